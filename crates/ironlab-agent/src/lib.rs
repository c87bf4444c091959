//! ironlab-agent
