//! IPv6 header facts the classifier decides on, written once for every reader of an IPv6
//! frame: where UDP starts behind the extension headers, which sources no sender can have, and
//! where the traffic class lies.
//!
//! Everything here is `no_std`, allocation-free and `#[inline(always)]`: the eBPF verifier
//! follows packet offsets only within one function.

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// Extension headers the classifier follows before UDP, at most. Hop-by-hop options, a routing
/// header and destination options before and after it are three; a fourth leaves room for
/// what a sender adds, while a chain deeper than that is not a stream anyone relays.
pub const MAX_EXTENSION_HEADERS: usize = 4;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DESTINATION_OPTIONS: u8 = 60;
const UDP: u8 = 17;

// Extension headers the classifier does not follow: the rest of IANA's "IPv6 Extension
// Header Types". UDP may be behind any of them, so they are counted rather than ignored.
const ESP: u8 = 50;
const AUTHENTICATION: u8 = 51;
const MOBILITY: u8 = 135;
const HOST_IDENTITY: u8 = 139;
const SHIM6: u8 = 140;
const EXPERIMENTAL: u8 = 253;
const EXPERIMENTAL_2: u8 = 254;

/// What the chain of next headers of an IPv6 packet leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP at `offset`. `routed`: a routing header came before it.
    Udp { offset: usize, routed: bool },
    /// Another upper-layer protocol (`ICMPv6`, TCP, "no next header", …): not UDP at all.
    NotUdp,
    /// A fragment header.
    Fragment,
    /// Still extension headers after [`MAX_EXTENSION_HEADERS`] of them.
    TooDeep,
    /// An extension header the classifier does not follow.
    Unfollowed,
    /// Hop-by-hop options anywhere but first, which IPv6 forbids.
    MisplacedHopByHop,
    /// An extension header that does not fit in the frame.
    Truncated,
}

impl Transport {
    /// Whether the packet can be UDP: it is, or a header that hides it stops the walk.
    pub const fn may_be_udp(self) -> bool {
        !matches!(self, Self::NotUdp)
    }
}

/// Follows the next-header chain of an IPv6 packet whose fixed header has `next_header` and
/// whose first extension header, if any, starts at `offset`. `read(offset)` returns the first
/// two bytes of the extension header there (its next header and its length in 8-byte units
/// after the first eight), or `None` when the frame ends before them.
///
/// Walks hop-by-hop options (first only), routing headers and destination options; stops at
/// UDP, at any other upper-layer protocol, at a fragment header, at an extension header it
/// does not follow, and after [`MAX_EXTENSION_HEADERS`] headers. Each step is a constant-bound
/// iteration with an offset that grows by at most 2 KiB, which the verifier can follow.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows packet offsets only within one function"
)]
#[inline(always)]
pub fn find_udp(
    next_header: u8,
    offset: usize,
    mut read: impl FnMut(usize) -> Option<[u8; 2]>,
) -> Transport {
    let mut next = next_header;
    let mut offset = offset;
    let mut routed = false;
    for depth in 0..=MAX_EXTENSION_HEADERS {
        match next {
            UDP => return Transport::Udp { offset, routed },
            FRAGMENT => return Transport::Fragment,
            HOP_BY_HOP if depth > 0 => return Transport::MisplacedHopByHop,
            HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS => {
                if depth == MAX_EXTENSION_HEADERS {
                    return Transport::TooDeep;
                }
                let Some([following, length]) = read(offset) else {
                    return Transport::Truncated;
                };
                routed |= next == ROUTING;
                next = following;
                offset += (usize::from(length) + 1) * 8;
            }
            ESP | AUTHENTICATION | MOBILITY | HOST_IDENTITY | SHIM6 | EXPERIMENTAL
            | EXPERIMENTAL_2 => return Transport::Unfollowed,
            _ => return Transport::NotUdp,
        }
    }
    // The last iteration returns in every arm that does not walk, and walking is refused there.
    Transport::TooDeep
}

/// Sources no sender of UDP can have: the unspecified address `::`, loopback `::1` (the
/// kernel refuses it from any interface but `lo`) and any multicast address.
pub const fn impossible_source(source: &[u8; 16]) -> bool {
    if source[0] == 0xff {
        return true;
    }
    let mut i = 0;
    while i < 15 {
        if source[i] != 0 {
            return false;
        }
        i += 1;
    }
    source[15] <= 1
}

/// The scope of a multicast `group` (RFC 4291 2.7): its low nibble of the second byte.
pub const fn multicast_scope(group: &[u8; 16]) -> u8 {
    group[1] & 0x0f
}

/// Whether a packet to a group of `scope` can come from a link: not with 0 (reserved) or 1
/// (interface-local), which the kernel drops on input.
pub const fn may_arrive_on_a_link(scope: u8) -> bool {
    scope > 1
}

