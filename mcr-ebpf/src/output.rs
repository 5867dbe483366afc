//! The kernel path: the classifier writes each output of a rule itself and sends the copy
//! straight to the output interface's egress, with no socket, no copy to user space and no
//! route lookup.
//!
//! Per output the packet is rewritten in place (Ethernet addresses, IPv4 source, destination,
//! TTL and, when the output sets one, DSCP; UDP destination port; with incremental checksum
//! updates) and cloned to the output
//! interface; the last output takes the packet itself (`bpf_redirect`), which spares a copy.
//! With local delivery the last output is cloned too and the original headers are put back, so
//! the host's own stack sees the packet as it arrived.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_redirect,
    macros::btf_map,
    programs::TcContext,
};
use mcr_common::{
    KEEP_DSCP, KernelOutput, KernelOutputs, MAX_OUTPUTS, MAX_RULE_OUTPUTS, MAX_RULES,
    OutputCounters,
};

/// `BPF_F_NO_PREALLOC`: elements are freed after an RCU grace period, so a classifier that
/// holds a rule's output set while the supervisor replaces it keeps reading the old one whole.
const NO_PREALLOC: usize = 1;

#[btf_map]
static MCR_KERNEL_OUTPUTS: HashMap<u32, KernelOutputs, { MAX_RULES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
static MCR_OUTPUT_STATS: PerCpuArray<OutputCounters, { MAX_OUTPUTS as usize }> = PerCpuArray::new();

/// Where the headers of a matched packet lie, and their values as it arrived.
pub struct Packet {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the UDP header.
    pub l4: usize,
    /// UDP payload bytes, for the counters.
    pub payload: u64,
    pub fields: Fields,
}

/// The header fields an output rewrites, as the bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// Ethernet destination then source.
    pub macs: [u8; 12],
    /// IPv4 version/IHL and DSCP/ECN: the 16-bit word the header checksum sees.
    pub version_tos: [u8; 2],
    /// IPv4 TTL and protocol: the 16-bit word the header checksum sees.
    pub ttl_protocol: [u8; 2],
    pub source: [u8; 4],
    pub destination: [u8; 4],
    pub port: [u8; 2],
}

impl Fields {
    /// The fields of `output`, for a packet that arrived with `input`.
    fn of(output: &KernelOutput, input: &Self) -> Self {
        let mut macs = [0; 12];
        macs[..6].copy_from_slice(&output.destination_mac);
        macs[6..].copy_from_slice(&output.source_mac);
        let [version_ihl, tos] = input.version_tos;
        let tos = if output.dscp == KEEP_DSCP {
            tos
        } else {
            (output.dscp << 2) | (tos & ECN_BITS)
        };
        Self {
            macs,
            version_tos: [version_ihl, tos],
            ttl_protocol: [output.ttl, input.ttl_protocol[1]],
            source: [
                output.source[0],
                output.source[1],
                output.source[2],
                output.source[3],
            ],
            destination: [
                output.destination[0],
                output.destination[1],
                output.destination[2],
                output.destination[3],
            ],
            port: output.port.to_be_bytes(),
        }
    }
}

/// The ECN bits of the DSCP/ECN byte: always the input's.
const ECN_BITS: u8 = 0b11;
const IP_VERSION_TOS: usize = 0;
const IP_CHECKSUM: usize = 10;
const IP_TTL: usize = 8;
const IP_SOURCE: usize = 12;
const IP_DESTINATION: usize = 16;
const UDP_PORT: usize = 2;
const UDP_CHECKSUM: usize = 6;

/// The output set of rule `slot`, if it runs on the kernel path.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows the map value's bounds only within one function"
)]
#[inline(always)]
pub fn outputs_of(slot: u32) -> Option<&'static KernelOutputs> {
    // SAFETY: hash map values are not preallocated (`NO_PREALLOC`): a value the supervisor
    // replaces is freed only after an RCU grace period, which outlasts this program run.
    MCR_KERNEL_OUTPUTS
        .get_ptr(slot)
        .map(|outputs| unsafe { &*outputs })
}

