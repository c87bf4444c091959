//! The snapshot format: chunk hashes, chunk objects and drive manifests. Frozen as format 1;
//! a change needs a new format number.
//!
//! - A chunk is `chunk_size` bytes of a drive at an offset that is a multiple of `chunk_size`
//!   (the last one may be shorter). Chunks that are holes or all zero are not stored.
//! - A chunk is addressed by the BLAKE3 hash of its plain bytes, key `chunks/HH/HASH` (`HH` =
//!   the first two hex digits). The object is one codec byte followed by the payload:
//!   `0` = the plain bytes, `1` = one zstd frame of them. The codec is chosen per chunk (zstd
//!   when it saves at least 1/16), so readers must accept both.
//! - A manifest (`manifests/ID.json`) is JSON `{"format":1,"size":N,"chunk_size":C,
//!   "chunks":[[OFFSET,"HASH"],…]}` with chunks sorted by offset. `ID` is the BLAKE3 hash (hex)
//!   of the manifest's JSON bytes as stored: equal drives give equal ids, and a changed
//!   manifest is detected on read.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The only manifest format this crate reads and writes.
pub const FORMAT: u32 = 1;
/// Chunk size used unless [`crate::UploadOptions::chunk_size`] says otherwise (measured in
/// `bench/store.sh`: see bench/RESULTS.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest allowed chunk size.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

const CODEC_PLAIN: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// BLAKE3 hash of a chunk's plain bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The object key of this chunk: `chunks/HH/HASH`.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    /// The hash from a chunk key made by [`ChunkHash::key`]; `None` for other keys.
    pub fn from_key(key: &str) -> Option<Self> {
        let rest = key.strip_prefix("chunks/")?;
        let (dir, hex) = rest.split_once('/')?;
        let hash: Self = hex.parse().ok()?;
        (dir == &hex[..2]).then_some(hash)
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

impl FromStr for ChunkHash {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("expected 64 lowercase hex digits");
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| "expected 64 lowercase hex digits")?;
        Ok(Self(out))
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One stored chunk of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Byte offset in the drive (a multiple of the manifest's chunk size).
    pub offset: u64,
    /// Hash of the chunk's bytes.
    pub hash: ChunkHash,
}

/// A drive snapshot: its size and the chunks that hold data. Everything not listed reads as
/// zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveManifest {
    /// The manifest's id (BLAKE3 of its stored JSON): pass it to [`crate::restore_drive`] and
    /// keep it live for [`crate::gc`].
    pub id: String,
    /// The drive's size in bytes.
    pub size: u64,
    /// The chunk size in bytes.
    pub chunk_size: u64,
    /// Data chunks, sorted by offset.
    pub chunks: Vec<ChunkRef>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestJson {
    format: u32,
    size: u64,
    chunk_size: u64,
    chunks: Vec<(u64, ChunkHash)>,
}

/// A manifest that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("manifest {id}: {reason}")]
pub struct ManifestError {
    /// The manifest id concerned.
    pub id: String,
    /// What is wrong.
    pub reason: String,
}

impl DriveManifest {
    /// Builds a manifest (computing its id). `chunks` must be sorted by offset.
    pub fn new(size: u64, chunk_size: u64, chunks: Vec<ChunkRef>) -> Self {
        let mut m = Self {
            id: String::new(),
            size,
            chunk_size,
            chunks,
        };
        m.id = blake3::hash(&m.to_json()).to_hex().to_string();
        m
    }

    /// The object key of manifest `id`: `manifests/ID.json`.
    pub fn key_of(id: &str) -> String {
        format!("manifests/{id}.json")
    }

    /// The manifest id in a key made by [`DriveManifest::key_of`].
    pub fn id_from_key(key: &str) -> Option<&str> {
        let id = key.strip_prefix("manifests/")?.strip_suffix(".json")?;
        valid_id(id).then_some(id)
    }

    /// This manifest's object key.
    pub fn key(&self) -> String {
        Self::key_of(&self.id)
    }

    /// The stored JSON bytes.
    pub fn to_json(&self) -> Bytes {
        let j = ManifestJson {
            format: FORMAT,
            size: self.size,
            chunk_size: self.chunk_size,
            chunks: self.chunks.iter().map(|c| (c.offset, c.hash)).collect(),
        };
        // Serialising plain integers and strings cannot fail.
        Bytes::from(serde_json::to_vec(&j).unwrap_or_default())
    }

    /// Parses and checks stored JSON: the id must be the hash of `bytes`, the format 1, the
    /// chunk size in range, and the chunks sorted, aligned and inside the drive.
    pub fn from_json(id: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let err = |reason: String| ManifestError {
            id: id.to_owned(),
            reason,
        };
        let actual = blake3::hash(bytes).to_hex();
        if actual.as_str() != id {
            return Err(err(format!(
                "its content does not match its id (BLAKE3 is {actual}): the stored manifest is corrupt"
            )));
        }
        let j: ManifestJson =
            serde_json::from_slice(bytes).map_err(|e| err(format!("not a valid manifest: {e}")))?;
        if j.format != FORMAT {
            return Err(err(format!(
                "format {} is not supported (only {FORMAT})",
                j.format
            )));
        }
        check_chunk_size(j.chunk_size).map_err(|r| err(format!("chunk_size: {r}")))?;
        let mut prev: Option<u64> = None;
        for (i, (offset, _)) in j.chunks.iter().enumerate() {
            if offset % j.chunk_size != 0 {
                return Err(err(format!(
                    "chunks[{i}]: offset {offset} is not a multiple of the chunk size"
                )));
            }
            if *offset >= j.size {
                return Err(err(format!(
                    "chunks[{i}]: offset {offset} is past the drive's size {}",
                    j.size
                )));
            }
            if prev.is_some_and(|p| p >= *offset) {
                return Err(err(format!(
                    "chunks[{i}]: offsets are not strictly increasing"
                )));
            }
            prev = Some(*offset);
        }
        Ok(Self {
            id: id.to_owned(),
            size: j.size,
            chunk_size: j.chunk_size,
            chunks: j
                .chunks
                .into_iter()
                .map(|(offset, hash)| ChunkRef { offset, hash })
                .collect(),
        })
    }

    /// Length of the chunk at `offset` (the last chunk may be short).
    pub fn chunk_len(&self, offset: u64) -> u64 {
        self.chunk_size.min(self.size.saturating_sub(offset))
    }

    /// Bytes of data the manifest holds (the drive minus holes and zero chunks).
    pub fn data_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| self.chunk_len(c.offset)).sum()
    }
}

