//! Weights that do not all fit in the memory a run is given: which byte ranges of the mapped
//! file stay resident, and how the rest is streamed from the file on every token.
//!
//! A [`Residency`] is built from a plan (`ggpt::budget` decides which tensors go where):
//! - **pinned** spans stay in memory for the whole run. They are locked with `mlock` once,
//!   when the residency is created, so page reclaim never takes them. Where `mlock` is refused
//!   (`RLIMIT_MEMLOCK`), each pinned span is read once into an anonymous buffer of its own
//!   and the forward pass reads that copy ([`Pinning::Copied`]); the mapped pages are
//!   released, so the budget holds one copy, never two.
//! - **streamed** spans are listed per *step* of the forward pass (step `l` < n_layer is block
//!   `l`, step n_layer is the output head). Every streamed span no larger than the largest
//!   streamed block matrix goes through a *ring*: reader threads (two, each with one read in
//!   flight) `pread` the spans in the order the forward pass uses them (cyclically: the head
//!   is followed by the next token's block 0) into a few reused slots of the largest piece's
//!   size that together take at most the read-ahead window, as far ahead of use as free space
//!   allows. Consecutive pieces that fit one slot together share it, so the slots hold more
//!   pieces when they are small. The reads go through a second open file
//!   description of the mapped file (`/proc/self/fd`, the same inode) with `O_DIRECT` where
//!   the file system allows it, so streamed bytes never enter the page cache and are charged
//!   once, as the buffers; elsewhere through the mapped descriptor itself, dropping each
//!   range from the page cache (`POSIX_FADV_DONTNEED`) after reading it.
//! - a streamed span larger than that (the output head of a model whose head could not stay)
//!   is read through the mapping: entering a step asks the kernel to read ahead
//!   (`MADV_WILLNEED`) such spans of that step and of the following ones, up to the window;
//!   leaving it drops the pages (`MADV_DONTNEED`, `POSIX_FADV_DONTNEED`). That advice is
//!   given by a thread of its own so that reclaim at the limit happens beside the forward
//!   pass, not in it.
//!
//! The forward pass asks [`Residency::weight`] for each matrix's bytes: a pinned copy, a
//! filled piece of the ring (held until the returned guard is dropped), or `None` for "read
//! the mapping". Asking for a streamed span that is not the next one in the ring's order (a
//! pass that skips the head, an error part-way) skips the ring ahead to it; the skipped reads
//! are wasted, never wrong. One piece of the ring is held at a time: concurrent passes take
//! turns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ggpt_gguf::GgufFile;

/// A byte range of the model file (absolute offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

/// Why a residency could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResidencyError {
    #[error("{file}: the model is not a mapped file, so it cannot be streamed")]
    NotMapped { file: String },
    #[error("{file}: span {offset}+{len} lies outside the file ({file_len} bytes)")]
    OutOfRange {
        file: String,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("{file}: cannot set up streaming: {source}")]
    Open {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: cannot allocate {bytes} bytes for {what}")]
    Alloc {
        file: String,
        bytes: u64,
        what: &'static str,
    },
}

/// How the resident set is held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Every pinned span is locked with `mlock`.
    Locked,
    /// `mlock` was refused (the reason is kept): every pinned span was read once into an
    /// anonymous buffer, which the forward pass reads instead of the mapping.
    Copied(String),
}

/// How the ring reads the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT` through a second open file description of the mapped file.
    Direct,
    /// Buffered `pread` on the mapped descriptor, each range dropped from the page cache after.
    Buffered,
}

const PAGE: u64 = 4096;

/// The most ring memory a streamed span of `len` bytes can take: its read range, widened to
/// whole pages at both ends (`O_DIRECT` reads whole pages into page-aligned buffers).
pub fn slot_bytes(len: u64) -> u64 {
    len.div_ceil(PAGE) * PAGE + PAGE
}

/// Reader threads of a ring: each has one read in flight, so the disk stays busy while
/// another waits to be scheduled (on a loaded machine a woken thread may wait milliseconds).
const READERS: usize = 2;

/// A zero-initialised, page-aligned buffer of anonymous memory, mapped directly (its pages are
/// charged when first written). From [`HUGE`] bytes on it starts on a 2 MiB boundary and asks
/// for transparent huge pages (`MADV_HUGEPAGE`; the kernel falls back to small pages when it has
/// none): an `O_DIRECT` read into physically contiguous memory reaches the device as a few large
/// requests. Into small pages scattered in physical memory (as the pages a run under a tight
/// memory limit gets often are) the same 8 MiB reads went out as ~0.5 MiB requests at 6.5 ms
/// each instead of ~2.8 MiB at 2.5–2.9 ms, and F16 decode at 400 MiB ran 2.7× slower
/// (docs/memory.md).
struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

/// The huge-page size the buffers align to.
const HUGE: usize = 2 << 20;

