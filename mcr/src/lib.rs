//! MCR, a multicast relay for Linux: the supervisor, the CLI and their building blocks.
pub mod bpf;
pub mod cli;
pub mod config;
pub mod control;
pub mod stats;
pub mod supervisor;
