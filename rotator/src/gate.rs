//! A trust-anchor gate: the step it guards, whether it is open and why, and what forcing it
//! risks. Plain data: [`crate::anchors::gate`] computes one, [`crate::state::StateError`]
//! carries a closed one.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::rfc3339;

/// A phase change an operator (or the opt-in automation) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// steady → staged.
    Stage,
    /// staged → activated.
    Activate,
    /// activated → steady.
    Finish,
    /// activated → staged, or staged → steady.
    Rollback,
}

impl Step {
    /// As typed on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Activate => "activate",
            Self::Finish => "finish",
            Self::Rollback => "rollback",
        }
    }
}

/// Why a gate is open (or how it would open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenedBy {
    /// The ledger's measurement.
    Measured,
    /// The time-based fallback.
    Time,
    /// The step is safe in itself.
    Always,
}

/// The state of one gate at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// The step it guards.
    pub step: Step,
    /// Whether the step may be taken now.
    pub open: bool,
    /// What opened it, when open.
    pub opened_by: Option<OpenedBy>,
    /// The condition, in words.
    pub condition: String,
    /// The measurement, or why there is none.
    pub measured: String,
    /// When the time-based fallback opens it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub opens_at: Option<OffsetDateTime>,
    /// What skipping it with `--force` risks (empty when open).
    pub risk: String,
    /// How many leaves or workloads that risk concerns (`None`: unknown, the ledger cannot say).
    pub at_risk: Option<u64>,
}

impl Gate {
    /// One line for humans: `open (measured): …` / `closed: …; opens by … at the latest`.
    pub fn explain(&self) -> String {
        let when = self
            .opens_at
            .map(|t| format!("; the time fallback opens it at {}", rfc3339(t)))
            .unwrap_or_default();
        match (self.open, self.opened_by) {
            (true, Some(OpenedBy::Always)) => format!("open: {}", self.condition),
            (true, Some(OpenedBy::Measured)) => {
                format!("open (measured): {} — {}", self.condition, self.measured)
            }
            (true, _) => format!("open (time): {} — {}{when}", self.condition, self.measured),
            (false, _) => format!("closed: {} — {}{when}", self.condition, self.measured),
        }
    }
}
