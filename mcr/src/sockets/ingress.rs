//! The `AF_PACKET` sockets of one input interface and family: one per worker, joined in one
//! `PACKET_FANOUT_EBPF` group whose program (`mcr_steer`) picks the worker named in the
//! packet's mark, each behind the `mcr_admit` filter so only classified packets get through.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use nix::libc;

use super::{get_option, set_option};
use crate::{bpf::Classifier, flow::Family};

/// Receive buffer of each socket, at least: room for bursts while a worker is busy or
/// restarting.
const MIN_RECEIVE_BUFFER: usize = 32 * 1024 * 1024;
/// And at most: a limit, not an allocation (the kernel charges a socket for what it holds,
/// and the classifier sheds before it holds more than a window). It cuts only windows that
/// would need more: jumbo frames with a large `settings.shed_window`.
pub const MAX_RECEIVE_BUFFER: usize = 160 * 1024 * 1024;

/// What a window of `window` packets of an interface with `mtu` costs a socket: each costs
/// it about twice its length, and more for small ones.
pub fn window_bytes(window: u64, mtu: u32) -> usize {
    let per_packet = 2 * mtu as usize + 1024;
    usize::try_from(window)
        .unwrap_or(usize::MAX)
        .saturating_mul(per_packet)
}

/// The receive buffer a socket of an interface with `mtu` gets: room for a worker's shedding
/// window of `window` packets (`settings.shed_window`), so that the classifier sheds before a
/// socket overflows, within [`MAX_RECEIVE_BUFFER`].
pub fn receive_buffer(window: u64, mtu: u32) -> usize {
    window_bytes(window, mtu).clamp(MIN_RECEIVE_BUFFER, MAX_RECEIVE_BUFFER)
}

/// `struct tpacket_stats`.
#[repr(C)]
#[derive(Default)]
struct PacketStatistics {
    packets: u32,
    drops: u32,
}

/// One interface's sockets; index `i` belongs to worker `i`.
pub struct FanoutGroup {
    pub sockets: Vec<OwnedFd>,
}

impl FanoutGroup {
    /// Opens `workers` sockets on `ifindex` and joins them into a new fanout group. Sockets
    /// join in worker order, so a socket's place in the group is its worker's index. Each
    /// socket's receive buffer holds `shed_window` packets of `mtu` (see [`receive_buffer`]).
    pub fn open(
        ifindex: u32,
        family: Family,
        mtu: u32,
        shed_window: u64,
        workers: usize,
        classifier: &Classifier,
    ) -> io::Result<Self> {
        let mut sockets = Vec::with_capacity(workers);
        let mut group_id = None;
        let receive_buffer =
            i32::try_from(receive_buffer(shed_window, mtu)).map_err(io::Error::other)?;
        for _ in 0..workers {
            let socket = packet_socket(ifindex, family, receive_buffer)?;
            let id = join_fanout(&socket, group_id)?;
            group_id = Some(id);
            sockets.push(socket);
        }
        if let Some(first) = sockets.first() {
            let program = classifier.steer_program().map_err(io::Error::other)?;
            set_option(
                first.as_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT_DATA,
                &program.as_raw_fd(),
            )?;
        }
        // Until now every socket dropped everything; from here on they admit marked packets.
        for socket in &sockets {
            classifier
                .attach_admit_filter(socket.as_fd())
                .map_err(io::Error::other)?;
        }
        Ok(Self { sockets })
    }

    /// Packets received and dropped by each socket since the last call (the kernel resets
    /// `PACKET_STATISTICS` on every read).
    pub fn take_statistics(&self) -> Vec<(u64, u64)> {
        self.sockets
            .iter()
            .map(|socket| {
                get_option::<PacketStatistics>(
                    socket.as_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                )
                .map_or((0, 0), |stats| {
                    (u64::from(stats.packets), u64::from(stats.drops))
                })
            })
            .collect()
    }

