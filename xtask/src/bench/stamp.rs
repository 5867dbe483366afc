//! The stamp every generated frame carries for the latency measurement: the first
//! [`STAMP_LEN`] bytes of its UDP payload, written by the generator as it hands the frame's
//! batch to the kernel (big-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..4 | [`MAGIC`] |
//! | 4..8 | 1 when the frame is a latency sample (the generator asked the kernel for its send time, the sink's tap keeps it), else 0 |
//! | 8..16 | the frame's sequence number in its trial |
//! | 16..24 | when its batch was handed to the kernel, `CLOCK_MONOTONIC` nanoseconds |
//!
//! Every relay copies the payload untouched, so the sink reads what the generator wrote. The
//! UDP checksum is brought up to date with each stamp: the frame keeps the one's-complement sum
//! of everything but the stamp, and adds the stamp's words to it.

use anyhow::bail;

use super::frame::{Family, fold, sum_words};

/// Bytes of payload the stamp takes.
pub const STAMP_LEN: usize = 24;
/// The first word of a stamp: `MCRB`.
pub const MAGIC: u32 = 0x4d43_5242;

/// What a stamp says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub sampled: bool,
    pub sequence: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the frame's batch was handed to the kernel.
    pub sent_ns: u64,
}

impl Stamp {
    fn bytes(&self) -> [u8; STAMP_LEN] {
        let mut bytes = [0; STAMP_LEN];
        bytes[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        bytes[4..8].copy_from_slice(&u32::from(self.sampled).to_be_bytes());
        bytes[8..16].copy_from_slice(&self.sequence.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        bytes
    }

    /// The stamp at the start of `payload`, if it carries one.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(
                payload.get(at..at + 4)?.try_into().ok()?,
            ))
        };
        let long = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                payload.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        if word(0)? != MAGIC {
            return None;
        }
        Some(Self {
            sampled: word(4)? == 1,
            sequence: long(8)?,
            sent_ns: long(16)?,
        })
    }
}

/// A frame whose stamp is rewritten before every send.
#[derive(Clone, Debug)]
pub struct StampedFrame {
    bytes: Vec<u8>,
    /// Where the payload, and so the stamp, starts.
    payload_at: usize,
    /// Where the UDP checksum sits.
    checksum_at: usize,
    /// The unfolded one's-complement sum of the UDP pseudo-header, header (checksum zero) and
    /// payload with the stamp's bytes zero.
    sum_without_stamp: u32,
}

impl StampedFrame {
    /// Takes a frame as `FrameSpec::bytes` builds it (either family, no IP options or
    /// extension headers, payload of [`STAMP_LEN`] bytes or more).
    pub fn new(frame: Vec<u8>) -> anyhow::Result<Self> {
        let Some(family) = Family::of_frame(&frame) else {
            bail!("a frame that is neither IPv4 nor IPv6 cannot carry the latency stamp");
        };
        let payload_at = family.headers();
        let checksum_at = family.udp_at() + 6;
        if frame.len() < payload_at + STAMP_LEN {
            bail!(
                "a {}-byte frame has no room for the {STAMP_LEN}-byte latency stamp",
                frame.len()
            );
        }
        let mut blank = frame.clone();
        blank[checksum_at..checksum_at + 2].fill(0);
        blank[payload_at..payload_at + STAMP_LEN].fill(0);
        let udp = &blank[family.udp_at()..];
        let udp_len = u32::try_from(udp.len())?;
        let sum = sum_words(&blank[family.addresses()]) + 17 + udp_len + sum_words(udp);
        let mut frame = Self {
            bytes: frame,
            payload_at,
            checksum_at,
            sum_without_stamp: sum,
        };
        frame.stamp(&Stamp {
            sampled: false,
            sequence: 0,
            sent_ns: 0,
        });
        Ok(frame)
    }

