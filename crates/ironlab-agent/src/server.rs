//! The gRPC service (`ironlab.agent.v1.Agent`) on a unix socket.
//!
//! Who talks to whom: the worker on the host connects to the socket (bind-mounted into the
//! machine); each handler here only translates between protobuf and the plain functions of
//! [`crate::exec`], [`crate::files`] and [`crate::users`]. Errors become a `Status` in exactly one
//! place, [`status_of`].

use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ironlab_api::agent::agent_server::{Agent, AgentServer};
use ironlab_api::agent::{
    ApplyTasksRequest, ApplyTasksResponse, ConfigureRequest, ConfigureResponse, DialInput,
    DialOutput, EnsureUsersRequest, EnsureUsersResponse, ExecInput, ExecOutput, HealthRequest,
    HealthResponse, ListTasksRequest, ListTasksResponse, PutFileRequest, PutFileResponse,
    SetExternalRequest, SetExternalResponse, TaskEvent, TaskInputRequest, TaskInputResponse,
    WatchTasksRequest, dial_input, exec_input,
};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::dial::{self, DialError};
use crate::exec::{self, ExecError};
use crate::files::{self, FileError};
use crate::serial::AgentConn;
use crate::tasks::{self, BashExecutor, Engine, TaskError};
use crate::users::{UserDb, UserError};

/// Largest request accepted (`PutFile` content).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The agent service. `root` is the machine's root directory (`/`; tests use a temp dir for the
/// user database and files).
#[derive(Debug, Clone)]
pub struct AgentService {
    db: UserDb,
    started: Instant,
    tasks: Engine,
}

