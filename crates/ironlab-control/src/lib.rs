//! ironlab-control
