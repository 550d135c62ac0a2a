//! The real probes (to be written).