// SAFETY: PageBuf owns its mapping exclusively, like a Vec<u8>.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only hands out `&[u8]`; writes go through `&mut self` or through the
// ring's protocol (see `Ring::fill`), which gives a reader exclusive use of the range it fills.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> Option<PageBuf> {
        let mapped = Self::mapped_len(len)?;
        let huge = mapped >= HUGE;
        // Room to slide the start to a 2 MiB boundary; the slack is unmapped below.
        let reserve = if huge {
            mapped.checked_add(HUGE)?
        } else {
            mapped
        };
        // SAFETY: a fresh private anonymous mapping (no file, no fixed address); the result is
        // checked for MAP_FAILED before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base.cast::<u8>();
        let head = if huge {
            (base as usize).next_multiple_of(HUGE) - base as usize
        } else {
            0
        };
        let tail = reserve - head - mapped;
        // SAFETY: `head` and `tail` are whole pages of the mapping just made, outside
        // `start..start + mapped`, which stays mapped; advice on that range is only a hint.
        let start = unsafe {
            if head > 0 {
                libc::munmap(base.cast(), head);
            }
            let start = base.add(head);
            if tail > 0 {
                libc::munmap(start.add(mapped).cast(), tail);
            }
            if huge {
                libc::madvise(start.cast(), mapped, libc::MADV_HUGEPAGE);
            }
            start
        };
        Some(PageBuf {
            ptr: std::ptr::NonNull::new(start)?,
            len,
        })
    }

    /// Bytes mapped for a buffer of `len` bytes: whole pages, at least one.
    fn mapped_len(len: usize) -> Option<usize> {
        len.max(1).checked_next_multiple_of(PAGE as usize)
    }

    fn bytes(&self) -> &[u8] {
        self.range(0, self.len)
    }

    /// The `len` bytes from `off`.
    fn range(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the range lies in this buffer's mapping (checked above), zero until written.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// # Safety
    /// The caller must have exclusive use of the buffer (no live `bytes()` slice).
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut_unchecked(&self) -> &mut [u8] {
        // SAFETY: exclusive use of the whole buffer is the caller's contract.
        unsafe { self.range_mut_unchecked(0, self.len) }
    }

    /// # Safety
    /// The caller must have exclusive use of the `len` bytes from `off`: no live slice of
    /// this buffer overlaps them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range_mut_unchecked(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the range lies in this mapping (checked above); exclusive use of it is the
        // caller's contract, and a slice made from the raw pointer borrows nothing else.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let mapped = Self::mapped_len(self.len).expect("it was mapped in `new`");
        // SAFETY: `ptr..ptr + mapped` is the mapping made in `new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), mapped) };
    }
}

/// Read `buf.len()` bytes at `offset` (fewer only at the end of the file).
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The bytes of one weight matrix when they are not read from the mapping: a pinned copy or
/// a filled piece of the ring (its space freed for the readers when this is dropped).
pub struct WeightBytes<'a> {
    bytes: &'a [u8],
    ring: Option<&'a Ring>,
}

impl std::ops::Deref for WeightBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for WeightBytes<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.ring {
            r.release();
        }
    }
}

/// A streamed span in the ring's order, and the page-aligned range read for it.
struct Piece {
    span: Span,
    read_start: u64,
    read_len: usize,
}

/// A sequence number a reader has claimed, and where its piece goes in the ring's buffer.
struct Claim {
    seq: u64,
    /// Byte offset in the buffer (a multiple of the page size) and length of its read range.
    at: usize,
    len: usize,
    /// A reader is writing it; once cleared the piece is there to take (a failed read stops
    /// the ring and reports its error before any piece is looked up).
    busy: bool,
}

/// Where the ring's readers and the forward pass are (at the start: nothing claimed or taken).
#[derive(Default)]
struct RingState {
    /// The next sequence number a reader claims (piece `fill % n`).
    fill: u64,
    /// The claims still holding buffer space, oldest first (in sequence order).
    claims: std::collections::VecDeque<Claim>,
    /// The next sequence number the forward pass takes; space of numbers below it is free once
    /// no reader writes it.
    consume: u64,
    /// A pass owns the cursor: it holds the piece of `consume`, or waits for it.
    held: bool,
    stop: bool,
    /// A read failed: the message, reported to the forward pass.
    error: Option<String>,
    /// How long the forward pass has waited for pieces to be filled, in all.
    waited: Duration,
}

impl RingState {
    /// Drop the claims the forward pass is done with or skipped, oldest first, as far as no
    /// reader still writes one. True when space was freed.
    fn reclaim(&mut self) -> bool {
        let mut freed = false;
        while self
            .claims
            .front()
            .is_some_and(|c| c.seq < self.consume && !c.busy)
        {
            self.claims.pop_front();
            freed = true;
        }
        freed
    }

