//! Assertions on what a receiver got.

use std::net::Ipv4Addr;

use anyhow::ensure;

use crate::{Datagram, Netns, Stream, send_udp};

/// What the relay should have put on the wire for a stream.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub destination: Ipv4Addr,
    pub source: Ipv4Addr,
    pub ttl: u8,
}

/// Checks that `received` is exactly `stream`: every datagram, in order, once, with the
/// same payload, sent to `expected.destination` from `expected.source` with `expected.ttl`.
pub fn assert_delivered(
    received: &[Datagram],
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
            datagram.payload == stream.payload(sequence),
            "payload {sequence} differs"
        );
        ensure!(
            datagram.destination == expected.destination,
            "sent to {}",
            datagram.destination
        );
        ensure!(
            *datagram.source.ip() == expected.source,
            "sent from {}",
            datagram.source
        );
        ensure!(
            datagram.ttl == expected.ttl,
            "TTL {} instead of {}",
            datagram.ttl,
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