/// Whether `id` looks like a manifest id (64 lowercase hex digits).
pub fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a chunk size: a power of two between [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(size: u64) -> Result<(), String> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "{size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        ));
    }
    Ok(())
}

thread_local! {
    /// One zstd context per (blocking-pool) thread: making one per chunk costs more than
    /// compressing a chunk of incompressible data.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(data: &[u8], level: i32, out: &mut [u8]) -> Option<usize> {
    COMPRESSOR.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, comp) = c.as_mut()?;
        comp.compress_to_buffer(data, out).ok()
    })
}

/// Encodes a chunk's plain bytes as a stored object (see the module docs). `level` is the zstd
/// level; `None` stores it plain.
pub fn encode_chunk(data: &[u8], level: Option<i32>) -> Bytes {
    let mut framed = Vec::with_capacity(data.len() + 1);
    framed.push(0);
    framed.extend_from_slice(data);
    encode_framed(framed, level)
}

/// [`encode_chunk`] for a chunk read with one spare byte in front (`framed[0]`, overwritten
/// with the codec byte): a chunk stored plain is not copied.
pub fn encode_framed(mut framed: Vec<u8>, level: Option<i32>) -> Bytes {
    let data_len = framed.len().saturating_sub(1);
    if let Some(level) = level {
        // Worth it only when it saves 1/16; a frame that would not fit is not worth it.
        let limit = data_len - data_len / 16;
        let mut out = vec![0u8; 1 + zstd::zstd_safe::compress_bound(data_len)];
        if let Some(n) = zstd_compress(&framed[1..], level, &mut out[1..])
            && n < limit
        {
            out.truncate(1 + n);
            out[0] = CODEC_ZSTD;
            return Bytes::from(out);
        }
    }
    if let Some(b) = framed.first_mut() {
        *b = CODEC_PLAIN;
    }
    Bytes::from(framed)
}

