//! Every socket the supervisor creates for the data plane: the `AF_PACKET` fanout groups that
//! feed the workers, the UDP sockets they send from, and the IGMP and MLD memberships; and the interface,
//! route and neighbour facts outputs need (`interfaces`, `routes`).

pub mod egress;
pub mod ingress;
pub mod interfaces;
pub mod memberships;
mod netlink;
pub mod routes;

use std::{
    io,
    mem::size_of_val,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `setsockopt` with a plain-data value.
fn set_option<T>(socket: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    let len = nix::libc::socklen_t::try_from(size_of_val(value)).map_err(io::Error::other)?;
    // SAFETY: `value` points to `len` initialised bytes for the duration of the call, and the
    // kernel copies them before returning.
    let rc = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt` into a plain-data value.
fn get_option<T: Default>(socket: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = nix::libc::socklen_t::try_from(size_of::<T>()).map_err(io::Error::other)?;
    // SAFETY: `value` has room for `len` bytes and lives across the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}
