//! Interface facts the supervisor looks up when a rule starts (never per packet).

use std::net::Ipv4Addr;

/// The index of `name`, if it exists.
pub fn index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// The first IPv4 address of `name`.
pub fn ipv4_address(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifaddr| {
        if ifaddr.interface_name != name {
            return None;
        }
        ifaddr
            .address?
            .as_sockaddr_in()
            .map(nix::sys::socket::SockaddrIn::ip)
    })
}
