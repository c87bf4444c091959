//! Users and groups, read straight from the machine's `/etc/passwd` and `/etc/group` (no NSS:
//! images may be busybox or Debian, and the agent is a static binary), and creation of missing
//! accounts (`EnsureUsers`).
//!
//! Every path is taken relative to a root directory (`/` inside a machine) so tests can point the
//! whole module at a throwaway tree.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::files;

/// Errors of user and group lookups and account creation.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A database file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The user is not in `/etc/passwd`.
    #[error("no user {name:?} in {path}")]
    NoSuchUser {
        /// The name asked for.
        name: String,
        /// The passwd file searched.
        path: PathBuf,
    },
    /// The group is not in `/etc/group`.
    #[error("no group {name:?} in {path}")]
    NoSuchGroup {
        /// The name asked for.
        name: String,
        /// The group file searched.
        path: PathBuf,
    },
    /// A user name that `useradd` and friends would reject (or that could smuggle in fields).
    #[error("invalid user name {0:?}: use 1-32 characters [a-z0-9_-], starting with a letter or _")]
    InvalidName(String),
    /// The account tool failed.
    #[error("cannot create user {name} with {tool}: {detail}")]
    Create {
        /// The user.
        name: String,
        /// The tool run (`useradd`, `adduser`).
        tool: String,
        /// Exit status and output of the tool.
        detail: String,
    },
}

type Result<T, E = UserError> = std::result::Result<T, E>;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell (may be empty).
    pub shell: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Numeric group id.
    pub gid: u32,
    /// Supplementary members (user names).
    pub members: Vec<String>,
}

/// Everything needed to run a process as a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Primary and supplementary group ids, primary first, without duplicates.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell; `/bin/sh` when passwd names none.
    pub shell: PathBuf,
}

impl Identity {
    /// Root as it is when `/etc/passwd` has no entry for it (minimal images).
    fn fallback_root() -> Self {
        Identity {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
            shell: "/bin/sh".into(),
        }
    }
}

