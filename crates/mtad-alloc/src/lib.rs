//! The binaries' memory allocator: large blocks are kept for reuse instead of handed back to the
//! operating system.
//!
//! A training step allocates and frees the same large tensors (activations, their gradients,
//! patch matrices) every time it runs. The system allocator maps each block of 32 MiB or more
//! afresh and unmaps it when it is freed, so every step faults each of its pages in again, and
//! the kernel clears each one: on the development machine, 2.1 million page faults and a fifth
//! of the CPU time in the kernel over four vgg11 steps at batch 8 (`perf stat -e page-faults`).
//! [`BlockCache`] keeps freed large blocks (up to a cap, beyond which it unmaps those freed
//! longest ago) and hands them out again for requests of the same size class, or cut down to a
//! smaller request where no block of its class is free; new ones are mapped with transparent
//! huge pages where the kernel has them (one fault per 2 MiB). Small blocks, and every block on
//! other systems than Unix, go to the system allocator. See this crate's `README.md` for the
//! design and the measured figures.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: mtad_alloc::BlockCache = mtad_alloc::BlockCache::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks of at least this many bytes are ours.
const LARGE: usize = 1 << 20;
/// Large blocks are whole multiples of this (a huge page on x86-64) and aligned to it.
const HUGE_PAGE: usize = 2 << 20;
/// Largest alignment the blocks guarantee: a page.
const PAGE: usize = 4096;
/// Free blocks kept at most.
const SLOTS: usize = 256;
/// Bytes of free blocks kept at most by [`BlockCache::new`], and at most an eighth of the
/// machine's memory. On the development machine (24 GiB, so 2.9 GiB kept) a CIFAR-10 run of
/// densenet121 at batch 32 and 224x224 peaked at 6.98 GB; with 4 GiB it peaked at 7.89 GB, with
/// 2 GiB at 6.32 GB, but then the batch-32 training steps ran 5-15% slower. (Those were before
/// [`BlockCache`] cut larger free blocks down for smaller requests; since then the same run peaks
/// at 5.48 GB with 2.9 GiB, and at 8.0 and 9.0 GB with caps of 4 and 8 GiB, measured before the
/// cut-down too, so the cap was left as it is.)
pub const DEFAULT_CAP: usize = 4 << 30;

/// A global allocator that keeps freed large blocks for reuse (see the module's documentation).
pub struct BlockCache {
    free: Mutex<Free>,
    /// The cap in bytes, or [`AUTO`] until the first block is freed.
    cap: AtomicUsize,
}

/// [`BlockCache::cap`] not yet worked out from the machine's memory.
const AUTO: usize = usize::MAX;

