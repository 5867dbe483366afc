//! The classifier's IPv6 side, before the rules file takes IPv6 rules: IPv6 traffic on an
//! input interface passes untouched beside IPv4 rules, hostile IPv6 frames are counted by
//! reason and left alone, and IPv6 rules written straight into the pinned `MCR_RULES6` (and
//! `MCR_KERNEL_OUTPUTS`) are counted, marked, shed and relayed as IPv4 rules are.
//!
//! The rules written here use slots, workers and output counters far above those MCR hands
//! out for the one IPv4 rule of the file, so the two never meet.

use std::{
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use mcr_common::{
    ANY_SOURCE6, KEEP_DSCP, KernelOutput, KernelOutputs, MAP_KERNEL_OUTPUTS, MAP_OUTPUT_STATS,
    MAP_RULE_STATS, MAP_RULES6, MAP_WORKER_LOAD, OutputCounters, PATH_KERNEL, PATH_WORKER,
    RULE_LOCAL_DELIVERY, RuleCounters, RuleKey6, RuleSlot, WorkerLoad, steering_mark,
};
use mcr_tests::{
    ETH_P_8021AD, ETH_P_8021Q, Expected, Frame6, Lab, Mcr, Netns, OTHER_HOST_MAC, RELAY_OUT0,
    Receiver, RulesFile, SINK, Stream, assert_delivered, in_netns,
    ipv6::{
        DESTINATION_OPTIONS, HOP_BY_HOP, ICMPV6, multicast_mac, pseudo_header_sum, udp_checksum,
    },
    send_frames, send_udp, wait_for,
};
use nix::{
    libc,
    net::if_::if_nametoindex,
    sys::socket::{
        AddressFamily, ControlMessageOwned, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType,
        SockaddrIn6, bind, recvmsg, setsockopt, socket, sockopt,
    },
};
use serde_json::Value;

/// The file's one rule, IPv4: it puts the classifier on in0.
const RULES: &str = "\
rules:
  - name: ipv4
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
";

const GROUP: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1234);
const SENDER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const SENDER_2: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9);
const PORT: u16 = 5000;

/// Slots, workers and output counters of the rules the tests write themselves.
const SLOT: u32 = 4000;
const SLOT_2: u32 = 4001;
const WORKER: u32 = 200;
const WORKER_2: u32 = 201;
const COUNTER: u32 = 16_000;

// ---------------------------------------------------------------------------------------
// What arrives where.

/// One IPv6 datagram as a UDP socket got it.
#[derive(Clone, Debug)]
struct Datagram6 {
    source: SocketAddrV6,
    hop_limit: u8,
    traffic_class: u8,
    payload: Vec<u8>,
}

/// A thread in a namespace that collects what a socket receives until told to stop and the
/// socket has been quiet for a moment.
struct Collector<T> {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<T>>>,
}

const DRAIN_IDLE: Duration = Duration::from_millis(800);

impl<T: Send + 'static> Collector<T> {
    /// Runs `open` inside `netns`, then `receive` until stopped; `receive` returns `None`
    /// when nothing arrived within the socket's timeout.
    fn start<S: 'static>(
        netns: &Netns,
        open: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
        mut receive: impl FnMut(&S) -> anyhow::Result<Option<T>> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let path = netns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let (ready, is_ready) = mpsc::channel();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<T>> {
            let opened = std::fs::File::open(&path)
                .with_context(|| format!("opening {path}"))
                .and_then(|file| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("entering the namespace")
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
            let mut collected = Vec::new();
            let mut last = Instant::now();
            loop {
                if let Some(item) = receive(&socket)? {
                    collected.push(item);
                    last = Instant::now();
                } else if thread_stop.load(Ordering::Relaxed) && last.elapsed() >= DRAIN_IDLE {
                    return Ok(collected);
                }
            }
        });
        match is_ready.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, thread }),
            Ok(Err(error)) => bail!("collector did not start: {error}"),
            Err(_) => bail!("collector did not start within 5 s"),
        }
    }

    fn finish(self) -> anyhow::Result<Vec<T>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the collector thread panicked"))?
    }
}

