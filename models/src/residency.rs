//! Weights that do not all fit in the memory a run is given: which byte ranges of the mapped
//! file stay resident, and how the rest is streamed through a small window.
//!
//! A [`Residency`] is built from a plan (`ggpt::budget` decides which tensors go where):
//! - **pinned** spans are locked into memory with `mlock` once, when the residency is created,
//!   so the kernel's page reclaim never takes them, however many streamed pages pass by;
//! - **streamed** spans are listed per *step* of the forward pass (step `l` < n_layer is block
//!   `l`, step n_layer is the output head). Entering a step asks the kernel to read ahead
//!   (`MADV_WILLNEED`) the streamed spans of that step and of the following ones, cyclically
//!   (the head is followed by the next token's block 0), up to `window` bytes; leaving a step
//!   drops that step's pages from this process's page tables (`MADV_DONTNEED`) and from the
//!   page cache (`POSIX_FADV_DONTNEED`), so streamed data never accumulates and never pushes
//!   the resident set out.
//!
//! The advice is given by a reader thread of the residency's own, so that allocating pages for
//! read-ahead (and reclaiming them, at the limit) happens beside the forward pass, not in it;
//! the forward pass only posts "entering step l" / "done with step l". If the thread falls
//! behind, stale read-ahead requests are skipped.
//!
//! Every call only advises the kernel: the mapping stays valid and readable at all times, so a
//! page that was dropped too early (two sessions at different steps) is simply read again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
    #[error("{file}: cannot open for read-ahead advice: {source}")]
    Open {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the resident set is held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Every pinned span is locked with `mlock`.
    Locked,
    /// `mlock` was refused (e.g. `RLIMIT_MEMLOCK` for an unprivileged user): the spans are
    /// read once and stay resident only as long as nothing else pushes them out. Streamed
    /// pages are still released after use, so in practice they stay.
    Unlocked(String),
}

/// Pinned and streamed spans of one mapped model file. See the module documentation.
pub struct Residency {
    inner: Arc<Inner>,
    pinned: Vec<Span>,
    pinning: Pinning,
    /// Requests to the reader thread (`None` once dropping).
    tx: Mutex<Option<Sender<Msg>>>,
    reader: Option<JoinHandle<()>>,
}

/// What the reader thread needs.
struct Inner {
    file: Arc<GgufFile>,
    /// A second descriptor of the mapped file, for `posix_fadvise`.
    fd: File,
    /// Streamed spans of each step.
    steps: Vec<Vec<Span>>,
    /// Bytes of streamed spans per step.
    step_bytes: Vec<u64>,
    /// Most streamed bytes asked for ahead of use.
    window: u64,
}

/// A request to the reader thread.
enum Msg {
    Enter(usize),
    Leave(usize),
}

const PAGE: u64 = 4096;

impl Residency {
    /// Pin `pinned` (reading it once) and prepare to stream `steps`, keeping at most `window`
    /// bytes of streamed data in flight.
    pub fn new(
        file: Arc<GgufFile>,
        pinned: Vec<Span>,
        steps: Vec<Vec<Span>>,
        window: u64,
    ) -> Result<Residency, ResidencyError> {
        let name = file.path().display().to_string();
        if !file.is_mapped() {
            return Err(ResidencyError::NotMapped { file: name });
        }
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
        let fd = File::open(file.path()).map_err(|source| ResidencyError::Open {
            file: name.clone(),
            source,
        })?;
        let step_bytes = steps
            .iter()
            .map(|v| v.iter().map(|s| s.len).sum())
            .collect();
        let inner = Arc::new(Inner {
            file,
            fd,
            steps,
            step_bytes,
            window,
        });
        let pinning = inner.lock(&pinned);
        let (tx, rx) = channel();
        let worker = Arc::clone(&inner);
        let reader = std::thread::Builder::new()
            .name("ggpt-stream".to_string())
            .spawn(move || worker.serve(rx))
            .map_err(|source| ResidencyError::Open {
                file: name.clone(),
                source,
            })?;
        Ok(Residency {
            inner,
            pinned,
            pinning,
            tx: Mutex::new(Some(tx)),
            reader: Some(reader),
        })
    }

    /// How the resident set is held.
    pub fn pinning(&self) -> &Pinning {
        &self.pinning
    }

    /// Bytes kept resident.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned.iter().map(|s| s.len).sum()
    }

    /// Bytes read from the file for each token (every streamed span once).
    pub fn streamed_bytes(&self) -> u64 {
        self.inner.step_bytes.iter().sum()
    }

    /// The read-ahead window in bytes.
    pub fn window(&self) -> u64 {
        self.inner.window
    }

    fn post(&self, m: Msg) {
        if let Ok(guard) = self.tx.lock() {
            if let Some(tx) = guard.as_ref() {
                let _ = tx.send(m);
            }
        }
    }

    /// The forward pass is about to run `step`: have its streamed spans and the next steps'
    /// read ahead, up to the window.
    pub fn enter(&self, step: usize) {
        self.post(Msg::Enter(step));
    }

    /// The forward pass is done with `step`: have its streamed pages released.
    pub fn leave(&self, step: usize) {
        self.post(Msg::Leave(step));
    }

    /// Release every streamed page now, on the calling thread.
    pub fn release_all(&self) {
        for l in 0..self.inner.steps.len() {
            self.inner.leave(l);
        }
    }
}

impl Inner {
    /// The reader thread: release and read ahead as the forward pass reports its progress.
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

    fn lock(&self, pinned: &[Span]) -> Pinning {
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
                return Pinning::Unlocked(format!("mlock: {err}"));
            }
        }
        Pinning::Locked
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
            // SAFETY: plain system call on a descriptor this struct owns.
            unsafe {
                libc::posix_fadvise(
                    self.fd.as_raw_fd(),
                    (addr as usize - self.file.bytes().as_ptr() as usize) as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }

    /// Read ahead the streamed spans of `step` and the next steps', up to the window.
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

    /// Release the streamed pages of `step`.
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
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
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
            .field("pinning", &self.pinning)
            .finish()
    }
}
