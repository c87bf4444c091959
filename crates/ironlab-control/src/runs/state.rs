//! The run state machine: the only place that decides which state follows which.
//!
//! ```text
//! pending ──dispatch──► starting ──ready──► running ──stop──► stopping ──stopped──► stopped
//!    │                     │                 ▲  │                                  │  ▲
//!    │ destroy             │ destroy         │  └──────────stopped─────────────────┤  │
//!    ▼                     ▼                 │                          restart    │  │ stopped
//! destroyed ◄──gone── destroying             └──────ready────── restarting ◄───────┘  │ (failed
//!                          ▲                                        └─────────────────┘  restart)
//!                          └── destroy: from starting, running, stopping, stopped, restarting, failed
//! pending | starting | running | stopping | stopped | restarting ──fail──► failed
//! ```
//!
//! A pending run never reached a worker, so destroying it ends it at once. A running run whose
//! machines stop on their own (the worker found them dead after a restart of the host) becomes
//! `stopped`, keeping its drives; a restart that fails leaves the run `stopped` with the reason.

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
    /// The user asked to stop the run (keeping its drives).
    Stop,
    /// The worker reports the run stopped (after a stop, a failed restart, or machines that
    /// died).
    Stopped,
    /// The user asked to boot a stopped run again.
    Restart,
}

impl RunEvent {
    /// Every event, for exhaustive tests and docs.
    pub const ALL: [RunEvent; 8] = [
        RunEvent::Dispatch,
        RunEvent::Ready,
        RunEvent::Fail,
        RunEvent::Destroy,
        RunEvent::Gone,
        RunEvent::Stop,
        RunEvent::Stopped,
        RunEvent::Restart,
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
        (S::Pending, E::Stop) => invalid,
        (S::Pending, E::Stopped) => invalid,
        (S::Pending, E::Restart) => invalid,

        (S::Starting, E::Dispatch) => invalid,
        (S::Starting, E::Ready) => Ok(S::Running),
        (S::Starting, E::Fail) => Ok(S::Failed),
        (S::Starting, E::Destroy) => Ok(S::Destroying),
        (S::Starting, E::Gone) => invalid,
        (S::Starting, E::Stop) => invalid,
        (S::Starting, E::Stopped) => invalid,
        (S::Starting, E::Restart) => invalid,

        (S::Running, E::Dispatch) => invalid,
        (S::Running, E::Ready) => invalid,
        (S::Running, E::Fail) => Ok(S::Failed),
        (S::Running, E::Destroy) => Ok(S::Destroying),
        (S::Running, E::Gone) => invalid,
        (S::Running, E::Stop) => Ok(S::Stopping),
        (S::Running, E::Stopped) => Ok(S::Stopped),
        (S::Running, E::Restart) => invalid,

        (S::Stopping, E::Dispatch) => invalid,
        (S::Stopping, E::Ready) => invalid,
        (S::Stopping, E::Fail) => Ok(S::Failed),
        (S::Stopping, E::Destroy) => Ok(S::Destroying),
        (S::Stopping, E::Gone) => invalid,
        (S::Stopping, E::Stop) => invalid,
        (S::Stopping, E::Stopped) => Ok(S::Stopped),
        (S::Stopping, E::Restart) => invalid,

        (S::Stopped, E::Dispatch) => invalid,
        (S::Stopped, E::Ready) => invalid,
        (S::Stopped, E::Fail) => Ok(S::Failed),
        (S::Stopped, E::Destroy) => Ok(S::Destroying),
        (S::Stopped, E::Gone) => invalid,
        (S::Stopped, E::Stop) => invalid,
        (S::Stopped, E::Stopped) => invalid,
        (S::Stopped, E::Restart) => Ok(S::Restarting),

        (S::Restarting, E::Dispatch) => invalid,
        (S::Restarting, E::Ready) => Ok(S::Running),
        (S::Restarting, E::Fail) => Ok(S::Failed),
        (S::Restarting, E::Destroy) => Ok(S::Destroying),
        (S::Restarting, E::Gone) => invalid,
        (S::Restarting, E::Stop) => invalid,
        (S::Restarting, E::Stopped) => Ok(S::Stopped),
        (S::Restarting, E::Restart) => invalid,

        (S::Destroying, E::Dispatch) => invalid,
        (S::Destroying, E::Ready) => invalid,
        (S::Destroying, E::Fail) => invalid,
        (S::Destroying, E::Destroy) => invalid,
        (S::Destroying, E::Gone) => Ok(S::Destroyed),
        (S::Destroying, E::Stop) => invalid,
        (S::Destroying, E::Stopped) => invalid,
        (S::Destroying, E::Restart) => invalid,

        (S::Destroyed, E::Dispatch) => invalid,
        (S::Destroyed, E::Ready) => invalid,
        (S::Destroyed, E::Fail) => invalid,
        (S::Destroyed, E::Destroy) => invalid,
        (S::Destroyed, E::Gone) => invalid,
        (S::Destroyed, E::Stop) => invalid,
        (S::Destroyed, E::Stopped) => invalid,
        (S::Destroyed, E::Restart) => invalid,

        (S::Failed, E::Dispatch) => invalid,
        (S::Failed, E::Ready) => invalid,
        (S::Failed, E::Fail) => invalid,
        (S::Failed, E::Destroy) => Ok(S::Destroying),
        (S::Failed, E::Gone) => invalid,
        (S::Failed, E::Stop) => invalid,
        (S::Failed, E::Stopped) => invalid,
        (S::Failed, E::Restart) => invalid,
    }
}

