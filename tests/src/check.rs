//! Assertions on what a receiver got.

use std::net::IpAddr;

use anyhow::ensure;

use crate::{Datagram, Datagram6, Netns, Stream, send_udp};

/// What the relay should have put on the wire for a stream.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub destination: IpAddr,
    pub source: IpAddr,
    /// TTL, or hop limit.
    pub ttl: u8,
}

/// A datagram as a receiver of either family recorded it.
pub trait Arrived {
    fn sequence(&self) -> Option<u64>;
    fn payload(&self) -> &[u8];
    fn destination(&self) -> IpAddr;
    fn source(&self) -> IpAddr;
    /// TTL, or hop limit.
    fn ttl(&self) -> u8;
}

impl Arrived for Datagram {
    fn sequence(&self) -> Option<u64> {
        Datagram::sequence(self)
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn destination(&self) -> IpAddr {
        self.destination.into()
    }
    fn source(&self) -> IpAddr {
        (*self.source.ip()).into()
    }
    fn ttl(&self) -> u8 {
        self.ttl
    }
}

impl Arrived for Datagram6 {
    fn sequence(&self) -> Option<u64> {
        Datagram6::sequence(self)
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn destination(&self) -> IpAddr {
        self.destination.into()
    }
    fn source(&self) -> IpAddr {
        (*self.source.ip()).into()
    }
    fn ttl(&self) -> u8 {
        self.hop_limit
    }
}

/// Checks that `received` is exactly `stream`: every datagram, in order, once, with the
/// same payload, sent to `expected.destination` from `expected.source` with `expected.ttl`.
pub fn assert_delivered(
    received: &[impl Arrived],
    stream: &Stream,
    expected: Expected,
) -> anyhow::Result<()> {
    ensure!(
        received.len() as u64 == stream.count,
        "{} of {} datagrams arrived at {}",
        received.len(),
        stream.count,
        expected.destination
    );
    for (sequence, datagram) in (0..stream.count).zip(received) {
        ensure!(
            datagram.sequence() == Some(sequence),
            "datagram {sequence} out of order or duplicated: got {:?}",
            datagram.sequence()
        );
        ensure!(
            datagram.payload() == stream.payload(sequence),
            "payload {sequence} differs"
        );
        ensure!(
            datagram.destination() == expected.destination,
            "sent to {}",
            datagram.destination()
        );
        ensure!(
            datagram.source() == expected.source,
            "sent from {}",
            datagram.source()
        );
        ensure!(
            datagram.ttl() == expected.ttl,
            "TTL {} instead of {}",
            datagram.ttl(),
            expected.ttl
        );
    }
    Ok(())
}

/// Sends `streams` from `threads` senders at once, each taking its share in turn.
pub fn send_concurrently(
    generator: &Netns,
    streams: &[Stream],
    threads: usize,
) -> anyhow::Result<()> {
    let per_thread = streams.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let senders: Vec<_> = streams
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .try_for_each(|stream| send_udp(generator, stream))
                })
            })
            .collect();
        senders.into_iter().try_for_each(|sender| {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))?
        })
    })
}
