//! Persistent terminal sessions: PTY processes that outlive the WebSocket they were started from.
//!
//! Who talks to whom:
//! - the relay (`relay.rs`) opens an agent `Exec` stream for a `tty` start and hands its input
//!   sender and output stream to [`Sessions::create`]; one task per session (`run_session`) then
//!   owns the output stream for the session's whole life;
//! - that task appends every output chunk to the session's ring buffer (the last
//!   [`REPLAY_BYTES`]) and, when a client is attached, forwards it through the attachment's small
//!   bounded channel, awaiting room: a slow client holds the agent (and the process) back;
//! - a relay connection attaches with [`Sessions::attach`] (a new attach detaches the previous
//!   one) and gets the ring's contents for replay plus the live channel; dropping the
//!   [`Attachment`] detaches. While detached, output only goes to the ring (oldest bytes
//!   dropped), and after the grace period the task ends the session: SIGHUP, then it drops the
//!   agent stream (the agent kills the process group when its client goes away);
//! - `api.rs` ends every session of a run before destroying it ([`Sessions::end_run`]).
//!
//! The table lock and each session's state lock are plain mutexes held for a few field updates,
//! never across an await.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use ironlab_api::agent::exec_input::Kind as InKind;
use ironlab_api::agent::exec_output::Kind as OutKind;
use ironlab_api::agent::{ExecInput, ExecOutput};
use ironlab_api::relay::{DETACHED_GRACE_SECS, MAX_SESSIONS_PER_MACHINE, REPLAY_BYTES};
use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One message of the agent's output stream.
type AgentItem = Result<ExecOutput, tonic::Status>;
/// The agent's output for one `Exec` call.
pub type OutputStream = Pin<Box<dyn Stream<Item = AgentItem> + Send>>;

/// Events queued towards an attached client before the session task waits (and with it the
/// agent and the process).
const EVENTS_BUFFER: usize = 4;
/// How long the final event (exit, error) may wait for a slow client.
const FINAL_EVENT_WAIT: Duration = Duration::from_secs(2);
/// A wrapped replay starts after the first newline within this many bytes.
const LINE_SEARCH: usize = 4096;
/// SIGHUP.
const SIGHUP: i32 = 1;
/// Output gathered into one event when the agent has more ready.
const COALESCE_BYTES: usize = 64 * 1024;
/// Length of session ids.
const ID_LEN: usize = 16;

/// Why a session cannot be attached to or created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No such session on this machine (never existed, ended, or expired).
    #[error("terminal session {0} is unknown or has ended on this machine; start a new session")]
    Unknown(String),
    /// The session belongs to another user.
    #[error("terminal session {0} belongs to another user")]
    NotOwner(String),
    /// The machine has too many attached sessions.
    #[error("machine {machine} already has {max} attached terminal sessions; close one first")]
    TooMany {
        /// Machine name.
        machine: String,
        /// The limit.
        max: usize,
    },
}

/// What the session sends to its attached client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Terminal output.
    Output(Bytes),
    /// The process exited with this status; the session is gone.
    Exit(i32),
    /// The session ended for another reason (destroyed, agent failure); the session is gone.
    Ended(String),
}

/// Settings of the session table.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Ring buffer size per session.
    pub replay_bytes: usize,
    /// How long a detached session waits for a client.
    pub grace: Duration,
    /// Sessions per (run, machine).
    pub max_per_machine: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            replay_bytes: REPLAY_BYTES,
            grace: Duration::from_secs(DETACHED_GRACE_SECS),
            max_per_machine: MAX_SESSIONS_PER_MACHINE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    run: String,
    machine: String,
    id: String,
}

