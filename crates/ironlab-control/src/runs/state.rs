//! The run state machine: the only place that decides which state follows which.
//!
//! ```text
//! pending ──dispatch──► starting ──ready──► running
//!    │                     │                   │
//!    │ destroy             │ destroy           │ destroy          failed ──destroy──► destroying
//!    ▼                     ▼                   ▼                                          │
//! destroyed ◄──gone── destroying ◄─────────────┘                                          │
//!                          ▲                                                              │
//!                          └──────────────────────────────────────────────────────────────┘
//! pending | starting | running ──fail──► failed
//! ```
//!
//! A pending run never reached a worker, so destroying it ends it at once.

use std::fmt;

use ironlab_api::v1::RunState;

/// Something that happens to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunEvent {
    /// The worker accepted the plan (`PUT /v1/runs/{id}` succeeded).
    Dispatch,
    /// The worker reports every machine ready.
    Ready,
    /// Starting or running failed (worker error, timeout, lost run).
    Fail,
    /// The user asked to destroy the run.
    Destroy,
    /// The worker confirmed the run is gone.
    Gone,
}

impl RunEvent {
    /// Every event, for exhaustive tests and docs.
    pub const ALL: [RunEvent; 5] = [
        RunEvent::Dispatch,
        RunEvent::Ready,
        RunEvent::Fail,
        RunEvent::Destroy,
        RunEvent::Gone,
    ];
}

/// An event that does not apply to the run's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {} run cannot take the {event:?} event", from.as_str())]
pub struct InvalidTransition {
    /// The state the run was in.
    pub from: RunState,
    /// The event that was refused.
    pub event: RunEvent,
}

impl fmt::Display for RunEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The state that follows `from` on `event`, or why there is none.
pub fn transition(from: RunState, event: RunEvent) -> Result<RunState, InvalidTransition> {
    use RunEvent as E;
    use RunState as S;
    let invalid = Err(InvalidTransition { from, event });
    match (from, event) {
        (S::Pending, E::Dispatch) => Ok(S::Starting),
        (S::Pending, E::Ready) => invalid,
        (S::Pending, E::Fail) => Ok(S::Failed),
        (S::Pending, E::Destroy) => Ok(S::Destroyed),
        (S::Pending, E::Gone) => invalid,

        (S::Starting, E::Dispatch) => invalid,
        (S::Starting, E::Ready) => Ok(S::Running),
        (S::Starting, E::Fail) => Ok(S::Failed),
        (S::Starting, E::Destroy) => Ok(S::Destroying),
        (S::Starting, E::Gone) => invalid,

        (S::Running, E::Dispatch) => invalid,
        (S::Running, E::Ready) => invalid,
        (S::Running, E::Fail) => Ok(S::Failed),
        (S::Running, E::Destroy) => Ok(S::Destroying),
        (S::Running, E::Gone) => invalid,

        (S::Destroying, E::Dispatch) => invalid,
        (S::Destroying, E::Ready) => invalid,
        (S::Destroying, E::Fail) => invalid,
        (S::Destroying, E::Destroy) => invalid,
        (S::Destroying, E::Gone) => Ok(S::Destroyed),

        (S::Destroyed, E::Dispatch) => invalid,
        (S::Destroyed, E::Ready) => invalid,
        (S::Destroyed, E::Fail) => invalid,
        (S::Destroyed, E::Destroy) => invalid,
        (S::Destroyed, E::Gone) => invalid,

        (S::Failed, E::Dispatch) => invalid,
        (S::Failed, E::Ready) => invalid,
        (S::Failed, E::Fail) => invalid,
        (S::Failed, E::Destroy) => Ok(S::Destroying),
        (S::Failed, E::Gone) => invalid,
    }
}

/// States in which a run occupies (or is about to occupy) a worker and counts against the
/// user's limit of active runs.
pub fn is_active(s: RunState) -> bool {
    match s {
        RunState::Pending | RunState::Starting | RunState::Running => true,
        RunState::Destroying | RunState::Destroyed | RunState::Failed => false,
    }
}

