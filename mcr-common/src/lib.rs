//! Types shared by MCR's eBPF classifier and its userspace supervisor.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout byte
//! for byte, and so `bpftool map dump` can print the fields by name from BTF.
#![no_std]

/// Most rules one instance can hold: the size of the rule map and of the counter array.
pub const MAX_RULES: u32 = 4096;

/// Name of the hash map from [`RuleKey`] to [`RuleSlot`].
pub const MAP_RULES: &str = "MCR_RULES";
/// Name of the per-CPU array of [`RuleCounters`], indexed by [`RuleSlot::slot`].
pub const MAP_RULE_STATS: &str = "MCR_RULE_STATS";
/// Name of the single-entry per-CPU array of [`SkipCounters`].
pub const MAP_SKIPS: &str = "MCR_SKIPS";
/// Name of the ingress classifier program.
pub const PROG_CLASSIFIER: &str = "mcr_classify";

/// What a rule matches: a UDP packet arriving on `ifindex` for `group:port`, from `source`
/// (or from anyone when `source` is `0.0.0.0`).
///
/// Addresses are kept as the four bytes on the wire so `bpftool` prints them as
/// `[239,1,1,1]`; the port is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub ifindex: u32,
    pub group: [u8; 4],
    pub source: [u8; 4],
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// A source of `0.0.0.0` in a [`RuleKey`]: the rule accepts any sender.
pub const ANY_SOURCE: [u8; 4] = [0; 4];

/// What the classifier needs to know about a matched rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSlot {
    /// Index of the rule's counters in `MCR_RULE_STATS`. Slots are stable for the life of a
    /// rule, so its counters survive reloads that do not change it.
    pub slot: u32,
    /// Reserved for steering (the worker that owns the flow); zero for now.
    pub flags: u32,
}

/// Ingress counters of one rule on one CPU. Bytes are UDP payload bytes, the figure that
/// egress counters use too, so ingress and egress rates compare directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Multicast IPv4 packets seen on a classified interface that no rule can take, by reason.
/// They pass on untouched; these counters say why they were not relayed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipCounters {
    /// UDP to a multicast group with a header that contradicts the packet (length fields).
    pub malformed: u64,
    /// IP fragments to a multicast group: the relay forwards whole datagrams only.
    pub fragments: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four are `#[repr(C)]` plain integers and byte arrays with the padding spelled
    // out as fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SkipCounters {}
}
