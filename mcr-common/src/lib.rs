//! Types shared by MCR's eBPF classifier and its userspace supervisor.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout byte
//! for byte, and so `bpftool map dump` can print the fields by name from BTF.
#![no_std]

pub mod ipv6;

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

/// Name of the hash map from [`RuleKey6`] to [`RuleSlot`]: the IPv6 rules.
pub const MAP_RULES6: &str = "MCR_RULES6";

/// What an IPv6 rule matches: a UDP packet arriving on `ifindex` for `group:port`, from
/// `source` (or from anyone when `source` is `::`). Slots, counters and steering are shared
/// with the IPv4 rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct RuleKey6 {
    pub ifindex: u32,
    /// In host byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    pub group: [u8; 16],
    pub source: [u8; 16],
}

/// A source of `::` in a [`RuleKey6`]: the rule accepts any sender.
pub const ANY_SOURCE6: [u8; 16] = [0; 16];

impl RuleKey6 {
    pub const fn new(ifindex: u32, group: [u8; 16], source: [u8; 16], port: u16) -> Self {
        Self {
            ifindex,
            port,
            pad: 0,
            group,
            source,
        }
    }

    /// The same key for any sender.
    #[must_use]
    pub const fn any_source(self) -> Self {
        Self {
            source: ANY_SOURCE6,
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
    /// Lowest IPv4 TTL or IPv6 hop limit the rule relays; packets below it are counted in
    /// [`RuleCounters::below_min_ttl`] and left alone. 0 (the default) relays any TTL.
    pub min_ttl: u8,
    /// [`PATH_WORKER`] or [`PATH_KERNEL`]: who writes the rule's outputs.
    pub path: u8,
    /// [`RULE_LOCAL_DELIVERY`] or 0.
    pub flags: u8,
    /// Explicit padding, always zero.
    pub pad: u8,
}

/// [`RuleSlot::path`]: the classifier marks the rule's packets for its worker.
pub const PATH_WORKER: u8 = 0;
/// [`RuleSlot::path`]: the classifier writes the rule's outputs itself, from the rule's entry
/// in `MCR_KERNEL_OUTPUTS`.
pub const PATH_KERNEL: u8 = 1;
/// [`RuleSlot::flags`]: the host's own stack also gets the rule's packets, as they arrived.
pub const RULE_LOCAL_DELIVERY: u8 = 1;

/// Ingress counters of one rule on one CPU. Bytes are UDP payload bytes, the figure that
/// egress counters use too, so ingress and egress rates compare directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets the rule relays (on either path).
    pub packets: u64,
    pub bytes: u64,
    /// Packets of the rule that arrived with a TTL below its `min_ttl`: not relayed.
    pub below_min_ttl: u64,
    /// Packets of a kernel-path rule handed to its worker instead: longer than an output's
    /// MTU allows, or a segmentation offload aggregate.
    pub to_worker: u64,
    /// Packets of a worker-path rule dropped in the classifier because the rule's worker was
    /// behind by a full window ([`WorkerLoad`]): overload, shed before it cost more.
    pub shed: u64,
}

impl core::ops::Add for RuleCounters {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            below_min_ttl: self.below_min_ttl + other.below_min_ttl,
            to_worker: self.to_worker + other.to_worker,
            shed: self.shed + other.shed,
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
    /// A source no sender can have: 0.0.0.0/8, 127.0.0.0/8, multicast, 255.255.255.255; for
    /// IPv6 `::`, `::1` and multicast.
    pub bad_source: u64,
    /// IPv6 extension headers chained deeper than the classifier follows (hop-by-hop,
    /// routing and destination options, at most four), or ones it does not know.
    pub extension_headers: u64,
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
            extension_headers: self.extension_headers + other.extension_headers,
        }
    }
}

/// Name of the array of [`WorkerLoad`] pages, one per worker.
pub const MAP_WORKER_LOAD: &str = "MCR_WORKER_LOAD";

/// Bytes of one [`WorkerLoad`]: a page, so that each worker maps its own and nothing else.
pub const WORKER_LOAD_SIZE: usize = 4096;

/// How far behind one worker is: the classifier counts what it steers to the worker, the
/// worker counts what it has taken from its sockets (in its own page of the map, mapped into
/// its memory). When the difference reaches `window` the worker cannot keep up, and the
/// classifier drops the worker's packets at once (`shed`) instead of letting each cost a
/// socket enqueue only to overflow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Packets steered to the worker (the classifier adds, atomically).
    pub steered: u64,
    /// Packets the worker has taken from its sockets (the worker writes).
    pub taken: u64,
    /// Steered packets the worker will never take (lost before it could, such as those queued
    /// in a socket that closed): the worker sets it when it finds itself idle, so the backlog
    /// counts from zero again.
    pub forgiven: u64,
    /// Backlog at which the classifier sheds; 0 sheds nothing (the worker has not started).
    /// The worker writes the rules file's `settings.shed_window`, which its packet sockets are
    /// sized to hold, so shedding starts before a socket overflows.
    pub window: u64,
    /// Packets shed because this worker was behind (the classifier adds, atomically).
    pub shed: u64,
    /// Explicit padding to a page, always zero.
    pub pad: [u64; WORKER_LOAD_SIZE / 8 - 5],
}

