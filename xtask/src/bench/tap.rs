//! The sink's latency tap: one packet socket per sink interface that takes the kernel's
//! receive time of every latency sample. The same for every relay, and out of the way of the
//! loss figures:
//!
//! - It taps the interface (`ETH_P_ALL`), which the kernel serves before the ingress hook
//!   where the nftables counters count and drop every packet, so the counters see what they
//!   saw without it.
//! - A classic BPF filter keeps only the generator's samples (the stamp's magic and sample
//!   flag, at the same offset whatever relay framed the packet: 42 for IPv4 without options,
//!   62 for IPv6 without extension headers), and only their headers and stamp; every other
//!   packet costs the filter alone.
//! - The receive time is the kernel's software timestamp (`SO_TIMESTAMPNS`), taken when the
//!   frame enters the sink interface (`netif_rx`, before it is queued for the CPU that
//!   processes it: `net.core.netdev_tstamp_prequeue`, on by default), so the time the sink's
//!   CPU takes to get to it is not counted.
//! - The samples land in a memory-mapped ring (`PACKET_RX_RING`, `TPACKET_V2`) that holds a
//!   whole trial's, read once the trial is over: nothing reads during the trial on the CPU the
//!   generator needs.
//!
//! The tap is opened for a latency trial and closed after it. While any socket asks for receive
//! timestamps the kernel stamps every frame any interface receives (a clock read each).

use std::{
    fs::File,
    num::NonZeroUsize,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    libc,
    net::if_::if_nametoindex,
    sched::{CloneFlags, setns},
    sys::{
        mman::{MapFlags, ProtFlags, mmap, munmap},
        socket::{AddressFamily, SockFlag, SockType, socket},
    },
};

use super::{
    frame::Family,
    packet_socket::{bind_to, set_option},
    stamp::{MAGIC, STAMP_LEN, Stamp},
    topology::Netns,
};

/// Bytes of each sample the tap keeps: the headers and the stamp.
fn snap_len(family: Family) -> usize {
    family.headers() + STAMP_LEN
}

/// One slot of the ring: the `tpacket2_hdr`, the link-layer address and a sample's headers
/// and stamp.
const FRAME_SIZE: usize = 256;
const BLOCK_SIZE: usize = 128 << 10;
/// 32 MiB per interface: 131,072 samples, more than a trial takes (see `latency.rs`).
const BLOCKS: usize = 256;
pub const RING_SLOTS: usize = BLOCKS * BLOCK_SIZE / FRAME_SIZE;
const ETH_P_ALL: u16 = 0x0003;
/// `TPACKET_V2` in `enum tpacket_versions`.
const TPACKET_V2: libc::c_int = 1;

/// One sample as it arrived at the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxSample {
    pub sequence: u64,
    /// The generator's stamp: `CLOCK_MONOTONIC` when the frame's batch was handed to the kernel.
    pub sent_mono_ns: u64,
    /// `CLOCK_REALTIME` when the frame entered the sink interface.
    pub arrived_real_ns: u64,
}

/// What the tap saw over a trial.
#[derive(Clone, Debug, Default)]
pub struct TapReadout {
    pub samples: Vec<RxSample>,
    /// Samples the kernel had no receive timestamp for (timestamping was not on yet).
    pub unstamped: u64,
    /// Samples the ring had no room for.
    pub dropped: u64,
}

/// The taps of one trial, one per sink interface.
pub struct Tap {
    rings: Vec<Ring>,
    family: Family,
}

struct Ring {
    fd: OwnedFd,
    memory: NonNull<libc::c_void>,
    len: usize,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `memory` is the mapping of `len` bytes made in `Ring::open`, and no reference
        // into it outlives `Tap::collect`.
        if let Err(error) = unsafe { munmap(self.memory, self.len) } {
            eprintln!("bench: cleanup: unmapping the sink tap's ring: {error}");
        }
    }
}