/// Recent output, bounded: the oldest bytes are dropped past `cap`.
#[derive(Debug)]
struct Ring {
    chunks: VecDeque<Bytes>,
    len: usize,
    cap: usize,
    wrapped: bool,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Ring {
            chunks: VecDeque::new(),
            len: 0,
            cap,
            wrapped: false,
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() || self.cap == 0 {
            return;
        }
        if data.len() >= self.cap {
            self.chunks.clear();
            self.chunks.push_back(data.slice(data.len() - self.cap..));
            self.len = self.cap;
            self.wrapped = true;
            return;
        }
        self.len += data.len();
        self.chunks.push_back(data);
        while self.len > self.cap {
            let excess = self.len - self.cap;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            self.wrapped = true;
            if front.len() <= excess {
                self.len -= front.len();
                self.chunks.pop_front();
            } else {
                *front = front.slice(excess..);
                self.len -= excess;
            }
        }
    }

    /// The contents to replay; once bytes were dropped, from the first line start (when one is
    /// near), so the replay does not begin inside an escape sequence or a character.
    fn snapshot(&self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.chunks.iter().cloned().collect();
        if !self.wrapped {
            return out;
        }
        let mut seen = 0usize;
        for i in 0..out.len() {
            let chunk = &out[i];
            let window = (LINE_SEARCH - seen).min(chunk.len());
            if let Some(pos) = chunk[..window].iter().position(|b| *b == b'\n') {
                let rest = chunk.slice(pos + 1..);
                out.drain(..i);
                out[0] = rest;
                out.retain(|c| !c.is_empty());
                return out;
            }
            seen += window;
            if seen >= LINE_SEARCH {
                break;
            }
        }
        out
    }

    #[cfg(test)]
    fn contents(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }
}

struct Attached {
    id: u64,
    tx: mpsc::Sender<Event>,
    replaced: CancellationToken,
}

struct State {
    ring: Ring,
    attached: Option<Attached>,
    next_attach: u64,
    /// When the last client left (None while one is attached).
    detached_since: Option<Instant>,
    /// Set once the session ended; nobody may attach any more.
    ended: bool,
    /// Why [`Session::end`] was cancelled.
    end_reason: Option<String>,
}

/// One persistent session.
pub struct Session {
    key: Key,
    owner: String,
    input: mpsc::Sender<ExecInput>,
    state: Mutex<State>,
    /// Attach/detach happened: the session task recomputes its deadline.
    wake: Notify,
    /// Ends the session from outside (destroy, eviction).
    end: CancellationToken,
    created: Instant,
}

impl Session {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.key.id
    }

    /// The user who started it.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Input towards the agent (stdin, resize, signals); bounded.
    pub fn input(&self) -> &mpsc::Sender<ExecInput> {
        &self.input
    }

    fn detach(&self, attach_id: u64) {
        let mut st = self.state();
        if st.attached.as_ref().is_some_and(|a| a.id == attach_id) {
            st.attached = None;
            st.detached_since = Some(Instant::now());
            drop(st);
            tracing::debug!(session = %self.key.id, "client detached");
            self.wake.notify_one();
        }
    }

    fn is_attached(&self) -> bool {
        self.state().attached.is_some()
    }

    fn end_with(&self, reason: String) {
        {
            let mut st = self.state();
            if st.end_reason.is_none() {
                st.end_reason = Some(reason);
            }
        }
        self.end.cancel();
    }
}

/// A client's hold on a session; dropping it detaches.
pub struct Attachment {
    /// The session.
    pub session: Arc<Session>,
    /// Output recorded before this attach, oldest first.
    pub replay: Vec<Bytes>,
    /// Live events.
    pub events: mpsc::Receiver<Event>,
    /// Cancelled when a newer client attached (this one should close).
    pub replaced: CancellationToken,
    id: u64,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.session.detach(self.id);
    }
}

/// The table of persistent sessions of this worker.
pub struct Sessions {
    table: Mutex<HashMap<Key, Arc<Session>>>,
    limits: Limits,
}

