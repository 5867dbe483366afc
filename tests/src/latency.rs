//! Latency in the end-to-end tests: a steady stream of datagrams stamped with their send time,
//! and the one-way delay of each, from that stamp to the sink's kernel receiving it.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nix::time::{ClockId, clock_gettime};

use crate::{Datagram, Netns, in_netns};

/// `count` datagrams of `payload_len` bytes to `group:port`, evenly spaced at `rate` per
/// second. Each payload carries its sequence number (bytes 0..8) and the `CLOCK_MONOTONIC` time
/// it was handed to the socket (bytes 8..16, nanoseconds), both big-endian, then 0xa5.
#[derive(Clone, Debug)]
pub struct SteadyStream {
    pub destination: Ipv4Addr,
    pub port: u16,
    pub payload_len: usize,
    pub count: u64,
    pub rate: f64,
}

impl SteadyStream {
    pub fn new(
        destination: Ipv4Addr,
        port: u16,
        payload_len: usize,
        count: u64,
        rate: f64,
    ) -> Self {
        Self {
            destination,
            port,
            payload_len: payload_len.max(16),
            count,
            rate,
        }
    }

    fn payload(&self, sequence: u64, sent: Duration) -> Vec<u8> {
        let mut payload = vec![0xa5_u8; self.payload_len];
        payload[..8].copy_from_slice(&sequence.to_be_bytes());
        let nanos = u64::try_from(sent.as_nanos()).unwrap_or(u64::MAX);
        payload[8..16].copy_from_slice(&nanos.to_be_bytes());
        payload
    }
}

fn monotonic() -> anyhow::Result<Duration> {
    Ok(Duration::from(
        clock_gettime(ClockId::CLOCK_MONOTONIC).context("reading CLOCK_MONOTONIC")?,
    ))
}

/// Sends `stream` from inside `netns`, each datagram when it is due (a sender that fell behind
/// catches up at once), stamped just before it goes to the socket.
pub fn send_steady(netns: &Netns, stream: &SteadyStream) -> anyhow::Result<()> {
    in_netns(netns, || -> anyhow::Result<()> {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_multicast_ttl_v4(8)?;
        let destination = SocketAddrV4::new(stream.destination, stream.port);
        let start = Instant::now();
        for sequence in 0..stream.count {
            let due = start + Duration::from_secs_f64(sequence as f64 / stream.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let payload = stream.payload(sequence, monotonic()?);
            socket
                .send_to(&payload, destination)
                .with_context(|| format!("sending to {destination}"))?;
        }
        Ok(())
    })?
}

impl Datagram {
    /// When the sender stamped it (a [`SteadyStream`]'s datagram), on `CLOCK_MONOTONIC`.
    pub fn sent_at(&self) -> Option<Duration> {
        let bytes: [u8; 8] = self.payload.get(8..16)?.try_into().ok()?;
        Some(Duration::from_nanos(u64::from_be_bytes(bytes)))
    }

    /// From the sender's stamp to the sink's kernel receiving it. The arrival is turned from
    /// realtime into monotonic time with readings of both clocks up to a microsecond apart, so a
    /// relay that took less than that can show arriving just before it left: zero.
    pub fn one_way_delay(&self) -> Option<Duration> {
        Some(self.arrived?.saturating_sub(self.sent_at()?))
    }
}

/// The one-way delays of a stream's datagrams.
#[derive(Clone, Debug)]
pub struct Delays {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The sequence number of the slowest.
    pub slowest: u64,
}

impl Delays {
    /// The delays of every datagram in `received`; fails if one has no stamp or no arrival
    /// time (a delay that cannot be measured cannot be bounded).
    pub fn of(received: &[Datagram]) -> anyhow::Result<Self> {
        let mut delays = Vec::with_capacity(received.len());
        for datagram in received {
            let delay = datagram.one_way_delay().with_context(|| {
                format!(
                    "datagram {:?} has no send stamp or arrival time (sent {:?}, arrived {:?})",
                    datagram.sequence(),
                    datagram.sent_at(),
                    datagram.arrived
                )
            })?;
            delays.push((delay, datagram.sequence().unwrap_or(u64::MAX)));
        }
        ensure!(!delays.is_empty(), "no datagram to measure");
        delays.sort_unstable();
        let rank = |q: f64| {
            // Nearest rank; in range for any count below 2^53.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let index = ((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len()) - 1;
            delays[index].0
        };
        let (max, slowest) = delays[delays.len() - 1];
        Ok(Self {
            count: delays.len(),
            p50: rank(0.5),
            p99: rank(0.99),
            max,
            slowest,
        })
    }
}

impl fmt::Display for Delays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} datagrams, one-way delay p50 {:?}, p99 {:?}, max {:?} (datagram {})",
            self.count, self.p50, self.p99, self.max, self.slowest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(stream: &SteadyStream, sequence: u64, sent_us: u64, arrived_us: u64) -> Datagram {
        Datagram {
            source: SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1), 4000),
            destination: stream.destination,
            ttl: 64,
            tos: 0,
            payload: stream.payload(sequence, Duration::from_micros(sent_us)),
            arrived: Some(Duration::from_micros(arrived_us)),
        }
    }

    #[test]
    fn delays_run_from_the_stamp_to_the_arrival() {
        let stream = SteadyStream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 100, 100, 1000.0);
        let mut received: Vec<Datagram> = (0..100)
            .map(|k| datagram(&stream, k, 1000 * k, 1000 * k + 20))
            .collect();
        received[42] = datagram(&stream, 42, 42_000, 142_000);
        let delays = Delays::of(&received).expect("all measurable");
        assert_eq!(delays.count, 100);
        assert_eq!(delays.p50, Duration::from_micros(20));
        assert_eq!(delays.max, Duration::from_millis(100));
        assert_eq!(delays.slowest, 42);
        received[7].arrived = None;
        assert!(Delays::of(&received).is_err(), "an unmeasurable datagram");
    }
}
