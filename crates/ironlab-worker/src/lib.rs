//! ironlab-worker