/// States in which a run occupies (or is about to occupy) a worker's CPU and memory and counts
/// against the user's limit of active runs. A stopped run counts against the storage quota
/// instead.
pub fn is_active(s: RunState) -> bool {
    match s {
        RunState::Pending
        | RunState::Starting
        | RunState::Running
        | RunState::Stopping
        | RunState::Restarting => true,
        RunState::Stopped | RunState::Destroying | RunState::Destroyed | RunState::Failed => false,
    }
}

/// States the reconcile loop still has work for (a stopped run is checked now and then: its
/// storage use, and whether its worker still holds it).
pub fn needs_reconcile(s: RunState) -> bool {
    match s {
        RunState::Pending
        | RunState::Starting
        | RunState::Running
        | RunState::Destroying
        | RunState::Stopping
        | RunState::Stopped
        | RunState::Restarting => true,
        RunState::Destroyed | RunState::Failed => false,
    }
}

/// States a `?wait=` long-poll waits through.
pub fn is_transient(s: RunState) -> bool {
    match s {
        RunState::Pending
        | RunState::Starting
        | RunState::Destroying
        | RunState::Stopping
        | RunState::Restarting => true,
        RunState::Running | RunState::Destroyed | RunState::Failed | RunState::Stopped => false,
    }
}

/// States whose drives count against the owner's storage quota.
pub fn holds_storage(s: RunState) -> bool {
    match s {
        RunState::Stopping | RunState::Stopped | RunState::Restarting => true,
        RunState::Pending
        | RunState::Starting
        | RunState::Running
        | RunState::Destroying
        | RunState::Destroyed
        | RunState::Failed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunEvent as E;
    use RunState as S;

    const STATES: [RunState; 9] = [
        S::Pending,
        S::Starting,
        S::Running,
        S::Destroying,
        S::Destroyed,
        S::Failed,
        S::Stopping,
        S::Stopped,
        S::Restarting,
    ];

    /// The whole table, one line per (state, event) pair: `None` = refused.
    fn expected(from: RunState, event: RunEvent) -> Option<RunState> {
        let table: [(RunState, RunEvent, Option<RunState>); 72] = [
            (S::Pending, E::Dispatch, Some(S::Starting)),
            (S::Pending, E::Ready, None),
            (S::Pending, E::Fail, Some(S::Failed)),
            (S::Pending, E::Destroy, Some(S::Destroyed)),
            (S::Pending, E::Gone, None),
            (S::Pending, E::Stop, None),
            (S::Pending, E::Stopped, None),
            (S::Pending, E::Restart, None),
            (S::Starting, E::Dispatch, None),
            (S::Starting, E::Ready, Some(S::Running)),
            (S::Starting, E::Fail, Some(S::Failed)),
            (S::Starting, E::Destroy, Some(S::Destroying)),
            (S::Starting, E::Gone, None),
            (S::Starting, E::Stop, None),
            (S::Starting, E::Stopped, None),
            (S::Starting, E::Restart, None),
            (S::Running, E::Dispatch, None),
            (S::Running, E::Ready, None),
            (S::Running, E::Fail, Some(S::Failed)),
            (S::Running, E::Destroy, Some(S::Destroying)),
            (S::Running, E::Gone, None),
            (S::Running, E::Stop, Some(S::Stopping)),
            (S::Running, E::Stopped, Some(S::Stopped)),
            (S::Running, E::Restart, None),
            (S::Stopping, E::Dispatch, None),
            (S::Stopping, E::Ready, None),
            (S::Stopping, E::Fail, Some(S::Failed)),
            (S::Stopping, E::Destroy, Some(S::Destroying)),
            (S::Stopping, E::Gone, None),
            (S::Stopping, E::Stop, None),
            (S::Stopping, E::Stopped, Some(S::Stopped)),
            (S::Stopping, E::Restart, None),
            (S::Stopped, E::Dispatch, None),
            (S::Stopped, E::Ready, None),
            (S::Stopped, E::Fail, Some(S::Failed)),
            (S::Stopped, E::Destroy, Some(S::Destroying)),
            (S::Stopped, E::Gone, None),
            (S::Stopped, E::Stop, None),
            (S::Stopped, E::Stopped, None),
            (S::Stopped, E::Restart, Some(S::Restarting)),
            (S::Restarting, E::Dispatch, None),
            (S::Restarting, E::Ready, Some(S::Running)),
            (S::Restarting, E::Fail, Some(S::Failed)),
            (S::Restarting, E::Destroy, Some(S::Destroying)),
            (S::Restarting, E::Gone, None),
            (S::Restarting, E::Stop, None),
            (S::Restarting, E::Stopped, Some(S::Stopped)),
            (S::Restarting, E::Restart, None),
            (S::Destroying, E::Dispatch, None),
            (S::Destroying, E::Ready, None),
            (S::Destroying, E::Fail, None),
            (S::Destroying, E::Destroy, None),
            (S::Destroying, E::Gone, Some(S::Destroyed)),
            (S::Destroying, E::Stop, None),
            (S::Destroying, E::Stopped, None),
            (S::Destroying, E::Restart, None),
            (S::Destroyed, E::Dispatch, None),
            (S::Destroyed, E::Ready, None),
            (S::Destroyed, E::Fail, None),
            (S::Destroyed, E::Destroy, None),
            (S::Destroyed, E::Gone, None),
            (S::Destroyed, E::Stop, None),
            (S::Destroyed, E::Stopped, None),
            (S::Destroyed, E::Restart, None),
            (S::Failed, E::Dispatch, None),
            (S::Failed, E::Ready, None),
            (S::Failed, E::Fail, None),
            (S::Failed, E::Destroy, Some(S::Destroying)),
            (S::Failed, E::Gone, None),
            (S::Failed, E::Stop, None),
            (S::Failed, E::Stopped, None),
            (S::Failed, E::Restart, None),
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
        assert_eq!(checked, 72);
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
        let e = transition(S::Starting, E::Stop).expect_err("refused");
        assert_eq!(e.to_string(), "a starting run cannot take the Stop event");
    }

    #[test]
    fn classification() {
        assert!(is_active(S::Running) && !is_active(S::Failed));
        assert!(is_active(S::Restarting) && !is_active(S::Stopped));
        assert!(needs_reconcile(S::Destroying) && !needs_reconcile(S::Destroyed));
        assert!(needs_reconcile(S::Stopped));
        assert!(is_transient(S::Starting) && !is_transient(S::Running));
        assert!(is_transient(S::Stopping) && !is_transient(S::Stopped));
        assert!(holds_storage(S::Stopped) && !holds_storage(S::Running));
    }
}
