//! The real tesserad process (filled in by the daemon tests).
pub struct Daemon;
