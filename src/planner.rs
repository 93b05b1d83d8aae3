//! Plan one sync.
