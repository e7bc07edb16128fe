//! A counting global allocator: the source of every peak-memory figure flotilla reports.
//!
//! Install it in a binary with
//! `#[global_allocator] static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;`.
//! It keeps two counts: live heap bytes of the whole process (with its high-water mark) and
//! live heap bytes allocated minus freed by the current thread. The simulator runs each client
//! on one thread of its own (burn's internal parallelism is confined to that thread), so the
//! thread count of that thread measures that client alone, even with clients in parallel.
//! Without the allocator installed, measurements read zero and [`is_installed`] says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The counting allocator; forwards to the system allocator.
pub struct CountingAlloc;

fn record(delta: isize) {
    let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    if delta > 0 {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
    // try_with: the thread-local may already be gone while a thread shuts down.
    let _ = THREAD_LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        if delta > 0 {
            let _ = THREAD_PEAK.try_with(|p| {
                if v > p.get() {
                    p.set(v);
                }
            });
        }
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            record(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        record(-(layout.size() as isize));
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            record(layout.size() as isize);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            record(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Whether the counting allocator is the process's global allocator.
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes of the process.
pub fn live_bytes() -> u64 {
    LIVE.load(Ordering::Relaxed).max(0) as u64
}

/// High-water mark of live heap bytes of the process since start (or the last reset).
pub fn peak_bytes() -> u64 {
    PEAK.load(Ordering::Relaxed).max(0) as u64
}

/// Resets the process high-water mark to the current live bytes.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Measures the heap high-water mark of the current thread during a piece of work.
pub struct ThreadPeak {
    start: isize,
}

impl ThreadPeak {
    /// Starts measuring: the thread's peak is reset to its current live bytes.
    pub fn start() -> Self {
        let start = THREAD_LIVE.with(Cell::get);
        THREAD_PEAK.with(|p| p.set(start));
        Self { start }
    }

    /// Bytes above the starting point at the highest moment so far.
    pub fn peak_above_start(&self) -> u64 {
        (THREAD_PEAK.with(Cell::get) - self.start).max(0) as u64
    }
}
