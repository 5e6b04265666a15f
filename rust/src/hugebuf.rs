//! Zero-initialised buffers for the large sort arrays, backed by 2 MB transparent
//! huge pages where Linux allows it, and fallible zeroed `Vec`s.
//!
//! A radix scatter writes to thousands of places in an 8 MB buffer at once: with
//! 4 KB pages nearly every write misses the TLB, and the fresh pages cost one fault
//! each. Huge pages cut both by 512x. The buffer is mapped 2 MB-aligned and marked
//! `MADV_HUGEPAGE` (needed when THP is in `madvise` mode); if the kernel declines,
//! it is an ordinary zeroed mapping. Elsewhere (or if `mmap` fails) it is a `Vec`.
//!
//! Every allocation here is fallible: a refusal (address space limit, no memory)
//! is an [`AllocError`], never an abort, so callers can report it.

use std::ops::{Deref, DerefMut};

/// Element types whose all-zero bit pattern is a valid value.
///
/// # Safety
/// Implement only for such types (plain integers and floats).
pub unsafe trait Zeroed: Copy + Send + Sync {}
// SAFETY: every bit pattern of an integer is valid.
unsafe impl Zeroed for u32 {}
// SAFETY: as above.
unsafe impl Zeroed for u64 {}
// SAFETY: as above.
unsafe impl Zeroed for i32 {}
// SAFETY: all-zero bits are +0.0.
unsafe impl Zeroed for f32 {}

/// The system refused an allocation of `bytes` bytes (`usize::MAX`: the size overflows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError {
    pub bytes: usize,
}

/// `len` zeros in a `Vec`, or an [`AllocError`] instead of aborting.
///
/// Like `vec![0; len]` it asks the allocator for zeroed memory (`calloc`: large
/// blocks are fresh pages, zero without being written).
pub fn try_zeroed_vec<T: Zeroed>(len: usize) -> Result<Vec<T>, AllocError> {
    let layout =
        std::alloc::Layout::array::<T>(len).map_err(|_| AllocError { bytes: usize::MAX })?;
    if layout.size() == 0 {
        // Zero-sized: no allocation (`Vec` uses a dangling pointer).
        return Ok(vec![zero::<T>(); len]);
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(AllocError {
            bytes: layout.size(),
        });
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[T; len]`
    // (the capacity), and its `len` elements are zero, a valid `T` (`T: Zeroed`).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// A `[T]` of fixed length, initially all zeros.
pub struct HugeBuf<T: Zeroed> {
    inner: Inner<T>,
}

enum Inner<T> {
    Heap(Vec<T>),
    #[cfg(target_os = "linux")]
    Map {
        base: *mut libc::c_void,
        map_len: usize,
        ptr: *mut T,
        len: usize,
    },
}

// SAFETY: the mapping is owned exclusively by this value (like a `Vec`'s heap
// block), and `T` is `Send + Sync`.
unsafe impl<T: Zeroed> Send for HugeBuf<T> {}
// SAFETY: as above; shared access only hands out `&[T]`.
unsafe impl<T: Zeroed> Sync for HugeBuf<T> {}

#[cfg(target_os = "linux")]
const HUGE: usize = 2 << 20;

impl<T: Zeroed> HugeBuf<T> {
    /// `len` zeros: a huge-page mapping where possible, else a heap block; an
    /// [`AllocError`] if neither can be had.
    pub fn try_zeroed(len: usize) -> Result<HugeBuf<T>, AllocError> {
        #[cfg(target_os = "linux")]
        if let Some(b) = Self::map(len) {
            return Ok(b);
        }
        Ok(HugeBuf {
            inner: Inner::Heap(try_zeroed_vec(len)?),
        })
    }

    /// Anonymous mapping, 2 MB-aligned inside a slightly larger one; `None` for
    /// small sizes (a `Vec` is as good) or if the kernel refuses the mapping (the
    /// caller then tries the heap, which reports a refusal in turn).
    #[cfg(target_os = "linux")]
    fn map(len: usize) -> Option<HugeBuf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        if bytes < HUGE {
            return None;
        }
        let map_len = bytes.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let skip = (HUGE - base as usize % HUGE) % HUGE;
        // SAFETY: `skip < HUGE`, so `ptr..ptr + bytes` lies inside the mapping.
        let ptr = unsafe { (base as *mut u8).add(skip) } as *mut T;
        // SAFETY: advice on our own mapping; a failure (e.g. THP disabled) only
        // leaves ordinary pages, so the result is ignored.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
        }
        Some(HugeBuf {
            inner: Inner::Map {
                base,
                map_len,
                ptr,
                len,
            },
        })
    }
}

/// The zero value of `T`.
fn zero<T: Zeroed>() -> T {
    // SAFETY: `T: Zeroed`.
    unsafe { std::mem::zeroed() }
}

impl<T: Zeroed> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Heap(v) => v,
            // SAFETY: the mapping is readable, aligned for `T` (2 MB-aligned), zero-filled
            // by the kernel (a valid `T`) and lives as long as `self`.
            #[cfg(target_os = "linux")]
            Inner::Map { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl<T: Zeroed> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            #[cfg(target_os = "linux")]
            Inner::Map { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

impl<T: Zeroed> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Inner::Map { base, map_len, .. } = self.inner {
            // SAFETY: unmaps exactly the mapping made in `map`, no longer referenced.
            unsafe {
                libc::munmap(base, map_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_writable_any_size() {
        for len in [0usize, 1, 1000, 300_000, (2 << 20) / 8 + 3] {
            let mut b = HugeBuf::<u64>::try_zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as u64;
            }
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u64));
        }
        let b = HugeBuf::<u32>::try_zeroed(1 << 20).unwrap();
        assert_eq!(b.iter().map(|&x| x as u64).sum::<u64>(), 0);
        for len in [0usize, 1, 5000, 1 << 20] {
            let v = try_zeroed_vec::<f32>(len).unwrap();
            assert_eq!((v.len(), v.capacity()), (len, len));
            assert!(v.iter().all(|&x| x.to_bits() == 0));
        }
    }

    #[test]
    fn refusals_are_errors_not_aborts() {
        // Sizes no system grants (an eighth of the address space), and overflow.
        let big = usize::MAX / 64;
        assert_eq!(
            try_zeroed_vec::<u64>(big).unwrap_err(),
            AllocError { bytes: big * 8 }
        );
        assert!(HugeBuf::<u64>::try_zeroed(big).is_err());
        assert_eq!(
            try_zeroed_vec::<u32>(usize::MAX / 2).unwrap_err(),
            AllocError { bytes: usize::MAX }
        );
        assert!(HugeBuf::<u64>::try_zeroed(usize::MAX / 4).is_err());
    }
}
