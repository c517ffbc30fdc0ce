//! Just enough of the zip format to read what `torch.save` writes: the central directory
//! (ZIP64 included, for checkpoints over 4 GiB) and stored — uncompressed — entries, whose bytes
//! are returned as ranges of the caller's buffer (the mmapped file), never copied.
//!
//! `torch.save` never compresses or encrypts; an entry that is either is refused rather than
//! inflated. Every offset and length is checked against the buffer before use.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipError {
    #[error("not a zip archive (no end-of-central-directory record): truncated, or not a torch.save file")]
    NoEndRecord,
    #[error("zip {0} is out of bounds: the archive is truncated or corrupt")]
    OutOfBounds(&'static str),
    #[error("zip {what}: bad signature (corrupt archive)")]
    BadSignature { what: &'static str },
    #[error("zip entry {name} is compressed (method {method}); torch.save stores entries uncompressed, so this is not read")]
    Compressed { name: String, method: u16 },
    #[error("zip entry {name} is encrypted")]
    Encrypted { name: String },
    #[error("zip entry {name} appears twice")]
    Duplicate { name: String },
    #[error("zip archive spans several disks")]
    MultiDisk,
    #[error("zip entry name is not UTF-8")]
    BadName,
}

/// A stored entry: `len` bytes at `start` in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub start: usize,
    pub len: usize,
}

/// The entries of an archive, by name.
#[derive(Debug, Clone)]
pub struct ZipIndex {
    pub entries: HashMap<String, Entry>,
}

fn rd<const N: usize>(b: &[u8], at: usize, what: &'static str) -> Result<[u8; N], ZipError> {
    let s = at
        .checked_add(N)
        .and_then(|e| b.get(at..e))
        .ok_or(ZipError::OutOfBounds(what))?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}
fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, ZipError> {
    rd::<2>(b, at, what).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<u32, ZipError> {
    rd::<4>(b, at, what).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], at: usize, what: &'static str) -> Result<u64, ZipError> {
    rd::<8>(b, at, what).map(u64::from_le_bytes)
}
fn to_usize(v: u64, what: &'static str) -> Result<usize, ZipError> {
    usize::try_from(v).map_err(|_| ZipError::OutOfBounds(what))
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOC_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;

/// Does `b` start like a zip archive (a local file header)?
pub fn is_zip(b: &[u8]) -> bool {
    b.len() >= 4 && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == LFH_SIG
}

/// Parse the central directory of the archive `b`.
pub fn read_index(b: &[u8]) -> Result<ZipIndex, ZipError> {
    // The end record is 22 bytes plus a comment of at most 65535 bytes, at the very end.
    if b.len() < 22 {
        return Err(ZipError::NoEndRecord);
    }
    let lo = b.len().saturating_sub(22 + 0xffff);
    let eocd = (lo..=b.len() - 22)
        .rev()
        .find(|&i| {
            u32_at(b, i, "end record").ok() == Some(EOCD_SIG)
                && u16_at(b, i + 20, "end record")
                    .ok()
                    .map(|c| i + 22 + c as usize)
                    == Some(b.len())
        })
        .ok_or(ZipError::NoEndRecord)?;
    let disk = u16_at(b, eocd + 4, "end record")?;
    let cd_disk = u16_at(b, eocd + 6, "end record")?;
    let mut n_entries = u16_at(b, eocd + 10, "end record")? as u64;
    let mut cd_size = u32_at(b, eocd + 12, "end record")? as u64;
    let mut cd_offset = u32_at(b, eocd + 16, "end record")? as u64;
    if disk != 0 || cd_disk != 0 {
        return Err(ZipError::MultiDisk);
    }
    if n_entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        // ZIP64: a 20-byte locator right before the end record points at the ZIP64 end record.
        let loc = eocd
            .checked_sub(20)
            .ok_or(ZipError::OutOfBounds("zip64 locator"))?;
        if u32_at(b, loc, "zip64 locator")? != EOCD64_LOC_SIG {
            return Err(ZipError::BadSignature {
                what: "zip64 locator",
            });
        }
        let at = to_usize(u64_at(b, loc + 8, "zip64 locator")?, "zip64 end record")?;
        if u32_at(b, at, "zip64 end record")? != EOCD64_SIG {
            return Err(ZipError::BadSignature {
                what: "zip64 end record",
            });
        }
        n_entries = u64_at(b, at + 32, "zip64 end record")?;
        cd_size = u64_at(b, at + 40, "zip64 end record")?;
        cd_offset = u64_at(b, at + 48, "zip64 end record")?;
    }
    let cd_start = to_usize(cd_offset, "central directory")?;
    let cd_end = cd_start
        .checked_add(to_usize(cd_size, "central directory")?)
        .filter(|&e| e <= b.len())
        .ok_or(ZipError::OutOfBounds("central directory"))?;
    // Each entry takes at least 46 bytes: a larger count cannot be honest.
    if n_entries > (cd_end - cd_start) as u64 / 46 {
        return Err(ZipError::OutOfBounds("central directory entry count"));
    }

    let mut entries = HashMap::with_capacity(n_entries as usize);
    let mut p = cd_start;
    for _ in 0..n_entries {
        if p + 46 > cd_end || u32_at(b, p, "central directory")? != CDH_SIG {
            return Err(ZipError::BadSignature {
                what: "central directory entry",
            });
        }
        let flags = u16_at(b, p + 8, "central directory")?;
        let method = u16_at(b, p + 10, "central directory")?;
        let mut comp = u32_at(b, p + 20, "central directory")? as u64;
        let mut size = u32_at(b, p + 24, "central directory")? as u64;
        let name_len = u16_at(b, p + 28, "central directory")? as usize;
        let extra_len = u16_at(b, p + 30, "central directory")? as usize;
        let comment_len = u16_at(b, p + 32, "central directory")? as usize;
        let mut local = u32_at(b, p + 42, "central directory")? as u64;
        let name_at = p + 46;
        let extra_at = name_at + name_len;
        let next = extra_at + extra_len + comment_len;
        if next > cd_end {
            return Err(ZipError::OutOfBounds("central directory entry"));
        }
        let name = std::str::from_utf8(&b[name_at..extra_at])
            .map_err(|_| ZipError::BadName)?
            .to_string();
        // ZIP64 extended information: the 64-bit values of the fields set to all ones.
        let mut e = extra_at;
        while e + 4 <= extra_at + extra_len {
            let id = u16_at(b, e, "extra field")?;
            let len = u16_at(b, e + 2, "extra field")? as usize;
            let body = e + 4;
            if body + len > extra_at + extra_len {
                return Err(ZipError::OutOfBounds("extra field"));
            }
            if id == 1 {
                let mut q = body;
                for field in [&mut size, &mut comp, &mut local] {
                    if *field == 0xffff_ffff {
                        if q + 8 > body + len {
                            return Err(ZipError::OutOfBounds("zip64 extra field"));
                        }
                        *field = u64_at(b, q, "zip64 extra field")?;
                        q += 8;
                    }
                }
            }
            e = body + len;
        }
        if flags & 1 != 0 {
            return Err(ZipError::Encrypted { name });
        }
        if method != 0 || comp != size {
            return Err(ZipError::Compressed { name, method });
        }
        let lh = to_usize(local, "local header")?;
        if u32_at(b, lh, "local header")? != LFH_SIG {
            return Err(ZipError::BadSignature {
                what: "local header",
            });
        }
        let start = lh
            + 30
            + u16_at(b, lh + 26, "local header")? as usize
            + u16_at(b, lh + 28, "local header")? as usize;
        let len = to_usize(size, "entry size")?;
        if start.checked_add(len).is_none_or(|end| end > b.len()) {
            return Err(ZipError::OutOfBounds("entry data"));
        }
        if entries.insert(name.clone(), Entry { start, len }).is_some() {
            return Err(ZipError::Duplicate { name });
        }
        p = next;
    }
    Ok(ZipIndex { entries })
}
