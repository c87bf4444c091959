//! ironlab-worker
pub mod images;
pub mod pool;