/// A UDP socket in `netns` bound to `group:port` and joined to the group on `interface`,
/// reporting each datagram's hop limit and traffic class. The kernel hands it only datagrams
/// whose UDP checksum is right.
fn listen(
    netns: &Netns,
    interface: &'static str,
    group: Ipv6Addr,
    port: u16,
) -> anyhow::Result<Collector<Datagram6>> {
    let open = move || -> anyhow::Result<UdpSocket> {
        let ifindex = if_nametoindex(interface).with_context(|| format!("no {interface}"))?;
        let socket = UdpSocket::bind(SocketAddrV6::new(group, port, 0, 0))
            .with_context(|| format!("binding [{group}]:{port}"))?;
        socket
            .join_multicast_v6(&group, ifindex)
            .with_context(|| format!("joining {group} on {interface}"))?;
        setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
        setsockopt(&socket, sockopt::Ipv6RecvTClass, &true)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(socket)
    };
    let mut buffer = vec![0_u8; 65_536];
    let receive = move |socket: &UdpSocket| -> anyhow::Result<Option<Datagram6>> {
        let mut space = nix::cmsg_space!(i32, i32);
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let message = match recvmsg::<SockaddrIn6>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) {
            Ok(message) => message,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let (mut hop_limit, mut traffic_class) = (0, 0);
        for cmsg in message.cmsgs()? {
            match cmsg {
                ControlMessageOwned::Ipv6HopLimit(value) => {
                    hop_limit = u8::try_from(value).unwrap_or(0);
                }
                ControlMessageOwned::Ipv6TClass(value) => {
                    traffic_class = u8::try_from(value).unwrap_or(0);
                }
                _ => {}
            }
        }
        let source = message.address.context("datagram without a source")?;
        let source = SocketAddrV6::new(source.ip(), source.port(), 0, 0);
        let len = message.bytes;
        Ok(Some(Datagram6 {
            source,
            hop_limit,
            traffic_class,
            payload: buffer[..len].to_vec(),
        }))
    };
    Collector::start(netns, open, receive)
}

/// A frame as a packet socket got it.
struct Captured {
    frame: Vec<u8>,
    /// The UDP checksum is still to be completed (`TP_STATUS_CSUMNOTREADY`): the sender left
    /// it to the hardware (`CHECKSUM_PARTIAL`), and the field holds the pseudo-header's sum.
    checksum_pending: bool,
}

/// `TP_STATUS_CSUMNOTREADY` in `tpacket_auxdata::tp_status`.
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// Every IPv6 frame that arrives on `interface` in `netns`, whole.
fn capture(netns: &Netns, interface: &'static str) -> anyhow::Result<Collector<Captured>> {
    let open = move || -> anyhow::Result<OwnedFd> {
        let ifindex = if_nametoindex(interface).with_context(|| format!("no {interface}"))?;
        let socket = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthIpv6,
        )
        .context("opening a packet socket")?;
        let raw = libc::sockaddr_ll {
            sll_family: u16::try_from(libc::AF_PACKET)?,
            sll_protocol: u16::try_from(libc::ETH_P_IPV6)?.to_be(),
            sll_ifindex: i32::try_from(ifindex)?,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `raw` is a complete `sockaddr_ll` and the length given is its size.
        let address = unsafe {
            <LinkAddr as nix::sys::socket::SockaddrLike>::from_raw(
                std::ptr::from_ref(&raw).cast(),
                Some(libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())?),
            )
        }
        .context("building the link-layer address")?;
        bind(socket.as_raw_fd(), &address).context("binding the packet socket")?;
        let on: libc::c_int = 1;
        // SAFETY: `on` is a c_int that outlives the call, and the length given is its size.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                std::ptr::from_ref(&on).cast(),
                libc::socklen_t::try_from(size_of::<libc::c_int>())?,
            )
        };
        ensure!(
            result == 0,
            "PACKET_AUXDATA: {}",
            std::io::Error::last_os_error()
        );
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        Ok(socket)
    };
    let mut buffer = vec![0_u8; 65_536];
    let receive = move |socket: &OwnedFd| -> anyhow::Result<Option<Captured>> {
        let mut space = nix::cmsg_space!(libc::tpacket_auxdata);
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let message = match recvmsg::<LinkAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) {
            Ok(message) => message,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        // Not what the sink itself sends (MLD reports).
        if message
            .address
            .is_none_or(|from| from.pkttype() == libc::PACKET_OUTGOING)
        {
            return Ok(None);
        }
        let mut checksum_pending = false;
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::Unknown(aux) = cmsg
                && aux.cmsg_header.cmsg_type == libc::PACKET_AUXDATA
                && let Some(status) = aux.data_bytes.get(..4)
            {
                let status = u32::from_ne_bytes(status.try_into()?);
                checksum_pending = status & TP_STATUS_CSUMNOTREADY != 0;
            }
        }
        let len = message.bytes;
        Ok(Some(Captured {
            frame: buffer[..len].to_vec(),
            checksum_pending,
        }))
    };
    Collector::start(netns, open, receive)
}

/// The payload of datagram `sequence` of a test stream: the number, then `len - 8` bytes.
fn payload(sequence: u64, len: usize) -> Vec<u8> {
    let mut payload = vec![0x6b_u8; len];
    payload[..8].copy_from_slice(&sequence.to_be_bytes());
    payload
}

fn frames(first: u64, count: u64, len: usize, build: impl Fn(Frame6) -> Frame6) -> Vec<Vec<u8>> {
    (first..first + count)
        .map(|sequence| build(Frame6::udp(SENDER, GROUP, PORT, payload(sequence, len))).bytes())
        .collect()
}