impl Tap {
    /// Opens a tap on each of `interfaces` in `netns`, for samples of `family`.
    pub fn open(netns: &Netns, interfaces: &[String], family: Family) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{}", netns.name());
        let namespace = File::open(&path).with_context(|| format!("opening {path}"))?;
        // A socket belongs to the namespace it was created in; only this short-lived thread
        // enters the sink's.
        let sockets = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<Vec<OwnedFd>> {
                    setns(&namespace, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering {}", netns.name()))?;
                    interfaces
                        .iter()
                        .map(|name| open_socket(name, family))
                        .collect()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread opening the sink tap panicked"))?
        })
        .context("opening the sink's latency tap")?;
        let rings = sockets
            .into_iter()
            .map(Ring::map)
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { rings, family })
    }

    /// Everything the taps caught (call once, after the trial).
    pub fn collect(&mut self) -> anyhow::Result<TapReadout> {
        let mut readout = TapReadout::default();
        for ring in &self.rings {
            ring.collect(self.family, &mut readout);
            readout.dropped += u64::from(drops(ring.fd.as_fd())?);
        }
        Ok(readout)
    }
}

impl Ring {
    fn map(fd: OwnedFd) -> anyhow::Result<Self> {
        let len = BLOCKS * BLOCK_SIZE;
        // SAFETY: a fresh shared mapping of the socket's ring, which `PACKET_RX_RING` sized
        // to `len`; nothing else maps it, and `Drop` unmaps it.
        let memory = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).context("empty ring")?,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .context("mapping the sink tap's ring")?;
        Ok(Self { fd, memory, len })
    }

    /// Reads the ring's slots in order up to the first the kernel has not filled. (Nothing
    /// hands slots back during a trial, so the kernel fills them in order and drops what finds
    /// the ring full.)
    fn collect(&self, family: Family, readout: &mut TapReadout) {
        let base = self.memory.as_ptr().cast::<u8>();
        for slot in 0..RING_SLOTS {
            // SAFETY: `slot * FRAME_SIZE` is inside the mapping (`RING_SLOTS * FRAME_SIZE ==
            // len`), and every slot starts with a `tpacket2_hdr`, aligned (the mapping is
            // page-aligned and `FRAME_SIZE` a multiple of 16). The kernel writes `tp_status`
            // last; the volatile read sees it.
            #[allow(clippy::cast_ptr_alignment)]
            let header = unsafe { base.add(slot * FRAME_SIZE).cast::<libc::tpacket2_hdr>() };
            // SAFETY: as above.
            let status = unsafe { std::ptr::addr_of!((*header).tp_status).read_volatile() };
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            // The rest of the slot was written before its status.
            fence(Ordering::Acquire);
            // SAFETY: the kernel is done with a slot marked for the user; it stays mapped
            // while `self` lives.
            let header = unsafe { header.read() };
            if status & libc::TP_STATUS_TS_SOFTWARE == 0 {
                readout.unstamped += 1;
                continue;
            }
            let start = usize::from(header.tp_mac);
            let len = usize::try_from(header.tp_snaplen).unwrap_or(0);
            if start + len > FRAME_SIZE || len < snap_len(family) {
                continue;
            }
            // SAFETY: `start + len` is inside the slot (checked just above).
            let data =
                unsafe { std::slice::from_raw_parts(base.add(slot * FRAME_SIZE + start), len) };
            let Some(stamp) = Stamp::parse(&data[family.headers()..]) else {
                continue;
            };
            readout.samples.push(RxSample {
                sequence: stamp.sequence,
                sent_mono_ns: stamp.sent_ns,
                arrived_real_ns: u64::from(header.tp_sec) * 1_000_000_000
                    + u64::from(header.tp_nsec),
            });
        }
    }
}

