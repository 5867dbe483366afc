//! When each latency sample left the generator, as the kernel saw it: a software transmit
//! timestamp (`SO_TIMESTAMPING` with `SOF_TIMESTAMPING_TX_SOFTWARE`), which the veth driver
//! takes as it hands the frame to the relay's interface. That is after the `tbf` qdisc, so the
//! time a frame waited there (the generator runs a millisecond ahead of it) is not counted as
//! the relay's.
//!
//! A timestamp is asked for per frame, with a control message that also names the frame
//! (`SCM_TS_OPT_ID`: the low 32 bits of its sequence number), and read back from the socket's
//! error queue. The error queue gets the timestamp and the name only
//! (`SOF_TIMESTAMPING_OPT_TSONLY`), never a clone of the frame: a clone shares the frame's
//! data, and a relay that writes to a shared frame (the kernel's forwarding, MCR's kernel path)
//! copies it first, which would make sampled frames dearer to relay than the others.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::{Context as _, bail};
use nix::{errno::Errno, libc};

use super::packet_socket::set_option;

/// `SCM_TS_OPT_ID` (Linux 6.13, `asm-generic/socket.h`): the timestamp's id, per packet.
const SCM_TS_OPT_ID: libc::c_int = 81;
/// `SO_TIMESTAMPING` as the kernel reports it back (the 64-bit `timespec` flavour on 64-bit
/// targets).
const SCM_TIMESTAMPING: libc::c_int = libc::SO_TIMESTAMPING;
/// Room on the error queue: timestamps wait there until the generator reads them, a few
/// hundred bytes each.
const ERROR_QUEUE_BUFFER: usize = 64 << 20;
/// Timestamps read per system call.
pub const READ_BATCH: usize = 64;

/// One sampled frame's departure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxStamp {
    /// The low 32 bits of the frame's sequence number.
    pub id: u32,
    /// `CLOCK_REALTIME` nanoseconds when the driver passed the frame on.
    pub sent_real_ns: u64,
}

/// Makes `fd` report software transmit timestamps (only for frames that ask, see
/// [`Request`]) with the id the frame gives and no copy of the frame.
pub fn enable(fd: BorrowedFd) -> anyhow::Result<()> {
    let flags = libc::SOF_TIMESTAMPING_SOFTWARE
        | libc::SOF_TIMESTAMPING_OPT_ID
        | libc::SOF_TIMESTAMPING_OPT_TSONLY;
    let flags = libc::c_int::try_from(flags)?;
    set_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, &flags)
        .context("setting SO_TIMESTAMPING")?;
    let buffer = libc::c_int::try_from(ERROR_QUEUE_BUFFER)?;
    set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &buffer)
        .context("setting SO_RCVBUFFORCE for the timestamps")
}

const CMSG_HEADER: usize = size_of::<libc::cmsghdr>();
/// A control message with a 4-byte value, padded to the next header.
const CMSG_U32_SPACE: usize = (CMSG_HEADER + 4).next_multiple_of(size_of::<usize>());

/// The control data that asks for one frame's transmit timestamp under an id.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Request {
    bytes: [u8; 2 * CMSG_U32_SPACE],
}

impl Request {
    pub fn new(id: u32) -> Self {
        let mut request = Self {
            bytes: [0; 2 * CMSG_U32_SPACE],
        };
        let generate = libc::SOF_TIMESTAMPING_TX_SOFTWARE;
        write_cmsg(
            &mut request.bytes[..CMSG_U32_SPACE],
            SCM_TIMESTAMPING,
            generate,
        );
        write_cmsg(&mut request.bytes[CMSG_U32_SPACE..], SCM_TS_OPT_ID, id);
        request
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }

    pub const fn len() -> usize {
        2 * CMSG_U32_SPACE
    }
}

