//! Command-line syntax (clap derive). Only structs; the work is in `cmd/`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ironlab: learn Linux by doing, in real playgrounds.
#[derive(Debug, Parser)]
#[command(name = "ironlab", version, about, propagate_version = true)]
pub struct Cli {
    /// Control plane URL (overrides the stored login).
    #[arg(long, global = true, env = "IRONLAB_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API token (overrides the stored login).
    #[arg(
        long,
        global = true,
        env = "IRONLAB_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane and a local worker (one host, SQLite).
    Up(UpArgs),
    /// Run the control plane alone.
    Control(ControlArgs),
    /// Run a worker alone.
    Worker(WorkerArgs),
    /// Log in and out.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Playgrounds and their runs.
    #[command(subcommand, alias = "pg")]
    Playground(PlaygroundCommand),
    /// Open a shell, or run a command, in a machine of a run.
    Ssh(SshArgs),
    /// Forward local TCP ports to ports inside a machine of a run.
    PortForward(PortForwardArgs),
    /// Connect stdin/stdout to a TCP port of a machine (for ssh's ProxyCommand).
    SshProxy(SshProxyArgs),
    /// Print a one-time browser link to an HTTP server in a machine (what an http-port tab opens).
    HttpPort(HttpPortArgs),
    /// Manage users (admins only).
    #[command(subcommand)]
    User(UserCommand),
    /// The control plane's workers: whether each answers, its runtimes and runs (admins only;
    /// exits 1 when one does not answer).
    Workers {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Tutorials, challenges, courses and skill paths: write, publish, test.
    #[command(subcommand)]
    Content(ContentCommand),
}

/// Options of the worker, shared by `up` (passed to its child) and `worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerOptions {
    /// The static in-machine agent binary [default: <dir of this exe>/ironlab-agent-static].
    #[arg(long, env = "IRONLAB_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Directory of stock images (`<name>/` OCI image layouts).
    #[arg(
        long,
        env = "IRONLAB_STOCK_IMAGES",
        value_name = "DIR",
        default_value = "/var/lib/ironlab/stock-images"
    )]
    pub stock_images: PathBuf,
    /// A registry reached over plain HTTP (HOST:PORT); repeat or comma-separate.
    #[arg(
        long = "insecure-registry",
        env = "IRONLAB_INSECURE_REGISTRIES",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Where runs' traffic leaves: `host` (forwarding + NAT through the host), `none` (nothing
    /// leaves any run) or `netns:NAME` (a network namespace that routes it, e.g. a test's).
    #[arg(
        long,
        env = "IRONLAB_UPLINK",
        value_name = "MODE",
        default_value = "host"
    )]
    pub uplink: String,
    /// Resolvers runs' names are forwarded to [default: the host's /etc/resolv.conf]; repeat or
    /// comma-separate.
    #[arg(
        long = "upstream-dns",
        env = "IRONLAB_UPSTREAM_DNS",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub upstream_dns: Vec<std::net::Ipv4Addr>,
    /// Where stopped runs' drives are uploaded: a directory, `file:///DIR` or
    /// `s3://BUCKET[/PREFIX]` (endpoint and keys from IRONLAB_S3_ENDPOINT, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION), or `none` [default: WORKER_DIR/objects/snapshots].
    #[arg(long, env = "IRONLAB_SNAPSHOT_STORE", value_name = "LOCATION")]
    pub snapshot_store: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the control plane; the worker listens on the next port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory (database, tokens, worker pool).
    #[arg(long, default_value = "/var/lib/ironlab")]
    pub data_dir: PathBuf,
    /// Where the control plane keeps its state: a PostgreSQL URL
    /// (`postgres://USER:PASSWORD@HOST/DB`, the database must exist) or a SQLite file
    /// [default: DATA_DIR/control/ironlab.db].
    /// (Parsed by the command, not clap: clap would echo a refused URL, password and all.)
    #[arg(
        long,
        env = "IRONLAB_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL|FILE"
    )]
    pub database: Option<String>,
    /// Publish every content item folder in DIR at start, as the admin (e.g. the repository's
    /// `content/`); unchanged items keep their version.
    #[arg(long, value_name = "DIR")]
    pub content: Option<PathBuf>,
    #[command(flatten)]
    pub worker: WorkerOptions,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory (`control/ironlab.db`, content bundles, `admin-token`).
    #[arg(long, default_value = "/var/lib/ironlab")]
    pub data_dir: PathBuf,
    /// Where the control plane keeps its state: a PostgreSQL URL
    /// (`postgres://USER:PASSWORD@HOST/DB`, the database must exist) or a SQLite file
    /// [default: DATA_DIR/control/ironlab.db].
    /// (Parsed by the command, not clap: clap would echo a refused URL, password and all.)
    #[arg(
        long,
        env = "IRONLAB_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL|FILE"
    )]
    pub database: Option<String>,
    /// A worker's API: `URL`, or `NAME=URL` once per worker when there are several (runs are
    /// pinned to a worker by its name; new runs go to the least loaded one that answers).
    #[arg(
        long,
        default_value = "http://127.0.0.1:7070",
        value_name = "[NAME=]URL"
    )]
    pub worker_url: Vec<String>,
    /// File holding the workers' bearer token (the same for all).
    #[arg(long, value_name = "FILE")]
    pub worker_token_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Worker directory (storage pool, runs).
    #[arg(long, default_value = "/var/lib/ironlab/worker")]
    pub data_dir: PathBuf,
    /// File holding the bearer token the control plane presents.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Base URL clients use for terminal WebSockets [default: ws://<listen address>].
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub options: WorkerOptions,
    /// Exit when this process (the supervising `ironlab up`) exits.
    #[arg(long, hide = true, value_name = "PID")]
    pub parent_pid: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Check `--server URL --token TOKEN` against the server and store both (mode 600).
    Login,
    /// Show who you are logged in as.
    Whoami,
    /// Forget the stored credentials.
    Logout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable.
    Text,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum PlaygroundCommand {
    /// List the playgrounds you can start.
    Catalog {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Register a custom playground from a manifest file (YAML or JSON).
    Create {
        /// The manifest file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove a custom playground.
    Remove {
        /// Playground name.
        name: String,
    },
    /// Start a run of a playground; prints the run id once it is ready.
    Start {
        /// Playground name.
        name: String,
        /// Title of the run.
        #[arg(long)]
        title: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
        /// Return as soon as the run is recorded.
        #[arg(long)]
        no_wait: bool,
    },
    /// List your runs.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
        /// Everyone's runs (admins).
        #[arg(long)]
        all: bool,
    },
    /// Show a run: state, failure reason, machines.
    Status {
        /// Run id.
        run: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the end of a machine's console log (a microVM's serial console, a container's
    /// init output); still there for a day after the run failed or was destroyed.
    Logs {
        /// Run id.
        run: String,
        /// Machine [default: the first machine of the run].
        #[arg(long, short)]
        machine: Option<String>,
    },
    /// Destroy a run and everything it holds on its host.
    Destroy {
        /// Run id.
        run: String,
        /// Return as soon as destruction is requested.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the tasks (the checklist) of a run.
    Tasks {
        /// Run id.
        run: String,
        /// Follow changes until every task completed (exit 0) or one failed (exit 1).
        #[arg(long)]
        watch: bool,
        /// Output format (with --watch: one JSON task per line).
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Test a challenge: register and start its playground, type the solution into its
    /// terminals the way a student does, wait for every task, report, destroy the run.
    Test {
        /// The playground manifest (with tasks).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// The solution (Markdown with ```sh machine=M user=U blocks).
        #[arg(long, value_name = "FILE")]
        solution: PathBuf,
        /// Deadline for the whole test once the run is up (e.g. 90s, 5m; plain numbers are seconds).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Stop a run: its machines shut down, its drives are kept (restart, clone or save it).
    Stop {
        /// Run id.
        run: String,
        /// Return as soon as the stop is requested.
        #[arg(long)]
        no_wait: bool,
    },
    /// Boot a stopped run again on the same drives; prints the run id once it is ready.
    Restart {
        /// Run id.
        run: String,
        /// Return as soon as the restart is requested.
        #[arg(long)]
        no_wait: bool,
    },
    /// Clone a stopped run into a new stopped run (instant; no space until they diverge);
    /// prints the new run's id.
    Clone {
        /// Run id (stopped).
        run: String,
        /// Title of the clone.
        #[arg(long)]
        title: Option<String>,
    },
    /// Save a stopped run as a new playground that starts from its drives; prints its name.
    Save {
        /// Run id (stopped).
        run: String,
        /// Name of the new playground.
        #[arg(long)]
        name: String,
        /// Title of the new playground [default: the run's title].
        #[arg(long)]
        title: Option<String>,
        /// Description of the new playground.
        #[arg(long)]
        description: Option<String>,
    },
}

/// `90`, `90s`, `500ms`, `5m`, `1h`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(n));
    }
    ironlab_spec::Duration::parse(s).map(|d| d.0)
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Run id.
    pub run: String,
    /// Machine [default: the first machine of the run].
    #[arg(long, short)]
    pub machine: Option<String>,
    /// Command to run instead of an interactive shell.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// Run id.
    pub run: String,
    /// Machine [default: the first machine of the run].
    #[arg(long, short)]
    pub machine: Option<String>,
    /// LOCAL:REMOTE port pairs, or REMOTE alone for the same local port; LOCAL 0 picks a free
    /// port (printed).
    #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
    pub ports: Vec<String>,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: std::net::IpAddr,
}

#[derive(Debug, Args)]
pub struct SshProxyArgs {
    /// Run id.
    pub run: String,
    /// Machine [default: the first machine of the run].
    #[arg(long, short)]
    pub machine: Option<String>,
    /// The TCP port inside the machine.
    #[arg(long, short, default_value_t = 22)]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct HttpPortArgs {
    /// Run id.
    pub run: String,
    /// Machine [default: the first machine of the run].
    #[arg(long, short)]
    pub machine: Option<String>,
    /// The port the HTTP server listens on inside the machine.
    pub port: u16,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints their API token.
    Create {
        /// Login name.
        name: String,
        /// Make them an admin.
        #[arg(long)]
        admin: bool,
    },
    /// Make a user a content author (they may publish with `ironlab content push`), or not.
    Author {
        /// Login name.
        name: String,
        /// Take the role away instead.
        #[arg(long)]
        revoke: bool,
    },
    /// Set a user's storage quota for stopped runs and saved playgrounds (`20GiB`, or
    /// `default`).
    Quota {
        /// Login name.
        name: String,
        /// Size (`512MiB`, `20GiB`) or `default`.
        size: String,
    },
}

/// Kinds of content `content create` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ContentKindArg {
    /// Text with a live playground beside it.
    Tutorial,
    /// A statement with tasks that check the student's work.
    Challenge,
    /// Modules of lessons.
    Course,
    /// Units ordering challenges and tutorials.
    SkillPath,
}

#[derive(Debug, Subcommand)]
pub enum ContentCommand {
    /// Write a working example item into ./NAME (or --dir) that passes validation.
    Create {
        /// tutorial, challenge, course or skill-path.
        kind: ContentKindArg,
        /// Item name (3-40 characters [a-z0-9-]); also the folder's name.
        name: String,
        /// Where to create the folder [default: the current directory].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Check an item's folder locally (front matter, Markdown references, tasks).
    Check {
        /// The item's folder [default: the current directory].
        dir: Option<PathBuf>,
    },
    /// Publish an item's folder as its next version (admins).
    Push {
        /// The item's folder [default: the current directory]; its name is the item's name.
        dir: Option<PathBuf>,
        /// Keep running and publish again on every saved change (open pages re-render).
        #[arg(long)]
        watch: bool,
    },
    /// List the items you can see.
    #[command(alias = "ls")]
    List {
        /// Only this kind (tutorial, challenge, course, skill-path).
        #[arg(long)]
        kind: Option<String>,
        /// Words to search for.
        #[arg(long, short = 'q')]
        query: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download an item's files (author or admin) into ./NAME (or --dir).
    Pull {
        /// Item name.
        name: String,
        /// A version [default: the latest].
        #[arg(long = "at", value_name = "VERSION")]
        at_version: Option<i64>,
        /// Folder to write into [default: ./NAME]; must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Remove an item and all its versions (author or admin).
    #[command(alias = "remove")]
    Rm {
        /// Item name.
        name: String,
    },
    /// Play an item's solution.md against a real run and report per task; exits 0 only if
    /// every task completed. DIR tests a local folder without publishing it; NAME tests the
    /// published item.
    Test {
        /// A folder (contains index.md) or a published item's name.
        target: String,
        /// Deadline once the run is up (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}
