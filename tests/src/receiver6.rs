//! The IPv6 receiver: like [`crate::Receiver`], a UDP socket in a sink namespace that records
//! every datagram with its source, header destination, hop limit and traffic class.

use std::{
    fs::File,
    io::IoSliceMut,
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
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
    net::if_::if_nametoindex,
    sched::{CloneFlags, setns},
    sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, setsockopt, sockopt},
};

use crate::Netns;

/// One IPv6 datagram as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram6 {
    pub source: SocketAddrV6,
    /// The destination address in the IPv6 header (the group for multicast).
    pub destination: Ipv6Addr,
    pub hop_limit: u8,
    /// The DSCP/ECN byte (traffic class) it arrived with.
    pub traffic_class: u8,
    pub payload: Vec<u8>,
}

impl Datagram6 {
    /// The sequence number the test sender put in the first eight bytes.
    pub fn sequence(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    }
}

/// How long the receiver keeps listening after [`Receiver6::finish`] once nothing arrives.
const DRAIN_IDLE: Duration = Duration::from_millis(1500);

pub struct Receiver6 {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<Datagram6>>>,
}

impl Receiver6 {
    /// Listens on `port` inside `netns`; for a multicast `group`, joins it (MLD) on
    /// `interface`. Returns once the socket is ready.
    pub fn start(
        netns: &Netns,
        group: Option<Ipv6Addr>,
        interface: &str,
        port: u16,
    ) -> anyhow::Result<Self> {
        let path = netns.path();
        let interface = interface.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = mpsc::channel();
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<Datagram6>> {
            let socket = (|| -> anyhow::Result<UdpSocket> {
                let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                setns(&file, CloneFlags::CLONE_NEWNET).context("entering the sink namespace")?;
                let ifindex = if_nametoindex(interface.as_str())
                    .with_context(|| format!("no interface {interface}"))?;
                // Bound to the group, the socket sees only that group's datagrams.
                let bind = SocketAddrV6::new(group.unwrap_or(Ipv6Addr::UNSPECIFIED), port, 0, 0);
                let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
                if let Some(group) = group {
                    socket
                        .join_multicast_v6(&group, ifindex)
                        .with_context(|| format!("joining {group} on {interface}"))?;
                }
                setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
                setsockopt(&socket, sockopt::Ipv6RecvTClass, &true)?;
                setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
                setsockopt(&socket, sockopt::RcvBuf, &(8 << 20))?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(socket)
            })();
            let socket = match socket {
                Ok(socket) => {
                    let _ = ready.send(Ok(()));
                    socket
                }
                Err(error) => {
                    let _ = ready.send(Err(error.to_string()));
                    return Err(error);
                }
            };
            receive_until_stopped(&socket, &thread_stop)
        });
        match is_ready.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(error)) => bail!("receiver did not start: {error}"),
            Err(_) => bail!("receiver did not start within 5 s"),
        }
    }

    /// Stops listening once nothing has arrived for a moment and returns what arrived.
    pub fn finish(self) -> anyhow::Result<Vec<Datagram6>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?
    }
}

fn receive_until_stopped(socket: &UdpSocket, stop: &AtomicBool) -> anyhow::Result<Vec<Datagram6>> {
    let mut received = Vec::new();
    let mut buffer = vec![0_u8; 65_536];
    let mut last = Instant::now();
    loop {
        let mut space = nix::cmsg_space!(i32, i32, nix::libc::in6_pktinfo);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        match recvmsg::<SockaddrIn6>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) {
            Ok(message) => {
                let mut hop_limit = 0;
                let mut traffic_class = 0;
                let mut destination = Ipv6Addr::UNSPECIFIED;
                for cmsg in message.cmsgs()? {
                    match cmsg {
                        ControlMessageOwned::Ipv6HopLimit(value) => {
                            hop_limit = u8::try_from(value).unwrap_or(0);
                        }
                        ControlMessageOwned::Ipv6TClass(value) => {
                            traffic_class = u8::try_from(value).unwrap_or(0);
                        }
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            destination = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                        }
                        _ => {}
                    }
                }
                let source = message
                    .address
                    .map(|a| SocketAddrV6::new(a.ip(), a.port(), 0, a.scope_id()))
                    .context("datagram without a source")?;
                let len = message.bytes;
                received.push(Datagram6 {
                    source,
                    destination,
                    hop_limit,
                    traffic_class,
                    payload: buffer[..len].to_vec(),
                });
                last = Instant::now();
            }
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => {
                if stop.load(Ordering::Relaxed) && last.elapsed() >= DRAIN_IDLE {
                    return Ok(received);
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}
