//! Zeroed buffers placed for a memory-bound loop: f32 ([`AlignedBuf`]) and the compact
//! storage types (bf16, f16, 8-bit codes), all through one [`Aligned`].
//!
//! Buffers of 2 MiB or more are 2 MiB-aligned and, on Linux, advised `MADV_HUGEPAGE`:
//! where transparent huge pages are opt-in (`[madvise]`, the common default) this is what
//! turns them on, and on the development machine a read-4/write-3 f32 loop ran 1.7× faster
//! over such buffers. Smaller buffers are 64-byte (cache-line) aligned.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use lamb_core::half::{bf16, f16};

/// Alignment of large buffers: one x86-64/aarch64 transparent huge page.
pub const HUGE_PAGE: usize = 2 << 20;
/// Alignment of small buffers: one cache line.
pub const CACHE_LINE: usize = 64;

/// How an [`AlignedBuf`] was placed, for benchmark reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// 2 MiB-aligned, `madvise(MADV_HUGEPAGE)` accepted by the kernel.
    HugePages,
    /// 2 MiB-aligned, but the advice was refused or is not available on this OS.
    HugeAligned,
    /// 64-byte aligned (buffers under 2 MiB).
    CacheLine,
}

mod sealed {
    pub trait Sealed {}
}

/// An element type of [`Aligned`]: plain data whose all-zero bytes are the value zero
/// (`f32`, `bf16`, `f16`, `u8`). Sealed: `Aligned` zeroes memory bytewise, which is sound
/// only for such types.
pub trait Element: sealed::Sealed + Copy + PartialEq + Send + Sync + 'static {
    /// The value of its `size_of::<Self>()` little-endian bytes (how checkpoints store it).
    fn from_le(bytes: &[u8]) -> Self;
}

impl sealed::Sealed for f32 {}
impl Element for f32 {
    fn from_le(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}
impl sealed::Sealed for bf16 {}
impl Element for bf16 {
    fn from_le(b: &[u8]) -> bf16 {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}
impl sealed::Sealed for f16 {}
impl Element for f16 {
    fn from_le(b: &[u8]) -> f16 {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}
impl sealed::Sealed for u8 {}
impl Element for u8 {
    fn from_le(b: &[u8]) -> u8 {
        b[0]
    }
}

/// A zero-initialised, heap-allocated `[f32]` with the placement described in the module docs.
pub type AlignedBuf = Aligned<f32>;

/// A zero-initialised, heap-allocated `[T]` with the placement described in the module docs
/// (compact moments use it too, so that they get huge pages like f32 state).
pub struct Aligned<T: Element> {
    ptr: NonNull<T>,
    len: usize,
    placement: Placement,
}

// SAFETY: Aligned owns its allocation exclusively, like Vec<T>, and T: Send.
unsafe impl<T: Element> Send for Aligned<T> {}
// SAFETY: shared access only reads, like &[T], and T: Sync.
unsafe impl<T: Element> Sync for Aligned<T> {}

impl<T: Element> Aligned<T> {
    /// Overwrites the elements with those of `src`, little-endian bytes (as many as fit:
    /// the caller checked that `src` holds exactly `self.len()` elements).
    pub fn copy_from_le_bytes(&mut self, src: &[u8]) {
        for (d, s) in self.iter_mut().zip(src.chunks_exact(size_of::<T>())) {
            *d = T::from_le(s);
        }
    }

    /// `len` zeros.
    ///
    /// # Panics
    /// Aborts the process if the allocator has no memory for it, like `Vec` (use
    /// [`Aligned::try_zeroed`] for an error instead), and panics if its size overflows `isize`.
    pub fn zeroed(len: usize) -> Aligned<T> {
        match Self::try_zeroed(len) {
            Ok(b) => b,
            Err(AllocError {
                layout: Some(layout),
                ..
            }) => handle_alloc_error(layout),
            Err(e) => panic!("{e}"),
        }
    }

