//! The generator's socket: a send-only `AF_PACKET` socket on the generator interface, opened
//! inside the generator's namespace and used from the benchmark's own thread.
//!
//! Its send buffer is made large (`SO_SNDBUFFORCE`) on purpose. A frame stays charged to the
//! sending socket until the receiving side takes it off the relay CPU's backlog, so with the
//! default buffer (about 160 frames) a relay whose CPU falls behind slows the generator down
//! instead of losing frames — no real multicast source waits for a relay. With the large
//! buffer, a relay that cannot keep up drops at its interface, where a NIC would.
//!
//! Every frame is stamped as it goes (`stamp.rs`), and latency samples ask the kernel for
//! their transmit timestamps, which come back on the socket's error queue
//! (`tx_timestamps.rs`).

use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use anyhow::{Context as _, bail};
use nix::{
    errno::Errno,
    libc,
    net::if_::if_nametoindex,
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, LinkAddr, SockFlag, SockType, SockaddrLike as _, bind, setsockopt, socket,
        sockopt::SndBufForce,
    },
    time::{ClockId, clock_gettime},
};

use super::{
    pacing::MAX_BATCH,
    stamp::{Stamp, StampedFrame},
    tx_timestamps::{self, ErrorQueueReader, TxStamp},
};

/// Send buffer of the generator's sockets: far more than a relay CPU's receive backlog
/// (`net.core.netdev_max_backlog`, 1000 frames) holds, at any frame size.
const SEND_BUFFER: usize = 32 << 20;

/// Whether frames go through the interface's qdisc (the `tbf` that paces them) or straight
/// to the driver (`PACKET_QDISC_BYPASS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qdisc {
    Through,
    Bypassed,
}

pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
    qdisc: Qdisc,
}

impl PacketSocket {
    /// Opens the socket on `interface` of namespace `netns` (a name under `/run/netns`).
    pub fn open(netns: &str, interface: &str, qdisc: Qdisc) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{netns}");
        let namespace = File::open(&path).with_context(|| format!("opening {path}"))?;
        // A socket belongs to the namespace it was created in, whichever thread uses it later;
        // only this short-lived thread enters the namespace.
        let fd = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<OwnedFd> {
                    setns(&namespace, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering {netns}"))?;
                    open_bound(interface, qdisc)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread opening a socket in {netns} panicked"))?
        })
        .with_context(|| format!("opening the generator's packet socket on {interface}"))?;
        Ok(Self {
            fd,
            interface: interface.to_owned(),
            qdisc,
        })
    }

    /// A sender of `frames` in round robin for one trial.
    pub fn sender(&self, frames: &[StampedFrame]) -> BatchSender<'_> {
        // Every batch is a window of this ring of messages, each with a copy of its frame to
        // stamp: the frames in round-robin order, long enough for a full batch from any
        // starting frame. Built once per trial, so a batch costs the stamps and the system
        // call alone, whatever the build's optimisation.
        let len = frames.len() + MAX_BATCH;
        let copies: Vec<StampedFrame> = frames.iter().cycle().take(len).cloned().collect();
        BatchSender {
            socket: self,
            streams: frames.len(),
            // SAFETY (both): `iovec` and `mmsghdr` are plain integers and pointers, for which
            // all zeros is a valid value; `send_round_robin` points them at live data first.
            vectors: vec![unsafe { std::mem::zeroed() }; len],
            messages: vec![unsafe { std::mem::zeroed() }; len],
            requests: vec![tx_timestamps::Request::new(0); len],
            frames: copies,
        }
    }

    /// Reads the transmit timestamps waiting on the socket's error queue into `out`.
    pub fn read_tx_timestamps(
        &self,
        reader: &mut ErrorQueueReader,
        out: &mut Vec<TxStamp>,
    ) -> anyhow::Result<usize> {
        reader.read(self.fd.as_fd(), out)
    }
}

/// What one batch handed to the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handed {
    /// Frames that left the generator (or were dropped by the driver, see
    /// [`BatchSender::send_round_robin`]).
    pub frames: usize,
    /// Of those, latency samples (their transmit timestamps follow on the error queue).
    pub samples: usize,
}

/// A ring of messages for `sendmmsg`, each with its own copy of a frame and its own
/// timestamp request; the pointers between them are set for each batch.
pub struct BatchSender<'s> {
    socket: &'s PacketSocket,
    streams: usize,
    frames: Vec<StampedFrame>,
    vectors: Vec<libc::iovec>,
    requests: Vec<tx_timestamps::Request>,
    messages: Vec<libc::mmsghdr>,
}