/// A `SOL_SOCKET` control message carrying `value`, in the kernel's layout (`cmsghdr`: length,
/// level, type, then the data).
fn write_cmsg(space: &mut [u8], kind: libc::c_int, value: u32) {
    let len = CMSG_HEADER + 4;
    space[..8].copy_from_slice(&(len as u64).to_ne_bytes());
    space[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
    space[12..16].copy_from_slice(&kind.to_ne_bytes());
    space[16..20].copy_from_slice(&value.to_ne_bytes());
}

/// Control data of one error-queue message, aligned as the kernel writes `cmsghdr`s.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 128]);

/// Room for a batch of timestamps off the error queue.
pub struct ErrorQueueReader {
    controls: Vec<Control>,
    messages: Vec<libc::mmsghdr>,
}

impl ErrorQueueReader {
    pub fn new() -> Self {
        Self {
            controls: vec![Control([0; 128]); READ_BATCH],
            // SAFETY: `mmsghdr` is plain integers and pointers, for which all zeros is valid.
            messages: vec![unsafe { std::mem::zeroed() }; READ_BATCH],
        }
    }

    /// Reads what timestamps are waiting (up to [`READ_BATCH`]) into `out`, without waiting;
    /// returns how many.
    pub fn read(&mut self, fd: BorrowedFd, out: &mut Vec<TxStamp>) -> anyhow::Result<usize> {
        let batch = libc::c_uint::try_from(READ_BATCH)?;
        for (message, control) in self.messages.iter_mut().zip(&mut self.controls) {
            message.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            message.msg_hdr.msg_controllen = control.0.len();
            message.msg_hdr.msg_iov = std::ptr::null_mut();
            message.msg_hdr.msg_iovlen = 0;
            message.msg_len = 0;
        }
        // SAFETY: every message points at its own live control buffer of the length given and
        // at no data; the kernel writes only inside them and the messages' lengths.
        let received = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.messages.as_mut_ptr(),
                batch,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let received = match Errno::result(received) {
            Ok(n) => usize::try_from(n)?,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(error) => bail!("reading transmit timestamps: {error}"),
        };
        let mut found = 0;
        for (message, control) in self.messages.iter().zip(&self.controls).take(received) {
            let len = message.msg_hdr.msg_controllen.min(control.0.len());
            if let Some(stamp) = parse_control(&control.0[..len]) {
                out.push(stamp);
                found += 1;
            }
        }
        Ok(found)
    }
}

/// The timestamp and id in the control data of one error-queue message.
fn parse_control(mut bytes: &[u8]) -> Option<TxStamp> {
    let mut sent = None;
    let mut id = None;
    while bytes.len() >= CMSG_HEADER {
        let len = usize::try_from(u64::from_ne_bytes(bytes[..8].try_into().ok()?)).ok()?;
        let level = i32::from_ne_bytes(bytes[8..12].try_into().ok()?);
        let kind = i32::from_ne_bytes(bytes[12..16].try_into().ok()?);
        if len < CMSG_HEADER || len > bytes.len() {
            break;
        }
        let data = &bytes[CMSG_HEADER..len];
        if level == libc::SOL_SOCKET && kind == SCM_TIMESTAMPING && data.len() >= 16 {
            // scm_timestamping: three timespecs, the software one first.
            let seconds = i64::from_ne_bytes(data[..8].try_into().ok()?);
            let nanos = i64::from_ne_bytes(data[8..16].try_into().ok()?);
            sent = u64::try_from(seconds * 1_000_000_000 + nanos).ok();
        } else if data.len() >= size_of::<libc::sock_extended_err>() {
            // sock_extended_err (SOL_PACKET / PACKET_TX_TIMESTAMP on a packet socket).
            let errno = u32::from_ne_bytes(data[..4].try_into().ok()?);
            let origin = data[4];
            if errno == libc::ENOMSG as u32 && origin == libc::SO_EE_ORIGIN_TIMESTAMPING {
                id = Some(u32::from_ne_bytes(data[12..16].try_into().ok()?));
            }
        }
        let next = len.next_multiple_of(size_of::<usize>());
        bytes = bytes.get(next..).unwrap_or_default();
    }
    Some(TxStamp {
        id: id?,
        sent_real_ns: sent?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((CMSG_HEADER + data.len()) as u64).to_ne_bytes());
        bytes.extend_from_slice(&level.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        bytes
    }

    #[test]
    fn reads_the_timestamp_and_the_id_the_frame_gave() {
        let mut timestamps = Vec::new();
        for (seconds, nanos) in [(1_700_000_000_i64, 123_456_789_i64), (0, 0), (0, 0)] {
            timestamps.extend_from_slice(&seconds.to_ne_bytes());
            timestamps.extend_from_slice(&nanos.to_ne_bytes());
        }
        let mut error = Vec::new();
        error.extend_from_slice(&(libc::ENOMSG as u32).to_ne_bytes());
        error.extend_from_slice(&[libc::SO_EE_ORIGIN_TIMESTAMPING, 0, 0, 0]);
        error.extend_from_slice(&0_u32.to_ne_bytes());
        error.extend_from_slice(&4242_u32.to_ne_bytes());
        let mut control = cmsg(libc::SOL_SOCKET, SCM_TIMESTAMPING, &timestamps);
        control.extend(cmsg(libc::SOL_PACKET, libc::PACKET_TX_TIMESTAMP, &error));
        assert_eq!(
            parse_control(&control),
            Some(TxStamp {
                id: 4242,
                sent_real_ns: 1_700_000_000_123_456_789
            })
        );
        // Without the id, or without the time, there is nothing to match a delivery with.
        assert_eq!(parse_control(&control[..CMSG_HEADER + 48]), None);
        assert_eq!(parse_control(&cmsg(libc::SOL_PACKET, 16, &error)), None);
    }

    #[test]
    fn a_request_holds_both_control_messages() {
        let request = Request::new(7);
        let bytes = request.bytes;
        assert_eq!(
            u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes")),
            20
        );
        assert_eq!(
            i32::from_ne_bytes(bytes[12..16].try_into().expect("4 bytes")),
            libc::SO_TIMESTAMPING
        );
        let second = &bytes[CMSG_U32_SPACE..];
        assert_eq!(
            i32::from_ne_bytes(second[12..16].try_into().expect("4 bytes")),
            SCM_TS_OPT_ID
        );
        assert_eq!(
            u32::from_ne_bytes(second[16..20].try_into().expect("4 bytes")),
            7
        );
    }
}