impl WorkerLoad {
    /// Packets steered to the worker that it has not taken yet ([`backlog`]).
    #[must_use]
    pub const fn backlog(&self) -> u64 {
        backlog(self.steered, self.taken, self.forgiven)
    }
}

impl Default for WorkerLoad {
    fn default() -> Self {
        Self {
            steered: 0,
            taken: 0,
            forgiven: 0,
            window: 0,
            shed: 0,
            pad: [0; WORKER_LOAD_SIZE / 8 - 5],
        }
    }
}

/// How far behind a worker whose page reads `steered`, `taken` and `forgiven` is: the packets
/// steered to it and neither taken nor forgiven, counted in wrapping arithmetic and read as
/// signed. A backlog below zero (more taken or forgiven than steered, as the worker and the
/// classifier update their fields at different moments) is no backlog, not an enormous one.
#[must_use]
pub const fn backlog(steered: u64, taken: u64, forgiven: u64) -> u64 {
    let behind = steered
        .wrapping_sub(taken)
        .wrapping_sub(forgiven)
        .cast_signed();
    if behind > 0 {
        behind.cast_unsigned()
    } else {
        0
    }
}

/// Whether a worker whose page reads `steered`, `taken` and `forgiven` is a full `window`
/// behind ([`backlog`]), so that the classifier sheds its next packet. A window of 0 (the
/// worker has not started) sheds nothing.
#[must_use]
pub const fn window_full(steered: u64, taken: u64, forgiven: u64, window: u64) -> bool {
    window != 0 && backlog(steered, taken, forgiven) >= window
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
    /// Source address: the output interface's (an IPv4 address in the first four bytes; the
    /// kernel path writes outputs of the input's own family only).
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub port: u16,
    pub ttl: u8,
    /// DSCP (0-63) of the copies, or [`KEEP_DSCP`] to carry the input's. The ECN bits are
    /// always the input's.
    pub dscp: u8,
}

/// [`KernelOutput::dscp`]: the copies carry the input packet's DSCP.
pub const KEEP_DSCP: u8 = 0xff;

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
    /// Copies the kernel refused (`bpf_clone_redirect` failed, e.g. the interface is down),
    /// and packets not written because the output is of the other IP family than the input.
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_sheds_from_a_full_window_on_and_never_below_zero() {
        assert!(!window_full(100, 0, 0, 0), "no window, no shedding");
        assert!(!window_full(8191, 0, 0, 8192));
        assert!(window_full(8192, 0, 0, 8192));
        assert!(window_full(10_000, 1000, 500, 8192));
        assert!(!window_full(10_000, 1000, 900, 8192));
        // More taken or forgiven than steered: nothing is queued, whatever the difference.
        assert!(!window_full(1000, 1500, 0, 8192));
        assert!(!window_full(1000, 0, 6000, 8192));
        assert!(!window_full(1000, 900, 8000, 8192));
        // The counters wrap and the backlog still reads right.
        assert!(window_full(8191, u64::MAX, 0, 8192));
        assert!(!window_full(8190, u64::MAX, 0, 8192));
    }

    #[test]
    fn the_backlog_is_what_was_steered_and_neither_taken_nor_forgiven() {
        assert_eq!(backlog(10_000, 1000, 500), 8500);
        assert_eq!(backlog(1000, 1000, 0), 0);
        // More taken or forgiven than steered reads as nothing queued.
        assert_eq!(backlog(1000, 1500, 0), 0);
        assert_eq!(backlog(1000, 900, 8000), 0);
        // Across a wrap of the counters.
        assert_eq!(backlog(8191, u64::MAX, 0), 8192);
        let load = WorkerLoad {
            steered: 300,
            taken: 100,
            forgiven: 50,
            window: 8192,
            ..WorkerLoad::default()
        };
        assert_eq!(load.backlog(), 150);
    }

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
        assert_eq!(size_of::<KernelOutput>(), 56);
        assert_eq!(size_of::<KernelOutputs>(), 8 + 56 * MAX_RULE_OUTPUTS);
        assert_eq!(size_of::<RuleKey6>(), 40);
        assert_eq!(size_of::<OutputCounters>(), 24);
        assert_eq!(size_of::<WorkerLoad>(), WORKER_LOAD_SIZE);
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
            extension_headers: 8,
        };
        let doubled = SkipCounters {
            malformed: 2,
            fragments: 4,
            vlan: 6,
            other_host: 8,
            bad_checksum: 10,
            ttl_zero: 12,
            bad_source: 14,
            extension_headers: 16,
        };
        assert_eq!(a + a, doubled);
        let r = RuleCounters {
            packets: 1,
            bytes: 10,
            below_min_ttl: 2,
            to_worker: 3,
            shed: 4,
        };
        assert_eq!(
            r + r,
            RuleCounters {
                packets: 2,
                bytes: 20,
                below_min_ttl: 4,
                to_worker: 6,
                shed: 8,
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
    unsafe impl aya::Pod for super::RuleKey6 {}
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WorkerLoad {}
}
