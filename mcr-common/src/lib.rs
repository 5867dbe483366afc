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
/// Name of the socket filter on every worker's `AF_PACKET` socket.
pub const PROG_ADMIT: &str = "mcr_admit";
/// Name of the fanout program that picks the worker of a packet.
pub const PROG_STEER: &str = "mcr_steer";

/// Most workers one instance can run: the worker index has eight bits in the mark.
pub const MAX_WORKERS: u32 = 256;

/// `skb->mark` of a packet the classifier matched: `0x4d` ('M') in the top byte, the worker
/// that owns the rule in the next, the rule's counter slot in the low sixteen bits. The socket
/// filter admits only packets with the tag; the fanout program reads the worker from it.
pub const MARK_TAG: u32 = 0x4d00_0000;
const MARK_TAG_MASK: u32 = 0xff00_0000;

/// The mark for a packet of rule `slot`, owned by `worker`.
#[inline]
pub const fn steering_mark(worker: u32, slot: u32) -> u32 {
    MARK_TAG | ((worker & 0xff) << 16) | (slot & 0xffff)
}

/// Whether `mark` was set by the classifier.
#[inline]
pub const fn is_steering_mark(mark: u32) -> bool {
    mark & MARK_TAG_MASK == MARK_TAG
}

/// The worker index carried by a steering mark.
#[inline]
pub const fn mark_worker(mark: u32) -> u32 {
    (mark >> 16) & 0xff
}

/// What a rule matches: a UDP packet arriving on `ifindex` for `group:port`, from `source`
/// (or from anyone when `source` is `0.0.0.0`). The classifier's rule map and the workers'
/// route tables use the same key.
///
/// Addresses are kept as the four bytes on the wire so `bpftool` prints them as
/// `[239,1,1,1]`; the port is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
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

impl RuleKey {
    pub const fn new(ifindex: u32, group: [u8; 4], source: [u8; 4], port: u16) -> Self {
        Self {
            ifindex,
            group,
            source,
            port,
            pad: 0,
        }
    }

    /// The same key for any sender: what a packet falls back to when no rule names its source.
    #[must_use]
    pub const fn any_source(self) -> Self {
        Self {
            source: ANY_SOURCE,
            ..self
        }
    }
}

/// What the classifier needs to know about a matched rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSlot {
    /// Index of the rule's counters in `MCR_RULE_STATS`. Slots are stable for the life of a
    /// rule, so its counters survive reloads that do not change it.
    pub slot: u32,
    /// Index of the worker that forwards this rule; it goes into the packet's mark.
    pub worker: u32,
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

/// Name of the hash map from a rule's slot to its [`KernelOutputs`].
pub const MAP_KERNEL_OUTPUTS: &str = "MCR_KERNEL_OUTPUTS";
/// Name of the per-CPU array of [`OutputCounters`], indexed by [`KernelOutput::counter`].
pub const MAP_OUTPUT_STATS: &str = "MCR_OUTPUT_STATS";
/// Most outputs of one rule.
pub const MAX_RULE_OUTPUTS: usize = 64;
/// Most outputs (over all rules) one instance can hold: the size of `MCR_OUTPUT_STATS` and of
/// each worker's counter block.
pub const MAX_OUTPUTS: u32 = 16_384;

/// One output the classifier writes itself (the kernel path): the headers that differ from
/// the input packet's, and where the copy goes. Addresses are the bytes on the wire, the port
/// is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOutput {
    /// The output interface: the copy leaves through its egress.
    pub ifindex: u32,
    /// Index of the output's counters in `MCR_OUTPUT_STATS` (and in the owning worker's
    /// counter block: the same output counts in one place whichever path carried it).
    pub counter: u32,
    /// Ethernet destination: the group's MAC, or the unicast next hop's.
    pub destination_mac: [u8; 6],
    /// Ethernet source: the output interface's MAC.
    pub source_mac: [u8; 6],
    /// IPv4 source: the output interface's address.
    pub source: [u8; 4],
    pub destination: [u8; 4],
    pub port: u16,
    pub ttl: u8,
    /// Explicit padding, always zero.
    pub pad: u8,
}

/// The outputs of one rule on the kernel path. Replaced as one hash map element, so the
/// classifier sees either the old set or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOutputs {
    /// Outputs in use, at most [`MAX_RULE_OUTPUTS`].
    pub count: u32,
    /// Longest frame (Ethernet header included) that fits every output's MTU; a longer packet
    /// is handed to the rule's worker instead.
    pub max_frame: u32,
    pub outputs: [KernelOutput; MAX_RULE_OUTPUTS],
}

impl Default for KernelOutputs {
    fn default() -> Self {
        Self {
            count: 0,
            max_frame: 0,
            outputs: [KernelOutput::default(); MAX_RULE_OUTPUTS],
        }
    }
}

/// What the classifier sent for one output on the kernel path, on one CPU. Bytes are UDP
/// payload bytes, as everywhere else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Copies the kernel refused (`bpf_clone_redirect` failed, e.g. the interface is down).
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_carry_worker_and_slot() {
        let mark = steering_mark(3, MAX_RULES - 1);
        assert!(is_steering_mark(mark));
        assert_eq!(mark_worker(mark), 3);
        assert_eq!(mark & 0xffff, MAX_RULES - 1);
        assert!(!is_steering_mark(0));
        assert!(!is_steering_mark(0x0001_0000));
    }

    #[test]
    fn kernel_outputs_have_no_hidden_padding() {
        assert_eq!(size_of::<KernelOutput>(), 32);
        assert_eq!(size_of::<KernelOutputs>(), 8 + 32 * MAX_RULE_OUTPUTS);
        assert_eq!(size_of::<OutputCounters>(), 24);
    }
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOutput {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOutputs {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutputCounters {}
}