    /// Where a piece of `len` bytes goes in a buffer of `k` slots of `slot` bytes: right after
    /// the newest claim if its slot has room left, else at the start of the next slot once no
    /// claim is left in it. Every piece fits a slot, so `k` pieces are in flight whatever their
    /// sizes, and more when small ones share a slot.
    fn place(&self, len: usize, slot: usize, k: usize) -> Option<usize> {
        let Some(last) = self.claims.back() else {
            return (len <= slot).then_some(0);
        };
        let end = last.at + last.len;
        let s = last.at / slot;
        if end + len <= (s + 1) * slot {
            return Some(end);
        }
        let next = (s + 1) % k;
        let busy = self.claims.iter().any(|c| c.at / slot == next);
        (!busy && len <= slot).then_some(next * slot)
    }
}

/// Streamed spans read ahead by reader threads into one reused buffer.
pub struct Ring {
    pieces: Vec<Piece>,
    /// Span offset → index in `pieces`.
    index: std::collections::HashMap<u64, usize>,
    /// The pieces in flight: `slots` slots of `slot` bytes, each holding one piece or several
    /// consecutive ones back to back.
    buf: PageBuf,
    slot: usize,
    slots: usize,
    file: File,
    mode: ReadMode,
    name: String,
    state: Mutex<RingState>,
    /// Readers wait here for room to claim (space freed, numbers skipped, or stop).
    readable: Condvar,
    /// The forward pass waits here for its piece to be filled, or for the cursor.
    takeable: Condvar,
}

impl Ring {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'g>(&self, cv: &Condvar, g: MutexGuard<'g, RingState>) -> MutexGuard<'g, RingState> {
        cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    fn piece(&self, seq: u64) -> &Piece {
        &self.pieces[(seq % self.pieces.len() as u64) as usize]
    }

    /// A reader thread: claim the next sequence number where the buffer has room for its piece,
    /// fill that space.
    fn fill(&self) {
        loop {
            let (seq, at) = {
                let mut g = self.lock();
                let at = loop {
                    if g.stop {
                        return;
                    }
                    g.reclaim();
                    // Sequence numbers the forward pass skipped need no reading.
                    g.fill = g.fill.max(g.consume);
                    if let Some(at) = g.place(self.piece(g.fill).read_len, self.slot, self.slots) {
                        break at;
                    }
                    g = self.wait(&self.readable, g);
                };
                let seq = g.fill;
                g.claims.push_back(Claim {
                    seq,
                    at,
                    len: self.piece(seq).read_len,
                    busy: true,
                });
                g.fill += 1;
                (seq, at)
            };
            let piece = self.piece(seq);
            // SAFETY: `at..at + read_len` was free when claimed above (`place` puts a claim only
            // where no other claim's bytes lie) and stays this claim's until it is reclaimed,
            // which needs `busy` cleared: no other reader writes it, and the forward pass gets a
            // slice of it only once `busy` is cleared below.
            let buf = unsafe { self.buf.range_mut_unchecked(at, piece.read_len) };
            let got = read_full(&self.file, buf, piece.read_start);
            let head = (piece.span.offset - piece.read_start) as usize;
            let result = match got {
                Ok(got) if got >= head + piece.span.len as usize => Ok(()),
                Ok(got) => Err(format!(
                    "short read of {} bytes at {} ({} expected)",
                    got,
                    piece.read_start,
                    head + piece.span.len as usize
                )),
                Err(e) => Err(format!("read at {}: {e}", piece.read_start)),
            };
            if self.mode == ReadMode::Buffered {
                // SAFETY: plain system call on a descriptor this ring holds; only advice.
                unsafe {
                    libc::posix_fadvise(
                        self.file.as_raw_fd(),
                        piece.read_start as libc::off_t,
                        piece.read_len as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    )
                };
            }
            let mut g = self.lock();
            if let Some(c) = g.claims.iter_mut().find(|c| c.seq == seq) {
                c.busy = false;
            }
            if let Err(e) = result {
                g.error = Some(e);
                g.stop = true;
            }
            // Wake only who can proceed: a reader woken for nothing is a context switch on a
            // core the forward pass uses (one condition variable for both sides cost each
            // reader ~8 switches per read, against 2 now).
            self.takeable.notify_all();
            if g.stop {
                self.readable.notify_all();
                return;
            }
            // A skipped piece's space is free once its read is done.
            if g.reclaim() {
                self.readable.notify_one();
            }
        }
    }

    /// Wait for the span at `offset` (piece `idx`) and lend its bytes out.
    fn take(&self, idx: usize) -> Result<&[u8], String> {
        let n = self.pieces.len() as u64;
        let mut g = self.lock();
        while g.held {
            g = self.wait(&self.takeable, g);
        }
        // Skip to the next occurrence of `idx` (at most one cycle).
        if g.consume % n != idx as u64 {
            while g.consume % n != idx as u64 {
                g.consume += 1;
            }
            g.reclaim();
            self.readable.notify_all();
        }
        // The cursor is this pass's until it releases the piece: another pass must not move
        // `consume` past the number this one waits for.
        g.held = true;
        let seq = g.consume;
        let mut waited_since = None;
        let at = loop {
            if let Some(e) = g.error.clone() {
                g.held = false;
                self.takeable.notify_one();
                return Err(format!("{}: reading streamed weights: {e}", self.name));
            }
            if let Some(c) = g.claims.iter().find(|c| c.seq == seq && !c.busy) {
                break c.at;
            }
            waited_since.get_or_insert_with(Instant::now);
            g = self.wait(&self.takeable, g);
        };
        if let Some(t) = waited_since {
            g.waited += t.elapsed();
        }
        let p = &self.pieces[idx];
        let head = (p.span.offset - p.read_start) as usize;
        Ok(self.buf.range(at + head, p.span.len as usize))
    }

    /// The forward pass is done with the piece it holds.
    fn release(&self) {
        let mut g = self.lock();
        g.consume += 1;
        g.held = false;
        // Its space is free: a reader may have room now.
        if g.reclaim() {
            self.readable.notify_one();
        }
        // Another pass may be waiting for the cursor.
        self.takeable.notify_one();
    }

    fn stop(&self) {
        let mut g = self.lock();
        g.stop = true;
        self.readable.notify_all();
        self.takeable.notify_all();
    }
}

