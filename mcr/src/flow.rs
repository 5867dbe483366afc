//! What a rule matches, in either address family: the key of the classifier's rule maps
//! (`MCR_RULES` for IPv4, `MCR_RULES6` for IPv6) and of the workers' route tables.

use std::{fmt, net::IpAddr};

use mcr_common::{ANY_SOURCE, ANY_SOURCE6, RuleKey, RuleKey6};
use serde::{Deserialize, Serialize};

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// The Ethernet protocol number of the family's packets, in host byte order.
    pub const fn ethertype(self) -> u16 {
        match self {
            Self::Ipv4 => 0x0800,
            Self::Ipv6 => 0x86dd,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        })
    }
}

/// A rule's stream: UDP to `group:port` arriving on an interface, from one sender or any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowKey {
    V4(RuleKey),
    V6(RuleKey6),
}

impl FlowKey {
    /// The key of `group:port` on `ifindex` from `source` (any sender when `None`); `None`
    /// when `source` is of the other family than `group` (the rules file refuses that).
    pub fn new(ifindex: u32, group: IpAddr, source: Option<IpAddr>, port: u16) -> Option<Self> {
        match (group, source) {
            (IpAddr::V4(group), None) => Some(Self::V4(RuleKey::new(
                ifindex,
                group.octets(),
                ANY_SOURCE,
                port,
            ))),
            (IpAddr::V4(group), Some(IpAddr::V4(source))) => Some(Self::V4(RuleKey::new(
                ifindex,
                group.octets(),
                source.octets(),
                port,
            ))),
            (IpAddr::V6(group), None) => Some(Self::V6(RuleKey6::new(
                ifindex,
                group.octets(),
                ANY_SOURCE6,
                port,
            ))),
            (IpAddr::V6(group), Some(IpAddr::V6(source))) => Some(Self::V6(RuleKey6::new(
                ifindex,
                group.octets(),
                source.octets(),
                port,
            ))),
            _ => None,
        }
    }

    pub const fn ifindex(&self) -> u32 {
        match self {
            Self::V4(key) => key.ifindex,
            Self::V6(key) => key.ifindex,
        }
    }

    pub const fn is_ipv6(&self) -> bool {
        matches!(self, Self::V6(_))
    }

    pub const fn family(&self) -> Family {
        match self {
            Self::V4(_) => Family::Ipv4,
            Self::V6(_) => Family::Ipv6,
        }
    }

    /// The same key for any sender: what a packet falls back to when no rule names its source.
    #[must_use]
    pub const fn any_source(self) -> Self {
        match self {
            Self::V4(key) => Self::V4(key.any_source()),
            Self::V6(key) => Self::V6(key.any_source()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_group_family() {
        let v4 = FlowKey::new(3, "239.1.1.1".parse().expect("group"), None, 5000);
        assert_eq!(
            v4,
            Some(FlowKey::V4(RuleKey::new(
                3,
                [239, 1, 1, 1],
                ANY_SOURCE,
                5000
            )))
        );
        let group: IpAddr = "ff3e::1:2".parse().expect("group");
        let source: IpAddr = "fd00::7".parse().expect("source");
        let v6 = FlowKey::new(4, group, Some(source), 6000).expect("same family");
        assert!(v6.is_ipv6());
        assert_eq!(v6.ifindex(), 4);
        assert_eq!(
            v6.any_source(),
            FlowKey::new(4, group, None, 6000).expect("same family")
        );
        assert_eq!(
            FlowKey::new(4, group, Some("10.0.0.1".parse().expect("source")), 6000),
            None
        );
    }
}
