//! Embeds the esbuild output (`web/dist/*`) into the binary when it exists. Without it the
//! crate still builds: the pages render and say that the terminal scripts are not built.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn dist_files(dist: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dist)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let web = manifest_dir.join("..").join("..").join("web");
    let dist = web.join("dist");
    let mut code = String::from(
        "/// `(file name, contents, etag)` of every file in `web/dist`, embedded at build time.\n\
         pub static FILES: &[(&str, &[u8], &str)] = &[\n",
    );
    if dist.is_dir() {
        println!("cargo:rerun-if-changed={}", dist.display());
        for path in dist_files(&dist) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let abs = path.canonicalize().unwrap_or(path.clone());
            let _ = writeln!(
                code,
                "    ({name:?}, include_bytes!({:?}), \"\\\"{:016x}\\\"\"),",
                abs.display().to_string(),
                fnv1a(&data)
            );
        }
    } else if web.is_dir() {
        // Rebuild when `npm run build` creates web/dist.
        println!("cargo:rerun-if-changed={}", web.display());
    }
    code.push_str("];\n");
    let out = out_dir.join("web_assets.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}
