//! A rule's state, and why: what `mcr stats`, `mcr status` and the log show for each rule.
//!
//! The supervisor keeps the reasons typed ([`Waiting`], [`StartError`]) and decides by variant;
//! reports carry the [`RuleState`] with each reason already put into words.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{bpf::BpfError, flow::Family};

fn beyond_link(routable: bool) -> &'static str {
    if routable {
        " beyond link-local (a link-local source is not routed off the link)"
    } else {
        ""
    }
}

/// Where a rule stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RuleState {
    /// Classified and forwarded on `path`. A rule that could take the kernel path but runs on
    /// the workers says why in `reason`.
    Active {
        path: ForwardingPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Something the rule needs does not exist yet; it starts by itself when it appears.
    Waiting { reason: String },
    /// Starting the rule failed; it is tried again on the next reload or interface change.
    Failed { reason: String },
}

impl RuleState {
    pub fn waiting(reason: &Waiting) -> Self {
        Self::Waiting {
            reason: reason.to_string(),
        }
    }

    pub fn failed(error: &StartError) -> Self {
        Self::Failed {
            reason: error.to_string(),
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self, Self::Active { .. })
    }

    /// The path an active rule runs on.
    pub fn path(&self) -> Option<ForwardingPath> {
        match self {
            Self::Active { path, .. } => Some(*path),
            Self::Waiting { .. } | Self::Failed { .. } => None,
        }
    }
}

/// Who writes an active rule's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardingPath {
    /// The classifier, in the kernel.
    Kernel,
    /// The rule's worker process.
    Worker,
}

impl fmt::Display for ForwardingPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Worker => "worker",
        })
    }
}

impl fmt::Display for RuleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Active { .. } => f.write_str("active"),
            Self::Waiting { reason } => write!(f, "waiting: {reason}"),
            Self::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// Why a rule cannot run on the interfaces that exist now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Waiting {
    #[error("interface {0} does not exist")]
    InputInterface(String),
    #[error("output interface {0} does not exist")]
    OutputInterface(String),
    /// Not reached from a checked rules file, which refuses a sender of the other family.
    #[error("input {0}: its sender and group are of different families")]
    MixedFamilies(String),
    #[error("output interface {interface} has no {family} address{}", beyond_link(*.routable))]
    OutputAddress {
        interface: String,
        family: Family,
        /// A link-local address would do for this output's destination.
        routable: bool,
    },
}

/// Why a rule whose interfaces exist could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("more than {0} rules")]
    NoSlot(u32),
    #[error("more than {0} outputs in all")]
    NoOutputCounter(usize),
    #[error("cannot attach the classifier: {0}")]
    Attach(#[source] BpfError),
    #[error("{family} packet sockets on {interface}: {source}")]
    InputSockets {
        interface: String,
        family: Family,
        source: std::io::Error,
    },
    #[error("output {output}: {source}")]
    OutputSocket {
        output: String,
        source: std::io::Error,
    },
    #[error("cannot add the rule to the classifier: {0}")]
    Map(#[source] BpfError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_name_the_state_and_its_reason() {
        let waiting = RuleState::waiting(&Waiting::InputInterface("in0".into()));
        assert_eq!(waiting.to_string(), "waiting: interface in0 does not exist");
        let json = serde_json::to_value(&waiting).expect("serialisable");
        assert_eq!(json["state"], "waiting");
        assert_eq!(json["reason"], "interface in0 does not exist");
        assert_eq!(
            serde_json::from_value::<RuleState>(json).expect("readable"),
            waiting
        );
        let kernel = RuleState::Active {
            path: ForwardingPath::Kernel,
            reason: None,
        };
        let json = serde_json::to_value(&kernel).expect("serialisable");
        assert_eq!(json["state"], "active");
        assert_eq!(json["path"], "kernel");
        assert!(json.get("reason").is_none(), "{json}");
        let worker = RuleState::Active {
            path: ForwardingPath::Worker,
            reason: Some("next hop 10.2.0.9 not resolved on out0".into()),
        };
        let json = serde_json::to_value(&worker).expect("serialisable");
        assert_eq!(json["path"], "worker");
        assert_eq!(json["reason"], "next hop 10.2.0.9 not resolved on out0");
        assert_eq!(
            serde_json::from_value::<RuleState>(json).expect("readable"),
            worker
        );
    }
}