/// Parses `/etc/passwd` content; malformed lines (and NIS `+`/`-` lines) are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: PathBuf::from(f[5]),
                shell: f[6].trim().to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` content; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// Whether `name` is a safe account name: 1–32 of `[a-z0-9_-]`, not starting with `-` or a digit.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The user database of one machine root.
#[derive(Debug, Clone)]
pub struct UserDb {
    root: PathBuf,
}

impl UserDb {
    /// The database under `root` (`/` in a machine).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        UserDb { root: root.into() }
    }

    /// The root directory this database lives under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root` joined with an absolute in-machine path.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn read(&self, abs: &str) -> Result<(PathBuf, String)> {
        let path = self.path(abs);
        match fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            // A missing file is an empty database (scratch images).
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((path, String::new())),
            Err(source) => Err(UserError::Read { path, source }),
        }
    }

    /// All entries of `/etc/passwd`.
    pub fn passwd(&self) -> Result<Vec<PasswdEntry>> {
        Ok(parse_passwd(&self.read("/etc/passwd")?.1))
    }

    /// All entries of `/etc/group`.
    pub fn groups(&self) -> Result<Vec<GroupEntry>> {
        Ok(parse_group(&self.read("/etc/group")?.1))
    }

    /// Resolves a user name (or a numeric uid) to an identity; empty = root.
    pub fn resolve(&self, user: &str) -> Result<Identity> {
        let name = if user.is_empty() { "root" } else { user };
        let (path, text) = self.read("/etc/passwd")?;
        let users = parse_passwd(&text);
        let entry = users
            .iter()
            .find(|u| u.name == name)
            .or_else(|| {
                let uid: u32 = name.parse().ok()?;
                users.iter().find(|u| u.uid == uid)
            })
            .cloned();
        let Some(entry) = entry else {
            if name == "root" || name == "0" {
                return Ok(Identity::fallback_root());
            }
            return Err(UserError::NoSuchUser {
                name: name.to_string(),
                path,
            });
        };
        let mut groups = vec![entry.gid];
        for g in self.groups()? {
            if g.members.contains(&entry.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
        let shell = if entry.shell.is_empty() {
            PathBuf::from("/bin/sh")
        } else {
            PathBuf::from(&entry.shell)
        };
        Ok(Identity {
            name: entry.name,
            uid: entry.uid,
            gid: entry.gid,
            groups,
            home: entry.home,
            shell,
        })
    }

    /// Resolves a group name (or numeric gid) to its gid.
    pub fn resolve_group(&self, group: &str) -> Result<u32> {
        let (path, text) = self.read("/etc/group")?;
        if let Some(g) = parse_group(&text).iter().find(|g| g.name == group) {
            return Ok(g.gid);
        }
        group.parse().map_err(|_| UserError::NoSuchGroup {
            name: group.to_string(),
            path,
        })
    }

    /// Resolves an owner spec — `""` (root), `user` (with the user's primary group) or
    /// `user:group` — to `(uid, gid)`.
    pub fn resolve_owner(&self, owner: &str) -> Result<(u32, u32)> {
        match owner.split_once(':') {
            None => {
                let id = self.resolve(owner)?;
                Ok((id.uid, id.gid))
            }
            Some((user, group)) => {
                let id = self.resolve(user)?;
                let gid = if group.is_empty() {
                    id.gid
                } else {
                    self.resolve_group(group)?
                };
                Ok((id.uid, gid))
            }
        }
    }

    /// Creates every user of `names` missing from `/etc/passwd`, with a home directory; with
    /// `sudo`, gives each of them passwordless sudo when `/etc/sudoers.d` exists. Returns the
    /// names created.
    ///
    /// On the real root (`/`) this prefers `useradd -m`, then busybox `adduser -D`; under any
    /// other root, or when neither tool exists, the files are edited directly.
    pub fn ensure_users(&self, names: &[String], sudo: bool) -> Result<Vec<String>> {
        if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
            return Err(UserError::InvalidName(bad.clone()));
        }
        let mut created = Vec::new();
        for name in names {
            if self.passwd()?.iter().any(|u| &u.name == name) {
                continue;
            }
            self.create_user(name)?;
            if !self.passwd()?.iter().any(|u| &u.name == name) {
                return Err(UserError::Create {
                    name: name.clone(),
                    tool: "account tools".into(),
                    detail: "the user is still missing from /etc/passwd".into(),
                });
            }
            created.push(name.clone());
        }
        if sudo {
            let dir = self.path("/etc/sudoers.d");
            if dir.is_dir() {
                for name in names {
                    let path = dir.join(format!("90-ironlab-{name}"));
                    let content = format!("{name} ALL=(ALL) NOPASSWD:ALL\n");
                    files::write_atomic(&path, content.as_bytes(), 0o440, Some((0, 0)))
                        .map_err(|source| UserError::Write { path, source })?;
                }
            }
        }
        Ok(created)
    }

    fn first_existing(&self, candidates: &[&str]) -> Option<PathBuf> {
        candidates.iter().map(|c| self.path(c)).find(|p| p.exists())
    }

    fn create_user(&self, name: &str) -> Result<()> {
        if self.root == Path::new("/") {
            if let Some(useradd) = self.first_existing(&["/usr/sbin/useradd", "/sbin/useradd"]) {
                let shell = if self.path("/bin/bash").exists() {
                    "/bin/bash"
                } else {
                    "/bin/sh"
                };
                return run_tool(name, &useradd, &["-m", "-s", shell, name]);
            }
            if let Some(adduser) = self.first_existing(&[
                "/usr/sbin/adduser",
                "/sbin/adduser",
                "/bin/adduser",
                "/usr/bin/adduser",
            ]) {
                return run_tool(name, &adduser, &["-D", "-s", "/bin/sh", name]);
            }
        }
        self.create_user_by_hand(name)
    }

    /// Appends the account to passwd/group/shadow and creates the home from `/etc/skel`.
    fn create_user_by_hand(&self, name: &str) -> Result<()> {
        let users = self.passwd()?;
        let groups = self.groups()?;
        let existing_group = groups.iter().find(|g| g.name == name).map(|g| g.gid);
        let id = (1000..60000)
            .find(|n| {
                !users.iter().any(|u| u.uid == *n)
                    && (existing_group.is_some() || !groups.iter().any(|g| g.gid == *n))
            })
            .ok_or_else(|| UserError::Create {
                name: name.into(),
                tool: "/etc/passwd".into(),
                detail: "no free uid in 1000..60000".into(),
            })?;
        let gid = existing_group.unwrap_or(id);
        let shell = if self.path("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        let home = format!("/home/{name}");
        self.append_line(
            "/etc/passwd",
            &format!("{name}:x:{id}:{gid}::{home}:{shell}"),
        )?;
        if existing_group.is_none() {
            self.append_line("/etc/group", &format!("{name}:x:{gid}:"))?;
        }
        if self.path("/etc/shadow").exists() {
            let days = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() / 86_400)
                .unwrap_or(0);
            self.append_line("/etc/shadow", &format!("{name}:*:{days}:0:99999:7:::"))?;
        }
        let home_path = self.path(&home);
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UserError::Write { path, source }
        };
        fs::create_dir_all(&home_path).map_err(write_err(&home_path))?;
        let skel = self.path("/etc/skel");
        if skel.is_dir() {
            copy_tree(&skel, &home_path).map_err(write_err(&home_path))?;
        }
        chown_tree(&home_path, id, gid).map_err(write_err(&home_path))?;
        fs::set_permissions(&home_path, fs::Permissions::from_mode(0o755))
            .map_err(write_err(&home_path))?;
        Ok(())
    }

    /// Appends one line to a database file, keeping its mode and owner (atomic replace).
    fn append_line(&self, abs: &str, line: &str) -> Result<()> {
        let (path, mut text) = self.read(abs)?;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        let (mode, owner) = match fs::metadata(&path) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                (m.mode() & 0o7777, Some((m.uid(), m.gid())))
            }
            Err(_) => (0o644, None),
        };
        files::write_atomic(&path, text.as_bytes(), mode, owner)
            .map_err(|source| UserError::Write { path, source })
    }
}