/// Pinned and streamed spans of one mapped model file. See the module documentation.
pub struct Residency {
    inner: Arc<Inner>,
    pinned: Vec<Span>,
    pinning: Pinning,
    /// Copies of the pinned spans when `mlock` was refused, by span offset.
    copies: std::collections::HashMap<u64, (PageBuf, usize, usize)>,
    ring: Option<Arc<Ring>>,
    ring_readers: Vec<JoinHandle<()>>,
    /// Requests to the advice thread (`None` once dropping, or when nothing is read through
    /// the mapping).
    tx: Mutex<Option<Sender<Msg>>>,
    advisor: Option<JoinHandle<()>>,
    streamed_bytes: u64,
}

/// What the advice thread needs.
struct Inner {
    file: Arc<GgufFile>,
    /// Spans of each step read through the mapping.
    steps: Vec<Vec<Span>>,
    /// Bytes of those spans per step.
    step_bytes: Vec<u64>,
    /// Most bytes asked for ahead of use.
    window: u64,
}

/// A request to the advice thread.
enum Msg {
    Enter(usize),
    Leave(usize),
}

impl Residency {
    /// Pin `pinned` and prepare to stream `steps`, with at most `window` bytes of streamed
    /// data read ahead of use (the ring's buffers).
    pub fn new(
        file: Arc<GgufFile>,
        pinned: Vec<Span>,
        steps: Vec<Vec<Span>>,
        window: u64,
    ) -> Result<Residency, ResidencyError> {
        Self::with_pinning(file, pinned, steps, window, true)
    }

    /// [`Residency::new`], with `lock = false` copying the pinned spans as when `mlock` is
    /// refused.
    pub fn with_pinning(
        file: Arc<GgufFile>,
        pinned: Vec<Span>,
        steps: Vec<Vec<Span>>,
        window: u64,
        lock: bool,
    ) -> Result<Residency, ResidencyError> {
        let name = file.path().display().to_string();
        let Some(mapped) = file.mapped_file().filter(|_| file.is_mapped()) else {
            return Err(ResidencyError::NotMapped { file: name });
        };
        let file_len = file.file_len();
        for s in pinned.iter().chain(steps.iter().flatten()) {
            if s.offset.checked_add(s.len).is_none_or(|end| end > file_len) {
                return Err(ResidencyError::OutOfRange {
                    file: name,
                    offset: s.offset,
                    len: s.len,
                    file_len,
                });
            }
        }
        let open_err = |source| ResidencyError::Open {
            file: name.clone(),
            source,
        };
        let streamed_bytes = steps.iter().flatten().map(|s| s.len).sum();

        // The ring takes every streamed span up to the largest block matrix (steps before
        // the head); larger ones are read through the mapping.
        let n_steps = steps.len();
        let cap = steps[..n_steps.saturating_sub(1)]
            .iter()
            .flatten()
            .map(|s| s.len)
            .max()
            .unwrap_or(0);
        let (mut ring_spans, mut mapped_steps) = (Vec::new(), vec![Vec::new(); n_steps]);
        for (l, spans) in steps.iter().enumerate() {
            for s in spans {
                if s.len <= cap {
                    ring_spans.push(*s);
                } else {
                    mapped_steps[l].push(*s);
                }
            }
        }
        let ring = if ring_spans.is_empty() {
            None
        } else {
            Some(Arc::new(Self::ring(mapped, &name, ring_spans, window)?))
        };
        let mut ring_readers = Vec::new();
        if let Some(r) = &ring {
            for _ in 0..READERS {
                let worker = Arc::clone(r);
                let h = std::thread::Builder::new()
                    .name("ggpt-stream".to_string())
                    .spawn(move || worker.fill())
                    .map_err(open_err);
                match h {
                    Ok(h) => ring_readers.push(h),
                    Err(e) => {
                        r.stop();
                        for h in ring_readers {
                            let _ = h.join();
                        }
                        return Err(e);
                    }
                }
            }
        }

        let step_bytes = mapped_steps
            .iter()
            .map(|v| v.iter().map(|s| s.len).sum())
            .collect();
        let any_mapped = mapped_steps.iter().any(|v| !v.is_empty());
        let inner = Arc::new(Inner {
            file,
            steps: mapped_steps,
            step_bytes,
            window,
        });
        let (pinning, copies) = if lock {
            match inner.lock(&pinned) {
                Ok(()) => (Pinning::Locked, Default::default()),
                Err(e) => (Pinning::Copied(format!("mlock: {e}")), inner.copy(&pinned)?),
            }
        } else {
            (
                Pinning::Copied("copies asked for".to_string()),
                inner.copy(&pinned)?,
            )
        };
        let (tx, advisor) = if any_mapped {
            let (tx, rx) = channel();
            let worker = Arc::clone(&inner);
            let h = std::thread::Builder::new()
                .name("ggpt-advise".to_string())
                .spawn(move || worker.serve(rx))
                .map_err(open_err)?;
            (Some(tx), Some(h))
        } else {
            (None, None)
        };
        Ok(Residency {
            inner,
            pinned,
            pinning,
            copies,
            ring,
            ring_readers,
            tx: Mutex::new(tx),
            advisor,
            streamed_bytes,
        })
    }