/// The free blocks: (address, length) in `blocks[..len]` in the order they were freed, `bytes`
/// in all.
struct Free {
    blocks: [(usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

impl Free {
    /// Takes block `index` out, keeping the others' order; returns its address.
    fn remove(&mut self, index: usize) -> usize {
        let (address, len) = self.blocks[index];
        self.blocks.copy_within(index + 1..self.len, index);
        self.len -= 1;
        self.bytes -= len;
        address
    }
}

impl BlockCache {
    /// Keeps up to [`DEFAULT_CAP`] bytes of free blocks, and at most an eighth of the
    /// machine's memory.
    pub const fn new() -> Self {
        Self::with_cap(AUTO)
    }

    /// Keeps up to `cap` bytes of free blocks; a block freed beyond that is unmapped.
    pub const fn with_cap(cap: usize) -> Self {
        Self {
            free: Mutex::new(Free {
                blocks: [(0, 0); SLOTS],
                len: 0,
                bytes: 0,
            }),
            cap: AtomicUsize::new(cap),
        }
    }

    fn cap(&self) -> usize {
        let cap = self.cap.load(Ordering::Relaxed);
        if cap != AUTO {
            return cap;
        }
        let cap = DEFAULT_CAP.min(physical_memory() / 8);
        self.cap.store(cap, Ordering::Relaxed);
        cap
    }

    /// Bytes held in free blocks now.
    pub fn free_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // Nothing panics while the lock is held (the indices are below `len`), so a poisoned
        // lock still guards a consistent `Free`.
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a block of `layout` is ours rather than the system allocator's.
    fn ours(layout: &Layout) -> bool {
        cfg!(unix) && layout.size() >= LARGE && layout.align() <= PAGE
    }

    /// The length of our block for `size` bytes: whole huge pages, in steps of an eighth of the
    /// power of two above `size` (so that similar sizes share blocks): at most a quarter more
    /// than `size`, or one huge page.
    fn class(size: usize) -> usize {
        let grain = (size.next_power_of_two() / 8).max(HUGE_PAGE);
        size.div_ceil(grain) * grain
    }

    /// A free block for `len` bytes, taken out of the cache: one of exactly `len` bytes (the one
    /// freed last), else the smallest larger one, cut down to `len` bytes (its tail unmapped; both
    /// lengths are whole huge pages, so the head keeps its pages). A fresh mapping would fault
    /// every page in again and have the kernel clear it: in densenet121's batch-32 training step,
    /// where the step's blocks outgrow the cap, the kernel's `clear_page` was a third of the
    /// samples in `perf`; cutting larger blocks down took the step from 4.08-4.31 to 4.55-4.81
    /// images/s, and the peak resident memory of a CIFAR-10 run (batch 32) from 7.11 to 5.48 GB.
    fn take(&self, len: usize) -> Option<*mut u8> {
        let mut free = self.lock();
        if let Some(index) = free.blocks[..free.len].iter().rposition(|b| b.1 == len) {
            return Some(free.remove(index) as *mut u8);
        }
        let (index, &(_, bigger)) = free.blocks[..free.len]
            .iter()
            .enumerate()
            .filter(|(_, b)| b.1 > len)
            .min_by_key(|(_, b)| b.1)?;
        let address = free.remove(index);
        drop(free);
        unmap((address + len) as *mut u8, bigger - len);
        Some(address as *mut u8)
    }

    /// Keeps the block at `ptr` of `len` bytes, first unmapping the blocks freed longest ago
    /// where the cap (or the slots) would not hold it; returns whether it kept it (not if it is
    /// larger than the cap).
    fn keep(&self, ptr: *mut u8, len: usize) -> bool {
        let cap = self.cap();
        if len > cap {
            return false;
        }
        let mut free = self.lock();
        while free.len == SLOTS || free.bytes + len > cap {
            let oldest = free.blocks[0].1;
            unmap(free.remove(0) as *mut u8, oldest);
        }
        let count = free.len;
        free.blocks[count] = (ptr as usize, len);
        free.len += 1;
        free.bytes += len;
        true
    }

    /// A block for `layout` (ours), and whether it is freshly mapped (zeroed).
    fn block(&self, layout: &Layout) -> (*mut u8, bool) {
        let len = Self::class(layout.size());
        match self.take(len) {
            Some(ptr) => (ptr, false),
            None => (map(len), true),
        }
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: our blocks are page-aligned mappings of at least `layout.size()` bytes that only one
// owner holds at a time (taken out of the cache under its lock); the rest is the system's.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::ours(&layout) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { System.alloc(layout) };
        }
        self.block(&layout).0
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::ours(&layout) {
            // SAFETY: as above.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let (ptr, fresh) = self.block(&layout);
        if !fresh && !ptr.is_null() {
            // SAFETY: the block holds at least `layout.size()` bytes.
            unsafe { ptr.write_bytes(0, layout.size()) };
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::ours(&layout) {
            // SAFETY: as above.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let len = Self::class(layout.size());
        if !self.keep(ptr, len) {
            unmap(ptr, len);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::ours(&layout), Self::ours(&new_layout)) {
            // SAFETY: as above.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) if Self::class(layout.size()) == Self::class(new_size) => ptr,
            _ => {
                // SAFETY: as above; the two blocks are distinct, and the copy stays within both.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// A new zeroed mapping of `len` bytes (a multiple of [`HUGE_PAGE`]) aligned to a huge page and
/// advised to use them, or null.
#[cfg(unix)]
fn map(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping, trimmed to the aligned `len` bytes within it.
    unsafe {
        let Some(span) = len.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        let base = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let start = base as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        if aligned > start {
            libc::munmap(base, aligned - start);
        }
        let tail = start + span - (aligned + len);
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        #[cfg(target_os = "linux")]
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        aligned as *mut u8
    }
}

/// The machine's memory in bytes (0 where unknown: nothing is kept).
#[cfg(unix)]
fn physical_memory() -> usize {
    // SAFETY: sysconf reads system values and touches no memory of ours.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    usize::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(usize::try_from(size).unwrap_or(0))
}

#[cfg(unix)]
fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: `ptr` is a mapping of `len` bytes from `map` that nothing uses any more.
    unsafe { libc::munmap(ptr.cast(), len) };
}

#[cfg(not(unix))]
fn physical_memory() -> usize {
    0
}

#[cfg(not(unix))]
fn map(_: usize) -> *mut u8 {
    unreachable!("no block is ours on this system")
}

#[cfg(not(unix))]
fn unmap(_: *mut u8, _: usize) {
    unreachable!("no block is ours on this system")
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    #[test]
    fn a_freed_large_block_is_reused_and_zeroed_on_request() {
        let cache = BlockCache::with_cap(64 << 20);
        let size = 3 << 20;
        // SAFETY: each block is used within its layout and freed once with it.
        unsafe {
            let a = cache.alloc(layout(size));
            assert!(!a.is_null());
            assert_eq!(a as usize % HUGE_PAGE, 0);
            a.write_bytes(7, size);
            cache.dealloc(a, layout(size));
            assert_eq!(cache.free_bytes(), BlockCache::class(size));
            // A size of the same class takes the same block.
            let b = cache.alloc_zeroed(layout(size - 1000));
            assert_eq!(b, a);
            assert_eq!(cache.free_bytes(), 0);
            let bytes = std::slice::from_raw_parts(b, size - 1000);
            assert!(
                bytes.iter().all(|v| *v == 0),
                "a reused block was not zeroed"
            );
            cache.dealloc(b, layout(size - 1000));
        }
    }

    #[test]
    fn a_smaller_request_takes_the_smallest_larger_block_cut_down() {
        let cache = BlockCache::with_cap(64 << 20);
        // SAFETY: as above.
        unsafe {
            let big = cache.alloc(layout(12 << 20));
            let bigger = cache.alloc(layout(20 << 20));
            big.write_bytes(7, 12 << 20);
            cache.dealloc(bigger, layout(20 << 20));
            cache.dealloc(big, layout(12 << 20));
            assert_eq!(cache.free_bytes(), (12 << 20) + (20 << 20));
            // No free block of 4 MiB: the 12 MiB one is cut to 4 MiB, the 20 MiB one stays.
            let small = cache.alloc(layout(4 << 20));
            assert_eq!(small, big);
            assert_eq!(cache.free_bytes(), 20 << 20);
            // Its head kept its contents (the same pages), and it goes back as a 4 MiB block.
            assert!(
                std::slice::from_raw_parts(small, 4 << 20)
                    .iter()
                    .all(|v| *v == 7)
            );
            cache.dealloc(small, layout(4 << 20));
            assert_eq!(cache.free_bytes(), (4 << 20) + (20 << 20));
            // A request larger than every free block maps a new one.
            let large = cache.alloc(layout(24 << 20));
            assert!(!large.is_null() && large != big && large != bigger);
            assert_eq!(cache.free_bytes(), (4 << 20) + (20 << 20));
            cache.dealloc(large, layout(24 << 20));
        }
    }

    #[test]
    fn the_blocks_freed_last_are_kept_within_the_cap_and_small_ones_are_not() {
        let cache = BlockCache::with_cap(4 << 20);
        // SAFETY: as above.
        unsafe {
            let small = cache.alloc(layout(1000));
            cache.dealloc(small, layout(1000));
            assert_eq!(cache.free_bytes(), 0);
            let a = cache.alloc(layout(3 << 20));
            let b = cache.alloc(layout(3 << 20));
            let c = cache.alloc(layout(5 << 20));
            cache.dealloc(a, layout(3 << 20));
            cache.dealloc(b, layout(3 << 20));
            // One block of 4 MiB fits the cap: the one freed last.
            assert_eq!(cache.free_bytes(), 4 << 20);
            // A block larger than the cap is not kept, and leaves the others.
            cache.dealloc(c, layout(5 << 20));
            assert_eq!(cache.free_bytes(), 4 << 20);
            assert_eq!(
                cache.alloc(layout(3 << 20)),
                b,
                "the newest block was not kept"
            );
            assert_eq!(cache.free_bytes(), 0);
            cache.dealloc(b, layout(3 << 20));
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_sizes() {
        let cache = BlockCache::with_cap(64 << 20);
        // From small to large, within a class, to a larger class, and back to small.
        let sizes = [1000, 2 << 20, (2 << 20) + 100, 9 << 20, 500];
        // SAFETY: as above; each realloc passes the block's current layout.
        unsafe {
            let mut ptr = cache.alloc(layout(sizes[0]));
            for i in 0..sizes[0] {
                *ptr.add(i) = (i % 251) as u8;
            }
            for pair in sizes.windows(2) {
                ptr = cache.realloc(ptr, layout(pair[0]), pair[1]);
                assert!(!ptr.is_null());
                let kept = pair[0].min(pair[1]).min(sizes[0]);
                let bytes = std::slice::from_raw_parts(ptr, kept);
                assert!(
                    bytes.iter().enumerate().all(|(i, v)| *v == (i % 251) as u8),
                    "contents lost from {} to {} bytes",
                    pair[0],
                    pair[1]
                );
            }
            cache.dealloc(ptr, layout(sizes[4]));
        }
    }

    #[test]
    fn the_default_cap_is_at_most_an_eighth_of_the_memory() {
        let memory = physical_memory();
        assert!(memory > 0, "the machine's memory is unknown");
        let cap = BlockCache::new().cap();
        assert_eq!(cap, DEFAULT_CAP.min(memory / 8));
    }

    #[test]
    fn size_classes_cover_their_sizes_within_a_quarter() {
        for size in [
            LARGE,
            3 << 20,
            (64 << 20) + 1,
            100 << 20,
            (100 << 20) + 1,
            411 << 20,
        ] {
            let class = BlockCache::class(size);
            assert!(
                class >= size && class.is_multiple_of(HUGE_PAGE),
                "{size}: {class}"
            );
            assert!(class - size <= (size / 4).max(HUGE_PAGE), "{size}: {class}");
        }
    }
}