    /// Writes `stamp` and the UDP checksum that goes with it.
    pub fn stamp(&mut self, stamp: &Stamp) {
        let bytes = stamp.bytes();
        self.bytes[self.payload_at..self.payload_at + STAMP_LEN].copy_from_slice(&bytes);
        let checksum = match !fold(self.sum_without_stamp + sum_words(&bytes)) {
            // RFC 768: a computed zero is sent as all ones.
            0 => 0xffff,
            sum => sum,
        };
        self.bytes[self.checksum_at..self.checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::bench::frame::{FILL, FrameSpec};

    fn frame_from(source: IpAddr, group: IpAddr, payload: usize) -> Vec<u8> {
        FrameSpec {
            source_mac: [0x1a, 0x55, 0x79, 0xa5, 0x53, 0x28],
            source,
            group,
            source_port: 4000,
            port: 5000,
            ttl: 32,
            payload,
        }
        .bytes()
        .expect("a frame")
    }

    fn frame(payload: usize) -> Vec<u8> {
        frame_from(
            Ipv4Addr::new(10, 1, 0, 1).into(),
            Ipv4Addr::new(239, 1, 1, 1).into(),
            payload,
        )
    }

    fn frame6(payload: usize) -> Vec<u8> {
        let source: Ipv6Addr = "fd00:1::1".parse().expect("an address");
        let group: Ipv6Addr = "ff0e::1:1".parse().expect("a group");
        frame_from(source.into(), group.into(), payload)
    }

    /// Whether `payload` past the stamp is the generator's fill.
    fn fill_intact(payload: &[u8]) -> bool {
        payload
            .get(STAMP_LEN..)
            .is_some_and(|rest| rest.iter().all(|&byte| byte == FILL))
    }

    fn udp_checksum_holds(frame: &[u8]) -> bool {
        let family = Family::of_frame(frame).expect("IP");
        let udp = &frame[family.udp_at()..];
        let pseudo =
            sum_words(&frame[family.addresses()]) + 17 + u32::try_from(udp.len()).expect("small");
        fold(pseudo + sum_words(udp)) == 0xffff
    }

    #[test]
    fn a_stamp_reads_back_and_keeps_the_checksum_valid() {
        type Build = fn(usize) -> Vec<u8>;
        let builders: [(Build, usize); 2] = [(frame, IPV4_PAYLOAD_AT), (frame6, IPV6_PAYLOAD_AT)];
        for (build, payload_at) in builders {
            for payload in [24, 64, 512, 1400] {
                let mut stamped = StampedFrame::new(build(payload)).expect("room for a stamp");
                for stamp in [
                    Stamp {
                        sampled: true,
                        sequence: 0,
                        sent_ns: 0,
                    },
                    Stamp {
                        sampled: false,
                        sequence: 123_456_789,
                        sent_ns: 987_654_321_012,
                    },
                    Stamp {
                        sampled: true,
                        sequence: u64::MAX,
                        sent_ns: u64::MAX,
                    },
                ] {
                    stamped.stamp(&stamp);
                    let bytes = stamped.bytes();
                    assert!(udp_checksum_holds(bytes), "payload {payload}, {stamp:?}");
                    assert_eq!(Stamp::parse(&bytes[payload_at..]), Some(stamp));
                    assert!(fill_intact(&bytes[payload_at..]));
                    // Only the payload's first bytes and the checksum changed.
                    let plain = build(payload);
                    let checksum_at = payload_at - 2;
                    assert_eq!(bytes[..checksum_at], plain[..checksum_at]);
                    assert_eq!(
                        bytes[payload_at + STAMP_LEN..],
                        plain[payload_at + STAMP_LEN..]
                    );
                }
            }
        }
    }

    const IPV4_PAYLOAD_AT: usize = 42;
    const IPV6_PAYLOAD_AT: usize = 62;

    #[test]
    fn a_payload_without_the_magic_has_no_stamp() {
        assert_eq!(Stamp::parse(&[0xa5; 64]), None);
        assert_eq!(Stamp::parse(&MAGIC.to_be_bytes()), None, "too short");
    }

    #[test]
    fn a_payload_too_short_for_a_stamp_is_refused() {
        assert!(StampedFrame::new(frame(STAMP_LEN - 1)).is_err());
        assert!(StampedFrame::new(frame6(STAMP_LEN - 1)).is_err());
    }
}
