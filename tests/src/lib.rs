//! The harness of MCR's end-to-end tests: network namespaces joined by veth pairs, the real
//! `mcr` binary running inside them, traffic sent from a generator namespace, and guards that
//! clean everything up when a test ends, passes or fails.
//!
//! Every name a test creates starts with [`PREFIX`], so a sweep after the run can prove that
//! nothing was left behind. The tests need root.

mod check;
mod frame;
mod frame4;
mod frame6;
mod lab;
mod latency;
mod mcr;
mod netns;
mod path;
mod receiver;
mod receiver6;
mod traffic;

pub use check::{Arrived, Expected, assert_delivered, send_concurrently};
pub use frame::{ETH_P_8021AD, ETH_P_8021Q, OTHER_HOST_MAC, send_frames};
pub use frame4::Frame;
pub use frame6::Frame6;
/// IPv6 next-header values and helpers for IPv6 test frames.
pub mod ipv6 {
    pub use crate::frame6::{
        AUTHENTICATION, DESTINATION_OPTIONS, FRAGMENT, HOP_BY_HOP, ICMPV6, ROUTING, UDP,
        multicast_mac, pseudo_header_sum, udp_checksum,
    };
}
pub use lab::{
    GENERATOR, GENERATOR_2, GENERATOR6, GENERATOR6_2, Lab, RELAY_OUT0, RELAY_OUT1, RELAY6_OUT0,
    RELAY6_OUT1, RulesFile, SINK, SINK_2, SINK6, SINK6_2,
};
pub use latency::{Delays, SteadyStream, send_steady};
pub use mcr::{Launch, Mcr, mcr_binary};
pub use netns::{Netns, in_netns, run as run_tool, unique_name, veth};
pub use path::TestPath;
pub use receiver::{Datagram, Listener, Receiver, receive_message};
pub use receiver6::{Datagram6, Receiver6};
pub use traffic::{Stream, send_udp};

/// Prefix of every namespace, pin directory and control socket the tests create.
pub const PREFIX: &str = "mcrt-";

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until `read` returns `expected`, then makes sure it stays there a moment, so that a
/// counter that overshoots is caught too. On failure, returns what `read` last gave.
pub fn settles_at<T: PartialEq>(
    mut read: impl FnMut() -> Option<T>,
    expected: &T,
) -> Result<(), Option<T>> {
    wait_for(std::time::Duration::from_secs(3), || {
        read().filter(|value| value == expected)
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    match read() {
        Some(value) if value == *expected => Ok(()),
        other => Err(other),
    }
}
