//! Snapshot store benchmark (driven by `bench/store.sh`).
//!
//! ```text
//! store_bench --store LOCATION --work DIR [--size-mib N] [--data random|text|mixed]
//!             [--chunk-kib K] [--zstd LEVEL|none] [--parallelism P]
//! ```
//!
//! Makes a drive of N MiB in DIR (every chunk new to the store), then measures: the first
//! upload (all data changed), a second upload of the same drive (nothing changed: read, hash
//! and exists checks), a restore to a fresh file, and a restore over an identical copy
//! (`have`).
//! Prints one result line per step: `step MiB seconds MiB/s stored-MiB`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ironlab_store::{RestoreOptions, UploadOptions, open_store, restore_drive, upload_drive};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn make_drive(path: &Path, size_mib: usize, data: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut xof = {
        let mut h = blake3::Hasher::new();
        h.update(&rand::random::<[u8; 16]>());
        h.finalize_xof()
    };
    let mut line = 0u64;
    let mut text = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..size_mib {
        let random = match data {
            "random" => true,
            "text" => false,
            _ => i % 2 == 0,
        };
        if random {
            xof.fill(&mut buf);
            f.write_all(&buf)?;
        } else {
            text.clear();
            while text.len() < 1 << 20 {
                text.extend_from_slice(
                    format!(
                        "{line:08} /usr/lib/x86_64-linux-gnu/libexample.so.{} rw-r--r-- root\n",
                        line % 97
                    )
                    .as_bytes(),
                );
                line += 1;
            }
            f.write_all(&text[..1 << 20])?;
        }
    }
    f.flush()?;
    f.get_ref().sync_all()
}

/// This process's CPU time (user + system) in seconds, from /proc/self/stat (100 Hz ticks).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the line are 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

struct Step {
    wall: Instant,
    cpu: f64,
}

fn start() -> Step {
    Step {
        wall: Instant::now(),
        cpu: cpu_secs(),
    }
}

fn report(step: &str, s: Step, bytes: u64, stored: u64) {
    let secs = s.wall.elapsed().as_secs_f64();
    let cpu = cpu_secs() - s.cpu;
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "{step:<14} {mib:>6.0} MiB {secs:>6.2} s {:>7.1} MiB/s  cpu {cpu:>5.2} s ({:>6.0} MiB per cpu-s)  stored {:>6.1} MiB",
        mib / secs,
        if cpu > 0.0 { mib / cpu } else { f64::INFINITY },
        stored as f64 / (1 << 20) as f64
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let location = arg(&args, "--store").ok_or("--store LOCATION is required")?;
    let work = PathBuf::from(arg(&args, "--work").ok_or("--work DIR is required")?);
    let size_mib: usize = arg(&args, "--size-mib")
        .unwrap_or_else(|| "512".into())
        .parse()?;
    let data = arg(&args, "--data").unwrap_or_else(|| "mixed".into());
    let chunk_kib: u64 = arg(&args, "--chunk-kib")
        .unwrap_or_else(|| "1024".into())
        .parse()?;
    let zstd = match arg(&args, "--zstd").as_deref() {
        None => Some(1),
        Some("none") => None,
        Some(l) => Some(l.parse()?),
    };
    let parallelism: usize = arg(&args, "--parallelism")
        .unwrap_or_else(|| "4".into())
        .parse()?;

    std::fs::create_dir_all(&work)?;
    let drive = work.join("drive.img");
    make_drive(&drive, size_mib, &data)?;
    let store = open_store(&location)?;
    let opts = UploadOptions {
        chunk_size: chunk_kib << 10,
        parallelism,
        zstd_level: zstd,
        ..Default::default()
    };
    println!(
        "# store={location} size={size_mib}MiB data={data} chunk={chunk_kib}KiB zstd={zstd:?} parallelism={parallelism}"
    );

    let t = start();
    let up = upload_drive(&store, &drive, &opts).await?;
    report("upload-new", t, up.bytes_read, up.bytes_uploaded);

    let t = start();
    let again = upload_drive(&store, &drive, &opts).await?;
    report("upload-same", t, again.bytes_read, again.bytes_uploaded);

    let out = work.join("restored.img");
    let t = start();
    let r = restore_drive(
        &store,
        &up.manifest.id,
        &out,
        &RestoreOptions {
            parallelism,
            ..Default::default()
        },
    )
    .await?;
    report("restore-fresh", t, r.manifest.data_bytes(), r.bytes_fetched);

    let t = start();
    let r = restore_drive(
        &store,
        &up.manifest.id,
        &out,
        &RestoreOptions {
            have: Some(out.clone()),
            parallelism,
            ..Default::default()
        },
    )
    .await?;
    report("restore-have", t, r.manifest.data_bytes(), r.bytes_fetched);
    std::fs::remove_file(&drive)?;
    std::fs::remove_file(&out)?;
    Ok(())
}
