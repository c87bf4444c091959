//! ironlab
