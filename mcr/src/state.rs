//! A rule's state, and why: what `mcr stats`, `mcr status` and the log show for each rule.
//!
//! The supervisor keeps the reasons typed ([`Waiting`], [`StartError`]) and decides by variant;
//! reports carry the [`RuleState`] with each reason already put into words.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bpf::BpfError;

/// Where a rule stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RuleState {
    /// Classified and forwarded.
    Active,
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
        matches!(self, Self::Active)
    }
}

impl fmt::Display for RuleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Active => f.write_str("active"),
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
    #[error("output interface {0} has no IPv4 address")]
    OutputAddress(String),
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
    #[error("packet sockets on {interface}: {source}")]
    InputSockets {
        interface: String,
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
        assert_eq!(
            serde_json::to_value(RuleState::Active).expect("serialisable")["state"],
            "active"
        );
    }
}
