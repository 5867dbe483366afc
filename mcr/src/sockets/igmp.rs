//! IGMP memberships of the input groups, so switches and routers deliver the streams.
//!
//! The kernel limits memberships per socket (`net.ipv4.igmp_max_memberships`, 20 by default),
//! so memberships are spread over as many sockets as needed. A socket holds at most one
//! membership per group, which also keeps source-specific joins clear of the per-group source
//! limit (`igmp_max_msf`).
//!
//! Several rules can need one membership (the same group on other ports, or a renamed rule
//! that starts before its old name stops), so memberships are counted: the group is left when
//! the last rule that needs it lets go.

use std::{collections::HashMap, io, net::Ipv4Addr, os::fd::AsFd};

use nix::libc;
use socket2::{Domain, Protocol, Socket, Type};

use super::set_option;

/// One membership: a group on an interface, from one source or any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Membership {
    pub ifindex: u32,
    pub group: Ipv4Addr,
    pub source: Option<Ipv4Addr>,
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

fn storage(address: Ipv4Addr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits sa_family_t"),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
    unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
    storage
}

struct MemberSocket {
    socket: Socket,
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
        let free = self.sockets.iter().position(|s| {
            s.members.len() < self.limit
                && !s
                    .members
                    .iter()
                    .any(|m| m.ifindex == membership.ifindex && m.group == membership.group)
        });
        let index = if let Some(index) = free {
            index
        } else {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
            self.sockets.push(MemberSocket {
                socket,
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

fn change(socket: &Socket, membership: Membership, join: bool) -> io::Result<()> {
    let fd = socket.as_fd();
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
            set_option(fd, libc::IPPROTO_IP, name, &request)
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
            set_option(fd, libc::IPPROTO_IP, name, &request)
        }
    }
}
