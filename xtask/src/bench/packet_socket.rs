//! The generator's socket: a send-only `AF_PACKET` socket on the generator interface, opened
//! inside the generator's namespace and used from the benchmark's own thread.
//!
//! Its send buffer is made large (`SO_SNDBUFFORCE`) on purpose. A frame stays charged to the
//! sending socket until the receiving side takes it off the relay CPU's backlog, so with the
//! default buffer (about 160 frames) a relay whose CPU falls behind slows the generator down
//! instead of losing frames — no real multicast source waits for a relay. With the large
//! buffer, a relay that cannot keep up drops at its interface, where a NIC would.

use std::{
    fs::File,
    marker::PhantomData,
    os::fd::{AsRawFd as _, OwnedFd},
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
};

use super::pacing::MAX_BATCH;

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
    pub fn sender<'f>(&self, frames: &'f [Vec<u8>]) -> BatchSender<'_, 'f> {
        // Every batch is a window of this ring of messages: the frames in round-robin order,
        // long enough for a full batch from any starting frame. Built once per trial, so a
        // batch costs the system call alone, whatever the build's optimisation.
        let len = frames.len() + MAX_BATCH;
        let vectors: Vec<libc::iovec> = (0..len)
            .map(|i| {
                let frame = &frames[i % frames.len().max(1)];
                libc::iovec {
                    iov_base: frame.as_ptr().cast_mut().cast(),
                    iov_len: frame.len(),
                }
            })
            .collect();
        let messages = vectors
            .iter()
            .map(|vector| {
                // SAFETY: `mmsghdr` is plain integers and pointers, for which all zeros is a
                // valid value (no name, no control data, no flags).
                let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                message.msg_hdr.msg_iov = std::ptr::from_ref(vector).cast_mut();
                message.msg_hdr.msg_iovlen = 1;
                message
            })
            .collect();
        BatchSender {
            socket: self,
            streams: frames.len(),
            _vectors: vectors,
            messages,
            _frames: PhantomData,
        }
    }
}

/// Messages ready for `sendmmsg`: `messages[i]` points at `_vectors[i]`, which points at a frame
/// borrowed for `'f`. Neither vector is resized after it is built, so the pointers stay valid.
pub struct BatchSender<'s, 'f> {
    socket: &'s PacketSocket,
    streams: usize,
    _vectors: Vec<libc::iovec>,
    messages: Vec<libc::mmsghdr>,
    _frames: PhantomData<&'f [Vec<u8>]>,
}

impl BatchSender<'_, '_> {
    /// Sends the frames of the stream `first` (counted from the first frame of the trial) and
    /// after, round robin (`count` of them, at most [`MAX_BATCH`]), and returns how many left
    /// the generator.
    ///
    /// `sendmmsg` stops at the first frame the kernel refuses, with `ENOBUFS`, and reports
    /// only the frames before it. Through the qdisc, that frame was refused by the qdisc (its
    /// queue is full) and never left: the caller sends it again later. With the qdisc
    /// bypassed, the driver took it and dropped it (the veth peer's receive backlog on the
    /// relay CPU was full, counted as `tx_dropped` / `rx_dropped`): it left the generator and
    /// was lost entering the relay, as on a wire.
    pub fn send_round_robin(&mut self, first: u64, count: usize) -> anyhow::Result<usize> {
        let count = count.min(MAX_BATCH);
        if self.streams == 0 || count == 0 {
            return Ok(0);
        }
        // Below `streams`, which is a usize.
        #[allow(clippy::cast_possible_truncation)]
        let start = (first % self.streams as u64) as usize;
        let window = &mut self.messages[start..start + count];
        // SAFETY: `window` is `count` initialised messages (the ring is `MAX_BATCH` longer than
        // `streams`, and `start < streams`), each pointing at one live I/O vector of a live
        // frame (see `BatchSender`); the kernel reads them and writes only `msg_len`.
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
            Err(Errno::EINTR) => return Ok(0),
            Err(error) => bail!("sending on {}: {error}", self.socket.interface),
        };
        let dropped_by_the_driver = self.socket.qdisc == Qdisc::Bypassed && accepted < count;
        Ok(accepted + usize::from(dropped_by_the_driver))
    }
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
    if qdisc == Qdisc::Bypassed {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a live c_int and the length given is its size; the kernel copies it.
        let result = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::from_ref(&on).cast(),
                libc::socklen_t::try_from(size_of::<libc::c_int>())?,
            )
        };
        Errno::result(result).context("setting PACKET_QDISC_BYPASS")?;
    }
    let raw = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET)?,
        sll_protocol: 0,
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
    bind(fd.as_raw_fd(), &address).with_context(|| format!("binding to {interface}"))?;
    Ok(fd)
}