/// The first two bytes of an IPv6 header (version, traffic class, the top of the flow label)
/// with the DSCP of the traffic class set to `dscp`; the version, the ECN bits and the flow
/// label stay.
pub const fn with_dscp(version_class: [u8; 2], dscp: u8) -> [u8; 2] {
    let [high, low] = version_class;
    let class = (high << 4) | (low >> 4);
    let class = (dscp << 2) | (class & 0b11);
    [(high & 0xf0) | (class >> 4), (class << 4) | (low & 0x0f)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extension headers laid out from offset 0: `(next header, total length in bytes)`.
    fn chain(headers: &[(u8, usize)]) -> impl FnMut(usize) -> Option<[u8; 2]> {
        let mut bytes = [0_u8; 4096];
        let mut at = 0;
        for &(next, len) in headers {
            bytes[at] = next;
            bytes[at + 1] = u8::try_from(len / 8 - 1).expect("length in 8-byte units");
            at += len;
        }
        move |offset| (offset + 2 <= at).then(|| [bytes[offset], bytes[offset + 1]])
    }

    #[test]
    fn udp_right_after_the_fixed_header() {
        assert_eq!(
            find_udp(UDP, 54, chain(&[])),
            Transport::Udp {
                offset: 54,
                routed: false
            }
        );
    }

    #[test]
    fn udp_behind_the_followed_extension_headers_is_found_at_its_offset() {
        // Hop-by-hop (8), destination options (24), routing (16), destination options (8).
        let walk = find_udp(
            HOP_BY_HOP,
            0,
            chain(&[
                (DESTINATION_OPTIONS, 8),
                (ROUTING, 24),
                (DESTINATION_OPTIONS, 16),
                (UDP, 8),
            ]),
        );
        assert_eq!(
            walk,
            Transport::Udp {
                offset: 56,
                routed: true
            }
        );
        let walk = find_udp(DESTINATION_OPTIONS, 0, chain(&[(UDP, 2048)]));
        assert_eq!(
            walk,
            Transport::Udp {
                offset: 2048,
                routed: false
            },
            "the longest extension header"
        );
    }

    #[test]
    fn a_chain_past_the_bound_is_too_deep() {
        let five = [(DESTINATION_OPTIONS, 8); 4];
        assert_eq!(
            find_udp(DESTINATION_OPTIONS, 0, chain(&five)),
            Transport::TooDeep
        );
        // Four headers, then UDP: still within the bound.
        let mut four = [(DESTINATION_OPTIONS, 8); 4];
        four[3].0 = UDP;
        assert!(matches!(
            find_udp(DESTINATION_OPTIONS, 0, chain(&four)),
            Transport::Udp { offset: 32, .. }
        ));
    }

    #[test]
    fn fragments_unfollowed_extensions_and_other_protocols_stop_the_walk() {
        assert_eq!(find_udp(FRAGMENT, 0, chain(&[])), Transport::Fragment);
        assert_eq!(
            find_udp(HOP_BY_HOP, 0, chain(&[(FRAGMENT, 8)])),
            Transport::Fragment
        );
        for extension in [50, 51, 135, 139, 140, 253, 254] {
            assert_eq!(
                find_udp(extension, 0, chain(&[])),
                Transport::Unfollowed,
                "{extension}"
            );
        }
        // An MLD report: hop-by-hop (router alert), then ICMPv6.
        let mld = find_udp(HOP_BY_HOP, 0, chain(&[(58, 8)]));
        assert_eq!(mld, Transport::NotUdp);
        assert!(!mld.may_be_udp());
        assert_eq!(find_udp(6, 0, chain(&[])), Transport::NotUdp, "TCP");
        assert_eq!(
            find_udp(59, 0, chain(&[])),
            Transport::NotUdp,
            "no next header"
        );
    }

    #[test]
    fn broken_chains_are_told_apart() {
        let twice = find_udp(HOP_BY_HOP, 0, chain(&[(HOP_BY_HOP, 8), (UDP, 8)]));
        assert_eq!(twice, Transport::MisplacedHopByHop);
        // The second header starts where the frame ends.
        let truncated = find_udp(HOP_BY_HOP, 0, chain(&[(DESTINATION_OPTIONS, 8)]));
        assert_eq!(truncated, Transport::Truncated);
        assert!(truncated.may_be_udp());
    }

    fn address(text: &str) -> [u8; 16] {
        text.parse::<core::net::Ipv6Addr>()
            .expect("a test address")
            .octets()
    }

    #[test]
    fn impossible_sources() {
        for source in ["::", "::1", "ff02::1", "ff0e::1234"] {
            assert!(impossible_source(&address(source)), "{source}");
        }
        for source in ["::2", "fe80::1", "2001:db8::1", "::ffff:10.1.0.1", "fe00::"] {
            assert!(!impossible_source(&address(source)), "{source}");
        }
    }

    #[test]
    fn scopes() {
        assert_eq!(multicast_scope(&address("ff0e::1")), 14);
        assert_eq!(multicast_scope(&address("ff35::1")), 5);
        assert!(!may_arrive_on_a_link(multicast_scope(&address("ff00::1"))));
        assert!(!may_arrive_on_a_link(multicast_scope(&address("ff11::1"))));
        assert!(may_arrive_on_a_link(multicast_scope(&address("ff02::1"))));
    }

    #[test]
    fn dscp_goes_into_the_traffic_class_and_nothing_else_changes() {
        // Version 6, traffic class 0xb9 (DSCP 46, ECN 1), flow label 0x5_4321.
        let header = [0x6b, 0x95];
        assert_eq!(with_dscp(header, 46), header, "same DSCP");
        // DSCP 10 keeps ECN 1: traffic class 0x29.
        assert_eq!(with_dscp(header, 10), [0x62, 0x95]);
        assert_eq!(with_dscp(header, 0), [0x60, 0x15]);
        assert_eq!(with_dscp([0x60, 0x0f], 63), [0x6f, 0xcf]);
    }
}