/// Decodes a stored chunk object and checks it: its plain bytes must be `expected_len` long
/// and hash to `expected`. The error says what is wrong.
pub fn decode_chunk(
    obj: &Bytes,
    expected: &ChunkHash,
    expected_len: usize,
) -> Result<Bytes, String> {
    let Some(&codec) = obj.first() else {
        return Err("the object is empty".to_owned());
    };
    let data = match codec {
        CODEC_PLAIN => obj.slice(1..),
        CODEC_ZSTD => {
            let mut out = vec![0u8; expected_len];
            let n = DECOMPRESSOR
                .with(|d| -> Result<usize, String> {
                    let mut d = d.try_borrow_mut().map_err(|e| e.to_string())?;
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                    }
                    let dec = d.as_mut().ok_or("no zstd context")?;
                    dec.decompress_to_buffer(&obj[1..], &mut out[..])
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    format!("its zstd data does not decompress to {expected_len} bytes ({e})")
                })?;
            out.truncate(n);
            Bytes::from(out)
        }
        other => return Err(format!("unknown codec byte {other}")),
    };
    if data.len() != expected_len {
        return Err(format!(
            "it holds {} bytes, expected {expected_len}",
            data.len()
        ));
    }
    let actual = ChunkHash::of(&data);
    if actual != *expected {
        return Err(format!("its BLAKE3 is {actual}"));
    }
    Ok(data)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_codec_round_trips_and_detects_damage() {
        let text = b"hello world ".repeat(10_000);
        let mut random = vec![0u8; 100_000];
        rand::fill(&mut random[..]);
        for data in [&text[..], &random[..]] {
            let h = ChunkHash::of(data);
            for level in [None, Some(1)] {
                let obj = encode_chunk(data, level);
                assert_eq!(
                    decode_chunk(&obj, &h, data.len()).ok().as_deref(),
                    Some(data)
                );
                let mut bad = obj.to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(decode_chunk(&Bytes::from(bad), &h, data.len()).is_err());
                // A frame that decompresses to more than the chunk is refused.
                assert!(decode_chunk(&obj, &h, data.len() - 1).is_err());
            }
        }
        // Text compresses, random data is stored plain.
        assert_eq!(encode_chunk(&text, Some(1))[0], CODEC_ZSTD);
        assert_eq!(encode_chunk(&random, Some(1))[0], CODEC_PLAIN);
        assert!(
            decode_chunk(&Bytes::from_static(&[9, 1, 2]), &ChunkHash::of(b""), 2)
                .unwrap_err()
                .contains("codec")
        );
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let h = ChunkHash::of(b"x");
        let m = DriveManifest::new(
            3 << 20,
            1 << 20,
            vec![
                ChunkRef { offset: 0, hash: h },
                ChunkRef {
                    offset: 2 << 20,
                    hash: h,
                },
            ],
        );
        assert!(valid_id(&m.id));
        let json = m.to_json();
        assert_eq!(DriveManifest::from_json(&m.id, &json).ok(), Some(m.clone()));
        assert_eq!(DriveManifest::id_from_key(&m.key()), Some(m.id.as_str()));
        assert_eq!(ChunkHash::from_key(&h.key()), Some(h));

        let mut bad = json.to_vec();
        bad[10] ^= 1;
        let err = DriveManifest::from_json(&m.id, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match its id"), "{err}");

        let unaligned = DriveManifest::new(3 << 20, 1 << 20, vec![ChunkRef { offset: 5, hash: h }]);
        let err = DriveManifest::from_json(&unaligned.id, &unaligned.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunks[0]: offset 5"), "{err}");
        let odd = DriveManifest::new(3 << 20, 1000, vec![]);
        let err = DriveManifest::from_json(&odd.id, &odd.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunk_size"), "{err}");
        assert_eq!(m.chunk_len(2 << 20), 1 << 20);
        assert_eq!(DriveManifest::new(10, 1 << 20, vec![]).chunk_len(0), 10);
    }
}
