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
    /// Index of the worker that forwards this rule; it goes into the packet's mark.
    pub worker: u32,
    /// Lowest IPv4 TTL the rule relays; packets below it are counted in
    /// [`RuleCounters::below_min_ttl`] and left alone. 0 (the default) relays any TTL.
    pub min_ttl: u8,
    /// Explicit padding, always zero.
    pub pad: [u8; 3],
}

/// Ingress counters of one rule on one CPU. Bytes are UDP payload bytes, the figure that
/// egress counters use too, so ingress and egress rates compare directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets steered to the rule's worker.
    pub packets: u64,
    pub bytes: u64,
    /// Packets of the rule that arrived with a TTL below its `min_ttl`: not relayed.
    pub below_min_ttl: u64,
}

impl core::ops::Add for RuleCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            below_min_ttl: self.below_min_ttl + other.below_min_ttl,
        }
    }
}

/// Multicast UDP over IPv4 seen on a classified interface that the relay does not take, by
/// reason. Such packets pass on untouched and are counted for no rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipCounters {
    /// Headers that contradict themselves or the packet (IHL, length fields).
    pub malformed: u64,
    /// IP fragments: the relay forwards whole datagrams only.
    pub fragments: u64,
    /// Frames with an 802.1Q or 802.1AD tag, in the data or taken into the skb by the
    /// receive path: they belong to a VLAN interface, which needs a rule of its own.
    pub vlan: u64,
    /// Frames addressed to another host's unicast MAC (`PACKET_OTHERHOST`).
    pub other_host: u64,
    /// IPv4 header checksum does not add up.
    pub bad_checksum: u64,
    /// TTL 0: no router may have passed it on.
    pub ttl_zero: u64,
    /// A source no sender can have: 0.0.0.0/8, 127.0.0.0/8, multicast, 255.255.255.255.
    pub bad_source: u64,
}

impl core::ops::Add for SkipCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            malformed: self.malformed + other.malformed,
            fragments: self.fragments + other.fragments,
            vlan: self.vlan + other.vlan,
            other_host: self.other_host + other.other_host,
            bad_checksum: self.bad_checksum + other.bad_checksum,
            ttl_zero: self.ttl_zero + other.ttl_zero,
            bad_source: self.bad_source + other.bad_source,
        }
    }
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
    fn counters_add_field_by_field() {
        let a = SkipCounters {
            malformed: 1,
            fragments: 2,
            vlan: 3,
            other_host: 4,
            bad_checksum: 5,
            ttl_zero: 6,
            bad_source: 7,
        };
        let doubled = SkipCounters {
            malformed: 2,
            fragments: 4,
            vlan: 6,
            other_host: 8,
            bad_checksum: 10,
            ttl_zero: 12,
            bad_source: 14,
        };
        assert_eq!(a + a, doubled);
        let r = RuleCounters {
            packets: 1,
            bytes: 10,
            below_min_ttl: 2,
        };
        assert_eq!(
            r + r,
            RuleCounters {
                packets: 2,
                bytes: 20,
                below_min_ttl: 4
            }
        );
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
}
