//! Large buffers backed by transparent huge pages.
//!
//! Batch-1 decode streams every weight once per token: hundreds of megabytes, which in
//! 4 KiB pages is a TLB miss (and a page walk) every 4 KiB of the stream. Measured on the
//! 2-core development VM, gpt2 decode went from 42 to 56 tokens/s at f32 when the weights
//! sat in 2 MiB pages. Linux gives an anonymous mapping huge pages at first touch when it
//! is advised (`MADV_HUGEPAGE`) and the kernel's policy is `madvise` or `always` (a common
//! default is `madvise`, where nothing else would get them), so on Linux a [`HugeBuf`] of
//! at least [`HUGE_MIN_BYTES`] is its own 2 MiB-aligned mapping, advised before anything
//! touches it (through the global allocator it could land in heap pages already faulted in
//! small). Elsewhere, or for smaller buffers, it is an ordinary zeroed allocation.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Size of a huge page on x86-64 and most arm64 Linux kernels.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Buffers at least this large are put in huge pages; smaller ones would waste most of a
/// 2 MiB page.
pub const HUGE_MIN_BYTES: usize = 1 << 20;

/// Element types whose all-zero bytes are a valid value (a [`HugeBuf`] starts zeroed).
///
/// # Safety
/// Every value of the type may be all zero bytes, and it has no drop glue.
pub unsafe trait Zeroable: Copy {}

// SAFETY: plain numbers; zero bytes are 0.
unsafe impl Zeroable for f32 {}
// SAFETY: as above.
unsafe impl Zeroable for u16 {}
// SAFETY: as above.
unsafe impl Zeroable for u8 {}

/// A fixed-length, zero-initialised buffer, in huge pages when large (see the module).
pub struct HugeBuf<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    memory: Memory,
}

/// Where a buffer's bytes came from, and so how they are given back.
enum Memory {
    /// The global allocator, with this layout.
    Heap(Layout),
    /// Its own anonymous mapping of this many bytes (Linux, large buffers).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Mapped(usize),
}

// SAFETY: the buffer owns its elements like a `Vec<T>`.
unsafe impl<T: Zeroable + Send> Send for HugeBuf<T> {}
// SAFETY: shared access only reads, like `&[T]`.
unsafe impl<T: Zeroable + Sync> Sync for HugeBuf<T> {}

impl<T: Zeroable> HugeBuf<T> {
    /// `len` zero values.
    ///
    /// # Panics
    /// When the size overflows or the memory cannot be had, as `vec![0; len]` does.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("HugeBuf size overflows usize");
        if bytes >= HUGE_MIN_BYTES {
            if let Some((ptr, mapped)) = map_huge(bytes) {
                return HugeBuf {
                    ptr: ptr.cast(),
                    len,
                    memory: Memory::Mapped(mapped),
                };
            }
        }
        // One byte at least: a zero-size allocation is not allowed.
        let layout =
            Layout::from_size_align(bytes.max(1), std::mem::align_of::<T>()).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            alloc::handle_alloc_error(layout)
        };
        HugeBuf {
            ptr,
            len,
            memory: Memory::Heap(layout),
        }
    }

    /// The values.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised values (zeroed at creation, and zero bytes
        // are a valid `T`) for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Mutable access.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A fresh anonymous mapping of at least `bytes`, 2 MiB aligned and advised for huge
/// pages before anything touches it (fresh mappings read as zero): the start and the
/// mapped length. `None` where mapping fails (the caller falls back to the heap).
#[cfg(target_os = "linux")]
fn map_huge(bytes: usize) -> Option<(NonNull<u8>, usize)> {
    let size = bytes.checked_next_multiple_of(HUGE_PAGE_BYTES)?;
    let reserve = size.checked_add(HUGE_PAGE_BYTES)?;
    // SAFETY: a new private anonymous mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
    let (head, tail) = (aligned - start, reserve - (aligned - start) - size);
    // SAFETY: both ranges are page-aligned parts of the mapping just made, outside
    // [aligned, aligned + size), which is kept; unmapping them touches nothing else.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: where the kernel refuses or has no transparent huge pages, small
        // pages serve as before.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    Some((NonNull::new(aligned as *mut u8)?, size))
}

#[cfg(not(target_os = "linux"))]
fn map_huge(_bytes: usize) -> Option<(NonNull<u8>, usize)> {
    None
}

impl<T: Zeroable> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        match self.memory {
            // SAFETY: allocated in `zeroed` with exactly this layout; `T` has no drop glue.
            Memory::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) },
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping `map_huge` made, of this length, used by nothing else.
            Memory::Mapped(size) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), size);
            },
            #[cfg(not(target_os = "linux"))]
            Memory::Mapped(_) => unreachable!("only Linux maps buffers"),
        }
    }
}

impl<T: Zeroable> Clone for HugeBuf<T> {
    fn clone(&self) -> Self {
        let mut copy = HugeBuf::zeroed(self.len);
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        copy
    }
}

impl<T: Zeroable> Deref for HugeBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Zeroable> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_zeroed_aligned_and_hold_their_values() {
        for len in [0usize, 1, 1000, HUGE_MIN_BYTES / 4 + 3] {
            let mut b = HugeBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            if cfg!(target_os = "linux") && len * 4 >= HUGE_MIN_BYTES {
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
            }
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as f32;
            }
            let c = b.clone();
            drop(b);
            assert!(c.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }
}
