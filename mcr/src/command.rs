//! What the supervisor tells a worker, over a `SOCK_SEQPACKET` Unix socket: one message per
//! command (JSON, it is rare and small), with the sockets it refers to attached as
//! `SCM_RIGHTS`.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::flow::FlowKey;

/// The largest command message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most file descriptors one command carries (at most one per output of a rule).
pub const MAX_FDS: usize = mcr_common::MAX_RULE_OUTPUTS;

/// What a worker needs to build the frames of a multicast output itself: the link-layer
/// destination and the fields of the IP and UDP headers that do not change per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameHeader {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub addresses: FrameAddresses,
    pub port: u16,
    /// IPv4 TTL, or IPv6 hop limit.
    pub ttl: u8,
    /// The output interface's Ethernet source address and MTU, when it is an Ethernet
    /// interface: the worker then writes the whole frame and sends runs of same-size packets
    /// as one segmentation-offload send on the egress's Ethernet socket.
    pub ethernet: Option<EthernetOrigin>,
}

/// What the worker needs to write an output's Ethernet header and to keep the packets of a
/// segmented send within the interface's MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EthernetOrigin {
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// The source and destination of a framed output, which also say its family: an IPv4 or an
/// IPv6 header, whatever the family of the input packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameAddresses {
    V4 {
        source: [u8; 4],
        destination: [u8; 4],
    },
    V6 {
        source: [u8; 16],
        destination: [u8; 16],
    },
}

/// One output of a rule as a worker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Index of the output's counters in the worker's counter block.
    pub counter: u32,
    /// Set for outputs the worker frames itself; `None` for a UDP socket output.
    pub frame: Option<FrameHeader>,
    /// DSCP to set on the output's packets; `None` carries the input packet's.
    pub dscp: Option<u8>,
    /// The output sends IPv6: a socket output's DSCP/ECN byte goes in an `IPV6_TCLASS`
    /// control message rather than `IP_TOS`. Always that of `frame`'s addresses when framed.
    pub ipv6: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// First message. Attached: the counter block memfd and the classifier's load map.
    Init {
        worker: u32,
        cpu: Option<usize>,
        uid: u32,
        gid: u32,
        /// Packets the worker may be behind before the classifier sheds its packets
        /// (`settings.shed_window`), which the worker writes into its page of the load map.
        shed_window: u64,
    },
    /// Receive from a new `AF_PACKET` socket (attached), which belongs to interface `ifindex`.
    AddInput {
        input: u32,
        ifindex: u32,
        /// The interface's MTU: which receive buffers its packets need.
        mtu: u32,
    },
    /// Stop receiving from `input` and close it.
    RemoveInput {
        input: u32,
    },
    /// Send the frames of every multicast output on the attached send-only link-layer sockets
    /// (one set per worker: packet sockets cost the kernel an RCU grace period each to close):
    /// IP packets on the first; with `ethernet`, whole Ethernet frames with a segmentation
    /// header on the second (see `sockets::egress::EgressSockets`).
    SetEgress {
        ethernet: bool,
    },
    /// Forward `key` to `outputs`. An output with a frame header is framed by the worker and
    /// sent on the egress socket; each other output brings its own connected UDP socket,
    /// attached in order. Replaces the rule's outputs if `slot` is already known.
    AddRule {
        slot: u32,
        key: FlowKey,
        outputs: Vec<OutputSpec>,
    },
    RemoveRule {
        slot: u32,
    },
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("control socket: {0}")]
    Io(#[from] nix::Error),
    #[error("control message is not a command: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("command {0} carries {1} sockets, expected {2}")]
    FdCount(&'static str, usize, usize),
    #[error("the supervisor closed the control socket")]
    Closed,
}

/// What a worker sends back, once: it has given up its privileges and is forwarding.
pub const READY: &[u8] = b"ready";

/// Sends `command` with `fds` attached.
pub fn send(
    socket: BorrowedFd<'_>,
    command: &Command,
    fds: &[BorrowedFd<'_>],
) -> Result<(), CommandError> {
    let bytes = serde_json::to_vec(command)?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one command and the descriptors attached to it. `Ok(None)` when no message is
/// waiting (the socket is non-blocking).
pub fn receive(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> Result<Option<(Command, Vec<OwnedFd>)>, CommandError> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = match recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(message) => message,
        Err(nix::Error::EAGAIN) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now; each is
            // owned by nobody else.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = message.bytes;
    if len == 0 {
        return Err(CommandError::Closed);
    }
    let command = serde_json::from_slice(&buffer[..len])?;
    Ok(Some((command, fds)))
}

impl Command {
    /// How many descriptors this command must carry.
    pub fn expected_fds(&self) -> usize {
        match self {
            Self::Init { .. } | Self::SetEgress { ethernet: true } => 2,
            Self::AddInput { .. } | Self::SetEgress { ethernet: false } => 1,
            Self::AddRule { outputs, .. } => outputs.iter().filter(|o| o.frame.is_none()).count(),
            Self::RemoveInput { .. } | Self::RemoveRule { .. } | Self::Shutdown => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Init { .. } => "init",
            Self::AddInput { .. } => "add-input",
            Self::RemoveInput { .. } => "remove-input",
            Self::SetEgress { .. } => "set-egress",
            Self::AddRule { .. } => "add-rule",
            Self::RemoveRule { .. } => "remove-rule",
            Self::Shutdown => "shutdown",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    use super::*;

    /// Both ends of a control socket.
    fn control_pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn commands_carry_their_sockets() {
        let (a, b) = control_pair();
        let passed = std::fs::File::open("/dev/null").expect("/dev/null");
        let command = Command::AddInput {
            input: 7,
            ifindex: 3,
            mtu: 1500,
        };
        send(a.as_fd(), &command, &[passed.as_fd()]).expect("send");
        let mut buffer = vec![0; MAX_MESSAGE];
        let (received, fds) = receive(b.as_fd(), &mut buffer)
            .expect("receive")
            .expect("a message");
        assert_eq!(received, command);
        assert_eq!(fds.len(), command.expected_fds());
        assert!(receive(b.as_fd(), &mut buffer).expect("receive").is_none());
        drop(a);
        assert!(matches!(
            receive(b.as_fd(), &mut buffer),
            Err(CommandError::Closed)
        ));
    }

    #[test]
    fn init_carries_the_shedding_window_and_two_sockets() {
        let (a, b) = control_pair();
        let counters = std::fs::File::open("/dev/null").expect("/dev/null");
        let load_map = std::fs::File::open("/dev/zero").expect("/dev/zero");
        let command = Command::Init {
            worker: 3,
            cpu: Some(1),
            uid: 65534,
            gid: 65534,
            shed_window: 2048,
        };
        send(a.as_fd(), &command, &[counters.as_fd(), load_map.as_fd()]).expect("send");
        let mut buffer = vec![0; MAX_MESSAGE];
        let (received, fds) = receive(b.as_fd(), &mut buffer)
            .expect("receive")
            .expect("a message");
        assert_eq!(received, command);
        assert!(
            matches!(
                received,
                Command::Init {
                    shed_window: 2048,
                    ..
                }
            ),
            "{received:?}"
        );
        assert_eq!(fds.len(), command.expected_fds());
        assert_eq!(fds.len(), 2);
    }
}
