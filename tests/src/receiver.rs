//! A UDP receiver in a sink namespace that records every datagram with its source, header
//! destination and TTL, so tests can check exactly what the relay put on the wire.

use std::{
    fs::File,
    io::IoSliceMut,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sched::{CloneFlags, setns},
    sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt},
    time::{ClockId, clock_gettime},
};

use crate::Netns;

/// One datagram as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub source: SocketAddrV4,
    /// The destination address in the IP header (the group for multicast).
    pub destination: Ipv4Addr,
    pub ttl: u8,
    /// The DSCP/ECN byte (IPv4 TOS) it arrived with.
    pub tos: u8,
    pub payload: Vec<u8>,
    /// When it entered the sink's interface, on `CLOCK_MONOTONIC`: the kernel's receive
    /// timestamp (`SO_TIMESTAMPNS`, on `CLOCK_REALTIME`) less the offset between the two
    /// clocks when it was read. The receiver's own scheduling does not move it.
    pub arrived: Option<Duration>,
}

impl Datagram {
    /// The sequence number the test sender put in the first eight bytes.
    pub fn sequence(&self) -> Option<u64> {
        sequence_of(&self.payload)
    }
}

/// The sequence number a test sender puts in the first eight bytes of a payload.
pub(crate) fn sequence_of(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// How long a receiver keeps listening after it is told to finish once nothing arrives.
const DRAIN_IDLE: Duration = Duration::from_millis(1500);

/// A thread in a namespace that opens a socket there and collects what `receive` makes of
/// what arrives, until it is told to stop and the socket has been quiet for `quiet`.
/// [`Receiver`] and [`crate::Receiver6`] are this with their family's UDP socket and parser.
pub struct Listener<T> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<T>>>,
}

impl<T: Send + 'static> Listener<T> {
    /// Runs `open` inside `netns` on a thread of its own, then `receive` until stopped;
    /// `receive` returns `None` when nothing arrived within the socket's timeout. Returns once
    /// the socket is open.
    pub fn start<S: 'static>(
        netns: &Netns,
        quiet: Duration,
        open: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
        mut receive: impl FnMut(&S) -> anyhow::Result<Option<T>> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let path = netns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = mpsc::channel();
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<T>> {
            let opened = File::open(&path)
                .with_context(|| format!("opening {path}"))
                .and_then(|file| {
                    setns(&file, CloneFlags::CLONE_NEWNET).context("entering the namespace")
                })
                .and_then(|()| open());
            let socket = match opened {
                Ok(socket) => {
                    let _ = ready.send(Ok(()));
                    socket
                }
                Err(error) => {
                    let _ = ready.send(Err(error.to_string()));
                    return Err(error);
                }
            };
            let mut received = Vec::new();
            let mut last = Instant::now();
            loop {
                if let Some(item) = receive(&socket)? {
                    received.push(item);
                    last = Instant::now();
                } else if thread_stop.load(Ordering::Relaxed) && last.elapsed() >= quiet {
                    return Ok(received);
                }
            }
        });
        match is_ready.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(error)) => bail!("receiver did not start: {error}"),
            Err(_) => bail!("receiver did not start within 5 s"),
        }
    }

    /// Stops listening once nothing has arrived for a moment and returns what arrived.
    pub fn finish(self) -> anyhow::Result<Vec<T>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?
    }
}

/// A test receiver's UDP socket from `open`, with room for a burst and a read timeout that
/// lets it notice when to stop; collects with `receive_one` into a 64 KiB buffer.
pub(crate) fn udp_listener<T: Send + 'static>(
    netns: &Netns,
    open: impl FnOnce() -> anyhow::Result<UdpSocket> + Send + 'static,
    receive_one: fn(&UdpSocket, &mut [u8]) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Listener<T>> {
    let open = move || -> anyhow::Result<UdpSocket> {
        let socket = open()?;
        setsockopt(&socket, sockopt::RcvBuf, &(8 << 20))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(socket)
    };
    let mut buffer = vec![0_u8; 65_536];
    Listener::start(netns, DRAIN_IDLE, open, move |socket| {
        receive_one(socket, &mut buffer)
    })
}

pub struct Receiver(Listener<Datagram>);