impl BatchSender<'_> {
    /// Sends the frames of the stream `first` (counted from the first frame of the trial) and
    /// after, round robin (`count` of them, at most [`MAX_BATCH`]), and returns how many left
    /// the generator. Each frame is stamped with its sequence number and the time of the
    /// batch (`CLOCK_MONOTONIC`, read just before the system call); with `sample_every`, the
    /// frames whose sequence number it divides are latency samples and ask the kernel for
    /// their transmit timestamp.
    ///
    /// `sendmmsg` stops at the first frame the kernel refuses, with `ENOBUFS`, and reports
    /// only the frames before it. Through the qdisc, that frame was refused by the qdisc (its
    /// queue is full) and never left: the caller sends it again later. With the qdisc
    /// bypassed, the driver took it and dropped it (the veth peer's receive backlog on the
    /// relay CPU was full, counted as `tx_dropped` / `rx_dropped`): it left the generator and
    /// was lost entering the relay, as on a wire.
    pub fn send_round_robin(
        &mut self,
        first: u64,
        count: usize,
        sample_every: Option<u64>,
    ) -> anyhow::Result<Handed> {
        let count = count.min(MAX_BATCH);
        if self.streams == 0 || count == 0 {
            return Ok(Handed::default());
        }
        // Below `streams`, which is a usize.
        #[allow(clippy::cast_possible_truncation)]
        let start = (first % self.streams as u64) as usize;
        let sent_ns = monotonic_ns()?;
        let mut sampled = [false; MAX_BATCH];
        for (offset, index) in (start..start + count).enumerate() {
            let sequence = first + offset as u64;
            let sample = sample_every.is_some_and(|every| sequence.is_multiple_of(every.max(1)));
            sampled[offset] = sample;
            let frame = &mut self.frames[index];
            frame.stamp(&Stamp {
                sampled: sample,
                sequence,
                sent_ns,
            });
            self.vectors[index] = libc::iovec {
                iov_base: frame.bytes().as_ptr().cast_mut().cast(),
                iov_len: frame.bytes().len(),
            };
            let header = &mut self.messages[index].msg_hdr;
            header.msg_iov = &raw mut self.vectors[index];
            header.msg_iovlen = 1;
            if sample {
                // The id is the sequence number's low 32 bits: a trial has fewer frames.
                #[allow(clippy::cast_possible_truncation)]
                let request = tx_timestamps::Request::new(sequence as u32);
                self.requests[index] = request;
                header.msg_control = self.requests[index].as_ptr().cast_mut().cast();
                header.msg_controllen = tx_timestamps::Request::len();
            } else {
                header.msg_control = std::ptr::null_mut();
                header.msg_controllen = 0;
            }
        }
        let window = &mut self.messages[start..start + count];
        // SAFETY: `window` is `count` initialised messages (the ring is `MAX_BATCH` longer than
        // `streams`, and `start < streams`), each pointing (just above) at its own I/O vector,
        // which points at its own frame, and at its own timestamp request or at none; all of
        // them live in `self` and are not touched until the call returns. The kernel reads
        // them and writes only `msg_len`.
        let sent = unsafe {
            libc::sendmmsg(
                self.socket.fd.as_raw_fd(),
                window.as_mut_ptr(),
                libc::c_uint::try_from(count)?,
                0,
            )
        };
        let accepted = match Errno::result(sent) {
            Ok(sent) => usize::try_from(sent)?,
            Err(Errno::ENOBUFS) => 0,
            Err(Errno::EINTR) => return Ok(Handed::default()),
            Err(error) => bail!("sending on {}: {error}", self.socket.interface),
        };
        let dropped_by_the_driver = self.socket.qdisc == Qdisc::Bypassed && accepted < count;
        let frames = accepted + usize::from(dropped_by_the_driver);
        Ok(Handed {
            frames,
            samples: sampled[..frames].iter().filter(|&&sample| sample).count(),
        })
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock every namespace shares).
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).context("reading CLOCK_MONOTONIC")?;
    Ok(u64::try_from(now.tv_sec())? * 1_000_000_000 + u64::try_from(now.tv_nsec())?)
}

/// A send-only packet socket bound to `interface` of the current namespace.
fn open_bound(interface: &str, qdisc: Qdisc) -> anyhow::Result<OwnedFd> {
    let ifindex = if_nametoindex(interface).with_context(|| format!("no interface {interface}"))?;
    // Protocol 0: the socket never receives a copy of the interface's traffic.
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a packet socket")?;
    setsockopt(&fd, SndBufForce, &SEND_BUFFER).context("setting SO_SNDBUFFORCE")?;
    tx_timestamps::enable(fd.as_fd())?;
    if qdisc == Qdisc::Bypassed {
        let on: libc::c_int = 1;
        set_option(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &on)
            .context("setting PACKET_QDISC_BYPASS")?;
    }
    bind_to(fd.as_fd(), ifindex, 0).with_context(|| format!("binding to {interface}"))?;
    Ok(fd)
}

/// Binds the packet socket `fd` to interface `ifindex` for `protocol` (an `ETH_P_*` value in
/// host order; 0 receives nothing).
pub fn bind_to(fd: BorrowedFd, ifindex: u32, protocol: u16) -> anyhow::Result<()> {
    let raw = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET)?,
        sll_protocol: protocol.to_be(),
        sll_ifindex: i32::try_from(ifindex)?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `raw` is a complete `sockaddr_ll` and the length given is its size.
    let address = unsafe {
        LinkAddr::from_raw(
            std::ptr::from_ref(&raw).cast(),
            Some(libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())?),
        )
    }
    .context("building the link-layer address")?;
    bind(fd.as_raw_fd(), &address).map_err(Into::into)
}

/// `setsockopt` with a value nix has no wrapper for.
pub fn set_option<T>(
    fd: BorrowedFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> anyhow::Result<()> {
    // SAFETY: `value` is a live `T` and the length given is its size; the kernel copies it
    // (a filter program is copied whole, so its instructions need only live for the call).
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            std::ptr::from_ref(value).cast(),
            libc::socklen_t::try_from(size_of::<T>())?,
        )
    };
    Errno::result(result).map(drop).map_err(Into::into)
}
