//! A local analytics API with fault injection (filled in below).
