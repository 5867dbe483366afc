//! Memberships of the input groups, so switches and routers deliver the streams: IGMP for
//! IPv4 groups, MLD for IPv6 ones (the kernel sends `MLDv2` reports, source-specific when the
//! rule names a sender).
//!
//! The kernel limits IPv4 memberships per socket (`net.ipv4.igmp_max_memberships`, 20 by
//! default) and charges IPv6 ones to the socket's option memory (`net.core.optmem_max`), so
//! memberships are spread over as many sockets as needed, the same number per socket in both
//! families. A socket holds at most one membership per group, which also keeps
//! source-specific joins clear of the per-group source limits (`igmp_max_msf`,
//! `mld_max_msf`).
//!
//! Several rules can need one membership (the same group on other ports, or a renamed rule
//! that starts before its old name stops), so memberships are counted: the group is left when
//! the last rule that needs it lets go.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
};

use nix::libc;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::set_option;

/// One membership: a group on an interface, from one source (of the group's family) or any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Membership {
    pub ifindex: u32,
    pub group: IpAddr,
    pub source: Option<IpAddr>,
}

#[repr(C)]
struct GroupReq {
    interface: u32,
    group: libc::sockaddr_storage,
}

#[repr(C)]
struct GroupSourceReq {
    interface: u32,
    group: libc::sockaddr_storage,
    source: libc::sockaddr_storage,
}

fn storage(address: IpAddr) -> libc::sockaddr_storage {
    let address = SockAddr::from(SocketAddr::new(address, 0));
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = (address.len() as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: both point to at least `len` bytes (a socket address is never longer than
    // sockaddr_storage), and they do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            address.as_ptr().cast::<u8>(),
            std::ptr::from_mut(&mut storage).cast::<u8>(),
            len,
        );
    }
    storage
}

struct MemberSocket {
    socket: Socket,
    /// An `AF_INET6` socket, for IPv6 groups; `AF_INET` for IPv4 ones.
    ipv6: bool,
    members: Vec<Membership>,
}

/// Where a membership is held, and by how many rules.
struct Joined {
    socket: usize,
    holders: usize,
}

pub struct Memberships {
    sockets: Vec<MemberSocket>,
    limit: usize,
    joined: HashMap<Membership, Joined>,
}

impl Memberships {
    pub fn new() -> Self {
        let limit = std::fs::read_to_string("/proc/sys/net/ipv4/igmp_max_memberships")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .filter(|limit| *limit > 0)
            .unwrap_or(20);
        Self {
            sockets: Vec::new(),
            limit,
            joined: HashMap::new(),
        }
    }

    /// Joins `membership`, or counts one more holder of it.
    pub fn join(&mut self, membership: Membership) -> io::Result<()> {
        if let Some(joined) = self.joined.get_mut(&membership) {
            joined.holders += 1;
            return Ok(());
        }
        let ipv6 = membership.group.is_ipv6();
        let free = self.sockets.iter().position(|s| {
            s.ipv6 == ipv6
                && s.members.len() < self.limit
                && !s
                    .members
                    .iter()
                    .any(|m| m.ifindex == membership.ifindex && m.group == membership.group)
        });
        let index = if let Some(index) = free {
            index
        } else {
            let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
            let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
            self.sockets.push(MemberSocket {
                socket,
                ipv6,
                members: Vec::new(),
            });
            self.sockets.len() - 1
        };
        change(&self.sockets[index].socket, membership, true)?;
        self.sockets[index].members.push(membership);
        self.joined.insert(
            membership,
            Joined {
                socket: index,
                holders: 1,
            },
        );
        Ok(())
    }

    /// Lets go of one hold on `membership`; the group is left when no holder remains.
    pub fn leave(&mut self, membership: Membership) -> io::Result<()> {
        let Some(joined) = self.joined.get_mut(&membership) else {
            return Ok(());
        };
        joined.holders -= 1;
        if joined.holders > 0 {
            return Ok(());
        }
        let index = joined.socket;
        self.joined.remove(&membership);
        let member = &mut self.sockets[index];
        member.members.retain(|m| *m != membership);
        change(&member.socket, membership, false)
    }

    /// How many rules hold `membership` (0 when it is not joined).
    pub fn holders(&self, membership: &Membership) -> usize {
        self.joined
            .get(membership)
            .map_or(0, |joined| joined.holders)
    }
}

impl Default for Memberships {
    fn default() -> Self {
        Self::new()
    }
}

/// Joins or leaves `membership` on `socket`, which is of the group's family. The
/// protocol-independent requests (RFC 3678) serve both families, at their family's level.
fn change(socket: &Socket, membership: Membership, join: bool) -> io::Result<()> {
    let fd = socket.as_fd();
    let level = if membership.group.is_ipv6() {
        libc::IPPROTO_IPV6
    } else {
        libc::IPPROTO_IP
    };
    match membership.source {
        None => {
            let request = GroupReq {
                interface: membership.ifindex,
                group: storage(membership.group),
            };
            let name = if join {
                libc::MCAST_JOIN_GROUP
            } else {
                libc::MCAST_LEAVE_GROUP
            };
            set_option(fd, level, name, &request)
        }
        Some(source) => {
            let request = GroupSourceReq {
                interface: membership.ifindex,
                group: storage(membership.group),
                source: storage(source),
            };
            let name = if join {
                libc::MCAST_JOIN_SOURCE_GROUP
            } else {
                libc::MCAST_LEAVE_SOURCE_GROUP
            };
            set_option(fd, level, name, &request)
        }
    }
}