/// States the reconcile loop still has work for.
pub fn needs_reconcile(s: RunState) -> bool {
    match s {
        RunState::Pending | RunState::Starting | RunState::Running | RunState::Destroying => true,
        RunState::Destroyed | RunState::Failed => false,
    }
}

/// States a `?wait=` long-poll waits through.
pub fn is_transient(s: RunState) -> bool {
    match s {
        RunState::Pending | RunState::Starting | RunState::Destroying => true,
        RunState::Running | RunState::Destroyed | RunState::Failed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunEvent as E;
    use RunState as S;

    const STATES: [RunState; 6] = [
        S::Pending,
        S::Starting,
        S::Running,
        S::Destroying,
        S::Destroyed,
        S::Failed,
    ];

    /// The whole table, one line per (state, event) pair: `None` = refused.
    fn expected(from: RunState, event: RunEvent) -> Option<RunState> {
        let table: [(RunState, RunEvent, Option<RunState>); 30] = [
            (S::Pending, E::Dispatch, Some(S::Starting)),
            (S::Pending, E::Ready, None),
            (S::Pending, E::Fail, Some(S::Failed)),
            (S::Pending, E::Destroy, Some(S::Destroyed)),
            (S::Pending, E::Gone, None),
            (S::Starting, E::Dispatch, None),
            (S::Starting, E::Ready, Some(S::Running)),
            (S::Starting, E::Fail, Some(S::Failed)),
            (S::Starting, E::Destroy, Some(S::Destroying)),
            (S::Starting, E::Gone, None),
            (S::Running, E::Dispatch, None),
            (S::Running, E::Ready, None),
            (S::Running, E::Fail, Some(S::Failed)),
            (S::Running, E::Destroy, Some(S::Destroying)),
            (S::Running, E::Gone, None),
            (S::Destroying, E::Dispatch, None),
            (S::Destroying, E::Ready, None),
            (S::Destroying, E::Fail, None),
            (S::Destroying, E::Destroy, None),
            (S::Destroying, E::Gone, Some(S::Destroyed)),
            (S::Destroyed, E::Dispatch, None),
            (S::Destroyed, E::Ready, None),
            (S::Destroyed, E::Fail, None),
            (S::Destroyed, E::Destroy, None),
            (S::Destroyed, E::Gone, None),
            (S::Failed, E::Dispatch, None),
            (S::Failed, E::Ready, None),
            (S::Failed, E::Fail, None),
            (S::Failed, E::Destroy, Some(S::Destroying)),
            (S::Failed, E::Gone, None),
        ];
        table
            .iter()
            .find(|(s, e, _)| *s == from && *e == event)
            .and_then(|(_, _, to)| *to)
    }

    #[test]
    fn every_pair() {
        let mut checked = 0;
        for from in STATES {
            for event in RunEvent::ALL {
                let got = transition(from, event);
                match expected(from, event) {
                    Some(to) => assert_eq!(got, Ok(to), "{from:?} + {event:?}"),
                    None => assert_eq!(
                        got,
                        Err(InvalidTransition { from, event }),
                        "{from:?} + {event:?} must be refused"
                    ),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 30);
    }

    #[test]
    fn terminal_states_take_nothing_but_destroy() {
        for event in RunEvent::ALL {
            assert!(transition(S::Destroyed, event).is_err());
        }
        assert_eq!(transition(S::Failed, E::Destroy), Ok(S::Destroying));
    }

    #[test]
    fn refusal_names_state_and_event() {
        let e = transition(S::Destroyed, E::Ready).expect_err("refused");
        assert_eq!(e.to_string(), "a destroyed run cannot take the Ready event");
    }

    #[test]
    fn classification() {
        assert!(is_active(S::Running) && !is_active(S::Failed));
        assert!(needs_reconcile(S::Destroying) && !needs_reconcile(S::Destroyed));
        assert!(is_transient(S::Starting) && !is_transient(S::Running));
    }
}
