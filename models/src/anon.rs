//! Anonymous memory that becomes resident only where it is written, and whose pages can be
//! handed back. The KV cache and the activation scratch live in it, so the memory a session
//! holds follows the tokens it runs, whatever the allocator would do with a `Vec`
//! (docs/memory.md).

use half::f16;

/// The element types the memory is viewed as: plain values for which every bit pattern
/// (including the all-zero pages the kernel supplies) is valid.
pub(crate) trait Elem: Copy {}
impl Elem for f32 {}
impl Elem for f16 {}

/// A fixed-size anonymous mapping, zero until written, huge pages off.
pub(crate) struct AnonMap {
    map: memmap2::MmapMut,
}

impl AnonMap {
    /// Reserve `bytes` of address space (no memory is used until pages are written). `what`
    /// names the use in the error.
    pub(crate) fn new(bytes: usize, what: &str) -> Result<AnonMap, String> {
        let map = memmap2::MmapOptions::new()
            .len(bytes.max(1))
            .map_anon()
            .map_err(|e| {
                format!(
                    "cannot reserve {:.1} MiB of address space for the {what}: {e}",
                    bytes as f64 / (1024.0 * 1024.0)
                )
            })?;
        // Huge pages would make the first value stored in each 2 MiB resident all at once.
        // Advisory: where the kernel refuses, the memory works the same, only coarser.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::NoHugePage);
        Ok(AnonMap { map })
    }

    /// The mapping viewed as `T`s.
    pub(crate) fn elems<T: Elem>(&self) -> &[T] {
        // SAFETY: an anonymous mapping is page-aligned (more than any `T` needs) and `len`
        // bytes long, all initialised (zero until written); `T: Elem` accepts every bit
        // pattern. The slice borrows `self`, so the mapping outlives it.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().cast::<T>(),
                self.map.len() / std::mem::size_of::<T>(),
            )
        }
    }

    /// [`elems`](Self::elems), mutable.
    pub(crate) fn elems_mut<T: Elem>(&mut self) -> &mut [T] {
        // SAFETY: as in `elems`; the mutable borrow of `self` makes this the only view.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_mut_ptr().cast::<T>(),
                self.map.len() / std::mem::size_of::<T>(),
            )
        }
    }

    /// Copy the bytes `src` to byte offset `dest` (the ranges may overlap).
    pub(crate) fn copy_within(&mut self, src: std::ops::Range<usize>, dest: usize) {
        self.map.copy_within(src, dest);
    }

    /// Give the whole pages inside the byte range `start..end` back to the kernel (the
    /// partial pages at its ends stay); they read as zeros afterwards and use no memory
    /// until written again.
    pub(crate) fn release(&mut self, start: usize, end: usize) {
        let page = page_size();
        let start = start.next_multiple_of(page);
        let end = end.min(self.map.len()) / page * page;
        if end > start {
            // SAFETY: the `&mut self` borrow means no slice of the mapping is alive, and the
            // dropped pages read back as zeros, a valid value of every `Elem`.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

/// The kernel's page size (4 KiB where it cannot be read).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&p| p > 0).unwrap_or(4096)
}
