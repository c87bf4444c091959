//! Real tests, as root: a loop-backed XFS pool, the test image built by
//! `images/testimg/build.sh`, Debian's `docker-registry` on 127.0.0.1, `skopeo` pushes (via
//! `images/push.sh`), and `debugfs` to look inside the built drives.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ironlab_api::worker::ImageRef;

use super::*;
use crate::pool::{Pool, loops_for};

macro_rules! skip_if_not_root {
    () => {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (loop devices, mkfs, ownership)");
            return;
        }
    };
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A pool in a temp dir of the (ext4) root filesystem; unmounted and removed on drop.
struct PoolFixture {
    pool: Pool,
    dir: tempfile::TempDir,
}

impl PoolFixture {
    fn new() -> PoolFixture {
        let dir = tempfile::Builder::new()
            .prefix("ironlab-images-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let pool = Pool::open(&dir.path().join("worker"), 0).expect("open pool");
        PoolFixture { pool, dir }
    }
}

impl Drop for PoolFixture {
    fn drop(&mut self) {
        if let Err(e) = self.pool.unmount() {
            eprintln!("cleanup: unmount pool: {e}");
        }
        if let Ok(loops) = loops_for(&self.dir.path().join("worker/pool.xfs")) {
            assert!(loops.is_empty(), "loop devices left: {loops:?}");
        }
    }
}

/// Debian's docker-registry on 127.0.0.1:<free port> with a temp storage dir; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    storage: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let storage = tempfile::tempdir().expect("registry dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.path().join("data").display()
            ),
        )
        .expect("registry config");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            port,
            storage,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    fn push(&self, layout: &Path, repo_tag: &str) -> String {
        let reference = self.reference(repo_tag);
        let out = Command::new(repo_root().join("images/push.sh"))
            .arg(layout)
            .arg(&reference)
            .output()
            .expect("run push.sh");
        assert!(
            out.status.success(),
            "push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    }

    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the two-layer busybox test layout with the recipe.
fn build_test_layout(out: &Path) {
    let status = Command::new(repo_root().join("images/testimg/build.sh"))
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("run images/testimg/build.sh");
    assert!(status.success(), "images/testimg/build.sh failed");
}

/// The manifest digest and descriptor of a layout's (single) index entry.
fn layout_manifest(layout: &Path) -> (String, oci::Manifest) {
    let index: oci::Index =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("parse index");
    let digest = index.manifests[0].digest.clone();
    let raw = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .expect("manifest blob");
    let oci::AnyManifest::Image(m) = oci::AnyManifest::parse(&raw).expect("manifest") else {
        panic!("layout entry is not a manifest")
    };
    (digest, m)
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("run debugfs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Collects progress lines.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);
impl Lines {
    fn sink(&self) -> impl Fn(String) + Send + Sync + '_ {
        move |line| {
            eprintln!("progress: {line}");
            self.0.lock().expect("lines").push(line);
        }
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("lines"))
    }
}

/// What the test image must look like once unpacked and built.
fn assert_test_image_drive(img: &Path) {
    let root = debugfs(img, "stat /");
    assert!(
        root.contains("Mode:  0755") && root.contains("User:     0"),
        "root dir: {root}"
    );
    let etc = debugfs(img, "ls -l /etc");
    assert!(etc.contains("passwd"), "/etc: {etc}");
    assert!(etc.contains("layer2"), "layer 2 applied: {etc}");
    assert!(
        !etc.contains("remove-me"),
        "whiteout removed /etc/remove-me: {etc}"
    );
    assert!(!etc.contains(".wh."), "no whiteout markers: {etc}");
    let removed = debugfs(img, "stat /etc/remove-me");
    assert!(removed.contains("File not found"), "{removed}");
    let busybox = debugfs(img, "stat /bin/busybox");
    assert!(busybox.contains("Type: regular"), "{busybox}");
    assert!(busybox.contains("Mode:  0755"), "{busybox}");
    let sh = debugfs(img, "stat /bin/sh");
    assert!(
        sh.contains("Type: symlink") && sh.contains("busybox"),
        "{sh}"
    );
    let opq = debugfs(img, "ls /opt/opaque");
    assert!(opq.contains("new"), "{opq}");
    assert!(
        !opq.contains("old-1") && !opq.contains("old-2"),
        "opaque dir: {opq}"
    );
    let home = debugfs(img, "stat /home/laborant");
    assert!(
        home.contains("User:  1000") && home.contains("Group:  1000"),
        "{home}"
    );
    let tmp = debugfs(img, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "{tmp}");
    let a = debugfs(img, "stat /etc/hardlink-a");
    assert!(a.contains("Links: 2"), "hard link kept: {a}");
    let label = Command::new("e2label").arg(img).output().expect("e2label");
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "root");
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(img)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(loopdev)]
async fn pulls_from_registry_builds_once_and_serves_from_cache() {
    skip_if_not_root!();
    let fx = PoolFixture::new();
    let layout = fx.dir.path().join("testimg");
    build_test_layout(&layout);
    let (layout_digest, layout_manifest) = layout_manifest(&layout);
    let registry = Registry::start();
    let reference = registry.push(&layout, "test/busybox:1");
    let store = ImageStore::new(
        &fx.pool,
        ImageConfig {
            stock_dir: fx.dir.path().join("no-stock"),
            ..Default::default()
        },
    );
    let image = ImageRef::Oci {
        reference: reference.clone(),
    };

    // Two concurrent calls build it once.
    let lines = Lines::default();
    let sink = lines.sink();
    let t = Instant::now();
    let (a, b) = tokio::join!(
        store.ensure_drive(&image, &sink),
        store.ensure_drive(&image, &sink)
    );
    eprintln!("pull + build: {:?}", t.elapsed());
    let drive = a.expect("ensure_drive");
    assert_eq!(b.expect("concurrent ensure_drive"), drive);
    let progress = lines.take();
    assert_eq!(
        progress
            .iter()
            .filter(|l| l.starts_with("pulling "))
            .count(),
        1,
        "{progress:?}"
    );
    assert!(
        progress.contains(&format!("pulling {reference}")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|l| l.starts_with("layer 1/2 (")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|l| l.starts_with("building drive")),
        "{progress:?}"
    );

    // skopeo pushes the layout's manifest unchanged: same digest.
    assert_eq!(drive.digest, layout_digest);
    let hex = drive.digest.trim_start_matches("sha256:");
    assert_eq!(drive.path, fx.pool.images_dir().join(format!("{hex}.ext4")));
    assert_eq!(
        drive.size,
        std::fs::metadata(&drive.path).expect("drive").len()
    );
    assert_eq!(drive.size % (1 << 20), 0);
    assert_test_image_drive(&drive.path);
    for layer in &layout_manifest.layers {
        let blob = store
            .blobs_dir()
            .join(layer.digest.trim_start_matches("sha256:"));
        assert!(blob.is_file(), "layer blob cached at {}", blob.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(fx.pool.tmp_dir()).expect("tmp").collect();
    assert!(leftovers.is_empty(), "build dir removed: {leftovers:?}");

    let cfg = store.image_config(&drive.digest).expect("image config");
    assert_eq!(cfg.cmd, vec!["/bin/sh".to_string()]);
    assert!(cfg.env.iter().any(|e| e.starts_with("PATH=")), "{cfg:?}");
    assert!(cfg.env.contains(&"HOME=/root".to_string()), "{cfg:?}");
    assert_eq!(cfg.working_dir, "/");
    assert_eq!(cfg.source, format!("oci://{reference}"));

    // Same digest under another tag: nothing pulled, same drive.
    let other = registry.push(&layout, "test/other:latest");
    let again = store
        .ensure_drive(&ImageRef::Oci { reference: other }, &lines.sink())
        .await
        .expect("second tag");
    assert_eq!(again, drive);
    assert!(
        lines.take().is_empty(),
        "nothing pulled for a cached digest"
    );

    // By digest, and with the registry down: served from the cache.
    drop(registry);
    let repo = reference.rsplit_once(':').map(|(r, _)| r).expect("tag");
    let pinned = ImageRef::Oci {
        reference: format!("{repo}@{}", drive.digest),
    };
    assert_eq!(
        store
            .ensure_drive(&pinned, &lines.sink())
            .await
            .expect("by digest, offline"),
        drive
    );
    let offline = store
        .ensure_drive(&image, &lines.sink())
        .await
        .expect("tag, registry down");
    assert_eq!(offline, drive);
    let progress = lines.take();
    assert!(
        progress.iter().all(|l| !l.starts_with("pulling")),
        "{progress:?}"
    );

    // A tag never seen, with the registry down: a clear registry error.
    let err = store
        .ensure_drive(
            &ImageRef::Oci {
                reference: format!("{repo}-never:1"),
            },
            &lines.sink(),
        )
        .await
        .expect_err("unreachable");
    assert!(matches!(err, ImageError::Registry { .. }), "{err}");
    assert!(err.to_string().contains("-never:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(loopdev)]
async fn tampered_registry_blob_is_a_digest_error() {
    skip_if_not_root!();
    let fx = PoolFixture::new();
    let layout = fx.dir.path().join("testimg");
    build_test_layout(&layout);
    let (_, manifest) = layout_manifest(&layout);
    let registry = Registry::start();
    let reference = registry.push(&layout, "test/busybox:tampered");

    // Flip bytes in the middle of the big layer, keeping its size.
    let data = registry.blob_data(&manifest.layers[0].digest);
    let mut bytes = std::fs::read(&data).expect("registry blob");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&data, &bytes).expect("tamper");

    let store = ImageStore::new(&fx.pool, ImageConfig::default());
    let err = store
        .ensure_drive(
            &ImageRef::Oci {
                reference: reference.clone(),
            },
            &|_| {},
        )
        .await
        .expect_err("tampered layer must fail");
    let ImageError::Digest {
        object, expected, ..
    } = &err
    else {
        panic!("expected a digest error, got: {err}")
    };
    assert_eq!(expected, &manifest.layers[0].digest);
    assert!(
        object.contains("layer 1/2") && object.contains(&reference),
        "{err}"
    );
    let blobs: Vec<_> = std::fs::read_dir(store.blobs_dir())
        .expect("blobs dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(blobs.is_empty(), "a bad blob is never cached: {blobs:?}");
    let drives: Vec<_> = std::fs::read_dir(fx.pool.images_dir())
        .expect("images dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
        .collect();
    assert!(drives.is_empty(), "no drive built: {drives:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(loopdev)]
async fn imports_stock_layouts_and_explains_missing_ones() {
    skip_if_not_root!();
    let fx = PoolFixture::new();
    let stock = fx.dir.path().join("stock");
    build_test_layout(&stock.join("testimg"));
    let (digest, manifest) = layout_manifest(&stock.join("testimg"));
    let store = ImageStore::new(
        &fx.pool,
        ImageConfig {
            stock_dir: stock.clone(),
            ..Default::default()
        },
    );

    let lines = Lines::default();
    let image = ImageRef::Stock {
        name: "testimg".into(),
    };
    let drive = store
        .ensure_drive(&image, &lines.sink())
        .await
        .expect("stock import");
    assert_eq!(drive.digest, digest);
    assert_test_image_drive(&drive.path);
    assert!(!lines.take().is_empty());
    assert_eq!(
        store
            .ensure_drive(&image, &lines.sink())
            .await
            .expect("cached"),
        drive
    );
    assert!(lines.take().is_empty(), "second import does nothing");
    assert_eq!(
        store.image_config(&digest).expect("config").source,
        "stock:testimg"
    );

    let err = store
        .ensure_drive(
            &ImageRef::Stock {
                name: "debian".into(),
            },
            &lines.sink(),
        )
        .await
        .expect_err("missing stock image");
    assert_eq!(
        err.to_string(),
        format!(
            "stock image \"debian\" not found in {}; build it with images/debian/build.sh",
            stock.display()
        )
    );
    let err = store
        .ensure_drive(
            &ImageRef::Stock {
                name: "../stock".into(),
            },
            &lines.sink(),
        )
        .await
        .expect_err("bad name");
    assert!(matches!(err, ImageError::InvalidStockName(_)), "{err}");

    // A corrupted layer in a (new) layout is refused before anything is unpacked.
    let bad = stock.join("bad");
    build_test_layout(&bad);
    let layer = bad
        .join("blobs/sha256")
        .join(manifest.layers[1].digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&layer).expect("layer");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&layer, &bytes).expect("tamper");
    // Same manifest digest as the good import: served from the cache without reading blobs.
    let cached = store
        .ensure_drive(&ImageRef::Stock { name: "bad".into() }, &lines.sink())
        .await;
    assert_eq!(cached.expect("cached by digest"), drive);
    std::fs::remove_file(&drive.path).expect("drop the cached drive");
    let err = store
        .ensure_drive(&ImageRef::Stock { name: "bad".into() }, &lines.sink())
        .await
        .expect_err("tampered layout");
    assert!(
        matches!(&err, ImageError::Digest { object, .. } if object.contains("layer 2/2")),
        "{err}"
    );
}

/// The real stock debian image, when `images/debian/build.sh` has built it
/// (`IRONLAB_STOCK_IMAGES`, as scripts/test.sh sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(loopdev)]
async fn stock_debian_image_builds_a_debian_12_drive() {
    skip_if_not_root!();
    let Some(stock) = std::env::var_os("IRONLAB_STOCK_IMAGES").map(PathBuf::from) else {
        eprintln!("skipped: IRONLAB_STOCK_IMAGES is not set");
        return;
    };
    if !stock.join("debian/index.json").is_file() {
        eprintln!("skipped: no debian layout in {}", stock.display());
        return;
    }
    let fx = PoolFixture::new();
    let store = ImageStore::new(
        &fx.pool,
        ImageConfig {
            stock_dir: stock,
            ..Default::default()
        },
    );
    let t = Instant::now();
    let drive = store
        .ensure_drive(
            &ImageRef::Stock {
                name: "debian".into(),
            },
            &|l| eprintln!("progress: {l}"),
        )
        .await
        .expect("debian drive");
    eprintln!(
        "debian drive built in {:?}: {} MiB",
        t.elapsed(),
        drive.size >> 20
    );
    let os = debugfs(&drive.path, "cat /usr/lib/os-release");
    assert!(os.contains("VERSION_ID=\"12\""), "{os}");
    let sudoers = debugfs(&drive.path, "cat /etc/sudoers.d/laborant");
    assert!(
        sudoers.contains("laborant ALL=(ALL) NOPASSWD:ALL"),
        "{sudoers}"
    );
    let passwd = debugfs(&drive.path, "cat /etc/passwd");
    assert!(
        passwd.contains("laborant:x:1000:1000::/home/laborant:/bin/bash"),
        "{passwd}"
    );
    let sudo = debugfs(&drive.path, "stat /usr/bin/sudo");
    assert!(sudo.contains("Mode:  04755"), "setuid sudo: {sudo}");
    let lists = debugfs(&drive.path, "ls /var/lib/apt/lists");
    assert!(!lists.contains("_Packages"), "no apt lists: {lists}");
    let cfg = store.image_config(&drive.digest).expect("config");
    assert_eq!(cfg.cmd, vec!["/bin/bash".to_string()]);
    assert_eq!(
        cfg.labels
            .get("org.ironlab.default-user")
            .map(String::as_str),
        Some("laborant")
    );
}

/// Writes `bytes` as a blob of `layout`; returns its descriptor JSON fields (digest, size).
fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = oci::sha256_digest(bytes);
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        bytes,
    )
    .expect("write blob");
    (digest, bytes.len())
}

/// Turns the test layout into a multi-platform one: `index.json` → an image index listing an
/// arm64 variant (same layers, arm64 config) and the real amd64 manifest.
fn make_multi_platform(layout: &Path) -> (String, String) {
    let (amd64_digest, manifest) = layout_manifest(layout);
    let amd64_size = std::fs::metadata(
        layout
            .join("blobs/sha256")
            .join(amd64_digest.trim_start_matches("sha256:")),
    )
    .expect("manifest")
    .len();
    let config_path = layout
        .join("blobs/sha256")
        .join(manifest.config.digest.trim_start_matches("sha256:"));
    let config = std::fs::read_to_string(config_path).expect("config");
    let arm_config = config.replace("\"architecture\":\"amd64\"", "\"architecture\":\"arm64\"");
    assert_ne!(arm_config, config);
    let (cfg_digest, cfg_size) = put_blob(layout, arm_config.as_bytes());
    let layers = serde_json::to_string(&manifest.layers).expect("layers");
    let arm_manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg_digest}","size":{cfg_size}}},"layers":{layers}}}"#,
        oci::MT_OCI_MANIFEST
    );
    let (arm_digest, arm_size) = put_blob(layout, arm_manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{mt_index}","manifests":[
            {{"mediaType":"{mt}","digest":"{arm_digest}","size":{arm_size},"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{mt}","digest":"{amd64_digest}","size":{amd64_size},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        mt_index = oci::MT_OCI_INDEX,
        mt = oci::MT_OCI_MANIFEST
    );
    let (index_digest, index_size) = put_blob(layout, index.as_bytes());
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{index_digest}","size":{index_size},"annotations":{{"{}":"latest"}}}}]}}"#,
            oci::MT_OCI_INDEX,
            oci::REF_NAME_ANNOTATION
        ),
    )
    .expect("index.json");
    (index_digest, amd64_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(loopdev)]
async fn multi_platform_images_resolve_to_linux_amd64() {
    skip_if_not_root!();
    let fx = PoolFixture::new();
    let stock = fx.dir.path().join("stock");
    let layout = stock.join("multi");
    build_test_layout(&layout);
    let (index_digest, amd64_digest) = make_multi_platform(&layout);
    let registry = Registry::start();
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}", registry.reference("test/multi:1")))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo copy --all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = ImageStore::new(
        &fx.pool,
        ImageConfig {
            stock_dir: stock,
            ..Default::default()
        },
    );
    let image = ImageRef::Oci {
        reference: registry.reference("test/multi:1"),
    };
    let drive = store
        .ensure_drive(&image, &|_| {})
        .await
        .expect("pull index");
    assert_eq!(drive.digest, amd64_digest, "the linux/amd64 manifest");
    assert_test_image_drive(&drive.path);
    let alias = fx.pool.images_dir().join(format!(
        "{}.index",
        index_digest.trim_start_matches("sha256:")
    ));
    assert_eq!(std::fs::read_to_string(alias).expect("alias"), amd64_digest);
    let lines = Lines::default();
    assert_eq!(
        store
            .ensure_drive(&image, &lines.sink())
            .await
            .expect("cached"),
        drive
    );
    assert!(lines.take().is_empty());

    // The layout importer follows the nested index the same way.
    let stock_drive = store
        .ensure_drive(
            &ImageRef::Stock {
                name: "multi".into(),
            },
            &|_| {},
        )
        .await
        .expect("stock multi");
    assert_eq!(stock_drive, drive);
}