fn sequences(datagrams: &[Datagram6]) -> Vec<u64> {
    datagrams
        .iter()
        .map(|d| u64::from_be_bytes(d.payload[..8].try_into().unwrap_or_default()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// MCR's counters and maps.

/// The classifier's skip counters, from `mcr stats --json --skipped`.
fn skipped(mcr: &Mcr) -> anyhow::Result<Value> {
    let text = mcr.cli(&["stats", "--json", "--skipped"])?;
    serde_json::from_str(&text).context("parsing mcr stats --json --skipped")
}

/// Waits until `read` returns `expected`, then makes sure it stays there a moment, so a
/// counter that overshoots is caught too.
fn settles_at<T: PartialEq + Clone>(
    mut read: impl FnMut() -> Option<T>,
    expected: &T,
) -> Result<(), Option<T>> {
    wait_for(Duration::from_secs(3), || {
        read().filter(|value| value == expected)
    });
    std::thread::sleep(Duration::from_millis(200));
    match read() {
        Some(value) if value == *expected => Ok(()),
        other => Err(other),
    }
}

fn pinned(mcr: &Mcr, name: &str) -> anyhow::Result<Map> {
    let path = mcr.pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("{name} is no map aya knows"))
}

/// The pinned maps a test writes rules into and reads counters from.
struct Maps {
    rules6: HashMap<MapData, RuleKey6, RuleSlot>,
    rule_stats: PerCpuArray<MapData, RuleCounters>,
    worker_load: Array<MapData, WorkerLoad>,
    outputs: HashMap<MapData, u32, KernelOutputs>,
    output_stats: PerCpuArray<MapData, OutputCounters>,
}

impl Maps {
    fn open(mcr: &Mcr) -> anyhow::Result<Self> {
        Ok(Self {
            rules6: pinned(mcr, MAP_RULES6)?.try_into()?,
            rule_stats: pinned(mcr, MAP_RULE_STATS)?.try_into()?,
            worker_load: pinned(mcr, MAP_WORKER_LOAD)?.try_into()?,
            outputs: pinned(mcr, MAP_KERNEL_OUTPUTS)?.try_into()?,
            output_stats: pinned(mcr, MAP_OUTPUT_STATS)?.try_into()?,
        })
    }

    fn rule_counters(&self, slot: u32) -> Option<RuleCounters> {
        let per_cpu = self.rule_stats.get(&slot, 0).ok()?;
        Some(per_cpu.iter().fold(RuleCounters::default(), |a, b| a + *b))
    }

    fn output_counters(&self, counter: u32) -> Option<(u64, u64, u64)> {
        let per_cpu = self.output_stats.get(&counter, 0).ok()?;
        Some(per_cpu.iter().fold((0, 0, 0), |(p, b, e), c| {
            (p + c.packets, b + c.bytes, e + c.errors)
        }))
    }

    fn worker_load(&self, worker: u32) -> Option<WorkerLoad> {
        self.worker_load.get(&worker, 0).ok()
    }
}

fn rule(slot: u32, worker: u32, min_ttl: u8, path: u8, flags: u8) -> RuleSlot {
    RuleSlot {
        slot,
        worker,
        min_ttl,
        path,
        flags,
        pad: 0,
    }
}

/// The index of `interface` in `netns`.
fn ifindex(netns: &Netns, interface: &'static str) -> anyhow::Result<u32> {
    in_netns(netns, move || if_nametoindex(interface))?.with_context(|| format!("no {interface}"))
}

/// Packets counted by each rule of the netdev ingress chain `mcrt6` on in0 (it runs after TC
/// ingress, so it sees the classifier's mark and packet type), by the rule's comment.
fn nft_counters(netns: &Netns) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let text = netns.exec("nft", &["-j", "list", "chain", "netdev", "mcrt6", "in0"])?;
    let json: Value = serde_json::from_str(&text)?;
    let mut counters = std::collections::HashMap::new();
    for item in json["nftables"].as_array().context("nftables")? {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let comment = rule["comment"].as_str().unwrap_or("").to_owned();
        let packets = rule["expr"]
            .as_array()
            .and_then(|exprs| exprs.iter().find_map(|e| e["counter"]["packets"].as_u64()))
            .unwrap_or(0);
        counters.insert(comment, packets);
    }
    Ok(counters)
}

/// Counts, on in0 after the classifier, the packets with each of `marks` (by name) and the
/// packet type named beside it (`other` for another host's, `multicast`).
fn nft_watch(netns: &Netns, marks: &[(&str, u32, &str)]) -> anyhow::Result<()> {
    netns.exec("nft", &["add", "table", "netdev", "mcrt6"])?;
    netns.exec(
        "nft",
        &[
            "add",
            "chain",
            "netdev",
            "mcrt6",
            "in0",
            "{ type filter hook ingress device in0 priority 0 ; }",
        ],
    )?;
    for (name, mark, pkttype) in marks {
        netns.exec(
            "nft",
            &[
                "add",
                "rule",
                "netdev",
                "mcrt6",
                "in0",
                "meta",
                "mark",
                &format!("{mark:#x}"),
                "meta",
                "pkttype",
                pkttype,
                "counter",
                "comment",
                &format!("\"{name}\""),
            ],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn ipv6_traffic_passes_untouched_beside_ipv4_rules() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let local = listen(&lab.relay, "in0", GROUP, PORT)?;
    let sink = Receiver::start(&lab.sink, Some("239.2.2.1".parse()?), SINK, 6000)?;
    let skips_before = skipped(&mcr)?;

    // Valid IPv6 multicast UDP on in0, plain and behind the extension headers the
    // classifier follows, with a DSCP: no rule is IPv6, so the host gets every one as sent.
    let valid = [
        frames(0, 10, 100, |f| f.traffic_class(0xb9)),
        frames(10, 10, 100, |f| {
            f.options(HOP_BY_HOP, 8)
                .options(DESTINATION_OPTIONS, 16)
                .hop_limit(3)
        }),
    ]
    .concat();
    send_frames(&lab.generator, "gen0", &valid)?;
    // IPv4 on the same interface is still relayed.
    let stream = Stream::new("239.1.1.1".parse::<std::net::Ipv4Addr>()?, 5000, 200, 50);
    send_udp(&lab.generator, &stream)?;

    let received = local.finish()?;
    ensure!(
        sequences(&received) == (0..20).collect::<Vec<_>>(),
        "the host got {:?} of IPv6 datagrams 0..20",
        sequences(&received)
    );
    for (sequence, datagram) in (0..20).zip(&received) {
        let (hop_limit, traffic_class) = if sequence < 10 { (64, 0xb9) } else { (3, 0) };
        ensure!(
            datagram.payload == payload(sequence, 100)
                && datagram.hop_limit == hop_limit
                && datagram.traffic_class == traffic_class
                && *datagram.source.ip() == SENDER,
            "datagram {sequence} changed on its way: {datagram:?}"
        );
    }
    assert_delivered(
        &sink.finish()?,
        &stream,
        Expected {
            destination: "239.2.2.1".parse()?,
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )?;
    let ipv4 = mcr.rule_stats("ipv4")?;
    assert_eq!(ipv4["rx_packets"], 50, "only the IPv4 stream: {ipv4}");
    // Nothing of it was counted: not as a rule's, not as skipped (the generator's own MLD
    // reports and neighbour discovery, ICMPv6, neither).
    assert_eq!(skipped(&mcr)?, skips_before);
    Ok(())
}

/// A kind of IPv6 frame the relay must leave alone, and the skip counter it must land in.
struct Refused {
    what: &'static str,
    reason: &'static str,
    breaks: fn(Frame6) -> Frame6,
}

const REFUSED: [Refused; 19] = [
    Refused {
        what: "802.1Q VLAN 42",
        reason: "vlan",
        breaks: |f| f.tagged(ETH_P_8021Q, 42),
    },
    Refused {
        what: "QinQ, UDP behind hop-by-hop options",
        reason: "vlan",
        breaks: |f| {
            f.tagged(ETH_P_8021AD, 100)
                .tagged(ETH_P_8021Q, 42)
                .options(HOP_BY_HOP, 8)
        },
    },
    Refused {
        what: "another host's MAC",
        reason: "other_host",
        breaks: |f| f.to_mac(OTHER_HOST_MAC),
    },
    Refused {
        what: "payload length past the frame",
        reason: "malformed",
        // 72 bytes of UDP follow the header.
        breaks: |f| f.payload_len(73),
    },
    Refused {
        what: "UDP length past the payload",
        reason: "malformed",
        breaks: |f| f.udp_len_excess(1),
    },
    Refused {
        what: "interface-local group ff01::1234",
        reason: "malformed",
        breaks: |f| f.to("ff01::1234".parse().expect("an address")),
    },
    Refused {
        what: "a routing header",
        reason: "malformed",
        breaks: |f| f.options(HOP_BY_HOP, 8).routing(),
    },
    Refused {
        what: "hop-by-hop options after destination options",
        reason: "malformed",
        breaks: |f| f.options(DESTINATION_OPTIONS, 8).options(HOP_BY_HOP, 8),
    },
    Refused {
        what: "UDP past the payload length, behind 64 bytes of destination options",
        reason: "malformed",
        breaks: |f| f.options(DESTINATION_OPTIONS, 64).payload_len(40),
    },
    Refused {
        what: "an extension header past the payload length",
        reason: "malformed",
        breaks: |f| f.options(HOP_BY_HOP, 8).payload_len(1),
    },
    Refused {
        what: "UDP checksum 0",
        reason: "bad_checksum",
        breaks: Frame6::zero_checksum,
    },
    Refused {
        what: "hop limit 0",
        reason: "ttl_zero",
        breaks: |f| f.hop_limit(0),
    },
    Refused {
        what: "source ::",
        reason: "bad_source",
        breaks: |f| f.from(Ipv6Addr::UNSPECIFIED),
    },
    Refused {
        what: "source ::1",
        reason: "bad_source",
        breaks: |f| f.from(Ipv6Addr::LOCALHOST),
    },
    Refused {
        what: "source ff02::1",
        reason: "bad_source",
        breaks: |f| f.from("ff02::1".parse().expect("an address")),
    },
    Refused {
        what: "first fragment",
        reason: "fragments",
        breaks: |f| f.fragment(0, true),
    },
    Refused {
        what: "fragment header behind hop-by-hop options",
        reason: "fragments",
        breaks: |f| f.options(HOP_BY_HOP, 8).fragment(185, false),
    },
    Refused {
        what: "five extension headers",
        reason: "extension_headers",
        breaks: |f| {
            f.options(HOP_BY_HOP, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
        },
    },
    Refused {
        what: "an authentication header",
        reason: "extension_headers",
        breaks: Frame6::authentication,
    },
];

const REFUSED_SENT: u64 = 5;

#[test]
fn hostile_ipv6_frames_are_counted_by_reason_and_left_alone() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let mut maps = Maps::open(&mcr)?;
    // An IPv6 rule for the group, so that a refused frame that got through would be counted.
    let in0 = ifindex(&lab.relay, "in0")?;
    maps.rules6.insert(
        RuleKey6::new(in0, GROUP.octets(), ANY_SOURCE6, PORT),
        rule(SLOT, WORKER, 0, PATH_WORKER, 0),
        0,
    )?;
    let mut failures = Vec::new();
    for (case, refused) in REFUSED.iter().enumerate() {
        let before = skipped(&mcr)?;
        let first = 1000 * (case as u64 + 1);
        let sent = frames(first, REFUSED_SENT, 64, refused.breaks);
        send_frames(&lab.generator, "gen0", &sent)?;
        let mut expected = before.clone();
        expected[refused.reason] =
            Value::from(before[refused.reason].as_u64().unwrap_or(0) + REFUSED_SENT);
        if let Err(now) = settles_at(|| skipped(&mcr).ok(), &expected) {
            failures.push(format!(
                "{}: skip counters {now:?}, expected {} +{REFUSED_SENT}",
                refused.what, refused.reason
            ));
        }
    }
    // The controls: valid frames, and frames that are not UDP (ICMPv6 behind hop-by-hop
    // options, as MLD sends), are counted by the rule and by no reason respectively.
    let before = skipped(&mcr)?;
    send_frames(&lab.generator, "gen0", &frames(0, 10, 64, |f| f))?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(100, 10, 64, |f| f.options(HOP_BY_HOP, 8).protocol(ICMPV6)),
    )?;
    let counted = settles_at(
        || maps.rule_counters(SLOT).map(|c| (c.packets, c.bytes)),
        &(10, 640),
    );
    if let Err(now) = counted {
        failures.push(format!("control: the rule counted {now:?}, not (10, 640)"));
    }
    if skipped(&mcr)? != before {
        failures.push("control: valid or non-UDP frames were counted as skipped".into());
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// bpftool prints the IPv6 rule written to `MCR_RULES6` by field name, from BTF.
fn assert_bpftool_shows_the_rule(mcr: &Mcr) -> anyhow::Result<()> {
    let path = mcr.pin_dir.join(MAP_RULES6);
    let dump = mcr_tests::run_tool(
        "bpftool",
        &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
    )?;
    let dump: Vec<Value> = serde_json::from_str(&dump)?;
    let group: Vec<Value> = GROUP.octets().iter().map(|&b| Value::from(b)).collect();
    ensure!(
        dump.iter().any(|entry| {
            entry["formatted"]["key"]["group"] == Value::Array(group.clone())
                && entry["formatted"]["key"]["port"] == PORT
                && entry["formatted"]["value"]["slot"] == SLOT
        }),
        "MCR_RULES6 as bpftool shows it: {dump:?}"
    );
    Ok(())
}

/// Makes `WORKER` a full window (two packets) behind from now on, sends six packets of the
/// any-source rule at `SLOT` and checks that the classifier steered two and shed four.
fn shed_when_the_worker_is_behind(lab: &Lab, maps: &mut Maps) -> anyhow::Result<()> {
    let before = maps.rule_counters(SLOT).context("no counters")?;
    let mut load = maps.worker_load(WORKER).context("no load")?;
    let steered = load.steered;
    load.taken = load.steered;
    load.window = 2;
    maps.worker_load.set(WORKER, load, 0)?;
    send_frames(&lab.generator, "gen0", &frames(40, 6, 100, |f| f))?;
    let expected = (before.packets + 2, before.shed + 4);
    settles_at(
        || {
            let c = maps.rule_counters(SLOT)?;
            Some((c.packets, c.shed))
        },
        &expected,
    )
    .map_err(|now| anyhow::anyhow!("(packets, shed) {now:?}, not {expected:?}"))?;
    let load = maps.worker_load(WORKER).context("no load")?;
    assert_eq!((load.steered, load.shed), (steered + 2, 4));
    Ok(())
}

#[test]
fn an_ipv6_rule_in_the_map_is_counted_marked_and_shed() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let mut maps = Maps::open(&mcr)?;
    let in0 = ifindex(&lab.relay, "in0")?;
    let any = RuleKey6::new(in0, GROUP.octets(), ANY_SOURCE6, PORT);
    let from_2 = RuleKey6::new(in0, GROUP.octets(), SENDER_2.octets(), PORT);
    let mark = steering_mark(WORKER, SLOT);
    nft_watch(
        &lab.relay,
        &[
            ("steered", mark, "other"),
            ("steered_2", steering_mark(WORKER_2, SLOT_2), "other"),
            ("delivered", mark, "multicast"),
        ],
    )?;
    maps.rules6
        .insert(any, rule(SLOT, WORKER, 0, PATH_WORKER, 0), 0)?;
    maps.rules6
        .insert(from_2, rule(SLOT_2, WORKER_2, 0, PATH_WORKER, 0), 0)?;
    let skips_before = skipped(&mcr)?;
    let local = listen(&lab.relay, "in0", GROUP, PORT)?;
    let counters = |maps: &Maps, slot| maps.rule_counters(slot).context("no counters");

    // Counted and marked for the worker, source-specific rules first; the host drops them.
    send_frames(&lab.generator, "gen0", &frames(0, 10, 100, |f| f))?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(10, 5, 50, |f| f.from(SENDER_2)),
    )?;
    settles_at(
        || {
            Some((
                counters(&maps, SLOT).ok()?.packets,
                counters(&maps, SLOT_2).ok()?.packets,
            ))
        },
        &(10, 5),
    )
    .map_err(|now| anyhow::anyhow!("packets of the two rules: {now:?}, not (10, 5)"))?;
    assert_eq!(counters(&maps, SLOT)?.bytes, 1000);
    assert_eq!(counters(&maps, SLOT_2)?.bytes, 250);
    let nft = nft_counters(&lab.relay)?;
    assert_eq!(
        (nft["steered"], nft["steered_2"], nft["delivered"]),
        (10, 5, 0),
        "marked as the workers' and another host's: {nft:?}"
    );
    assert_eq!(maps.worker_load(WORKER).context("no load")?.steered, 10);
    assert_eq!(maps.worker_load(WORKER_2).context("no load")?.steered, 5);

    assert_bpftool_shows_the_rule(&mcr)?;

    // Below the rule's minimum hop limit: counted apart, passed on to the host.
    maps.rules6
        .insert(any, rule(SLOT, WORKER, 2, PATH_WORKER, 0), 0)?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(20, 4, 100, |f| f.hop_limit(1)),
    )?;
    settles_at(|| Some(counters(&maps, SLOT).ok()?.below_min_ttl), &4)
        .map_err(|now| anyhow::anyhow!("below_min_ttl {now:?}, not 4"))?;
    assert_eq!(counters(&maps, SLOT)?.packets, 10);

    // With local delivery the host gets them too, as they arrived.
    maps.rules6.insert(
        any,
        rule(SLOT, WORKER, 0, PATH_WORKER, RULE_LOCAL_DELIVERY),
        0,
    )?;
    send_frames(&lab.generator, "gen0", &frames(30, 3, 100, |f| f))?;
    settles_at(|| Some(counters(&maps, SLOT).ok()?.packets), &13)
        .map_err(|now| anyhow::anyhow!("packets {now:?}, not 13"))?;
    assert_eq!(nft_counters(&lab.relay)?["delivered"], 3);

    // A worker a full window behind: the classifier sheds its packets.
    maps.rules6
        .insert(any, rule(SLOT, WORKER, 0, PATH_WORKER, 0), 0)?;
    shed_when_the_worker_is_behind(&lab, &mut maps)?;

    let received = local.finish()?;
    assert_eq!(
        sequences(&received),
        [20, 21, 22, 23, 30, 31, 32],
        "the host gets the held-back and the locally delivered packets only"
    );
    ensure!(
        received.iter().all(|d| d.payload.len() == 100),
        "{received:?}"
    );
    assert_eq!(skipped(&mcr)?, skips_before);
    Ok(())
}

/// An IPv6 output of the kernel path, as the supervisor would write it.
fn output6(
    ifindex: u32,
    counter: u32,
    source_mac: [u8; 6],
    wanted: Wanted,
    dscp: u8,
) -> KernelOutput {
    KernelOutput {
        ifindex,
        counter,
        destination_mac: multicast_mac(wanted.group),
        source_mac,
        source: RELAY6.octets(),
        destination: wanted.group.octets(),
        port: wanted.port,
        ttl: wanted.hop_limit,
        dscp,
    }
}

/// The traffic class of the kernel path's input: DSCP 10, ECN 1.
const INPUT_CLASS: u8 = (10 << 2) | 1;

/// The source the kernel-path outputs send from.
const RELAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
const OUTPUT_A: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x5678);
const OUTPUT_B: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0x1, 0x5679);

