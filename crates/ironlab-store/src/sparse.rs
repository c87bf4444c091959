//! Sparse-file helpers: where a file has data (SEEK_DATA/SEEK_HOLE), zero detection, hole
//! punching, sparse writes and reflink clones.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use rustix::fs::{FallocateFlags, SeekFrom};

/// Block size for sparse writes and zero detection inside a chunk.
const BLOCK: usize = 4096;

/// The `[start, end)` byte ranges of `file` (of length `size`) that hold data, in order. On a
/// file system without SEEK_DATA support the whole file is one range.
pub fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if out.is_empty() => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// The indexes of the `chunk_size` chunks that overlap a data range.
pub fn data_chunks(ranges: &[(u64, u64)], chunk_size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(start, end) in ranges {
        if end <= start {
            continue;
        }
        let first = start / chunk_size;
        let last = (end - 1) / chunk_size;
        for i in first..=last {
            if out.last().is_none_or(|&l| l < i) {
                out.push(i);
            }
        }
    }
    out
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    const Z: [u8; 256] = [0; 256];
    let mut chunks = buf.chunks_exact(256);
    chunks.all(|c| c == Z) && chunks.remainder().iter().all(|&b| b == 0)
}

/// Reads `len` bytes at `offset`; bytes past the end of the file read as zeros.
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_into(file, offset, &mut buf)?;
    Ok(buf)
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
pub fn read_into(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = buf.len();
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deallocates `[offset, offset + len)`, keeping the file size; the range then reads as zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        // No hole punching here: write zeros instead.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `buf` at `offset` skipping all-zero 4 KiB blocks, which must already read as zeros
/// in `file` (a fresh sparse file, or a range just punched).
pub fn write_sparse(file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let end = (i + BLOCK).min(buf.len());
        if is_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        // Extend the run over the following non-zero blocks.
        let mut run_end = end;
        while run_end < buf.len() {
            let next = (run_end + BLOCK).min(buf.len());
            if is_zero(&buf[run_end..next]) {
                break;
            }
            run_end = next;
        }
        file.write_all_at(&buf[i..run_end], offset + i as u64)?;
        i = run_end;
    }
    Ok(())
}

/// Makes `dest` share `src`'s blocks (FICLONE). Fails (EXDEV, EOPNOTSUPP, EINVAL) when the
/// file system cannot, or the two are on different file systems.
pub fn reflink(src: &File, dest: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dest, src).map_err(io::Error::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_ranges() {
        let mib = 1u64 << 20;
        assert_eq!(data_chunks(&[], mib), Vec::<u64>::new());
        assert_eq!(data_chunks(&[(0, 1)], mib), vec![0]);
        assert_eq!(
            data_chunks(&[(mib - 1, mib + 1), (mib + 5, 3 * mib)], mib),
            vec![0, 1, 2]
        );
        assert_eq!(data_chunks(&[(5 * mib, 5 * mib)], mib), Vec::<u64>::new());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 5000];
        v[4999] = 1;
        assert!(!is_zero(&v));
        v[4999] = 0;
        v[0] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn holes_are_found_and_sparse_writes_stay_sparse() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))?;
        let mib = 1u64 << 20;
        f.set_len(16 * mib)?;
        assert_eq!(data_ranges(&f, 16 * mib)?, vec![]);
        let mut buf = vec![0u8; mib as usize];
        buf[100] = 7;
        write_sparse(&f, 4 * mib, &buf)?;
        let ranges = data_ranges(&f, 16 * mib)?;
        // Only the one 4 KiB block (or the file system's allocation unit) was written.
        assert_eq!(ranges.len(), 1, "{ranges:?}");
        assert!(ranges[0].0 <= 4 * mib + 100 && ranges[0].1 > 4 * mib + 100);
        assert!(ranges[0].1 - ranges[0].0 <= 64 << 10, "{ranges:?}");
        assert_eq!(read_at(&f, 4 * mib, mib as usize)?, buf);
        punch_hole(&f, 4 * mib, mib)?;
        assert!(is_zero(&read_at(&f, 4 * mib, mib as usize)?));
        // Reads past the end are zeros.
        assert_eq!(read_at(&f, 16 * mib - 2, 4)?, vec![0; 4]);
        Ok(())
    }
}