    /// The ring for `spans` (in execution order) within `window` bytes of buffers.
    fn ring(
        mapped: &File,
        name: &str,
        spans: Vec<Span>,
        window: u64,
    ) -> Result<Ring, ResidencyError> {
        // O_DIRECT through a new open file description of the same inode; the mapped
        // descriptor itself (buffered) where that is refused (tmpfs, some file systems).
        let proc_path = format!("/proc/self/fd/{}", mapped.as_raw_fd());
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&proc_path)
            .ok()
            .filter(|f| {
                // The probe: one aligned page read must work.
                PageBuf::new(PAGE as usize).is_some_and(|b| {
                    // SAFETY: `b` is a fresh buffer nobody else sees.
                    read_full(f, unsafe { b.bytes_mut_unchecked() }, 0).is_ok()
                })
            });
        let (file, mode) = match direct {
            Some(f) => (f, ReadMode::Direct),
            None => (
                mapped.try_clone().map_err(|source| ResidencyError::Open {
                    file: name.to_string(),
                    source,
                })?,
                ReadMode::Buffered,
            ),
        };
        let pieces: Vec<Piece> = spans
            .iter()
            .map(|s| {
                let start = s.offset / PAGE * PAGE;
                let end = (s.offset + s.len).div_ceil(PAGE) * PAGE;
                Piece {
                    span: *s,
                    read_start: start,
                    read_len: (end - start) as usize,
                }
            })
            .collect();
        // Slots of the largest piece, as many as the window holds: at least two, at most one
        // per piece.
        let slot = pieces.iter().map(|p| p.read_len).max().unwrap_or(0).max(1);
        let slots = (window / slot as u64).clamp(2, pieces.len().max(2) as u64) as usize;
        let buf = PageBuf::new(slot * slots).ok_or(ResidencyError::Alloc {
            file: name.to_string(),
            bytes: (slot * slots) as u64,
            what: "streaming buffers",
        })?;
        let index = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.span.offset, i))
            .collect();
        Ok(Ring {
            pieces,
            index,
            state: Mutex::new(RingState::default()),
            buf,
            slot,
            slots,
            file,
            mode,
            name: name.to_string(),
            readable: Condvar::new(),
            takeable: Condvar::new(),
        })
    }

    /// How the resident set is held.
    pub fn pinning(&self) -> &Pinning {
        &self.pinning
    }

    /// How the ring reads the file (`None` when nothing is streamed through it).
    pub fn read_mode(&self) -> Option<ReadMode> {
        self.ring.as_ref().map(|r| r.mode)
    }

    /// Bytes of the ring's buffers.
    pub fn ring_bytes(&self) -> u64 {
        self.ring.as_ref().map_or(0, |r| r.buf.len as u64)
    }

    /// Bytes kept resident.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned.iter().map(|s| s.len).sum()
    }

    /// Bytes read from the file for each token (every streamed span once).
    pub fn streamed_bytes(&self) -> u64 {
        self.streamed_bytes
    }

    /// How long the forward pass has waited for streamed weights to arrive, since the
    /// residency was set up: near zero when the reads keep ahead of use.
    pub fn waited(&self) -> Duration {
        self.ring
            .as_ref()
            .map_or(Duration::ZERO, |r| r.lock().waited)
    }

    /// The read-ahead window in bytes.
    pub fn window(&self) -> u64 {
        self.inner.window
    }

    /// The bytes of the weight stored at file offset `offset` (`len` bytes) when they are not
    /// to be read from the mapping: a pinned copy, or a streamed span once the reader has it
    /// (waiting for it). `Ok(None)`: read the mapping. `Err`: the streaming read failed.
    pub fn weight(&self, offset: u64, len: u64) -> Result<Option<WeightBytes<'_>>, String> {
        if let Some((buf, head, n)) = self.copies.get(&offset) {
            if *n as u64 == len {
                return Ok(Some(WeightBytes {
                    bytes: &buf.bytes()[*head..*head + *n],
                    ring: None,
                }));
            }
        }
        if let Some(r) = &self.ring {
            if let Some(&idx) = r.index.get(&offset) {
                if r.pieces[idx].span.len == len {
                    let bytes = r.take(idx)?;
                    return Ok(Some(WeightBytes {
                        bytes,
                        ring: Some(r),
                    }));
                }
            }
        }
        Ok(None)
    }

    fn post(&self, m: Msg) {
        if let Ok(guard) = self.tx.lock() {
            if let Some(tx) = guard.as_ref() {
                let _ = tx.send(m);
            }
        }
    }

    /// The forward pass is about to run `step`: have the spans it reads through the mapping
    /// (and the next steps') read ahead, up to the window.
    pub fn enter(&self, step: usize) {
        self.post(Msg::Enter(step));
    }

    /// The forward pass is done with `step`: have its mapped streamed pages released.
    pub fn leave(&self, step: usize) {
        self.post(Msg::Leave(step));
    }

    /// Release every page of the mapping that the forward pass does not read through it (all
    /// streamed spans, and the pinned ones when they are copies), on the calling thread.
    pub fn release_all(&self) {
        for l in 0..self.inner.steps.len() {
            self.inner.leave(l);
        }
        if let Some(r) = &self.ring {
            for p in &r.pieces {
                self.inner.release(&p.span);
            }
        }
        if !self.copies.is_empty() {
            for s in &self.pinned {
                self.inner.release(s);
            }
        }
    }
}