/// The MAC address of `interface` in `netns`.
fn mac_of(netns: &Netns, interface: &str) -> anyhow::Result<[u8; 6]> {
    let text = netns.ip(&["-j", "link", "show", interface])?;
    let links: Value = serde_json::from_str(&text)?;
    let text = links[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().ok().context("not a MAC address")
}

/// What one output of the kernel-path test should put on the wire.
#[derive(Clone, Copy)]
struct Wanted {
    group: Ipv6Addr,
    port: u16,
    hop_limit: u8,
    traffic_class: u8,
}

const WANTED_A: Wanted = Wanted {
    group: OUTPUT_A,
    port: 6000,
    hop_limit: 7,
    traffic_class: (46 << 2) | 1,
};
const WANTED_B: Wanted = Wanted {
    group: OUTPUT_B,
    port: 6001,
    hop_limit: 9,
    traffic_class: INPUT_CLASS,
};

/// Checks a frame the kernel path sent: Ethernet addresses, the IPv6 header (flow label
/// `flow_label` and the ECN bits kept, the output's traffic class, hop limit and addresses),
/// the UDP ports and checksum. For a frame whose checksum the sender left to the hardware,
/// the field must hold the sum of the new pseudo-header. Returns the datagram's sequence.
fn check_output_frame(
    captured: &Captured,
    source_mac: [u8; 6],
    wanted: Wanted,
    flow_label: u32,
) -> anyhow::Result<u64> {
    let frame = &captured.frame;
    ensure!(frame.len() >= 14 + 40 + 8 + 8, "short frame: {frame:?}");
    ensure!(
        frame[..6] == multicast_mac(wanted.group) && frame[6..12] == source_mac,
        "MAC addresses {:x?}",
        &frame[..12]
    );
    let header = u32::from_be_bytes(frame[14..18].try_into()?);
    ensure!(
        header == (6 << 28) | (u32::from(wanted.traffic_class) << 20) | flow_label,
        "version, traffic class, flow label: {header:#x}"
    );
    ensure!(
        frame[20] == 17 && frame[21] == wanted.hop_limit,
        "next header and hop limit {:?}",
        &frame[20..22]
    );
    let source = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38])?);
    let destination = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54])?);
    ensure!(
        source == RELAY6 && destination == wanted.group,
        "{source} -> {destination}"
    );
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let mut datagram = frame[54..54 + payload_len].to_vec();
    ensure!(
        datagram[..4] == [4000_u16.to_be_bytes(), wanted.port.to_be_bytes()].concat(),
        "ports {:?}",
        &datagram[..4]
    );
    let checksum = u16::from_be_bytes([datagram[6], datagram[7]]);
    datagram[6..8].copy_from_slice(&[0, 0]);
    let expected = if captured.checksum_pending {
        let len = u32::try_from(datagram.len())?;
        pseudo_header_sum(source, destination, len)
    } else {
        udp_checksum(source, destination, &datagram)
    };
    ensure!(
        checksum == expected,
        "UDP checksum {checksum:#06x}, expected {expected:#06x} (left to the hardware: {})",
        captured.checksum_pending
    );
    Ok(u64::from_be_bytes(datagram[8..16].try_into()?))
}