    /// Whether a packet waits in the socket of `worker` (`SIOCINQ`, alias `FIONREAD`, which
    /// on a packet socket is the length of the next queued packet).
    pub fn has_waiting(&self, worker: usize) -> bool {
        let Some(socket) = self.sockets.get(worker) else {
            return false;
        };
        let mut next: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int through the pointer, which points at `next`.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &raw mut next) };
        rc == 0 && next > 0
    }
}

/// A cooked (`SOCK_DGRAM`) packet socket for `family`'s packets on `ifindex` that receives
/// nothing yet.
fn packet_socket(ifindex: u32, family: Family, receive_buffer: i32) -> io::Result<OwnedFd> {
    let protocol = family.ethertype().to_be();
    // SAFETY: plain socket(2) call; the result is checked before it is wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    // Drop everything until the socket is in its fanout group, so it never sees a packet the
    // group's other members also get.
    let mut drop_all = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    set_option(
        socket.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &program,
    )?;
    // Frames this host sends on the interface are not input.
    set_option(
        socket.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        &1_i32,
    )?;
    if set_option(
        socket.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &receive_buffer,
    )
    .is_err()
    {
        set_option(
            socket.as_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &receive_buffer,
        )?;
    }

    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value to fill in.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = u16::try_from(libc::AF_PACKET).map_err(io::Error::other)?;
    address.sll_protocol = protocol;
    address.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
    // SAFETY: `address` is a complete sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&address).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Joins `socket` to fanout group `id`, or to a new group with a kernel-chosen id; returns
/// the group id.
fn join_fanout(socket: &OwnedFd, id: Option<u16>) -> io::Result<u16> {
    let kind = libc::PACKET_FANOUT_EBPF;
    let argument = match id {
        Some(id) => (kind << 16) | u32::from(id),
        None => (kind | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16,
    };
    set_option(
        socket.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_FANOUT,
        &argument,
    )?;
    let joined: u32 = get_option(socket.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT)?;
    Ok((joined & 0xffff) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{DEFAULT_SHED_WINDOW, MAX_SHED_WINDOW, MIN_SHED_WINDOW};

    #[test]
    fn sockets_hold_a_shedding_window() {
        assert!(receive_buffer(DEFAULT_SHED_WINDOW, 1500) >= 8192 * 3000);
        let jumbo = receive_buffer(DEFAULT_SHED_WINDOW, 9000);
        assert!(jumbo >= 8192 * 9000, "{jumbo}");
        assert!(jumbo <= MAX_RECEIVE_BUFFER);
    }

    #[test]
    fn the_receive_buffer_grows_with_the_window() {
        let large = receive_buffer(MAX_SHED_WINDOW, 1500);
        assert!(large >= 32_768 * 3000, "{large}");
        assert!(large > receive_buffer(DEFAULT_SHED_WINDOW, 1500));
        // Decision 0017's figure for a window of 32,768 at a 1500-byte MTU.
        assert_eq!(large / (1024 * 1024), 125);
        // A small window keeps the floor: room for a worker's restart.
        assert_eq!(receive_buffer(MIN_SHED_WINDOW, 1500), MIN_RECEIVE_BUFFER);
    }

    #[test]
    fn every_allowed_window_fits_a_socket_of_a_standard_mtu() {
        // The bound `settings.shed_window` is checked against: the largest window must not be
        // cut by the limit, or a socket would overflow before the classifier sheds.
        for window in [MIN_SHED_WINDOW, DEFAULT_SHED_WINDOW, MAX_SHED_WINDOW] {
            assert!(
                window_bytes(window, 1500) <= MAX_RECEIVE_BUFFER,
                "a window of {window} does not fit"
            );
            assert_eq!(
                receive_buffer(window, 1500),
                window_bytes(window, 1500).max(MIN_RECEIVE_BUFFER)
            );
        }
        // Jumbo frames: the default window fits, the largest is cut at the limit.
        assert!(window_bytes(DEFAULT_SHED_WINDOW, 9000) <= MAX_RECEIVE_BUFFER);
        assert!(window_bytes(MAX_SHED_WINDOW, 9000) > MAX_RECEIVE_BUFFER);
        assert_eq!(receive_buffer(MAX_SHED_WINDOW, 9000), MAX_RECEIVE_BUFFER);
    }
}
