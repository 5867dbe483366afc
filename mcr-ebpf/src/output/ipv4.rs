//! IPv4 outputs: the header checksum and the UDP checksum follow every change, incrementally
//! (a UDP checksum of 0, "none", stays 0).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use mcr_common::{KEEP_DSCP, KernelOutput};

use super::{Headers, Offsets, UDP_CHECKSUM, UDP_PORT, holds_ipv4, word};
use crate::classify::{Ipv4Header, read_into};

/// The ECN bits of the DSCP/ECN byte: always the input's.
const ECN_BITS: u8 = 0b11;
const IP_VERSION_TOS: usize = 0;
const IP_TTL: usize = 8;
const IP_CHECKSUM: usize = 10;
const IP_SOURCE: usize = 12;
const IP_DESTINATION: usize = 16;

/// The headers an IPv4 output rewrites, as the bytes on the wire (without IP options).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Fields {
    /// Ethernet destination then source.
    macs: [u8; 12],
    ip: Ipv4Header,
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
        if !holds_ipv4(output) {
            return false;
        }
        self.macs[..6].copy_from_slice(&output.destination_mac);
        self.macs[6..].copy_from_slice(&output.source_mac);
        if output.dscp != KEEP_DSCP {
            self.ip.tos = (output.dscp << 2) | (self.ip.tos & ECN_BITS);
        }
        self.ip.ttl = output.ttl;
        self.ip.source.copy_from_slice(&output.source[..4]);
        self.ip
            .destination
            .copy_from_slice(&output.destination[..4]);
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
        let (ip, wanted_ip) = (&self.ip, &wanted.ip);
        if self.macs != wanted.macs {
            ctx.store(0, &wanted.macs, 0)?;
        }
        if ip.tos != wanted_ip.tos {
            // The 16-bit words the header checksum sees.
            let from = word([ip.version_ihl, ip.tos]);
            let to = [wanted_ip.version_ihl, wanted_ip.tos];
            ctx.l3_csum_replace(l3 + IP_CHECKSUM, from, word(to), 2)?;
            ctx.store(l3 + IP_VERSION_TOS, &to, 0)?;
        }
        if ip.ttl != wanted_ip.ttl {
            let from = word([ip.ttl, ip.protocol]);
            let to = [wanted_ip.ttl, wanted_ip.protocol];
            ctx.l3_csum_replace(l3 + IP_CHECKSUM, from, word(to), 2)?;
            ctx.store(l3 + IP_TTL, &to, 0)?;
        }
        if ip.source != wanted_ip.source {
            address(ctx, at, IP_SOURCE, ip.source, wanted_ip.source)?;
        }
        if ip.destination != wanted_ip.destination {
            address(
                ctx,
                at,
                IP_DESTINATION,
                ip.destination,
                wanted_ip.destination,
            )?;
        }
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

/// Replaces the IPv4 address at `field` of the header: it counts in the IPv4 header checksum
/// and, through the pseudo-header, in the UDP checksum.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
fn address(
    ctx: &TcContext,
    at: Offsets,
    field: usize,
    from: [u8; 4],
    to: [u8; 4],
) -> Result<(), i64> {
    let (old, new) = (
        u64::from(u32::from_ne_bytes(from)),
        u64::from(u32::from_ne_bytes(to)),
    );
    ctx.l3_csum_replace(at.l3 + IP_CHECKSUM, old, new, 4)?;
    ctx.l4_csum_replace(
        at.l4 + UDP_CHECKSUM,
        old,
        new,
        u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | 4,
    )?;
    ctx.store(at.l3 + field, &to, 0)
}