/// Sends datagrams `sequences` of the test stream to the group from a UDP socket in the
/// generator, with the input's traffic class: its checksum is left to the hardware
/// (`CHECKSUM_PARTIAL` across the veth), which the kernel path must keep right too.
fn send_from_a_socket(lab: &Lab, sequences: std::ops::Range<u64>) -> anyhow::Result<()> {
    lab.generator
        .ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", "gen0", "nodad"])?;
    // A flow label of 0, which the frames on the sink's wire must keep.
    lab.generator
        .exec("sysctl", &["-qw", "net.ipv6.auto_flowlabels=0"])?;
    in_netns(&lab.generator, move || -> anyhow::Result<()> {
        let source = SocketAddrV6::new("fd00:1::1".parse()?, 4000, 0, 0);
        let socket = UdpSocket::bind(source).with_context(|| format!("binding {source}"))?;
        setsockopt(&socket, sockopt::Ipv6TClass, &i32::from(INPUT_CLASS))?;
        for sequence in sequences {
            socket.send_to(
                &payload(sequence, 300),
                SocketAddrV6::new(GROUP, PORT, 0, 0),
            )?;
        }
        Ok(())
    })?
}

#[test]
fn an_ipv6_rule_on_the_kernel_path_writes_ipv6_outputs() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let mut maps = Maps::open(&mcr)?;
    let (in0, out0) = (ifindex(&lab.relay, "in0")?, ifindex(&lab.relay, "out0")?);
    let out0_mac = mac_of(&lab.relay, "out0")?;
    let any = RuleKey6::new(in0, GROUP.octets(), ANY_SOURCE6, PORT);
    let a = output6(out0, COUNTER, out0_mac, WANTED_A, 46);
    let b = output6(out0, COUNTER + 1, out0_mac, WANTED_B, KEEP_DSCP);
    let mut ipv4 = output6(out0, COUNTER + 2, out0_mac, WANTED_A, KEEP_DSCP);
    ipv4.source = [10, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ipv4.destination = [239, 2, 2, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let local = listen(&lab.relay, "in0", GROUP, PORT)?;
    let at_a = listen(&lab.sink, "sink0", OUTPUT_A, 6000)?;
    let at_b = listen(&lab.sink, "sink0", OUTPUT_B, 6001)?;
    let wire = capture(&lab.sink, "sink0")?;
    let raw = |first| frames(first, 10, 300, |f| f.traffic_class(INPUT_CLASS));
    let sent_by = |maps: &Maps, counter| maps.output_counters(counter);

    // Two outputs: the first gets a clone, the second the packet itself.
    maps.outputs.insert(SLOT, output_set(&[a, b]), 0)?;
    maps.rules6
        .insert(any, rule(SLOT, WORKER, 0, PATH_KERNEL, 0), 0)?;
    send_frames(&lab.generator, "gen0", &[raw(0), raw(10)].concat())?;
    settles_at(
        || Some((sent_by(&maps, COUNTER)?, sent_by(&maps, COUNTER + 1)?)),
        &((20, 6000, 0), (20, 6000, 0)),
    )
    .map_err(|now| anyhow::anyhow!("output counters {now:?}"))?;

    // An output of the other family is refused and counted, the others still sent.
    maps.outputs.insert(SLOT, output_set(&[a, b, ipv4]), 0)?;
    send_frames(&lab.generator, "gen0", &raw(20))?;
    settles_at(|| sent_by(&maps, COUNTER + 2), &(0, 0, 10))
        .map_err(|now| anyhow::anyhow!("the IPv4 output's counters {now:?}"))?;

    // From a socket: the checksum is the hardware's to finish.
    maps.outputs.insert(SLOT, output_set(&[a, b]), 0)?;
    send_from_a_socket(&lab, 30..40)?;
    settles_at(|| sent_by(&maps, COUNTER + 1), &(40, 12_000, 0))
        .map_err(|now| anyhow::anyhow!("output B's counters {now:?}"))?;

    // With local delivery, the host gets the packet as it arrived.
    maps.outputs.insert(SLOT, output_set(&[a]), 0)?;
    maps.rules6.insert(
        any,
        rule(SLOT, WORKER, 0, PATH_KERNEL, RULE_LOCAL_DELIVERY),
        0,
    )?;
    send_frames(&lab.generator, "gen0", &raw(40))?;
    settles_at(|| sent_by(&maps, COUNTER), &(50, 15_000, 0))
        .map_err(|now| anyhow::anyhow!("output A's counters {now:?}"))?;

    let counters = maps.rule_counters(SLOT).context("no counters")?;
    assert_eq!((counters.packets, counters.bytes), (50, 15_000));
    let load = maps.worker_load(WORKER).context("no load")?;
    assert_eq!(load.steered, 0, "no packet for a worker");

    check_datagrams(&at_a.finish()?, WANTED_A, 50).context("output A")?;
    check_datagrams(&at_b.finish()?, WANTED_B, 40).context("output B")?;
    let received = local.finish()?;
    ensure!(
        sequences(&received) == (40..50).collect::<Vec<_>>()
            && received.iter().all(|d| {
                d.hop_limit == 64 && d.traffic_class == INPUT_CLASS && *d.source.ip() == SENDER
            }),
        "the host got, with local delivery: {received:?}"
    );
    check_wire(&wire.finish()?, out0_mac)
}

fn output_set(outputs: &[KernelOutput]) -> KernelOutputs {
    let mut set = KernelOutputs {
        count: u32::try_from(outputs.len()).expect("a few"),
        max_frame: 1514,
        ..KernelOutputs::default()
    };
    set.outputs[..outputs.len()].copy_from_slice(outputs);
    set
}

/// Checks every frame of the outputs on the sink's wire, and that each output's frames are
/// all there: datagrams 30 to 39 came from a socket, with flow label 0.
fn check_wire(captured: &[Captured], source_mac: [u8; 6]) -> anyhow::Result<()> {
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for frame in captured {
        let destination = Ipv6Addr::from(<[u8; 16]>::try_from(&frame.frame[38..54])?);
        let (wanted, seen) = match destination {
            OUTPUT_A => (WANTED_A, &mut to_a),
            OUTPUT_B => (WANTED_B, &mut to_b),
            // The relay's own MLD and neighbour discovery.
            _ => continue,
        };
        let sequence = u64::from_be_bytes(frame.frame[62..70].try_into()?);
        let flow_label = if (30..40).contains(&sequence) {
            0
        } else {
            0x1_2345
        };
        let checked = check_output_frame(frame, source_mac, wanted, flow_label)
            .with_context(|| format!("datagram {sequence} to {destination}"))?;
        seen.push(checked);
    }
    ensure!(to_a == (0..50).collect::<Vec<_>>(), "to A: {to_a:?}");
    ensure!(to_b == (0..40).collect::<Vec<_>>(), "to B: {to_b:?}");
    ensure!(
        captured.iter().any(|frame| frame.checksum_pending),
        "no frame with its checksum left to the hardware: the socket's path was not tried"
    );
    Ok(())
}

/// Checks that an output's receiver got datagrams 0..`count` of the test stream, in order,
/// from the relay's source and the input's UDP source port, as `wanted` says.
fn check_datagrams(datagrams: &[Datagram6], wanted: Wanted, count: u64) -> anyhow::Result<()> {
    ensure!(
        sequences(datagrams) == (0..count).collect::<Vec<_>>(),
        "got {:?}",
        sequences(datagrams)
    );
    for datagram in datagrams {
        ensure!(
            datagram.source == SocketAddrV6::new(RELAY6, 4000, 0, 0)
                && datagram.hop_limit == wanted.hop_limit
                && datagram.traffic_class == wanted.traffic_class
                && datagram.payload.len() == 300,
            "{datagram:?}"
        );
    }
    Ok(())
}
