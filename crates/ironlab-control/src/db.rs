//! The SQL database: opening it, migrations, and small helpers shared by the services.
//!
//! Two backends behind one pool type ([`Db`], sqlx's `Any` driver):
//! - **SQLite** (the default, `DATA_DIR/control/ironlab.db`): WAL, foreign keys on, busy timeout;
//!   one host.
//! - **PostgreSQL** (`--database postgres://…`): the control plane of a fleet.
//!
//! The schema and every query are written once, in portable SQL: `$N` placeholders, `BIGINT`
//! milliseconds for times, `ON CONFLICT … DO …` and `RETURNING`. The one type the `Any` driver
//! cannot read from SQLite is `BOOLEAN`, so boolean columns are read as integers
//! ([`bool_col`]) and written as booleans.

use std::time::Duration;

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use sqlx::Executor;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

/// The database pool type used throughout the crate.
pub type Db = sqlx::AnyPool;

/// Embedded migrations from `crates/ironlab-control/migrations/` (the same files for both
/// backends).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Which database the control plane keeps its state in.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created if missing.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host:port/dbname`); the database must exist.
    Postgres(String),
}

impl Database {
    /// Parses `--database`: a `postgres://` or `postgresql://` URL, a `sqlite://` URL, or a
    /// path to a SQLite file.
    pub fn parse(s: &str) -> anyhow::Result<Database> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let url = url::Url::parse(s)
                .with_context(|| format!("--database: {} is not a valid URL", redact(s)))?;
            if url.path().trim_start_matches('/').is_empty() {
                anyhow::bail!(
                    "--database: {} names no database (add /DBNAME to the URL)",
                    redact(s)
                );
            }
            return Ok(Database::Postgres(s.to_string()));
        }
        if let Some(path) = s.strip_prefix("sqlite://") {
            return Database::parse(path);
        }
        if s.is_empty() {
            anyhow::bail!("--database: empty (give a postgres:// URL or a SQLite file path)");
        }
        if s.contains("://") {
            anyhow::bail!(
                "--database: unsupported scheme in {} (use postgres://… or a SQLite file path)",
                redact(s)
            );
        }
        Ok(Database::Sqlite(s.into()))
    }

    /// Which backend, for logs and errors.
    pub fn backend(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "SQLite",
            Database::Postgres(_) => "PostgreSQL",
        }
    }
}

/// Shows where the data is, never a password.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(u) => write!(f, "{}", redact(u)),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({self})", self.backend())
    }
}

/// A URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
}

/// Opens the database (creating a SQLite file if needed) and applies migrations.
pub async fn open(database: &Database) -> anyhow::Result<Db> {
    sqlx::any::install_default_drivers();
    let url = match database {
        Database::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            // `mode=rwc`: create the file when missing. The driver %-decodes the path, so a
            // `%`, `?` or `#` in it is encoded first.
            let path = path
                .to_str()
                .with_context(|| format!("database path {} is not UTF-8", path.display()))?
                .replace('%', "%25")
                .replace('?', "%3F")
                .replace('#', "%23");
            format!("sqlite://{path}?mode=rwc")
        }
        Database::Postgres(url) => url.clone(),
    };
    let opts: AnyConnectOptions = url
        .parse()
        .with_context(|| format!("bad --database {database}"))?;
    let sqlite = matches!(database, Database::Sqlite(_));
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 8 } else { 16 })
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    // Per connection: foreign keys and the busy timeout; WAL sticks to the file.
                    conn.execute(
                        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                         PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(opts)
        .await
        .with_context(|| {
            format!(
                "cannot open the {} database {database}{}",
                database.backend(),
                if sqlite {
                    ""
                } else {
                    " (is PostgreSQL running, and does the database exist? `createdb NAME`)"
                }
            )
        })?;
    MIGRATOR
        .run(&pool)
        .await
        .with_context(|| format!("failed to migrate the database {database}"))?;
    Ok(pool)
}

/// A boolean column, read portably: SQLite's `Any` driver cannot read `BOOLEAN`, so a query
/// selects `CASE WHEN col THEN 1 ELSE 0 END` and the row gets `!= 0` of it.
pub fn bool_col(v: i64) -> bool {
    v != 0
}