/// A tap on `interface` of the current namespace, ring and filter in place before it is
/// bound (bound, it starts receiving).
fn open_socket(interface: &str, family: Family) -> anyhow::Result<OwnedFd> {
    let ifindex = if_nametoindex(interface).with_context(|| format!("no interface {interface}"))?;
    // Protocol 0 until bound: no packet arrives before the filter and the ring are set.
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a packet socket")?;
    let filter = sample_filter(family);
    let program = libc::sock_fprog {
        len: u16::try_from(filter.len())?,
        filter: filter.as_ptr().cast_mut(),
    };
    set_option(
        fd.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &program,
    )
    .context("attaching the sample filter")?;
    set_option(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &TPACKET_V2,
    )
    .context("setting PACKET_VERSION")?;
    let software: libc::c_int = libc::SOF_TIMESTAMPING_SOFTWARE.try_into()?;
    set_option(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_TIMESTAMP,
        &software,
    )
    .context("setting PACKET_TIMESTAMP")?;
    // Asks the kernel to stamp frames as they arrive (the ring's timestamps come from there).
    let on: libc::c_int = 1;
    set_option(fd.as_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &on)
        .context("setting SO_TIMESTAMPNS")?;
    let request = libc::tpacket_req {
        tp_block_size: BLOCK_SIZE.try_into()?,
        tp_block_nr: BLOCKS.try_into()?,
        tp_frame_size: FRAME_SIZE.try_into()?,
        tp_frame_nr: RING_SLOTS.try_into()?,
    };
    set_option(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_RX_RING, &request)
        .context("setting up the receive ring")?;
    bind_to(fd.as_fd(), ifindex, ETH_P_ALL)
        .with_context(|| format!("binding the tap to {interface}"))?;
    Ok(fd)
}

/// Samples the ring had no room for (`PACKET_STATISTICS`, which resets as it is read).
fn drops(fd: BorrowedFd) -> anyhow::Result<u32> {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tpacket_stats>())?;
    // SAFETY: `stats` is a live `tpacket_stats` and `len` its size; the kernel writes at most
    // that much.
    let result = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            std::ptr::from_mut(&mut stats).cast(),
            &raw mut len,
        )
    };
    Errno::result(result).context("reading PACKET_STATISTICS")?;
    Ok(stats.tp_drops)
}

/// Classic BPF instruction classes and modes (`linux/filter.h`).
const LD_W_ABS: u16 = 0x20;
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