impl Sessions {
    /// An empty table.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Sessions {
            table: Mutex::new(HashMap::new()),
            limits,
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<Key, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of live sessions (all runs).
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for one more session on (run, machine): ends the oldest detached session when
    /// the machine is at its limit; refuses when all are attached.
    pub fn make_room(&self, run: &str, machine: &str) -> Result<(), SessionError> {
        let (count, oldest_detached) = {
            let table = self.table();
            let mine: Vec<&Arc<Session>> = table
                .values()
                .filter(|s| s.key.run == run && s.key.machine == machine)
                .collect();
            let oldest = mine
                .iter()
                .filter(|s| !s.is_attached())
                .min_by_key(|s| s.created)
                .map(|s| Arc::clone(s));
            (mine.len(), oldest)
        };
        if count < self.limits.max_per_machine {
            return Ok(());
        }
        match oldest_detached {
            Some(s) => {
                tracing::info!(%run, %machine, session = %s.key.id, "too many sessions: ending the oldest detached one");
                self.remove(&s);
                s.end_with(format!(
                    "session ended: machine {machine} reached {} terminal sessions",
                    self.limits.max_per_machine
                ));
                Ok(())
            }
            None => Err(SessionError::TooMany {
                machine: machine.to_string(),
                max: self.limits.max_per_machine,
            }),
        }
    }

    /// Registers a new session around an agent `Exec` stream (already started) and attaches
    /// `owner` to it.
    pub fn create(
        self: &Arc<Self>,
        run: &str,
        machine: &str,
        owner: &str,
        input: mpsc::Sender<ExecInput>,
        output: OutputStream,
    ) -> Result<Attachment, SessionError> {
        self.make_room(run, machine)?;
        let key = Key {
            run: run.to_string(),
            machine: machine.to_string(),
            id: new_id(),
        };
        let session = Arc::new(Session {
            key: key.clone(),
            owner: owner.to_string(),
            input,
            state: Mutex::new(State {
                ring: Ring::new(self.limits.replay_bytes),
                attached: None,
                next_attach: 0,
                detached_since: Some(Instant::now()),
                ended: false,
                end_reason: None,
            }),
            wake: Notify::new(),
            end: CancellationToken::new(),
            created: Instant::now(),
        });
        let attachment = attach_to(&session);
        self.table().insert(key.clone(), session.clone());
        tracing::info!(%run, %machine, session = %key.id, "terminal session started");
        tokio::spawn(run_session(self.clone(), session, output));
        Ok(attachment)
    }

    /// Attaches `user` to session `id` of (run, machine), detaching its current client.
    pub fn attach(
        &self,
        run: &str,
        machine: &str,
        id: &str,
        user: &str,
    ) -> Result<Attachment, SessionError> {
        let key = Key {
            run: run.to_string(),
            machine: machine.to_string(),
            id: id.to_string(),
        };
        let session = self
            .table()
            .get(&key)
            .cloned()
            .ok_or_else(|| SessionError::Unknown(id.to_string()))?;
        if session.owner != user {
            return Err(SessionError::NotOwner(id.to_string()));
        }
        if session.state().ended {
            return Err(SessionError::Unknown(id.to_string()));
        }
        tracing::info!(%run, %machine, session = %id, "terminal session re-attached");
        Ok(attach_to(&session))
    }

    /// Ends every session of `run` (before it is destroyed); attached clients get `reason`.
    pub fn end_run(&self, run: &str, reason: &str) {
        let ended: Vec<Arc<Session>> = {
            let mut table = self.table();
            let keys: Vec<Key> = table.keys().filter(|k| k.run == run).cloned().collect();
            keys.iter().filter_map(|k| table.remove(k)).collect()
        };
        for s in ended {
            s.end_with(reason.to_string());
        }
    }

    fn remove(&self, session: &Arc<Session>) {
        let mut table = self.table();
        if table
            .get(&session.key)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            table.remove(&session.key);
        }
    }
}

