//! The analytics API client (filled in below).