/// Keeps the headers and stamp of `family`'s UDP frames (IPv4 without options, IPv6 without
/// extension headers: UDP right after the fixed header) whose payload starts with a sample's
/// stamp; drops everything else.
fn sample_filter(family: Family) -> Vec<libc::sock_filter> {
    // Short constants: they fit.
    let payload_at = u32::try_from(family.headers()).unwrap_or(u32::MAX);
    let snap_len = u32::try_from(snap_len(family)).unwrap_or(u32::MAX);
    // (offset, load, expected value): every test jumps to the drop at the end when it fails.
    let (version, protocol) = match family {
        // Version 4 with a 20-byte header; the protocol field.
        Family::Ipv4 => ((14, LD_B_ABS, 0x45), (23, LD_B_ABS, 17)),
        // IPv6's payload length is where IPv4's protocol would be; its next header.
        Family::Ipv6 => ((14, LD_B_ABS, 0x60), (20, LD_B_ABS, 17)),
    };
    let tests: [(u32, u16, u32); 5] = [
        (12, LD_H_ABS, u32::from(family.ethertype())),
        version,
        protocol,
        (payload_at, LD_W_ABS, MAGIC),
        (payload_at + 4, LD_W_ABS, 1),
    ];
    let mut program = Vec::new();
    let drop_at = 2 * tests.len() + 1;
    for (offset, load, value) in tests {
        program.push(libc::sock_filter {
            code: load,
            jt: 0,
            jf: 0,
            k: offset,
        });
        let next = program.len() + 1;
        program.push(libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            // Short of 256 instructions: fits.
            jf: u8::try_from(drop_at - next).unwrap_or(u8::MAX),
            k: value,
        });
    }
    program.push(libc::sock_filter {
        code: RET_K,
        jt: 0,
        jf: 0,
        k: snap_len,
    });
    program.push(libc::sock_filter {
        code: RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    });
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` on `packet` the way the kernel's classic BPF interpreter does, for the
    /// few instructions the filter uses.
    fn run(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
        let mut accumulator = 0_u32;
        let mut pc = 0;
        loop {
            let instruction = program[pc];
            let at = instruction.k as usize;
            let load = |len: usize| -> Option<u32> {
                let bytes = packet.get(at..at + len)?;
                Some(bytes.iter().fold(0, |acc, &b| (acc << 8) | u32::from(b)))
            };
            match instruction.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS => {
                    let len = match instruction.code {
                        LD_W_ABS => 4,
                        LD_H_ABS => 2,
                        _ => 1,
                    };
                    // A load past the end drops the packet.
                    let Some(value) = load(len) else { return 0 };
                    accumulator = value;
                    pc += 1;
                }
                JEQ_K => {
                    let jump = if accumulator == instruction.k {
                        instruction.jt
                    } else {
                        instruction.jf
                    };
                    pc += 1 + usize::from(jump);
                }
                RET_K => return instruction.k,
                other => panic!("instruction {other:#x}"),
            }
        }
    }

    fn stamped(source: &str, group: &str, sampled: bool) -> Vec<u8> {
        use crate::bench::{frame::FrameSpec, stamp::StampedFrame};
        let frame = FrameSpec {
            source_mac: [2, 0, 0, 0, 0, 1],
            source: source.parse().expect("an address"),
            group: group.parse().expect("a group"),
            source_port: 4000,
            port: 6000,
            ttl: 31,
            payload: 512,
        }
        .bytes()
        .expect("a frame");
        let mut stamped = StampedFrame::new(frame).expect("room");
        stamped.stamp(&Stamp {
            sampled,
            sequence: 99,
            sent_ns: 1,
        });
        stamped.bytes().to_vec()
    }

    fn sample_frame(sampled: bool) -> Vec<u8> {
        stamped("10.2.0.1", "239.2.2.1", sampled)
    }

    fn sample_frame6(sampled: bool) -> Vec<u8> {
        stamped("fd00:2::1", "ff0e::2:1", sampled)
    }

    #[test]
    fn the_filter_keeps_the_headers_and_stamp_of_samples_only() {
        let program = sample_filter(Family::Ipv4);
        assert_eq!(run(&program, &sample_frame(true)), 42 + 24);
        assert_eq!(run(&program, &sample_frame(false)), 0, "not a sample");
        let mut options = sample_frame(true);
        options[14] = 0x46;
        assert_eq!(run(&program, &options), 0, "IP options move the payload");
        let mut tcp = sample_frame(true);
        tcp[23] = 6;
        assert_eq!(run(&program, &tcp), 0, "not UDP");
        assert_eq!(run(&program, &sample_frame6(true)), 0, "not IPv4");
        let mut foreign = sample_frame(true);
        foreign[42] ^= 1;
        assert_eq!(run(&program, &foreign), 0, "no stamp");
        assert_eq!(run(&program, &sample_frame(true)[..40]), 0, "too short");
    }

    #[test]
    fn the_ipv6_filter_finds_the_stamp_20_bytes_further_on() {
        let program = sample_filter(Family::Ipv6);
        assert_eq!(run(&program, &sample_frame6(true)), 62 + 24);
        let readout = Stamp::parse(&sample_frame6(true)[62..]).expect("a stamp");
        assert_eq!(readout.sequence, 99);
        assert_eq!(run(&program, &sample_frame6(false)), 0, "not a sample");
        assert_eq!(run(&program, &sample_frame(true)), 0, "not IPv6");
        let mut extension = sample_frame6(true);
        extension[20] = 0; // a hop-by-hop header before UDP moves the payload
        assert_eq!(run(&program, &extension), 0, "extension header");
        let mut foreign = sample_frame6(true);
        foreign[62] ^= 1;
        assert_eq!(run(&program, &foreign), 0, "no stamp");
        assert_eq!(run(&program, &sample_frame6(true)[..60]), 0, "too short");
    }

    #[test]
    fn a_ring_slot_holds_a_sample() {
        assert_eq!(snap_len(Family::Ipv4), 42 + STAMP_LEN);
        assert_eq!(snap_len(Family::Ipv6), 62 + STAMP_LEN);
        // tpacket_rcv puts the MAC header at TPACKET_ALIGN(TPACKET2_HDRLEN + 16) - 14.
        let mac = (libc::TPACKET2_HDRLEN + 16).next_multiple_of(libc::TPACKET_ALIGNMENT) - 14;
        assert!(mac + snap_len(Family::Ipv6) <= FRAME_SIZE);
        assert_eq!(BLOCK_SIZE % FRAME_SIZE, 0);
    }
}
