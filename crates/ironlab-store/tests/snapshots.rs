//! Drive snapshots against real stores: a local directory and a real S3 server (`s3s-fs` on
//! 127.0.0.1). Every scenario runs on both (`local_*` and `s3_*` tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use common::{
    Backend, Counting, allocated, ext4_write, file_hash, keys, make_ext4, random_bytes, text_bytes,
};
use ironlab_store::locks::{Lock, LockKind};
use ironlab_store::{
    ChunkHash, GcOptions, ObjectStore, Progress, RestoreOptions, SnapshotError, UploadOptions, gc,
    open_store, restore_drive, upload_drive,
};

const MIB: u64 = 1 << 20;

/// Declares `local_NAME` and `s3_NAME` tests running `NAME(backend)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Backend::local()?).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let Some(backend) = super::Backend::s3()? else { return Ok(()) };
                    super::$name(backend).await
                }
            )*
        }
    };
}

both_backends!(
    sparse_ext4_round_trip_and_incremental_upload,
    shared_chunks_are_stored_once,
    corrupt_chunk_fails_the_restore,
    gc_removes_garbage_and_keeps_live_and_in_flight,
    killed_upload_leaves_no_manifest,
    dropped_upload_leaves_no_manifest,
    upload_waits_for_a_running_gc,
    restore_from_the_image_drive_fetches_only_what_the_run_changed,
);

/// A 256 MiB sparse ext4 drive with 20 MiB of random data and 6 MiB of text.
fn base_drive(dir: &Path) -> Result<std::path::PathBuf> {
    let img = dir.join("base.ext4");
    make_ext4(&img, 256)?;
    ext4_write(&img, "random.bin", &random_bytes(20 * MIB as usize))?;
    ext4_write(&img, "text.txt", &text_bytes(6 * MIB as usize))?;
    Ok(img)
}