impl Inner {
    /// The advice thread: release and read ahead as the forward pass reports its progress.
    /// Of several queued "entering" reports only the latest matters.
    fn serve(&self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut enter = None;
            let mut m = Some(first);
            while let Some(msg) = m {
                match msg {
                    Msg::Leave(l) => self.leave(l),
                    Msg::Enter(l) => enter = Some(l),
                }
                m = rx.try_recv().ok();
            }
            if let Some(l) = enter {
                self.enter(l);
            }
        }
    }

    /// The address range of `s` in the mapping, widened (`outer`) or narrowed to whole pages.
    fn pages(&self, s: &Span, outer: bool) -> Option<(*mut libc::c_void, usize)> {
        let (start, end) = if outer {
            (
                s.offset / PAGE * PAGE,
                (s.offset + s.len).div_ceil(PAGE) * PAGE,
            )
        } else {
            (
                s.offset.div_ceil(PAGE) * PAGE,
                (s.offset + s.len) / PAGE * PAGE,
            )
        };
        let end = end.min(self.file.file_len().div_ceil(PAGE) * PAGE);
        if end <= start {
            return None;
        }
        // The mapping starts at file offset 0 and is page-aligned, so file offsets and
        // offsets into it are the same.
        let base = self.file.bytes().as_ptr();
        Some((
            base.wrapping_add(start as usize) as *mut _,
            (end - start) as usize,
        ))
    }

    fn lock(&self, pinned: &[Span]) -> Result<(), std::io::Error> {
        for (i, s) in pinned.iter().enumerate() {
            let Some((addr, len)) = self.pages(s, true) else {
                continue;
            };
            // SAFETY: addr..addr+len lies inside the live read-only mapping owned by
            // `self.file` (checked against the file length in `new`, rounded to its pages);
            // mlock only changes whether those pages may be reclaimed.
            if unsafe { libc::mlock(addr, len) } != 0 {
                let err = std::io::Error::last_os_error();
                for s in &pinned[..i] {
                    if let Some((addr, len)) = self.pages(s, true) {
                        // SAFETY: the same ranges that were locked above.
                        unsafe { libc::munlock(addr, len) };
                    }
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Read each pinned span once into an anonymous buffer (same alignment within a page as
    /// in the file), through the mapped descriptor, dropping the file's cached pages after.
    #[allow(clippy::type_complexity)]
    fn copy(
        &self,
        pinned: &[Span],
    ) -> Result<std::collections::HashMap<u64, (PageBuf, usize, usize)>, ResidencyError> {
        let name = self.file.path().display().to_string();
        let f = self
            .file
            .mapped_file()
            .ok_or_else(|| ResidencyError::NotMapped { file: name.clone() })?;
        let mut out = std::collections::HashMap::new();
        for s in pinned {
            let head = (s.offset % PAGE) as usize;
            let buf = PageBuf::new(head + s.len as usize).ok_or(ResidencyError::Alloc {
                file: name.clone(),
                bytes: s.len,
                what: "a resident copy",
            })?;
            // SAFETY: `buf` is owned here and not shared yet.
            let dst = unsafe { buf.bytes_mut_unchecked() };
            let got = read_full(f, &mut dst[head..], s.offset).map_err(|source| {
                ResidencyError::Open {
                    file: name.clone(),
                    source,
                }
            })?;
            if got < s.len as usize {
                return Err(ResidencyError::Open {
                    file: name.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                });
            }
            self.release(s);
            out.insert(s.offset, (buf, head, s.len as usize));
        }
        Ok(out)
    }

    /// Ask the kernel to read `len` bytes at the start of `s` ahead of use.
    fn will_need(&self, s: &Span, len: u64) {
        let part = Span {
            offset: s.offset,
            len: len.min(s.len),
        };
        if let Some((addr, len)) = self.pages(&part, true) {
            // SAFETY: a range of the live mapping (see `pages`); WILLNEED only starts reads.
            unsafe { libc::madvise(addr, len, libc::MADV_WILLNEED) };
        }
    }

    /// Drop the pages of `s` from this process and from the page cache.
    fn release(&self, s: &Span) {
        if let Some((addr, len)) = self.pages(s, false) {
            // SAFETY: a range of the live read-only shared file mapping (see `pages`), narrowed
            // to pages wholly inside the span. DONTNEED on such a mapping only unmaps the pages;
            // the next access reads them from the file again, so no data is lost.
            unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
            if let Some(f) = self.file.mapped_file() {
                // SAFETY: plain system call on the mapped file's descriptor; only advice.
                unsafe {
                    libc::posix_fadvise(
                        f.as_raw_fd(),
                        (addr as usize - self.file.bytes().as_ptr() as usize) as libc::off_t,
                        len as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    )
                };
            }
        }
    }

    /// Read ahead the mapped streamed spans of `step` and the next steps', up to the window.
    fn enter(&self, step: usize) {
        let n = self.steps.len();
        if n == 0 || step >= n {
            return;
        }
        let mut ahead = 0u64;
        for k in 0..n {
            let s = (step + k) % n;
            if self.step_bytes[s] == 0 {
                continue;
            }
            if k > 0 && ahead + self.step_bytes[s] > self.window {
                break;
            }
            for span in &self.steps[s] {
                let room = self.window.saturating_sub(ahead);
                if room == 0 {
                    return;
                }
                self.will_need(span, room);
                ahead += span.len.min(room);
            }
        }
    }

    /// Release the mapped streamed pages of `step`.
    fn leave(&self, step: usize) {
        if let Some(spans) = self.steps.get(step) {
            for s in spans {
                self.release(s);
            }
        }
    }
}

impl Drop for Residency {
    fn drop(&mut self) {
        if let Some(r) = &self.ring {
            r.stop();
        }
        for h in self.ring_readers.drain(..) {
            let _ = h.join();
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.advisor.take() {
            let _ = h.join();
        }
        if self.pinning == Pinning::Locked {
            for s in &self.pinned {
                if let Some((addr, len)) = self.inner.pages(s, true) {
                    // SAFETY: the ranges locked in `new`; the mapping is still alive (the Arc
                    // held here keeps it).
                    unsafe { libc::munlock(addr, len) };
                }
            }
        }
    }
}

impl std::fmt::Debug for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residency")
            .field("pinned_bytes", &self.pinned_bytes())
            .field("streamed_bytes", &self.streamed_bytes())
            .field("window", &self.inner.window)
            .field("ring_bytes", &self.ring_bytes())
            .field("read_mode", &self.read_mode())
            .field("pinning", &self.pinning)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggpt_gguf::{GgmlType, GgufWriter};

    /// A GGUF file with one F32 tensor of `n` values whose bytes follow a pattern, mapped.
    fn file(tag: &str, n: u64) -> (Arc<GgufFile>, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("ggpt-residency-{tag}-{}.gguf", std::process::id()));
        let mut w = GgufWriter::new();
        w.add_tensor("t", &[n], GgmlType::F32).unwrap();
        let data: Vec<u8> = (0..n * 4).map(|i| (i * 7 + i / 4093) as u8).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        w.write_header(&mut f).unwrap();
        w.write_tensor_data(&mut f, 0, &data).unwrap();
        drop(f);
        (Arc::new(GgufFile::open(&path).unwrap()), path)
    }

    #[test]
    fn ring_hands_out_the_file_bytes_in_order_with_skips() {
        let (f, path) = file("ring", 300_000);
        let base = f.data_offset();
        // Unaligned spans of different sizes over three steps; the last is skipped at times.
        let mk = |o: u64, l: u64| Span {
            offset: base + o,
            len: l,
        };
        let steps = vec![
            vec![mk(3, 70_001), mk(70_100, 5_000)],
            vec![mk(100_000, 200_000), mk(300_001, 123_457)],
            vec![mk(500_000, 4_096)],
        ];
        // Room for two of the largest pieces: the readers must wait for the forward pass.
        let r = Residency::new(Arc::clone(&f), Vec::new(), steps.clone(), 420_000).unwrap();
        assert!(r.read_mode().is_some());
        assert_eq!(
            r.streamed_bytes(),
            70_001 + 5_000 + 200_000 + 123_457 + 4_096
        );
        let bytes = f.bytes();
        for round in 0..40 {
            for (l, spans) in steps.iter().enumerate() {
                if l == 2 && round % 3 == 1 {
                    continue;
                }
                for (i, s) in spans.iter().enumerate() {
                    // Sometimes skip a piece too.
                    if round % 5 == 2 && l == 0 && i == 1 {
                        continue;
                    }
                    let got = r.weight(s.offset, s.len).unwrap().expect("streamed");
                    let want = &bytes[s.offset as usize..(s.offset + s.len) as usize];
                    assert!(*got == *want, "round {round} step {l} span {i}");
                }
            }
        }
        // Not streamed: read the mapping.
        assert!(r.weight(base + 1, 10).unwrap().is_none());
        drop(r);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn small_pieces_share_a_slot() {
        let mut st = RingState::default();
        let claim = |seq, at, len| Claim {
            seq,
            at,
            len,
            busy: false,
        };
        // Three slots of 100 bytes. Empty: the first slot, if the piece fits a slot at all.
        assert_eq!(st.place(100, 100, 3), Some(0));
        assert_eq!(st.place(101, 100, 3), None);
        // Right after the newest while its slot has room, else the next slot.
        st.claims.push_back(claim(0, 0, 40));
        assert_eq!(st.place(60, 100, 3), Some(40));
        assert_eq!(st.place(61, 100, 3), Some(100));
        st.claims.push_back(claim(1, 40, 30));
        st.claims.push_back(claim(2, 100, 90));
        st.claims.push_back(claim(3, 200, 50));
        assert_eq!(st.place(50, 100, 3), Some(250));
        // The next slot (wrapping to the first) must hold no claim.
        assert_eq!(st.place(51, 100, 3), None);
        st.consume = 1;
        assert!(st.reclaim());
        assert_eq!(st.place(51, 100, 3), None, "seq 1 still holds slot 0");
        st.consume = 2;
        assert!(st.reclaim());
        assert_eq!(st.place(51, 100, 3), Some(0));
        // A consumed claim still being written holds its slot and everything after it.
        st.claims.front_mut().unwrap().busy = true;
        st.consume = 4;
        assert!(!st.reclaim());
        assert_eq!(st.claims.len(), 2);
        st.claims.front_mut().unwrap().busy = false;
        assert!(st.reclaim());
        assert!(st.claims.is_empty());
    }

    #[test]
    fn concurrent_passes_take_turns() {
        let (f, path) = file("turns", 200_000);
        let base = f.data_offset();
        let spans: Vec<Span> = (0..6)
            .map(|i| Span {
                offset: base + 1 + i * 100_000,
                len: 95_000 - i * 1_000,
            })
            .collect();
        let steps = spans.iter().map(|s| vec![*s]).collect();
        let r = Arc::new(Residency::new(Arc::clone(&f), Vec::new(), steps, 300_000).unwrap());
        // Two passes over every weight at once, as two threads sharing one model would run
        // them: each must get its bytes, and neither may wait for a number the other skipped.
        let (tx, rx) = channel();
        for t in 0..2 {
            let (r, f, spans, tx) = (Arc::clone(&r), Arc::clone(&f), spans.clone(), tx.clone());
            std::thread::spawn(move || {
                for round in 0..30 {
                    for (i, s) in spans.iter().enumerate() {
                        let got = r.weight(s.offset, s.len).unwrap().expect("streamed");
                        let want = &f.bytes()[s.offset as usize..(s.offset + s.len) as usize];
                        assert!(*got == *want, "thread {t} round {round} span {i}");
                    }
                }
                tx.send(t).unwrap();
            });
        }
        for _ in 0..2 {
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("a pass waited for a read that never comes, or failed");
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn copies_hold_the_pinned_bytes() {
        let (f, path) = file("copy", 100_000);
        let base = f.data_offset();
        let pinned = vec![
            Span {
                offset: base + 17,
                len: 50_000,
            },
            Span {
                offset: base + 60_000,
                len: 300_000,
            },
        ];
        let r =
            Residency::with_pinning(Arc::clone(&f), pinned.clone(), Vec::new(), 0, false).unwrap();
        assert!(matches!(r.pinning(), Pinning::Copied(_)));
        assert_eq!(r.read_mode(), None);
        for s in &pinned {
            let got = r.weight(s.offset, s.len).unwrap().expect("copied");
            assert!(*got == f.bytes()[s.offset as usize..(s.offset + s.len) as usize]);
            // The copy keeps the file's alignment within a page.
            assert_eq!(got.as_ptr() as u64 % PAGE, s.offset % PAGE);
        }
        drop(r);
        let _ = std::fs::remove_file(path);
    }
}