/// Milliseconds since the Unix epoch, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Converts a timestamp column back to a time.
pub fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// `n` random characters from `[a-z0-9]` (run ids, user ids).
pub fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// `n` random URL-safe characters (`[A-Za-z0-9_-]`) for secrets.
pub fn random_secret(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Databases for tests: SQLite in a directory, or, when `IRONLAB_TEST_DATABASE_URL` names a
/// PostgreSQL server (`postgres://USER@HOST/DB`, a user that may create databases), a fresh
/// database of its own there, dropped when the guard goes.
pub mod testing {
    use super::*;

    /// The environment variable that switches tests to PostgreSQL.
    pub const ENV: &str = "IRONLAB_TEST_DATABASE_URL";

    /// Keeps a test's database; a PostgreSQL one is dropped (connections and all) on drop.
    pub struct TestDatabase {
        /// What to open.
        pub database: Database,
        drop_from: Option<(String, String)>,
    }

    impl TestDatabase {
        /// A SQLite file in `dir`, or a new PostgreSQL database when [`ENV`] is set.
        pub async fn new(dir: &Path) -> TestDatabase {
            let Some(admin) = std::env::var(ENV).ok().filter(|v| !v.is_empty()) else {
                return TestDatabase {
                    database: Database::Sqlite(dir.join("control").join("ironlab.db")),
                    drop_from: None,
                };
            };
            let name = format!("ironlab_test_{}", random_id(12));
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("{ENV}: cannot connect to {}: {e}", redact(&admin)));
            conn.execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap_or_else(|e| panic!("{ENV}: CREATE DATABASE {name}: {e}"));
            let mut url = url::Url::parse(&admin).expect("checked by connect");
            url.set_path(&name);
            TestDatabase {
                database: Database::Postgres(url.to_string()),
                drop_from: Some((admin, name)),
            }
        }
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let Some((admin, name)) = self.drop_from.take() else {
                return;
            };
            // Drop runs inside the test's runtime: a thread with a runtime of its own.
            let db_name = name.clone();
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let mut conn =
                        <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
                    conn.execute(
                        format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str(),
                    )
                    .await?;
                    anyhow::Ok(())
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("warning: test database {name} was not dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        let id = random_id(12);
        assert_eq!(id.len(), 12);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        let s = random_secret(32);
        assert_eq!(s.len(), 32);
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[tokio::test]
    async fn opens_and_migrates_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = testing::TestDatabase::new(dir.path()).await;
        let db = open(&t.database).await.expect("first open");
        db.close().await;
        let db = open(&t.database)
            .await
            .expect("second open re-applies nothing");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&db)
            .await
            .expect("users table exists");
        assert_eq!(n, 0);
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&db)
            .await
            .expect("migrations table");
        assert_eq!(applied, MIGRATOR.iter().count() as i64);
    }

    #[tokio::test]
    async fn sqlite_paths_with_url_characters_open_where_they_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a b%20c?d#e");
        let file = odd.join("ironlab.db");
        let db = open(&Database::Sqlite(file.clone())).await.expect("opens");
        db.close().await;
        assert!(file.is_file(), "{} was not created", file.display());
        let journal: String = {
            let db = open(&Database::Sqlite(file)).await.expect("reopens");
            sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&db)
                .await
                .expect("pragma")
        };
        assert_eq!(journal, "wal");
    }

    #[test]
    fn database_argument_is_checked() {
        let pg =
            Database::parse("postgres://ironlab:secret@db.example:5432/ironlab").expect("accepted");
        assert_eq!(pg.backend(), "PostgreSQL");
        assert!(!pg.to_string().contains("secret"), "{pg}");
        assert!(format!("{pg:?}").contains("***"));
        assert_eq!(
            Database::parse("sqlite:///var/lib/x.db").expect("accepted"),
            Database::Sqlite("/var/lib/x.db".into())
        );
        assert_eq!(
            Database::parse("/var/lib/x.db").expect("accepted"),
            Database::Sqlite("/var/lib/x.db".into())
        );
        let e = Database::parse("postgres://u:pw@host:5432")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("names no database") && !e.contains("pw"), "{e}");
        let e = Database::parse("mysql://host/db")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("unsupported scheme"), "{e}");
        assert!(Database::parse("").is_err());
    }
}
