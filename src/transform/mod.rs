//! Source rows to records (filled in below).