/// Sends `packet` to every output of `outputs` and returns the program's verdict: the packet
/// is consumed (redirected to the last output), or, with `local_delivery`, passed on as it
/// arrived.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
pub fn relay(
    ctx: &TcContext,
    packet: &Packet,
    outputs: &KernelOutputs,
    local_delivery: bool,
) -> i32 {
    let count = outputs.count as usize;
    let mut current = packet.fields;
    for index in 0..MAX_RULE_OUTPUTS {
        if index >= count {
            break;
        }
        let output = &outputs.outputs[index];
        let wanted = Fields::of(output, &packet.fields);
        if rewrite(ctx, packet, &mut current, &wanted).is_err() {
            count_output(output.counter, |c| c.errors += 1);
            continue;
        }
        if index + 1 == count && !local_delivery {
            count_output(output.counter, |c| {
                c.packets += 1;
                c.bytes += packet.payload;
            });
            // SAFETY: a plain helper call; it only records where the packet goes next.
            let verdict = unsafe { bpf_redirect(output.ifindex, 0) };
            // `TC_ACT_REDIRECT`, or `TC_ACT_SHOT` when the flags are bad.
            return i32::try_from(verdict).unwrap_or(TC_ACT_SHOT);
        }
        match ctx.clone_redirect(output.ifindex, 0) {
            Ok(()) => count_output(output.counter, |c| {
                c.packets += 1;
                c.bytes += packet.payload;
            }),
            Err(_) => count_output(output.counter, |c| c.errors += 1),
        }
    }
    if local_delivery {
        if rewrite(ctx, packet, &mut current, &packet.fields).is_err() {
            // Half-restored headers must not reach the host's stack.
            return TC_ACT_SHOT;
        }
        return TC_ACT_UNSPEC;
    }
    TC_ACT_SHOT
}

/// Rewrites the packet's headers from `current` to `wanted`, fixing the IPv4 header checksum
/// and the UDP checksum incrementally (a UDP checksum of 0, "none", stays 0).
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    packet: &Packet,
    current: &mut Fields,
    wanted: &Fields,
) -> Result<(), i64> {
    let (l3, l4) = (packet.l3, packet.l4);
    if current.macs != wanted.macs {
        ctx.store(0, &wanted.macs, 0)?;
    }
    if current.version_tos != wanted.version_tos {
        let (from, to) = (word(current.version_tos), word(wanted.version_tos));
        ctx.l3_csum_replace(l3 + IP_CHECKSUM, from, to, 2)?;
        ctx.store(l3 + IP_VERSION_TOS, &wanted.version_tos, 0)?;
    }
    if current.ttl_protocol != wanted.ttl_protocol {
        let (from, to) = (word(current.ttl_protocol), word(wanted.ttl_protocol));
        ctx.l3_csum_replace(l3 + IP_CHECKSUM, from, to, 2)?;
        ctx.store(l3 + IP_TTL, &wanted.ttl_protocol, 0)?;
    }
    if current.source != wanted.source {
        address(ctx, l3 + IP_SOURCE, l3, l4, current.source, wanted.source)?;
    }
    if current.destination != wanted.destination {
        address(
            ctx,
            l3 + IP_DESTINATION,
            l3,
            l4,
            current.destination,
            wanted.destination,
        )?;
    }
    if current.port != wanted.port {
        let (from, to) = (word(current.port), word(wanted.port));
        ctx.l4_csum_replace(
            l4 + UDP_CHECKSUM,
            from,
            to,
            u64::from(BPF_F_MARK_MANGLED_0) | 2,
        )?;
        ctx.store(l4 + UDP_PORT, &wanted.port, 0)?;
    }
    *current = *wanted;
    Ok(())
}

/// Replaces the IPv4 address at `offset`: it counts in the IPv4 header checksum and, through
/// the pseudo-header, in the UDP checksum.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
fn address(
    ctx: &TcContext,
    offset: usize,
    l3: usize,
    l4: usize,
    from: [u8; 4],
    to: [u8; 4],
) -> Result<(), i64> {
    let (old, new) = (
        u64::from(u32::from_ne_bytes(from)),
        u64::from(u32::from_ne_bytes(to)),
    );
    ctx.l3_csum_replace(l3 + IP_CHECKSUM, old, new, 4)?;
    ctx.l4_csum_replace(
        l4 + UDP_CHECKSUM,
        old,
        new,
        u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | 4,
    )?;
    ctx.store(offset, &to, 0)
}

/// A 16-bit field as the checksum helpers take it: its bytes in memory order.
fn word(bytes: [u8; 2]) -> u64 {
    u64::from(u16::from_ne_bytes(bytes))
}

fn count_output(counter: u32, bump: impl FnOnce(&mut OutputCounters)) {
    if let Some(counters) = MCR_OUTPUT_STATS.get_ptr_mut(counter) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
        bump(unsafe { &mut *counters });
    }
}