impl Receiver {
    /// Listens on `port` inside `netns`; for a multicast `group`, joins it on the interface
    /// that has address `interface_address`. Returns once the socket is ready.
    pub fn start(
        netns: &Netns,
        group: Option<Ipv4Addr>,
        interface_address: Ipv4Addr,
        port: u16,
    ) -> anyhow::Result<Self> {
        let open = move || -> anyhow::Result<UdpSocket> {
            // Bound to the group, the socket sees only that group's datagrams, and several
            // receivers can share a port.
            let bind = SocketAddrV4::new(group.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            if let Some(group) = group {
                socket
                    .join_multicast_v4(&group, &interface_address)
                    .with_context(|| format!("joining {group}"))?;
            }
            setsockopt(&socket, sockopt::Ipv4RecvTtl, &true)?;
            setsockopt(&socket, sockopt::IpRecvTos, &true)?;
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
            setsockopt(&socket, sockopt::ReceiveTimestampns, &true)?;
            Ok(socket)
        };
        udp_listener(netns, open, receive_one).map(Self)
    }

    /// Stops listening once nothing has arrived for a moment and returns what arrived.
    pub fn finish(self) -> anyhow::Result<Vec<Datagram>> {
        self.0.finish()
    }
}

/// `realtime` (a `CLOCK_REALTIME` reading) on `CLOCK_MONOTONIC`, by the offset between the
/// clocks now.
fn to_monotonic(realtime: Duration) -> Option<Duration> {
    let (monotonic, now) = clocks_side_by_side()?;
    (monotonic + realtime).checked_sub(now)
}

/// A `CLOCK_MONOTONIC` and a `CLOCK_REALTIME` reading taken together: the realtime one between
/// two monotonic ones no more than 2 µs apart (a thread interrupted between two readings would
/// otherwise shift the offset by as long as it waited).
fn clocks_side_by_side() -> Option<(Duration, Duration)> {
    let read = |clock| clock_gettime(clock).ok().map(Duration::from);
    for _ in 0..1000 {
        let before = read(ClockId::CLOCK_MONOTONIC)?;
        let realtime = read(ClockId::CLOCK_REALTIME)?;
        let bracket = read(ClockId::CLOCK_MONOTONIC)?.checked_sub(before)?;
        if bracket <= Duration::from_micros(2) {
            return Some((before + bracket / 2, realtime));
        }
    }
    None
}

/// One message from a non-blocking socket, with its control messages in `space`; `None` when
/// nothing is waiting or a signal cut the call short.
#[allow(
    clippy::ptr_arg,
    reason = "nix's recvmsg takes the control buffer as a Vec"
)]
pub fn receive_message<'a, 'outer, 'inner, S: nix::sys::socket::SockaddrLike + 'a>(
    fd: std::os::fd::RawFd,
    iov: &'outer mut [IoSliceMut<'inner>],
    space: &'a mut Vec<u8>,
) -> anyhow::Result<Option<nix::sys::socket::RecvMsg<'a, 'outer, S>>>
where
    'inner: 'outer,
{
    match recvmsg::<S>(fd, iov, Some(space), MsgFlags::empty()) {
        Ok(message) => Ok(Some(message)),
        Err(nix::Error::EAGAIN | nix::Error::EINTR) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn receive_one(socket: &UdpSocket, buffer: &mut [u8]) -> anyhow::Result<Option<Datagram>> {
    let mut space = nix::cmsg_space!(i32, u8, nix::libc::in_pktinfo, nix::libc::timespec);
    let mut iov = [IoSliceMut::new(buffer)];
    let Some(message) = receive_message::<SockaddrIn>(socket.as_raw_fd(), &mut iov, &mut space)?
    else {
        return Ok(None);
    };
    let mut ttl = 0;
    let mut tos = 0;
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut arrived = None;
    for cmsg in message.cmsgs()? {
        match cmsg {
            ControlMessageOwned::Ipv4Ttl(value) => {
                ttl = u8::try_from(value).unwrap_or(0);
            }
            ControlMessageOwned::Ipv4Tos(value) => tos = value,
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                destination = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
            }
            ControlMessageOwned::ScmTimestampns(realtime) => {
                arrived = to_monotonic(Duration::from(realtime));
            }
            _ => {}
        }
    }
    let source = message
        .address
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
        .context("datagram without a source")?;
    let len = message.bytes;
    Ok(Some(Datagram {
        source,
        destination,
        ttl,
        tos,
        payload: iov[0][..len].to_vec(),
        arrived,
    }))
}