fn run_tool(name: &str, tool: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(tool)
        .args(args)
        .env("PATH", crate::ROOT_PATH)
        .output()
        .map_err(|e| UserError::Create {
            name: name.into(),
            tool: tool.display().to_string(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(UserError::Create {
        name: name.into(),
        tool: tool.display().to_string(),
        detail: format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(entry.path())?;
            std::os::unix::fs::symlink(link, &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # comment\n\
        broken line\n\
        laborant:x:1000:1000:,,,:/home/laborant:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:laborant\nlaborant:x:1000:\n\
        docker:x:998:alice, laborant\nnogroup:x:65534:\n";

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("etc/sudoers.d")).expect("mkdir");
        fs::create_dir_all(dir.path().join("etc/skel")).expect("mkdir");
        fs::write(dir.path().join("etc/skel/.profile"), "# profile\n").expect("skel");
        fs::write(dir.path().join("etc/passwd"), PASSWD).expect("passwd");
        fs::write(dir.path().join("etc/group"), GROUP).expect("group");
        fs::write(dir.path().join("etc/shadow"), "root:*:19000:0:99999:7:::\n").expect("shadow");
        dir
    }

    #[test]
    fn parses_passwd_skipping_junk() {
        let users = parse_passwd(PASSWD);
        let names: Vec<_> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "laborant", "nobody"]);
        assert_eq!(users[2].uid, 1000);
        assert_eq!(users[2].home, Path::new("/home/laborant"));
    }

    #[test]
    fn resolves_user_with_supplementary_groups() {
        let dir = tree();
        let db = UserDb::new(dir.path());
        let id = db.resolve("laborant").expect("laborant");
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, [1000, 27, 998]);
        assert_eq!(id.shell, Path::new("/bin/bash"));
        let root = db.resolve("").expect("root");
        assert_eq!((root.uid, root.home.as_path()), (0, Path::new("/root")));
        let nobody = db.resolve("65534").expect("by uid");
        assert_eq!(nobody.name, "nobody");
        assert_eq!(nobody.shell, Path::new("/bin/sh"), "empty shell falls back");
        let err = db.resolve("ghost").expect_err("unknown");
        assert!(err.to_string().contains("no user \"ghost\""), "{err}");
    }

    #[test]
    fn root_exists_even_without_passwd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = UserDb::new(dir.path()).resolve("root").expect("root");
        assert_eq!(id.uid, 0);
    }

    #[test]
    fn resolves_owner_specs() {
        let dir = tree();
        let db = UserDb::new(dir.path());
        assert_eq!(db.resolve_owner("").expect("root"), (0, 0));
        assert_eq!(db.resolve_owner("laborant").expect("user"), (1000, 1000));
        assert_eq!(db.resolve_owner("laborant:sudo").expect("u:g"), (1000, 27));
        assert_eq!(
            db.resolve_owner("laborant:42").expect("numeric"),
            (1000, 42)
        );
        assert!(db.resolve_owner("laborant:nope").is_err());
    }

    #[test]
    fn validates_names() {
        for good in ["alice", "_svc", "bob-2", "a"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "Alice",
            "-x",
            "1abc",
            "a:b",
            "a b",
            "a\nroot",
            &"x".repeat(33),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn creates_missing_users_by_hand_under_a_root() {
        let dir = tree();
        let db = UserDb::new(dir.path());
        let created = db
            .ensure_users(&["laborant".into(), "alice".into()], true)
            .expect("ensure");
        assert_eq!(created, ["alice"]);
        let alice = db.resolve("alice").expect("alice exists");
        assert_eq!((alice.uid, alice.gid), (1001, 1001));
        assert_eq!(alice.home, Path::new("/home/alice"));
        assert_eq!(db.resolve_group("alice").expect("group"), 1001);
        let shadow = fs::read_to_string(dir.path().join("etc/shadow")).expect("shadow");
        assert!(
            shadow.lines().any(|l| l.starts_with("alice:*:")),
            "{shadow}"
        );
        let home = dir.path().join("home/alice");
        let meta = fs::metadata(&home).expect("home");
        assert_eq!((meta.uid(), meta.gid()), (1001, 1001));
        let profile = fs::metadata(home.join(".profile")).expect("skel copied");
        assert_eq!(profile.uid(), 1001);
        for name in ["laborant", "alice"] {
            let sudoers = dir.path().join(format!("etc/sudoers.d/90-ironlab-{name}"));
            let text = fs::read_to_string(&sudoers).expect("sudoers");
            assert_eq!(text, format!("{name} ALL=(ALL) NOPASSWD:ALL\n"));
            assert_eq!(fs::metadata(&sudoers).expect("meta").mode() & 0o7777, 0o440);
        }
        // Idempotent.
        assert!(
            db.ensure_users(&["alice".into()], false)
                .expect("again")
                .is_empty()
        );
        assert!(db.ensure_users(&["bad name".into()], false).is_err());
    }
}
