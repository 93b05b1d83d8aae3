//! Reading the Django tables (filled in below).
