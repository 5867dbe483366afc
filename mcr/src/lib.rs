//! MCR, a multicast relay for Linux: the supervisor, the CLI and their building blocks.
pub mod bpf;
pub mod cli;
pub mod command;
pub mod config;
pub mod control;
pub mod counters;
pub mod flow;
pub mod metrics;
pub mod packet;
pub mod sockets;
pub mod state;
pub mod stats;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod worker;
