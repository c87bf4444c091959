//! Off-host snapshots on the real platform (crun containers, the XFS pool, a real snapshot
//! store: a local directory and a real S3 server, `s3s-fs` on 127.0.0.1): a stopped run's
//! drives are uploaded in the background; a drive wiped from the pool, or the whole run
//! directory, comes back from the store on restart with the user's files; destroying the run
//! collects its manifests and chunks; a worker killed during the upload finishes it after its
//! restart without leaving chunks no manifest references.

mod common;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Needs, Platform, Registry, http, preflight, serial, wait_for};
use serde_json::Value;

const BUCKET: &str = "snapshots";
const ACCESS_KEY: &str = "ironlabtest";
const SECRET_KEY: &str = "ironlabtestsecret";

fn busybox_manifest(name: &str, image: &str) -> String {
    format!(
        r#"kind: playground
name: {name}
title: Off-host snapshot test
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
"#
    )
}

/// A running `s3s-fs` on a free 127.0.0.1 port (killed on drop).
struct S3Server {
    child: Child,
    root: common::TempDir,
    endpoint: String,
}

impl S3Server {
    /// Starts `s3s-fs`, or `None` (a clear skip message) when it is not installed and
    /// `IRONLAB_E2E_REQUIRED` is unset.
    fn start(test: &str) -> Option<S3Server> {
        let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
        let bin = std::env::var_os("IRONLAB_S3S_FS")
            .map(PathBuf::from)
            .or_else(|| common::which("s3s-fs"))
            .or_else(|| Some(home.join(".cargo/bin/s3s-fs")).filter(|p| p.is_file()));
        let Some(bin) = bin else {
            assert!(
                !common::required(),
                "{test}: s3s-fs is not installed (scripts/setup.sh installs it) and IRONLAB_E2E_REQUIRED=1"
            );
            eprintln!("SKIP {test}: s3s-fs is not installed (scripts/setup.sh installs it)");
            return None;
        };
        let root = common::TempDir::new("s3");
        std::fs::create_dir_all(root.path().join(BUCKET)).expect("bucket dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let up = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        if up.is_none() {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("s3s-fs did not listen on 127.0.0.1:{port}: {err}");
        }
        Some(S3Server {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }

    fn worker_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "IRONLAB_SNAPSHOT_STORE".into(),
                format!("s3://{BUCKET}/ironlab"),
            ),
            ("IRONLAB_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// The directory where the server keeps the store's objects.
    fn objects(&self) -> PathBuf {
        self.root.path().join(BUCKET).join("ironlab")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which store a test runs against.
enum Backend {
    Local,
    S3(S3Server),
}

impl Backend {
    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "IRONLAB_SNAPSHOT_GC_GRACE_SECS".to_string(),
            "0".to_string(),
        )];
        if let Backend::S3(s) = self {
            env.extend(s.worker_env());
        }
        env
    }

    /// The directory holding the store's objects (`manifests/`, `chunks/`).
    fn objects(&self, p: &Platform) -> PathBuf {
        match self {
            Backend::Local => p.data.join("worker/objects/snapshots"),
            Backend::S3(s) => s.objects(),
        }
    }
}

/// Files under `dir` (relative paths), recursively; hidden temporaries excluded.
fn files(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The store's manifests and chunks (object names).
fn store_objects(objects: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let manifests = files(&objects.join("manifests"))
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| f.trim_end_matches(".json").to_string())
        .collect();
    let chunks = files(&objects.join("chunks"))
        .into_iter()
        .filter_map(|f| f.rsplit('/').next().map(str::to_string))
        .filter(|f| !f.starts_with('.') && !f.contains(".tmp"))
        .collect();
    (manifests, chunks)
}

/// The chunk hashes a manifest references.
fn manifest_chunks(objects: &Path, id: &str) -> BTreeSet<String> {
    let bytes = std::fs::read(objects.join("manifests").join(format!("{id}.json")))
        .unwrap_or_else(|e| panic!("manifest {id} in {}: {e}", objects.display()));
    let v: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    v["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c[1].as_str().expect("hash").to_string())
        .collect()
}

/// The worker's view of a run (`GET /v1/runs/{run}`), with the snapshot status.
fn worker_run(p: &Platform, id: &str) -> common::Response {
    let token = std::fs::read_to_string(p.data.join("worker-token")).expect("worker token");
    http(
        "GET",
        &format!("{}/v1/runs/{id}", p.worker_url()),
        Some(token.trim()),
        None,
    )
}

/// Waits until the worker reports the stopped run's drives uploaded; returns its manifests.
fn wait_uploaded(p: &Platform, id: &str) -> Value {
    let mut last = Value::Null;
    let got = wait_for(Duration::from_secs(120), Duration::from_millis(200), || {
        let r = worker_run(p, id);
        if r.status != 200 {
            return None;
        }
        last = r.json();
        (last["state"] == "stopped" && last["snapshot"]["state"] == "uploaded")
            .then(|| last["snapshot"]["manifests"].clone())
    });
    got.unwrap_or_else(|| {
        panic!(
            "run {id}: the snapshot was not uploaded within 120 s; last seen {last}\n{}",
            p.logs()
        )
    })
}

fn start(test: &str, backend: &Backend) -> Option<(Platform, Registry, String)> {
    let env = preflight(
        test,
        Needs {
            test_image: true,
            ..Needs::default()
        },
    )?;
    let layout = env.test_image.clone().expect("preflight checked the image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    // Again with this test's store (the first start used the default one, still empty).
    p.stop_worker();
    p.worker_env = backend.env();
    p.start_worker();
    Some((p, registry, image))
}

fn stop(p: &Platform, id: &str) {
    p.cli_ok(&["playground", "stop", id]);
    p.wait_state(id, &["stopped"], Duration::from_secs(60));
}

fn restart(p: &Platform, id: &str) {
    p.cli_ok(&["playground", "restart", id]);
    assert_eq!(p.run_view(id)["state"], "running", "{}", p.logs());
}

fn wiped_pool_restores_from_the_store(test: &str, backend: Backend) {
    let _serial = serial();
    let Some((mut p, _registry, image)) = start(test, &backend) else {
        return;
    };
    let objects = backend.objects(&p);
    assert!(
        p.create_playground(&busybox_manifest("offhost", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    let id = p.start_run("offhost")["id"]
        .as_str()
        .expect("run id")
        .to_string();
    let r = worker_run(&p, &id);
    assert!(
        r.json()["snapshot"].is_null(),
        "a running run has no snapshot status: {}",
        r.body
    );
    p.ssh_ok(
        &id,
        &["sh", "-c", "echo 'my work' > /home/laborant/work.txt"],
    );

    // Stop: stopped at once, the upload follows.
    stop(&p, &id);
    let manifests = wait_uploaded(&p, &id);
    let m1 = manifests["box"]
        .as_str()
        .expect("manifest of box")
        .to_string();
    // The control plane learns it (it looks every 2 s while an upload runs) and the CLI says so.
    let seen = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        (p.run_view(&id)["snapshot"] == "uploaded").then_some(())
    });
    assert!(
        seen.is_some(),
        "the API shows the snapshot uploaded: {}\n{}",
        p.run_view(&id),
        p.logs()
    );
    let list = p.cli_ok(&["playground", "list"]);
    assert!(list.contains("stopped · saved off host"), "{list}");
    let (in_store, chunks) = store_objects(&objects);
    assert!(
        in_store.contains(&m1),
        "manifest {m1} is in the store: {in_store:?}"
    );
    let referenced = manifest_chunks(&objects, &m1);
    assert!(!referenced.is_empty());
    assert!(
        referenced.is_subset(&chunks),
        "every chunk the manifest names is stored"
    );

    // A clone of a run whose snapshot is current shares it: nothing to upload.
    let clone = p.cli_ok(&["playground", "clone", &id]).trim().to_string();
    p.track(&clone);
    let c = worker_run(&p, &clone).json();
    assert_eq!(
        c["snapshot"]["state"], "uploaded",
        "a fresh clone shares its origin's snapshot: {c}"
    );
    assert_eq!(c["snapshot"]["manifests"]["box"], m1.as_str());
    p.destroy(&clone);

    // The drive is wiped from the pool: restart brings it back from the store.
    let drive = p.run_dir(&id).join("box/root.ext4");
    std::fs::remove_file(&drive).expect("wipe the drive");
    restart(&p, &id);
    assert_eq!(
        p.ssh_ok(&id, &["cat", "/home/laborant/work.txt"]),
        "my work\n"
    );
    assert!(
        worker_run(&p, &id).json()["snapshot"].is_null(),
        "a restarted run's snapshot no longer matches its drives"
    );
    // Chunks the run never changed came from the image drive it grew from, not the store.
    let logs = p.logs();
    let reused: Option<u64> = logs
        .lines()
        .rev()
        .filter(|l| l.contains("drive restored from the snapshot store"))
        .filter_map(|l| l.split("chunks_reused=").nth(1))
        .find_map(|r| r.split_whitespace().next()?.parse().ok());
    assert!(
        reused.is_some_and(|n| n > 0),
        "the restore reused chunks of the image drive: {reused:?}\n{logs}"
    );
    p.ssh_ok(
        &id,
        &["sh", "-c", "echo 'more work' >> /home/laborant/work.txt"],
    );
    stop(&p, &id);
    let m2 = wait_uploaded(&p, &id)["box"]
        .as_str()
        .expect("manifest")
        .to_string();
    assert_ne!(m1, m2, "a changed drive has a new manifest");

    // The whole run directory is gone (the pool lost it) while the worker was down: the
    // worker brings the run back as stopped from its snapshot index, restart restores it.
    p.stop_worker();
    std::fs::remove_dir_all(p.run_dir(&id)).expect("wipe the run directory");
    p.start_worker();
    let v = worker_run(&p, &id);
    assert_eq!(v.status, 200, "the worker knows the run again: {}", v.body);
    assert_eq!(v.json()["state"], "stopped");
    assert_eq!(v.json()["snapshot"]["manifests"]["box"], m2.as_str());
    restart(&p, &id);
    assert_eq!(
        p.ssh_ok(&id, &["cat", "/home/laborant/work.txt"]),
        "my work\nmore work\n"
    );
    assert_eq!(p.ssh_ok(&id, &["id", "-un"]), "laborant\n");

    // Destroy: the run's manifests and their chunks are collected.
    p.destroy(&id);
    p.assert_clean(&id);
    let mut left = (BTreeSet::new(), BTreeSet::new());
    let empty = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        left = store_objects(&objects);
        (left.0.is_empty() && left.1.is_empty()).then_some(())
    });
    assert!(
        empty.is_some(),
        "the destroyed run's manifests and chunks are collected; left: {} manifests, {} chunks\n{}",
        left.0.len(),
        left.1.len(),
        p.logs()
    );
    assert!(
        !p.data.join(format!("worker/snapshots/{id}.json")).exists(),
        "the index forgets the destroyed run"
    );
}

#[test]
fn local_store_restores_a_wiped_pool() {
    wiped_pool_restores_from_the_store("local_store_restores_a_wiped_pool", Backend::Local);
}

#[test]
fn s3_store_restores_a_wiped_pool() {
    let test = "s3_store_restores_a_wiped_pool";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    wiped_pool_restores_from_the_store(test, Backend::S3(s3));
}

/// The worker SIGKILLs itself during the upload (after the drive's chunks and manifest are
/// stored, before the index names it; and after the index, before the run directory does):
/// after its restart the upload completes, the store holds exactly the run's manifest and its
/// chunks, and the restored drive has the user's file.
#[test]
fn a_worker_killed_during_the_upload_finishes_it_after_restart() {
    let test = "a_worker_killed_during_the_upload_finishes_it_after_restart";
    let _serial = serial();
    let backend = Backend::Local;
    let Some((mut p, _registry, image)) = start(test, &backend) else {
        return;
    };
    let objects = backend.objects(&p);
    assert!(
        p.create_playground(&busybox_manifest("offhost-crash", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    let id = p.start_run("offhost-crash")["id"]
        .as_str()
        .expect("run id")
        .to_string();
    for (i, point) in ["upload:machine", "upload:indexed"].into_iter().enumerate() {
        p.ssh_ok(
            &id,
            &["sh", "-c", &format!("echo {i} > /home/laborant/n.txt")],
        );
        p.stop_worker();
        let mut env = backend.env();
        env.push(("IRONLAB_TEST_CRASH_AT".into(), point.into()));
        p.worker_env = env;
        p.start_worker();
        let (url, token) = (p.api(&format!("/runs/{id}/stop")), p.token());
        let r = http("POST", &url, Some(&token), None);
        assert_eq!(r.status, 202, "{}", r.body);
        let died = p.wait_worker_exit(Duration::from_secs(120));
        assert!(
            died.is_some(),
            "the worker did not reach crash point {point}\n{}",
            p.logs()
        );
        p.worker_env = backend.env();
        p.start_worker();
        p.wait_state(&id, &["stopped"], Duration::from_secs(60));
        let m = wait_uploaded(&p, &id)["box"]
            .as_str()
            .expect("manifest")
            .to_string();
        let (manifests, chunks) = store_objects(&objects);
        assert!(manifests.contains(&m), "{point}: {manifests:?}");
        // What the killed upload stored is what the finished one references: the store holds
        // no chunk of nothing (manifests of earlier rounds may remain until the next GC).
        let mut referenced = BTreeSet::new();
        for id in &manifests {
            referenced.extend(manifest_chunks(&objects, id));
        }
        assert_eq!(
            chunks, referenced,
            "{point}: every stored chunk is referenced by a manifest"
        );
        std::fs::remove_file(p.run_dir(&id).join("box/root.ext4")).expect("wipe the drive");
        restart(&p, &id);
        assert_eq!(
            p.ssh_ok(&id, &["cat", "/home/laborant/n.txt"]),
            format!("{i}\n"),
            "{point}"
        );
    }
    p.destroy(&id);
    p.assert_clean(&id);
}

/// A snapshot store the worker cannot use is refused at start, naming the flag and the reason,
/// before the worker sets anything up.
#[test]
fn a_bad_snapshot_store_is_refused_at_start() {
    let dir = common::TempDir::new("badstore");
    let token = dir.path().join("token");
    std::fs::write(&token, "t").expect("token");
    for (location, reason) in [
        ("relative/dir", "expected an absolute path"),
        ("s3://", "the bucket name is missing"),
    ] {
        let data = dir.path().join("data");
        let out = Command::new(common::bin())
            .args(["worker", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .arg("--token-file")
            .arg(&token)
            .args(["--snapshot-store", location])
            .env_remove("IRONLAB_SNAPSHOT_STORE")
            .output()
            .expect("run the worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{location}: the worker refuses to start"
        );
        assert!(
            stderr.contains("--snapshot-store") && stderr.contains(reason),
            "{location}: the error names the flag and the reason: {stderr}"
        );
        assert!(
            !data.join("pool").exists(),
            "{location}: nothing was set up"
        );
    }
}
