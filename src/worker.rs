//! Process one chunk.
