//! IPv6 outputs. IPv6 has no header checksum; the UDP checksum covers both addresses through
//! the pseudo-header and follows them, and the port, incrementally.
//!
//! The UDP checksum is never 0 here: the classifier refuses IPv6 UDP without one. So
//! `BPF_F_MARK_MANGLED_0` never keeps a 0; what it does is write 0xffff where an update comes
//! out as 0, which RFC 8200 8.1 asks of a computed 0 (sent as 0, every receiver would drop the
//! copy).
//!
//! A NIC that checksums what it receives (`CHECKSUM_COMPLETE`) leaves a sum of the packet in
//! the skb, which the host's stack checks after local delivery and a receiving stack after a
//! redirect to a veth. The traffic class and the hop limit are in no checksum of the packet,
//! and an address's change is offset in the UDP checksum, which the helper's pseudo-header
//! update accounts for alone: those stores carry `BPF_F_RECOMPUTE_CSUM` to keep that sum true.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use mcr_common::{KEEP_DSCP, KernelOutput, ipv6::with_dscp};

use super::{Headers, Offsets, UDP_CHECKSUM, UDP_PORT, holds_ipv4, word};
use crate::classify::{Ipv6Header, read_into};

const IP_VERSION_CLASS: usize = 0;
const IP_NEXT_HEADER: usize = 6;
const IP_SOURCE: usize = 8;
const IP_DESTINATION: usize = 24;

/// The headers an IPv6 output rewrites, as the bytes on the wire.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Fields {
    /// Ethernet destination then source.
    macs: [u8; 12],
    ip: Ipv6Header,
    /// UDP destination port.
    port: [u8; 2],
}

impl Headers for Fields {
    #[expect(
        clippy::inline_always,
        reason = "the verifier follows packet offsets only within one function"
    )]
    #[inline(always)]
    fn read(ctx: &TcContext, at: Offsets) -> Option<Self> {
        let mut fields = Self::default();
        read_into(ctx, 0, &mut fields.macs).ok()?;
        read_into(ctx, at.l3, &mut fields.ip).ok()?;
        read_into(ctx, at.l4 + UDP_PORT, &mut fields.port).ok()?;
        Some(fields)
    }

    fn apply(&mut self, output: &KernelOutput) -> bool {
        if holds_ipv4(output) {
            return false;
        }
        self.macs[..6].copy_from_slice(&output.destination_mac);
        self.macs[6..].copy_from_slice(&output.source_mac);
        if output.dscp != KEEP_DSCP {
            self.ip.version_class = with_dscp(self.ip.version_class, output.dscp);
        }
        self.ip.hop_limit = output.ttl;
        self.ip.source = output.source;
        self.ip.destination = output.destination;
        self.port = output.port.to_be_bytes();
        true
    }

    #[expect(
        clippy::inline_always,
        reason = "the verifier follows packet offsets only within one function"
    )]
    #[inline(always)]
    fn rewrite(&self, ctx: &TcContext, at: Offsets, wanted: &Self) -> Result<(), i64> {
        let Offsets { l3, l4 } = at;
        let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
        if self.macs != wanted.macs {
            ctx.store(0, &wanted.macs, 0)?;
        }
        if self.ip.version_class != wanted.ip.version_class {
            ctx.store(l3 + IP_VERSION_CLASS, &wanted.ip.version_class, recompute)?;
        }
        if self.ip.hop_limit != wanted.ip.hop_limit {
            // With the next header: an aligned 16-bit word for the receive checksum.
            let word = [wanted.ip.next_header, wanted.ip.hop_limit];
            ctx.store(l3 + IP_NEXT_HEADER, &word, recompute)?;
        }
        address(ctx, at, IP_SOURCE, &self.ip.source, &wanted.ip.source)?;
        address(
            ctx,
            at,
            IP_DESTINATION,
            &self.ip.destination,
            &wanted.ip.destination,
        )?;
        if self.port != wanted.port {
            let (from, to) = (word(self.port), word(wanted.port));
            ctx.l4_csum_replace(
                l4 + UDP_CHECKSUM,
                from,
                to,
                u64::from(BPF_F_MARK_MANGLED_0) | 2,
            )?;
            ctx.store(l4 + UDP_PORT, &wanted.port, 0)?;
        }
        Ok(())
    }
}

/// Replaces the IPv6 address at `field` of the header, if it changes: each of its four 32-bit
/// words that differs counts in the UDP checksum through the pseudo-header.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
fn address(
    ctx: &TcContext,
    at: Offsets,
    field: usize,
    from: &[u8; 16],
    to: &[u8; 16],
) -> Result<(), i64> {
    let mut changed = false;
    for word in 0..4 {
        let bytes = |address: &[u8; 16]| {
            u32::from_ne_bytes([
                address[word * 4],
                address[word * 4 + 1],
                address[word * 4 + 2],
                address[word * 4 + 3],
            ])
        };
        let (old, new) = (bytes(from), bytes(to));
        if old != new {
            ctx.l4_csum_replace(
                at.l4 + UDP_CHECKSUM,
                u64::from(old),
                u64::from(new),
                u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | 4,
            )?;
            changed = true;
        }
    }
    if changed {
        ctx.store(at.l3 + field, to, u64::from(BPF_F_RECOMPUTE_CSUM))?;
    }
    Ok(())
}