async fn sparse_ext4_round_trip_and_incremental_upload(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let img = base_drive(work.path())?;
    let counting = Counting::new(backend.store()?);
    let store: Arc<dyn ObjectStore> = counting.clone();

    let progress = Arc::new(std::sync::Mutex::new(Vec::<Progress>::new()));
    let seen = Arc::clone(&progress);
    let opts = UploadOptions {
        progress: Some(Arc::new(move |p| seen.lock().unwrap().push(p))),
        ..Default::default()
    };
    let first = upload_drive(&store, &img, &opts).await?;
    let m1 = &first.manifest;
    assert_eq!(m1.size, 256 * MIB);
    // Holes and zero chunks are not stored: the data is ~26 MiB plus ext4 metadata.
    assert!(
        m1.data_bytes() < 40 * MIB,
        "data {} of a 256 MiB sparse drive",
        m1.data_bytes()
    );
    assert!(m1.data_bytes() >= 26 * MIB);
    assert_eq!(first.chunks_uploaded, first.chunks);
    let p = progress.lock().unwrap().clone();
    assert_eq!(
        p.last().map(|p| (p.done, p.total)),
        Some((first.bytes_read, first.bytes_read))
    );
    assert!(p.windows(2).all(|w| w[0].done <= w[1].done));
    // The text compresses: fewer bytes stored than read.
    assert!(
        first.bytes_uploaded < first.bytes_read - 4 * MIB,
        "{first:?}"
    );

    let restored = work.path().join("restored.ext4");
    let r = restore_drive(&store, &m1.id, &restored, &RestoreOptions::default()).await?;
    assert_eq!(
        file_hash(&restored)?,
        file_hash(&img)?,
        "restore is not byte-identical"
    );
    assert_eq!(std::fs::metadata(&restored)?.len(), 256 * MIB);
    assert!(
        allocated(&restored)? <= m1.data_bytes() + MIB,
        "restored drive is not sparse: {} allocated for {} of data",
        allocated(&restored)?,
        m1.data_bytes()
    );
    assert_eq!(r.chunks_fetched + r.chunks_reused, m1.chunks.len());

    // The same drive again: nothing uploaded, same id.
    let again = upload_drive(&store, &img, &UploadOptions::default()).await?;
    assert_eq!(again.manifest.id, m1.id);
    assert_eq!(again.chunks_uploaded, 0);

    // Change 10 MiB (a new file: data blocks plus ext4 metadata and journal), upload again.
    ext4_write(&img, "new.bin", &random_bytes(10 * MIB as usize))?;
    let before = counting.put_bytes.load(Ordering::Relaxed);
    let second = upload_drive(&store, &img, &UploadOptions::default()).await?;
    let put = counting.put_bytes.load(Ordering::Relaxed) - before;
    eprintln!(
        "10 MiB change: {put} bytes put, {} chunks of {}",
        second.chunks_uploaded, second.chunks
    );
    assert!(
        put < 12 * MIB,
        "uploaded {put} bytes for a 10 MiB change ({second:?})"
    );
    assert!(
        put >= 10 * MIB,
        "uploaded only {put} bytes for 10 MiB of new random data"
    );
    assert_ne!(second.manifest.id, m1.id);

    // Restore the new state over the old copy: only the changed chunks are fetched.
    let r2 = restore_drive(
        &store,
        &second.manifest.id,
        &restored,
        &RestoreOptions {
            have: Some(restored.clone()),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(file_hash(&restored)?, file_hash(&img)?);
    assert!(r2.bytes_fetched < 12 * MIB, "{r2:?}");
    assert!(r2.chunks_reused >= m1.chunks.len() - 12, "{r2:?}");
    // And restoring the old manifest over it goes back.
    let old = work.path().join("old.ext4");
    restore_drive(&store, &m1.id, &old, &RestoreOptions::default()).await?;
    restore_drive(
        &store,
        &m1.id,
        &restored,
        &RestoreOptions {
            have: Some(restored.clone()),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(file_hash(&restored)?, file_hash(&old)?);
    no_temp_files(work.path())?;
    Ok(())
}

async fn shared_chunks_are_stored_once(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let a = base_drive(work.path())?;
    let b = work.path().join("b.ext4");
    std::fs::copy(&a, &b)?;
    ext4_write(&b, "only-in-b.bin", &random_bytes(3 * MIB as usize))?;

    let counting = Counting::new(backend.store()?);
    let store: Arc<dyn ObjectStore> = counting.clone();
    let ma = upload_drive(&store, &a, &UploadOptions::default())
        .await?
        .manifest;
    let puts_a = counting.chunk_puts.load(Ordering::Relaxed);
    let mb = upload_drive(&store, &b, &UploadOptions::default())
        .await?
        .manifest;
    let puts_b = counting.chunk_puts.load(Ordering::Relaxed) - puts_a;

    let hashes = |m: &ironlab_store::DriveManifest| {
        m.chunks
            .iter()
            .map(|c| c.hash)
            .collect::<std::collections::HashSet<_>>()
    };
    let (ha, hb) = (hashes(&ma), hashes(&mb));
    let union: std::collections::HashSet<ChunkHash> = ha.union(&hb).copied().collect();
    let stored = keys(store.as_ref(), "chunks/").await?;
    assert_eq!(stored.len(), union.len(), "chunks stored more than once");
    assert!(
        ha.intersection(&hb).count() > 20,
        "the drives should share their base chunks"
    );
    assert_eq!(
        puts_b as usize,
        hb.difference(&ha).count(),
        "B uploaded chunks A had already stored"
    );
    for (m, path) in [(&ma, &a), (&mb, &b)] {
        let out = work.path().join("out.ext4");
        restore_drive(&store, &m.id, &out, &RestoreOptions::default()).await?;
        assert_eq!(file_hash(&out)?, file_hash(path)?);
    }
    Ok(())
}

async fn corrupt_chunk_fails_the_restore(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let img = base_drive(work.path())?;
    let store = backend.store()?;
    let m = upload_drive(&store, &img, &UploadOptions::default())
        .await?
        .manifest;
    let victim = m.chunks[m.chunks.len() / 2];
    let file = backend.object_file(&victim.hash.key());
    let mut bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes)?;

    let dest = work.path().join("dest.ext4");
    std::fs::write(&dest, b"the previous drive")?;
    let err = restore_drive(&store, &m.id, &dest, &RestoreOptions::default())
        .await
        .expect_err("a corrupt chunk was accepted");
    let msg = err.to_string();
    assert!(
        matches!(err, SnapshotError::CorruptChunk { hash, .. } if hash == victim.hash),
        "{msg}"
    );
    assert!(
        msg.contains(&victim.hash.to_string()) && msg.contains("corrupt"),
        "{msg}"
    );
    assert!(msg.contains(&format!("offset {}", victim.offset)), "{msg}");
    // The destination is untouched and no temporary file is left.
    assert_eq!(std::fs::read(&dest)?, b"the previous drive");
    no_temp_files(work.path())?;

    // A missing chunk is named too.
    store.delete(&victim.hash.key()).await?;
    let err = restore_drive(&store, &m.id, &dest, &RestoreOptions::default())
        .await
        .expect_err("a missing chunk was accepted");
    assert!(matches!(err, SnapshotError::MissingChunk { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    // A re-upload repairs the store (the chunk is missing, so it is sent again).
    upload_drive(&store, &img, &UploadOptions::default()).await?;
    restore_drive(&store, &m.id, &dest, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&dest)?, file_hash(&img)?);

    // A bad id and an unknown id are clear errors.
    let err = restore_drive(&store, "../etc", &dest, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("manifest_id"), "{err}");
    let err = restore_drive(&store, &"0".repeat(64), &dest, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SnapshotError::ManifestNotFound { .. }),
        "{err}"
    );
    Ok(())
}

async fn gc_removes_garbage_and_keeps_live_and_in_flight(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let a = base_drive(work.path())?;
    let b = work.path().join("b.ext4");
    std::fs::copy(&a, &b)?;
    ext4_write(&b, "only-in-b.bin", &random_bytes(4 * MIB as usize))?;
    let store = backend.store()?;
    let ma = upload_drive(&store, &a, &UploadOptions::default())
        .await?
        .manifest;
    let mb = upload_drive(&store, &b, &UploadOptions::default())
        .await?
        .manifest;
    let live = vec![ma.id.clone()];
    let later = |h: u64| GcOptions {
        now: Some(SystemTime::now() + Duration::from_secs(h * 3600)),
        ..Default::default()
    };

    // Within the grace period B's fresh manifest is kept, so nothing goes.
    let r = gc(&store, &live, &GcOptions::default()).await?;
    assert_eq!((r.manifests_deleted, r.chunks_deleted), (0, 0), "{r:?}");
    assert_eq!(r.manifests_kept, 2);

    // An upload in flight (its lock marker is live): B's manifest goes, no chunk does.
    let in_flight = Lock::acquire(&store, LockKind::Upload).await?;
    let r = gc(
        &store,
        &live,
        &GcOptions {
            now: Some(SystemTime::now() + Duration::from_secs(7200)),
            lock_stale_after: Duration::from_secs(3 * 3600),
            wait_for_uploads: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await?;
    assert!(r.deferred_by_uploads, "{r:?}");
    assert_eq!((r.manifests_deleted, r.chunks_deleted), (1, 0), "{r:?}");
    assert!(keys(store.as_ref(), "manifests/").await?.len() == 1);
    let all_chunks = keys(store.as_ref(), "chunks/").await?.len();
    in_flight.release().await?;

    // No upload: B's own chunks go, A's stay.
    let r = gc(&store, &live, &later(2)).await?;
    assert!(!r.deferred_by_uploads);
    let only_b = mb
        .chunks
        .iter()
        .filter(|c| !ma.chunks.iter().any(|a| a.hash == c.hash))
        .map(|c| c.hash)
        .collect::<std::collections::HashSet<_>>();
    assert!(!only_b.is_empty());
    assert_eq!(r.chunks_deleted, only_b.len(), "{r:?}");
    assert_eq!(
        keys(store.as_ref(), "chunks/").await?.len(),
        all_chunks - only_b.len()
    );
    assert!(r.bytes_deleted > 0);
    let out = work.path().join("out.ext4");
    restore_drive(&store, &ma.id, &out, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&out)?, file_hash(&a)?);
    // Nothing left to collect; a live id without a manifest is reported.
    let r = gc(&store, &[ma.id.clone(), mb.id.clone()], &later(2)).await?;
    assert_eq!((r.manifests_deleted, r.chunks_deleted), (0, 0), "{r:?}");
    assert_eq!(r.live_missing, vec![mb.id.clone()]);
    // A local write interrupted by a crash leaves a temporary file: removed once older than
    // the grace period, never listed as an object.
    let leftover = backend.object_file("chunks/ab/.abcd.tmp-0123456789abcdef");
    if let Backend::Local(_) = backend {
        std::fs::create_dir_all(leftover.parent().context("no parent")?)?;
        std::fs::write(&leftover, b"half a chunk")?;
        assert!(
            !keys(store.as_ref(), "chunks/")
                .await?
                .iter()
                .any(|k| k.contains("tmp"))
        );
    }
    // Nothing live: everything goes, and no lock marker is left behind.
    let r = gc(&store, &[], &later(2)).await?;
    assert_eq!(r.manifests_deleted, 1);
    assert!(keys(store.as_ref(), "chunks/").await?.is_empty());
    assert!(keys(store.as_ref(), "locks/").await?.is_empty());
    if let Backend::Local(_) = backend {
        assert_eq!(r.temp_files_removed, 1, "{r:?}");
        assert!(!leftover.exists());
    }
    Ok(())
}

async fn upload_waits_for_a_running_gc(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let drive = work.path().join("small.img");
    // Not a multiple of the chunk size: the last chunk is short.
    std::fs::write(&drive, random_bytes(3 * MIB as usize + 123))?;
    let store = backend.store()?;

    // Bad options are refused before anything is written.
    let err = upload_drive(
        &store,
        &drive,
        &UploadOptions {
            chunk_size: 1000,
            ..Default::default()
        },
    )
    .await
    .expect_err("a chunk size of 1000 was accepted");
    assert!(err.to_string().contains("chunk_size"), "{err}");
    let err = upload_drive(
        &store,
        &work.path().join("missing.img"),
        &UploadOptions::default(),
    )
    .await
    .expect_err("a missing drive was accepted");
    assert!(err.to_string().contains("missing.img"), "{err}");
    assert!(keys(store.as_ref(), "").await?.is_empty());

    // A GC sweep holds the store: the upload waits, then gives up with a clear error.
    let sweep = Lock::acquire(&store, LockKind::Gc).await?;
    let opts = UploadOptions {
        gc_wait: Duration::from_millis(600),
        ..Default::default()
    };
    let err = upload_drive(&store, &drive, &opts)
        .await
        .expect_err("uploaded during a GC sweep");
    assert!(matches!(err, SnapshotError::GcBusy { .. }), "{err}");
    assert!(keys(store.as_ref(), "chunks/").await?.is_empty());
    // Once the sweep is over (here: released while the upload waits), it goes through.
    let waiting = tokio::spawn({
        let store = store.clone();
        let drive = drive.clone();
        async move {
            upload_drive(
                &store,
                &drive,
                &UploadOptions {
                    gc_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "the upload did not wait for the sweep"
    );
    sweep.release().await?;
    let m = waiting.await??.manifest;
    let out = work.path().join("out.img");
    restore_drive(&store, &m.id, &out, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&out)?, file_hash(&drive)?);
    Ok(())
}

/// The worker grows a run's drive from the image's (reflink + `set_len` + `resize2fs`); when
/// the run's own copy is lost, the image's drive serves as `have`.
async fn restore_from_the_image_drive_fetches_only_what_the_run_changed(
    backend: Backend,
) -> Result<()> {
    let work = tempfile::tempdir()?;
    let image = work.path().join("image.ext4");
    make_ext4(&image, 64)?;
    ext4_write(&image, "usr.bin", &random_bytes(20 * MIB as usize))?;
    let run = work.path().join("run.ext4");
    std::fs::copy(&image, &run)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&run)?
        .set_len(256 * MIB)?;
    let out = Command::new("/usr/sbin/resize2fs")
        .arg("-f")
        .arg(&run)
        .output()?;
    ensure!(
        out.status.success(),
        "resize2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ext4_write(&run, "home.bin", &random_bytes(5 * MIB as usize))?;

    let store = backend.store()?;
    let m = upload_drive(&store, &run, &UploadOptions::default())
        .await?
        .manifest;
    let dest = work.path().join("restored.ext4");
    let r = restore_drive(
        &store,
        &m.id,
        &dest,
        &RestoreOptions {
            have: Some(image.clone()),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(file_hash(&dest)?, file_hash(&run)?);
    eprintln!(
        "restore from the image drive: {} chunks reused, {} fetched ({} bytes)",
        r.chunks_reused, r.chunks_fetched, r.bytes_fetched
    );
    assert!(r.chunks_reused >= 18, "{r:?}");
    assert!(
        r.bytes_fetched < 10 * MIB,
        "fetched {} bytes ({r:?})",
        r.bytes_fetched
    );
    Ok(())
}

/// Runs the slow upload child (see `child_upload`) and returns it with its stdout lines.
fn spawn_child(
    backend: &Backend,
    drive: &Path,
) -> Result<(
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
)> {
    let (location, env) = backend.location();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "child_upload",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("IRONLAB_STORE_CHILD_LOCATION", location)
    .env("IRONLAB_STORE_CHILD_DRIVE", drive)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    Ok((child, lines))
}

/// Reads the child's output until a progress line past `bytes`.
fn wait_progress(
    lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>,
    bytes: u64,
) -> Result<()> {
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("progress ")
            && rest
                .split(' ')
                .next()
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|d| d >= bytes)
        {
            return Ok(());
        }
    }
    bail!("the child ended before uploading {bytes} bytes")
}

async fn killed_upload_leaves_no_manifest(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let drive = work.path().join("big.img");
    std::fs::write(&drive, random_bytes(48 * MIB as usize))?;
    let store = backend.store()?;

    let (mut child, mut lines) = spawn_child(&backend, &drive)?;
    wait_progress(&mut lines, 12 * MIB)?;
    // SIGKILL: no chance to clean up.
    child.kill()?;
    child.wait()?;
    assert!(
        keys(store.as_ref(), "manifests/").await?.is_empty(),
        "a killed upload wrote a manifest"
    );
    let orphans = keys(store.as_ref(), "chunks/").await?;
    assert!(
        !orphans.is_empty(),
        "the child stored nothing before it was killed"
    );
    assert_eq!(
        keys(store.as_ref(), "locks/").await?.len(),
        1,
        "the dead upload's marker"
    );

    // A later upload completes and restores.
    let m = upload_drive(&store, &drive, &UploadOptions::default())
        .await?
        .manifest;
    let live = vec![m.id.clone()];
    let out = work.path().join("out.img");
    restore_drive(&store, &m.id, &out, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&out)?, file_hash(&drive)?);

    // While the dead marker is fresh, GC deletes no chunk; once stale, it is removed. Here
    // every orphan belongs to the finished manifest (same drive), so nothing else goes.
    let r = gc(
        &store,
        &live,
        &GcOptions {
            wait_for_uploads: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await?;
    assert!(r.deferred_by_uploads, "{r:?}");
    let r = gc(
        &store,
        &live,
        &GcOptions {
            now: Some(SystemTime::now() + Duration::from_secs(1200)),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(r.stale_locks_removed, 1, "{r:?}");
    assert!(!r.deferred_by_uploads);
    assert!(keys(store.as_ref(), "locks/").await?.is_empty());
    assert_eq!(keys(store.as_ref(), "chunks/").await?.len(), m.chunks.len());

    // An upload in flight in another process: GC waits for it to finish (the upload is not
    // held up), then sees its manifest and deletes none of its chunks.
    let drive2 = work.path().join("other.img");
    std::fs::write(&drive2, random_bytes(24 * MIB as usize))?;
    let (mut child, mut lines) = spawn_child(&backend, &drive2)?;
    wait_progress(&mut lines, 8 * MIB)?;
    let before = keys(store.as_ref(), "chunks/").await?;
    let r = gc(&store, &live, &GcOptions::default()).await?;
    assert!(!r.deferred_by_uploads && r.chunks_deleted == 0, "{r:?}");
    assert_eq!(r.manifests_kept, 2, "{r:?}");
    let mut id2 = None;
    for line in lines {
        if let Some(id) = line?.strip_prefix("manifest ") {
            id2 = Some(id.to_owned());
        }
    }
    ensure!(child.wait()?.success(), "the child upload failed");
    let id2 = id2.context("the child printed no manifest")?;
    assert!(keys(store.as_ref(), "chunks/").await?.len() >= before.len());
    restore_drive(&store, &id2, &out, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&out)?, file_hash(&drive2)?);
    Ok(())
}

async fn dropped_upload_leaves_no_manifest(backend: Backend) -> Result<()> {
    let work = tempfile::tempdir()?;
    let drive = work.path().join("big.img");
    std::fs::write(&drive, random_bytes(32 * MIB as usize))?;
    let store = backend.store()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let opts = UploadOptions {
        parallelism: 2,
        progress: Some(Arc::new(move |p: Progress| {
            let _ = tx.send(p.done);
            std::thread::sleep(Duration::from_millis(20));
        })),
        ..Default::default()
    };
    let upload = upload_drive(&store, &drive, &opts);
    tokio::select! {
        r = upload => bail!("the upload finished before it was dropped: {r:?}"),
        _ = async { while rx.recv().await.is_some_and(|d| d < 8 * MIB) {} } => {}
    }
    // The future is dropped here.
    assert!(keys(store.as_ref(), "manifests/").await?.is_empty());
    // Its marker is removed in the background.
    for _ in 0..100 {
        if keys(store.as_ref(), "locks/").await?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        keys(store.as_ref(), "locks/").await?.is_empty(),
        "the dropped upload's marker stayed"
    );
    let m = upload_drive(&store, &drive, &UploadOptions::default())
        .await?
        .manifest;
    let out = work.path().join("out.img");
    restore_drive(&store, &m.id, &out, &RestoreOptions::default()).await?;
    assert_eq!(file_hash(&out)?, file_hash(&drive)?);
    Ok(())
}

/// The child process of `killed_upload_leaves_no_manifest`: uploads a drive slowly (20 ms per
/// chunk), printing `progress DONE TOTAL` lines and finally `manifest ID`. Does nothing unless
/// run by that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by killed_upload_leaves_no_manifest"]
async fn child_upload() -> Result<()> {
    let (Ok(location), Ok(drive)) = (
        std::env::var("IRONLAB_STORE_CHILD_LOCATION"),
        std::env::var("IRONLAB_STORE_CHILD_DRIVE"),
    ) else {
        return Ok(());
    };
    let store = open_store(&location)?;
    let opts = UploadOptions {
        parallelism: 2,
        progress: Some(Arc::new(|p: Progress| {
            println!("progress {} {}", p.done, p.total);
            std::thread::sleep(Duration::from_millis(20));
        })),
        ..Default::default()
    };
    let r = upload_drive(&store, Path::new(&drive), &opts).await?;
    println!("manifest {}", r.manifest.id);
    Ok(())
}

/// No `.NAME.restore-*` file is left in `dir`.
fn no_temp_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(!name.contains(".restore-"), "temporary file left: {name}");
    }
    Ok(())
}