impl AgentService {
    /// A service over the machine rooted at `root`. Its task engine keeps state in memory only
    /// (see [`AgentService::with_task_state`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let db = UserDb::new(root);
        let tasks = Engine::new(Arc::new(BashExecutor::new(db.clone())), None);
        AgentService {
            db,
            started: Instant::now(),
            tasks,
        }
    }

    /// Replaces the task engine by one that persists its state at `path` and resumes the tasks
    /// saved there (an agent restart). Must be called within a tokio runtime.
    pub fn with_task_state(mut self, path: impl Into<PathBuf>) -> Self {
        self.tasks = Engine::new(
            Arc::new(BashExecutor::new(self.db.clone())),
            Some(path.into()),
        );
        self
    }

    /// The task engine.
    pub fn tasks(&self) -> &Engine {
        &self.tasks
    }

    /// The tonic server wrapper, with the message size limit raised to [`MAX_MESSAGE`].
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// `error: cause: cause`, the whole chain in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Maps the agent's errors to gRPC statuses.
pub fn status_of(e: &(dyn std::error::Error + 'static)) -> Status {
    let msg = chain(e);
    let user = |u: &UserError| match u {
        UserError::NoSuchUser { .. } | UserError::NoSuchGroup { .. } => Status::not_found(&msg),
        UserError::InvalidName(_) => Status::invalid_argument(&msg),
        UserError::Read { .. } | UserError::Write { .. } | UserError::Create { .. } => {
            Status::internal(&msg)
        }
    };
    if let Some(e) = e.downcast_ref::<ExecError>() {
        return match e {
            ExecError::User(u) => user(u),
            ExecError::NoCwd(_) => Status::invalid_argument(&msg),
            ExecError::NotRoot { .. } => Status::permission_denied(&msg),
            ExecError::Pty(_) | ExecError::Spawn { .. } => Status::internal(&msg),
        };
    }
    if let Some(e) = e.downcast_ref::<FileError>() {
        return match e {
            FileError::NotAbsolute(_) => Status::invalid_argument(&msg),
            FileError::Owner { source, .. } => user(source),
            FileError::Write { .. } => Status::internal(&msg),
        };
    }
    if let Some(u) = e.downcast_ref::<UserError>() {
        return user(u);
    }
    if let Some(d) = e.downcast_ref::<DialError>() {
        return match d {
            DialError::Invalid(_) => Status::invalid_argument(&msg),
            DialError::Resolve { .. } => Status::not_found(&msg),
            DialError::Connect { .. } | DialError::Timeout { .. } | DialError::Io { .. } => {
                Status::unavailable(&msg)
            }
        };
    }
    if let Some(t) = e.downcast_ref::<TaskError>() {
        return match t {
            TaskError::Invalid(_) | TaskError::NotInput(_) | TaskError::UnknownExternal(_) => {
                Status::invalid_argument(&msg)
            }
            TaskError::UnknownTask(_) => Status::not_found(&msg),
            TaskError::NotReady { .. } => Status::failed_precondition(&msg),
        };
    }
    Status::internal(msg)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send + 'static>>;
type DialStream = Pin<Box<dyn Stream<Item = Result<DialOutput, Status>> + Send + 'static>>;
type TaskStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send + 'static>>;

/// Forwards engine events to one `WatchTasks` stream until the client goes away; after a lag,
/// sends a fresh snapshot.
fn watch_tasks(
    engine: Engine,
    include_snapshot: bool,
) -> mpsc::Receiver<Result<TaskEvent, Status>> {
    let (tx, out) = mpsc::channel(64);
    let (snapshot, mut rx) = engine.watch();
    tokio::spawn(async move {
        if include_snapshot {
            for s in &snapshot {
                if tx.send(Ok(tasks::proto::event(s))).await.is_err() {
                    return;
                }
            }
        }
        drop(snapshot);
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                () = tx.closed() => return,
            };
            let events = match next {
                Ok(e) => vec![e],
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (snapshot, fresh) = engine.watch();
                    rx = fresh;
                    snapshot
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for e in &events {
                if tx.send(Ok(tasks::proto::event(e))).await.is_err() {
                    return;
                }
            }
        }
    });
    out
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            version: crate::VERSION.to_string(),
            hostname: hostname(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn configure(
        &self,
        request: Request<ConfigureRequest>,
    ) -> Result<Response<ConfigureResponse>, Status> {
        let req = request.into_inner();
        let what = if req.resume {
            "resumed from its RAM snapshot"
        } else {
            "configured from the boot template"
        };
        let steps = tokio::task::spawn_blocking(move || crate::boot::configure(&req))
            .await
            .map_err(|e| Status::internal(format!("configure: {e}")))?
            .map_err(|e| {
                let msg = format!("{e:#}");
                if msg.starts_with("this machine was not restored") {
                    Status::failed_precondition(msg)
                } else if msg.starts_with("hostname ") || msg.starts_with("seed: ") {
                    Status::invalid_argument(msg)
                } else {
                    Status::internal(msg)
                }
            })?;
        eprintln!("ironlab-agent: {what}: {steps}");
        Ok(Response::new(ConfigureResponse { steps }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<Streaming<ExecInput>>,
    ) -> Result<Response<ExecStream>, Status> {
        let mut input = request.into_inner();
        let start = match input.message().await?.and_then(|m| m.kind) {
            Some(exec_input::Kind::Start(start)) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "the first Exec message must be `start`",
                ));
            }
        };
        exec::wait_for_init().await;
        let rx = exec::spawn_session(&self.db, start, input).map_err(|e| status_of(&e))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }

    async fn put_file(
        &self,
        request: Request<PutFileRequest>,
    ) -> Result<Response<PutFileResponse>, Status> {
        let req = request.into_inner();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            files::put_file(
                &db,
                &req.path,
                &req.content,
                req.mode,
                &req.owner,
                req.append,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("PutFile task failed: {e}")))?
        .map_err(|e| status_of(&e))?;
        Ok(Response::new(PutFileResponse {}))
    }

    async fn ensure_users(
        &self,
        request: Request<EnsureUsersRequest>,
    ) -> Result<Response<EnsureUsersResponse>, Status> {
        let req = request.into_inner();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.ensure_users(&req.names, req.sudo))
            .await
            .map_err(|e| Status::internal(format!("EnsureUsers task failed: {e}")))?
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(EnsureUsersResponse {}))
    }

    async fn apply_tasks(
        &self,
        request: Request<ApplyTasksRequest>,
    ) -> Result<Response<ApplyTasksResponse>, Status> {
        let set = tasks::proto::task_set(request.into_inner());
        self.tasks.apply(set).map_err(|e| status_of(&e))?;
        Ok(Response::new(ApplyTasksResponse {}))
    }

    async fn set_external(
        &self,
        request: Request<SetExternalRequest>,
    ) -> Result<Response<SetExternalResponse>, Status> {
        let req = request.into_inner();
        self.tasks
            .set_external(&req.name, req.completed, &req.stdout)
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(SetExternalResponse {}))
    }

    type WatchTasksStream = TaskStream;

    async fn watch_tasks(
        &self,
        request: Request<WatchTasksRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let rx = watch_tasks(self.tasks.clone(), request.into_inner().include_snapshot);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_tasks(
        &self,
        _request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let (machine, list) = self.tasks.list();
        Ok(Response::new(ListTasksResponse {
            tasks: list.iter().map(tasks::proto::event).collect(),
            machine,
        }))
    }

    async fn task_input(
        &self,
        request: Request<TaskInputRequest>,
    ) -> Result<Response<TaskInputResponse>, Status> {
        let req = request.into_inner();
        let reply = self
            .tasks
            .input(&req.name, &req.value)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(TaskInputResponse {
            accepted: reply.accepted,
            hint: reply.hint,
        }))
    }

    type DialStream = DialStream;

    async fn dial(
        &self,
        request: Request<Streaming<DialInput>>,
    ) -> Result<Response<DialStream>, Status> {
        let mut input = request.into_inner();
        let open = match input.message().await?.and_then(|m| m.kind) {
            Some(dial_input::Kind::Open(open)) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first Dial message must be `open`",
                ));
            }
        };
        let (socket, peer) = dial::connect(&open).await.map_err(|e| status_of(&e))?;
        let rx = dial::pump(socket, peer, input);
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|r| r.map_err(|e| status_of(&e))),
        )))
    }
}

/// Binds the agent's socket: creates the parent directory, removes a stale socket file, and
/// makes the socket mode 600.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot remove stale socket {}", socket.display()));
        }
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod 600 {}", socket.display()))?;
    Ok(listener)
}

/// Serves `service` on `listener` and, when given, on the virtio-serial port `serial` (see
/// [`crate::serial`]) until `shutdown` resolves (then waits for open calls).
pub async fn serve_with_serial(
    listener: UnixListener,
    serial: Option<PathBuf>,
    service: AgentService,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some(serial) = serial else {
        return serve(listener, service, shutdown).await;
    };
    let unix = UnixListenerStream::new(listener).map(|r| r.map(AgentConn::Unix));
    let port = crate::serial::incoming(serial).map(|r| r.map(AgentConn::Serial));
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(unix.merge(port), shutdown)
        .await
        .context("agent gRPC server failed")
}

/// Serves `service` on `listener` until `shutdown` resolves (then waits for open calls).
pub async fn serve(
    listener: UnixListener,
    service: AgentService,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("agent gRPC server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let e = ExecError::User(UserError::NoSuchUser {
            name: "ghost".into(),
            path: "/etc/passwd".into(),
        });
        let s = status_of(&e);
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().contains("ghost"), "{}", s.message());
        let e = FileError::Write {
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        let s = status_of(&e);
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "cannot write /x: disk full");
    }
}