pub(crate) fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn attach_to(session: &Arc<Session>) -> Attachment {
    let (tx, rx) = mpsc::channel(EVENTS_BUFFER);
    let replaced = CancellationToken::new();
    let (id, replay) = {
        let mut st = session.state();
        st.next_attach += 1;
        let id = st.next_attach;
        if let Some(old) = st.attached.take() {
            old.replaced.cancel();
        }
        st.attached = Some(Attached {
            id,
            tx,
            replaced: replaced.clone(),
        });
        st.detached_since = None;
        (id, st.ring.snapshot())
    };
    session.wake.notify_one();
    Attachment {
        session: session.clone(),
        replay,
        events: rx,
        replaced,
        id,
    }
}

/// How a session ended.
enum Ending {
    Exit(i32),
    Failed(String),
    /// Ended from outside ([`Session::end`]).
    Ended,
    /// Detached for longer than the grace period.
    Abandoned,
}

/// Owns the agent output of one session for its whole life.
async fn run_session(sessions: Arc<Sessions>, session: Arc<Session>, mut output: OutputStream) {
    let grace = sessions.limits.grace;
    // An agent message read while coalescing that is not output, handled next round.
    let mut pending: Option<Option<AgentItem>> = None;
    let ending = loop {
        let item = match pending.take() {
            Some(item) => item,
            None => {
                let deadline = session.state().detached_since.map(|t| t + grace);
                tokio::select! {
                    biased;
                    () = session.end.cancelled() => break Ending::Ended,
                    () = session.wake.notified() => continue,
                    () = sleep_until(deadline) => break Ending::Abandoned,
                    item = output.next() => item,
                }
            }
        };
        let mut data = match item {
            Some(Ok(ExecOutput {
                kind: Some(OutKind::Stdout(d) | OutKind::Stderr(d)),
            })) => d,
            Some(Ok(ExecOutput {
                kind: Some(OutKind::Exit(exit)),
            })) => break Ending::Exit(exit.code),
            Some(Ok(ExecOutput { kind: None })) => continue,
            Some(Err(status)) => {
                break Ending::Failed(format!("the agent session failed: {}", status.message()));
            }
            None => {
                break Ending::Failed("the agent ended the session without an exit status".into());
            }
        };
        // Coalesce output that is already there (a PTY gives ~4 KiB per read): fewer, larger
        // events cost less per byte on this side and towards the client.
        while data.len() < COALESCE_BYTES {
            match output.next().now_or_never() {
                Some(Some(Ok(ExecOutput {
                    kind: Some(OutKind::Stdout(d) | OutKind::Stderr(d)),
                }))) => data.extend_from_slice(&d),
                Some(other) => {
                    pending = Some(other);
                    break;
                }
                None => break,
            }
        }
        let data = Bytes::from(data);
        let target = {
            let mut st = session.state();
            st.ring.push(data.clone());
            st.attached
                .as_ref()
                .map(|a| (a.tx.clone(), a.replaced.clone()))
        };
        if let Some((tx, replaced)) = target {
            // Waiting for room is the backpressure; a replaced or ended attachment stops it (the
            // chunk is in the ring, so the next client gets it in its replay).
            tokio::select! {
                r = tx.send(Event::Output(data)) => {
                    if r.is_err() {
                        tracing::debug!(session = %session.key.id, "attached client stopped reading");
                    }
                }
                () = replaced.cancelled() => {}
                () = session.end.cancelled() => {}
            }
        }
    };
    sessions.remove(&session);
    let final_event = {
        let mut st = session.state();
        st.ended = true;
        let event = match &ending {
            Ending::Exit(code) => Event::Exit(*code),
            Ending::Failed(m) => Event::Ended(m.clone()),
            Ending::Ended => Event::Ended(
                st.end_reason
                    .clone()
                    .unwrap_or_else(|| "the terminal session was ended".into()),
            ),
            Ending::Abandoned => Event::Ended("the terminal session expired".into()),
        };
        st.attached.take().map(|a| (a.tx, event))
    };
    let key = &session.key;
    match &ending {
        Ending::Exit(code) => {
            tracing::info!(run = %key.run, machine = %key.machine, session = %key.id, code, "terminal session ended: the process exited");
        }
        Ending::Failed(m) => {
            tracing::warn!(run = %key.run, machine = %key.machine, session = %key.id, "terminal session failed: {m}");
        }
        Ending::Ended | Ending::Abandoned => {
            tracing::info!(run = %key.run, machine = %key.machine, session = %key.id, abandoned = matches!(ending, Ending::Abandoned), "terminal session ended: hanging up");
            // Hang up politely; dropping the stream below makes the agent hang up the whole
            // process group and kill it shortly after.
            let _ = session.input.try_send(ExecInput {
                kind: Some(InKind::Signal(SIGHUP)),
            });
        }
    }
    drop(output);
    if let Some((tx, event)) = final_event {
        let _ = tokio::time::timeout(FINAL_EVENT_WAIT, tx.send(event)).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use ironlab_api::agent::Exit;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    fn limits() -> Limits {
        Limits {
            replay_bytes: 64,
            grace: Duration::from_secs(60),
            max_per_machine: 2,
        }
    }

    struct FakeAgent {
        /// What the session sent to the agent.
        input: mpsc::Receiver<ExecInput>,
        /// Agent output.
        out: mpsc::Sender<Result<ExecOutput, tonic::Status>>,
    }

    impl FakeAgent {
        async fn say(&self, text: &str) {
            self.out
                .send(Ok(ExecOutput {
                    kind: Some(OutKind::Stdout(text.as_bytes().to_vec())),
                }))
                .await
                .expect("session reads output");
        }
    }

    fn start(
        sessions: &Arc<Sessions>,
        machine: &str,
        owner: &str,
    ) -> Result<(Attachment, FakeAgent), SessionError> {
        let (itx, irx) = mpsc::channel(16);
        let (otx, orx) = mpsc::channel(4);
        let a = sessions.create(
            "run1",
            machine,
            owner,
            itx,
            Box::pin(ReceiverStream::new(orx)),
        )?;
        Ok((
            a,
            FakeAgent {
                input: irx,
                out: otx,
            },
        ))
    }

    async fn next_event(a: &mut Attachment) -> Event {
        tokio::time::timeout(Duration::from_secs(5), a.events.recv())
            .await
            .expect("an event in time")
            .expect("an event")
    }

    fn concat(chunks: &[Bytes]) -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    #[test]
    fn ring_keeps_the_newest_bytes_and_replays_from_a_line_start() {
        let mut r = Ring::new(10);
        r.push(Bytes::from_static(b"abc"));
        r.push(Bytes::from_static(b"def"));
        assert_eq!(r.contents(), b"abcdef");
        assert_eq!(concat(&r.snapshot()), "abcdef", "not wrapped: everything");
        r.push(Bytes::from_static(b"gh\nijkl"));
        assert_eq!(r.contents(), b"defgh\nijkl");
        assert_eq!(r.len, 10);
        assert_eq!(
            concat(&r.snapshot()),
            "ijkl",
            "wrapped: from the line start"
        );
        r.push(Bytes::from(vec![b'x'; 25]));
        assert_eq!(r.contents(), vec![b'x'; 10]);
        assert_eq!(r.chunks.len(), 1);
        // No newline near the start: replay everything kept.
        assert_eq!(concat(&r.snapshot()), "x".repeat(10));
    }

    #[test]
    fn ring_memory_is_bounded_under_a_flood() {
        let mut r = Ring::new(REPLAY_BYTES);
        for _ in 0..10_000 {
            r.push(Bytes::from(vec![b'y'; 4096]));
        }
        assert_eq!(r.len, REPLAY_BYTES);
        let held: usize = r.chunks.iter().map(Bytes::len).sum();
        assert_eq!(held, REPLAY_BYTES);
        assert!(r.chunks.len() <= REPLAY_BYTES / 4096 + 1);
    }

    #[tokio::test]
    async fn output_reaches_the_client_and_a_reattach_replays_it() {
        let sessions = Sessions::new(limits());
        let (mut a, agent) = start(&sessions, "m1", "alice").expect("create");
        let id = a.session.id().to_string();
        assert_eq!(id.len(), ID_LEN);
        assert!(a.replay.is_empty());
        agent.say("$ ls\n").await;
        assert_eq!(
            next_event(&mut a).await,
            Event::Output(Bytes::from("$ ls\n"))
        );
        drop(a);
        // Detached: output goes to the ring only.
        agent.say("file\n").await;
        agent.say("$ ").await;
        tokio::task::yield_now().await;
        let mut b = sessions
            .attach("run1", "m1", &id, "alice")
            .expect("reattach");
        // The ring may still be receiving the last chunk: wait until the replay is complete.
        let mut replay = concat(&b.replay);
        if replay != "$ ls\nfile\n$ " {
            drop(b);
            tokio::time::sleep(Duration::from_millis(50)).await;
            b = sessions
                .attach("run1", "m1", &id, "alice")
                .expect("reattach");
            replay = concat(&b.replay);
        }
        assert_eq!(replay, "$ ls\nfile\n$ ");
        agent.say("live").await;
        assert_eq!(next_event(&mut b).await, Event::Output(Bytes::from("live")));
        // The process exits: the client gets the status and the session is gone.
        agent
            .out
            .send(Ok(ExecOutput {
                kind: Some(OutKind::Exit(Exit { code: 3, signal: 0 })),
            }))
            .await
            .expect("exit");
        assert_eq!(next_event(&mut b).await, Event::Exit(3));
        assert_eq!(
            sessions.attach("run1", "m1", &id, "alice").err(),
            Some(SessionError::Unknown(id.clone()))
        );
        assert!(sessions.is_empty());
    }

    #[tokio::test]
    async fn only_the_owner_attaches_and_only_on_its_machine() {
        let sessions = Sessions::new(limits());
        let (a, _agent) = start(&sessions, "m1", "alice").expect("create");
        let id = a.session.id().to_string();
        assert_eq!(
            sessions.attach("run1", "m1", &id, "mallory").err(),
            Some(SessionError::NotOwner(id.clone()))
        );
        assert_eq!(
            sessions.attach("run1", "m2", &id, "alice").err(),
            Some(SessionError::Unknown(id.clone()))
        );
        assert_eq!(
            sessions.attach("run2", "m1", &id, "alice").err(),
            Some(SessionError::Unknown(id.clone()))
        );
        assert!(matches!(
            sessions.attach("run1", "m1", "nosuchsession0000", "alice"),
            Err(SessionError::Unknown(_))
        ));
        let msg = SessionError::NotOwner(id.clone()).to_string();
        assert!(msg.contains(&id) && msg.contains("another user"), "{msg}");
    }

    #[tokio::test]
    async fn a_new_attach_replaces_the_old_client() {
        let sessions = Sessions::new(limits());
        let (mut a, agent) = start(&sessions, "m1", "alice").expect("create");
        let id = a.session.id().to_string();
        let mut b = sessions.attach("run1", "m1", &id, "alice").expect("attach");
        tokio::time::timeout(Duration::from_secs(5), a.replaced.cancelled())
            .await
            .expect("the first client is told it was replaced");
        agent.say("to b").await;
        assert_eq!(next_event(&mut b).await, Event::Output(Bytes::from("to b")));
        assert!(a.events.try_recv().is_err(), "the old client gets nothing");
        // Dropping the old attachment does not detach the new one.
        drop(a);
        agent.say("still b").await;
        assert_eq!(
            next_event(&mut b).await,
            Event::Output(Bytes::from("still b"))
        );
    }

    #[tokio::test]
    async fn a_slow_client_holds_the_agent_back() {
        let sessions = Sessions::new(limits());
        let (_a, agent) = start(&sessions, "m1", "alice").expect("create");
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = sent.clone();
        let out = agent.out.clone();
        let producer = tokio::spawn(async move {
            for _ in 0..10_000 {
                let msg = Ok(ExecOutput {
                    kind: Some(OutKind::Stdout(vec![b'y'; 1024])),
                });
                if out.send(msg).await.is_err() {
                    break;
                }
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(std::sync::atomic::Ordering::SeqCst);
        // Held: the event channel, the event in hand and the one being gathered, each at most
        // COALESCE_BYTES, plus the agent's own small queue.
        let bound = (EVENTS_BUFFER + 2) * COALESCE_BYTES + 8 * 1024;
        assert!(
            n * 1024 < bound,
            "the agent ran ahead by {n} KiB while attached (bound {bound} bytes)"
        );
        producer.abort();
    }

    #[tokio::test]
    async fn detached_output_is_dropped_not_held() {
        let sessions = Sessions::new(limits());
        let (a, agent) = start(&sessions, "m1", "alice").expect("create");
        let id = a.session.id().to_string();
        drop(a);
        for i in 0..200 {
            agent.say(&format!("line {i}\n")).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = sessions.attach("run1", "m1", &id, "alice").expect("attach");
        let replay = concat(&b.replay);
        assert!(replay.len() <= 64, "{replay:?}");
        assert!(replay.starts_with("line "), "{replay:?}");
        assert!(replay.ends_with("line 199\n"), "{replay:?}");
    }

    #[tokio::test]
    async fn a_detached_session_expires_and_hangs_up() {
        let sessions = Sessions::new(Limits {
            grace: Duration::from_millis(400),
            ..limits()
        });
        let (a, mut agent) = start(&sessions, "m1", "alice").expect("create");
        let id = a.session.id().to_string();
        drop(a);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            sessions.attach("run1", "m1", &id, "alice").is_ok(),
            "still there within the grace period"
        );
        // That attach was dropped at once: the grace period starts again.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(sessions.attach("run1", "m1", &id, "alice").is_ok());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            sessions.attach("run1", "m1", &id, "alice").err(),
            Some(SessionError::Unknown(id.clone()))
        );
        let hup = agent.input.recv().await.expect("a hang-up");
        assert!(matches!(hup.kind, Some(InKind::Signal(SIGHUP))));
        // The output stream was dropped: the agent sees its client gone.
        tokio::time::timeout(Duration::from_secs(5), agent.out.closed())
            .await
            .expect("the agent stream is dropped");
    }

    #[tokio::test]
    async fn ending_a_run_ends_its_sessions_and_tells_the_client() {
        let sessions = Sessions::new(limits());
        let (mut a, agent) = start(&sessions, "m1", "alice").expect("create");
        sessions.end_run("other", "nope");
        assert_eq!(sessions.len(), 1);
        sessions.end_run("run1", "run run1 was destroyed");
        assert_eq!(
            next_event(&mut a).await,
            Event::Ended("run run1 was destroyed".into())
        );
        assert!(sessions.is_empty());
        tokio::time::timeout(Duration::from_secs(5), agent.out.closed())
            .await
            .expect("the agent stream is dropped");
    }

    #[tokio::test]
    async fn the_oldest_detached_session_makes_room() {
        let sessions = Sessions::new(limits());
        let (a1, _g1) = start(&sessions, "m1", "alice").expect("first");
        let first = a1.session.id().to_string();
        let (_a2, _g2) = start(&sessions, "m1", "alice").expect("second");
        // Both attached: a third is refused.
        assert!(matches!(
            start(&sessions, "m1", "alice").err(),
            Some(SessionError::TooMany { max: 2, .. })
        ));
        // Another machine has its own budget.
        let (_b, _gb) = start(&sessions, "m2", "alice").expect("other machine");
        drop(a1);
        let (_a3, _g3) = start(&sessions, "m1", "alice").expect("room made");
        assert!(matches!(
            sessions.attach("run1", "m1", &first, "alice"),
            Err(SessionError::Unknown(_))
        ));
    }
}
