//! One rtnetlink request at a time on a blocking socket, for the lookups the supervisor makes
//! when a rule starts (links, routes, neighbours): a handful of round trips, never per packet.
//! The message formats are the `netlink-packet-route` crate's, reached through `rtnetlink`.

use std::{fmt, io, time::Duration};

use rtnetlink::{
    packet_core::{
        NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
        NetlinkPayload,
    },
    packet_route::RouteNetlinkMessage,
    packet_utils::nla::NlasIterator,
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

/// How long a request may wait for its reply. The kernel answers these requests at once; the
/// limit only keeps a supervisor from hanging if it ever did not.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// `NLMSGERR_ATTR_MSG`: the human-readable reason in an extended acknowledgement.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// What the kernel answered.
#[derive(Debug)]
pub(super) enum Reply {
    Message(RouteNetlinkMessage),
    Ack,
}

/// A request that did not get a usable answer.
#[derive(Debug)]
pub(super) enum RequestError {
    /// The kernel refused the request with `errno`, and said why when it could.
    Refused {
        errno: i32,
        reason: Option<String>,
    },
    Io(io::Error),
    Decode(String),
}

impl RequestError {
    pub(super) fn errno(&self) -> Option<i32> {
        match self {
            Self::Refused { errno, .. } => Some(*errno),
            Self::Io(_) | Self::Decode(_) => None,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused {
                errno,
                reason: Some(reason),
            } => write!(f, "{} ({reason})", io::Error::from_raw_os_error(*errno)),
            Self::Refused {
                errno,
                reason: None,
            } => write!(f, "{}", io::Error::from_raw_os_error(*errno)),
            Self::Io(error) => write!(f, "{error}"),
            Self::Decode(what) => write!(f, "undecodable reply from the kernel: {what}"),
        }
    }
}

impl std::error::Error for RequestError {}

impl From<io::Error> for RequestError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

impl From<RequestError> for io::Error {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Io(error) => error,
            RequestError::Refused {
                errno,
                reason: None,
            } => io::Error::from_raw_os_error(errno),
            refused @ RequestError::Refused { .. } => {
                let kind = refused.errno().map_or(io::ErrorKind::Other, |errno| {
                    io::Error::from_raw_os_error(errno).kind()
                });
                io::Error::new(kind, refused.to_string())
            }
            RequestError::Decode(what) => io::Error::new(io::ErrorKind::InvalidData, what),
        }
    }
}

/// A route netlink socket in the calling thread's network namespace.
pub(super) struct Rtnetlink {
    socket: Socket,
    sequence: u32,
}

