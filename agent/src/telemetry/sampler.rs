//! The sampling thread (to be written).