    /// `len` zeros, or an [`AllocError`] if the allocator has no memory for them (or their
    /// size overflows `isize`): never an abort. Optimizer state is allocated this way, so
    /// that a model too large for the machine is an error the caller can handle.
    pub fn try_zeroed(len: usize) -> Result<Aligned<T>, AllocError> {
        let overflow = AllocError {
            bytes: len.checked_mul(size_of::<T>()),
            layout: None,
        };
        let bytes = overflow.bytes.ok_or(overflow)?;
        if bytes == 0 {
            return Ok(Aligned {
                ptr: NonNull::dangling(),
                len: 0,
                placement: Placement::CacheLine,
            });
        }
        let layout = Self::layout(bytes, Self::align_for(bytes)).ok_or(overflow)?;
        let failed = AllocError {
            bytes: Some(layout.size()),
            layout: Some(layout),
        };
        let (raw, placement) = if layout.align() == HUGE_PAGE {
            // Advise before the first touch: `alloc_zeroed` of an over-aligned layout writes
            // every page (as 4 KiB pages) before the advice could apply. So: allocate, advise,
            // then zero, which faults the memory in as huge pages where the OS gives them.
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc(layout) };
            if raw.is_null() {
                return Err(failed);
            }
            let placement = advise_huge_pages(raw, layout.size());
            // SAFETY: `raw` is a live allocation of `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(raw, 0, layout.size()) };
            (raw, placement)
        } else {
            // SAFETY: the layout has a non-zero size.
            (unsafe { alloc_zeroed(layout) }, Placement::CacheLine)
        };
        // The zero bytes written above are `len` zeros of T (`Element`'s contract); the
        // alignment (64 or 2 MiB) is a multiple of T's.
        let ptr = NonNull::new(raw.cast::<T>()).ok_or(failed)?;
        Ok(Aligned {
            ptr,
            len,
            placement,
        })
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[T]) -> Aligned<T> {
        let mut b = Aligned::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// How this buffer was placed (the benches report it; the optimizer has no use for it).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The alignment of a buffer of `bytes` bytes (see the module docs).
    fn align_for(bytes: usize) -> usize {
        if bytes >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            CACHE_LINE
        }
    }

    /// The allocation of a buffer of `bytes` bytes: its size rounded up to the alignment so
    /// that a huge-page advice covers whole pages. `None` if that overflows `isize`.
    fn layout(bytes: usize, align: usize) -> Option<Layout> {
        let size = bytes.checked_next_multiple_of(align)?;
        Layout::from_size_align(size, align).ok()
    }
}

/// A buffer the allocator could not provide (from [`Aligned::try_zeroed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocError {
    /// The bytes asked for (rounded up to the alignment); `None` if they overflow `usize`.
    bytes: Option<usize>,
    /// The allocation asked for; `None` if its size overflows `isize`.
    layout: Option<Layout>,
}

impl AllocError {
    /// The bytes that were asked for, or `None` if the size overflows `usize`.
    pub fn bytes(&self) -> Option<usize> {
        self.bytes
    }
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.bytes, self.layout) {
            (Some(b), Some(_)) => write!(f, "could not allocate {b} bytes"),
            (Some(b), None) => write!(f, "{b} bytes is more than isize::MAX"),
            (None, _) => write!(f, "the buffer's size overflows usize"),
        }
    }
}

impl std::error::Error for AllocError {}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) -> Placement {
    // SAFETY: [ptr, ptr + len) is one live allocation of ours, aligned to 2 MiB (a multiple
    // of the page size); MADV_HUGEPAGE only changes how the kernel backs it.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc == 0 {
        Placement::HugePages
    } else {
        Placement::HugeAligned
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) -> Placement {
    Placement::HugeAligned
}

impl<T: Element> Drop for Aligned<T> {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let bytes = self.len * size_of::<T>();
        // `try_zeroed` computed this same layout and allocated with it.
        let Some(layout) = Self::layout(bytes, Self::align_for(bytes)) else {
            return;
        };
        // SAFETY: allocated in `try_zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr().cast(), layout) }
    }
}

impl<T: Element> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr is valid for len initialised T (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Element> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Element> Clone for Aligned<T> {
    fn clone(&self) -> Aligned<T> {
        Aligned::from_slice(self)
    }
}

impl<T: Element> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("placement", &self.placement)
            .finish()
    }
}