impl Rtnetlink {
    pub(super) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // The kernel checks GET requests strictly (a field we set by mistake is an error, not
        // silently ignored) and says why it refuses a request; errors echo only our header.
        socket.set_netlink_get_strict_chk(true)?;
        socket.set_ext_ack(true)?;
        socket.set_cap_ack(true)?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(
                REPLY_TIMEOUT.as_secs().try_into().unwrap_or(i64::MAX),
                0,
            ),
        )
        .map_err(io::Error::from)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` with `flags` (`NLM_F_REQUEST` is added) and returns the kernel's answer
    /// to it: a message, an acknowledgement (when `flags` asked for one), or its refusal.
    pub(super) fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Reply, RequestError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            if let Some(reply) = reply_in(&datagram, self.sequence)? {
                return reply;
            }
        }
    }
}

/// The answer to request `sequence` in one datagram, if it holds one.
fn reply_in(
    datagram: &[u8],
    sequence: u32,
) -> Result<Option<Result<Reply, RequestError>>, RequestError> {
    let mut rest = datagram;
    while !rest.is_empty() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
            .map_err(|error| RequestError::Decode(error.to_string()))?;
        let length = usize::try_from(message.header.length).unwrap_or(usize::MAX);
        // A netlink message is at least its 16-byte header; anything shorter would loop.
        if length < 16 {
            return Err(RequestError::Decode(format!("message of {length} bytes")));
        }
        let aligned = length.next_multiple_of(4).min(rest.len());
        let flags = message.header.flags;
        if message.header.sequence_number == sequence {
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => return Ok(Some(Ok(Reply::Message(inner)))),
                NetlinkPayload::Error(error) => {
                    return Ok(Some(match error.code {
                        None => Ok(Reply::Ack),
                        Some(code) => Err(RequestError::Refused {
                            errno: code.get().saturating_neg(),
                            reason: extended_reason(&error.header, flags),
                        }),
                    }));
                }
                NetlinkPayload::Done(_) => {
                    return Err(RequestError::Decode(
                        "the kernel ended the reply without an answer".to_owned(),
                    ));
                }
                _ => {}
            }
        }
        rest = &rest[aligned..];
    }
    Ok(None)
}

/// The kernel's own words for a refusal (`NLMSGERR_ATTR_MSG`), which follow the echoed request
/// in an error message when the socket asked for extended acknowledgements.
fn extended_reason(echoed: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed_length = if flags & NLM_F_CAPPED == 0 {
        usize::try_from(NetlinkBuffer::new_checked(echoed).ok()?.length()).ok()?
    } else {
        16
    };
    let attributes = echoed.get(echoed_length.next_multiple_of(4)..)?;
    NlasIterator::new(attributes)
        .filter_map(Result::ok)
        .find(|attribute| attribute.kind() == NLMSGERR_ATTR_MSG)
        .map(|attribute| {
            String::from_utf8_lossy(attribute.value())
                .trim_end_matches('\0')
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error message as the kernel sends it for a capped, extended acknowledgement.
    fn refusal(sequence: u32, errno: i32, reason: &str) -> Vec<u8> {
        let mut reason = reason.as_bytes().to_vec();
        reason.push(0);
        let attribute_length = 4 + reason.len();
        let mut payload = Vec::new();
        payload.extend_from_slice(&(-errno).to_ne_bytes());
        // The echoed request header: length, type RTM_GETNEIGH, flags, sequence, port.
        payload.extend_from_slice(&36u32.to_ne_bytes());
        payload.extend_from_slice(&30u16.to_ne_bytes());
        payload.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        payload.extend_from_slice(&sequence.to_ne_bytes());
        payload.extend_from_slice(&0u32.to_ne_bytes());
        payload.extend_from_slice(
            &u16::try_from(attribute_length)
                .expect("a short reason")
                .to_ne_bytes(),
        );
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(&reason);
        payload.resize(payload.len().next_multiple_of(4), 0);
        let mut message = Vec::new();
        message.extend_from_slice(
            &u32::try_from(16 + payload.len())
                .expect("a short message")
                .to_ne_bytes(),
        );
        message.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        message.extend_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        message.extend_from_slice(&sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&payload);
        message
    }

    #[test]
    fn a_refusal_carries_the_errno_and_the_kernels_reason() {
        let datagram = refusal(7, 2, "Neighbour entry not found");
        let Some(Err(error)) = reply_in(&datagram, 7).expect("decodable") else {
            panic!("expected a refusal");
        };
        assert_eq!(error.errno(), Some(2));
        assert_eq!(
            error.to_string(),
            format!(
                "{} (Neighbour entry not found)",
                io::Error::from_raw_os_error(2)
            )
        );
    }

    #[test]
    fn an_answer_to_another_request_is_skipped() {
        let datagram = refusal(6, 2, "stale");
        assert!(reply_in(&datagram, 7).expect("decodable").is_none());
    }

    #[test]
    fn an_error_code_of_zero_is_an_acknowledgement() {
        let mut datagram = refusal(3, 0, "");
        datagram.truncate(16 + 4 + 16);
        datagram[..4].copy_from_slice(&36u32.to_ne_bytes());
        datagram[6..8].copy_from_slice(&NLM_F_CAPPED.to_ne_bytes());
        assert!(matches!(
            reply_in(&datagram, 3).expect("decodable"),
            Some(Ok(Reply::Ack))
        ));
    }
}