impl<T: Element> PartialEq for Aligned<T> {
    fn eq(&self, other: &Aligned<T>) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_f32_buffer_is_zeroed_huge_aligned_and_writable() {
        let mut b = AlignedBuf::zeroed(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        b[3] = 1.5;
        assert_eq!(b.iter().sum::<f32>(), 1.5);
    }

    #[test]
    fn a_2_mib_bf16_buffer_is_huge_aligned_and_zeroed() {
        let b = Aligned::<bf16>::zeroed(1 << 20);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(b.iter().all(|x| *x == bf16::ZERO));
    }

    #[test]
    fn try_zeroed_refuses_sizes_past_isize_and_usize() {
        assert_eq!(AlignedBuf::try_zeroed(1000).unwrap().len(), 1000);
        // More bytes than isize::MAX: refused before asking the allocator.
        let e = AlignedBuf::try_zeroed(usize::MAX / 4).unwrap_err();
        assert_eq!(e.bytes(), Some(usize::MAX / 4 * 4));
        // A size that overflows usize.
        assert_eq!(
            AlignedBuf::try_zeroed(usize::MAX).unwrap_err().bytes(),
            None
        );
    }

    /// Huge pages actually back a large buffer when the kernel offers them (THP `always` or
    /// `madvise`): the advice must come before the first touch. Reads the buffer's own
    /// mapping in /proc/self/smaps.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_get_huge_pages_where_offered() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            println!("SKIPPED: transparent huge pages are off here ({thp:?})");
            return;
        }
        let b = AlignedBuf::zeroed(64 << 20); // 256 MiB
        assert_eq!(b.placement(), Placement::HugePages);
        let start = b.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut huge_kb = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = lo <= start && start < hi;
                continue;
            }
            if in_range && let Some(v) = line.strip_prefix("AnonHugePages:") {
                huge_kb += v
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<usize>()
                    .unwrap_or(0);
            }
        }
        println!("AnonHugePages in the buffer's mapping: {huge_kb} kB of 262144");
        // The kernel may refuse under memory pressure; most of it should be huge here.
        assert!(huge_kb >= 128 * 1024, "only {huge_kb} kB of huge pages");
        // Compact storage takes the same path.
        let codes = Aligned::<u8>::zeroed(4 << 20);
        assert_eq!(codes.placement(), Placement::HugePages);
        assert_eq!(codes.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(codes.iter().all(|&c| c == 0));
    }

    /// A buffer beyond any 64-bit address space (2^60 bytes, within `isize`): the allocator
    /// returns null, which is an `Err` with the size, not an abort.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_allocation_the_machine_cannot_make_is_an_error() {
        for len in [1usize << 60, (1 << 60) + 3] {
            let e = Aligned::<u8>::try_zeroed(len).unwrap_err();
            assert_eq!(e.bytes(), Some((len).next_multiple_of(HUGE_PAGE)));
            assert!(e.to_string().contains("could not allocate"), "{e}");
        }
        let e = AlignedBuf::try_zeroed(1 << 60).unwrap_err();
        assert_eq!(e.bytes(), Some(1 << 62));
        // And the allocator still serves ordinary requests.
        assert_eq!(AlignedBuf::try_zeroed(HUGE_PAGE).unwrap().len(), HUGE_PAGE);
    }

    #[test]
    fn every_element_type_is_zeroed_and_aligned() {
        fn check<T: Element + std::fmt::Debug>(zero: T) {
            for len in [0, 1, 1000, (HUGE_PAGE / size_of::<T>()) + 3] {
                let b = Aligned::<T>::zeroed(len);
                assert_eq!(b.len(), len);
                assert!(b.iter().all(|x| *x == zero), "{len}");
                let align = if len * size_of::<T>() >= HUGE_PAGE {
                    HUGE_PAGE
                } else {
                    CACHE_LINE
                };
                assert!(
                    len == 0 || (b.as_ptr() as usize).is_multiple_of(align),
                    "{len}"
                );
                assert_eq!(b.clone(), b);
            }
        }
        check(0.0f32);
        check(bf16::ZERO);
        check(f16::ZERO);
        check(0u8);
    }
}
