//! A counting global allocator: the source of every peak-memory figure flotilla reports.
//!
//! Install it in a binary with
//! `#[global_allocator] static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;`.
//! It keeps two counts: live heap bytes of the whole process (with its high-water mark) and
//! live heap bytes of each measurement ([`ThreadPeak`]): what the measuring thread, and the
//! threads that [`Scope::enter`] it, allocate minus what they free. The simulator runs each
//! client on one thread of its own, so that count measures that client alone, even with
//! clients in parallel; a client given several threads hands its scope to the threads that
//! train its micro-batches. Without the allocator installed, measurements read zero and
//! [`is_installed`] says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Live bytes and high-water mark of one measurement; allocations also count in the
/// enclosing measurement (`parent`).
struct Counters {
    live: AtomicIsize,
    peak: AtomicIsize,
    parent: Option<Arc<Counters>>,
}

thread_local! {
    /// The measurement this thread's allocations count in: a pointer into an `Arc` that a
    /// [`ThreadPeak`] or a [`Scope::enter`] guard on this thread keeps alive while it is set.
    static CURRENT: Cell<*const Counters> = const { Cell::new(std::ptr::null()) };
}

/// The system allocator with counting: install it as the binary's `#[global_allocator]` and
/// every allocation updates the process's live bytes and the current thread's measurement.
pub struct CountingAlloc;

fn record(delta: isize) {
    let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    if delta > 0 {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
    // try_with: the thread-local may already be gone while a thread shuts down.
    let _ = CURRENT.try_with(|c| {
        // SAFETY: a non-null pointer is kept alive by the guard that set it on this thread
        // (see `CURRENT`); parents are kept alive by their children's `Arc`s.
        let mut next = unsafe { c.get().as_ref() };
        while let Some(counters) = next {
            let v = counters.live.fetch_add(delta, Ordering::Relaxed) + delta;
            if delta > 0 {
                counters.peak.fetch_max(v, Ordering::Relaxed);
            }
            next = counters.parent.as_deref();
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

/// Measures the heap high-water mark of a piece of work on the current thread (and on the
/// threads it hands its [`Scope`] to), from the moment of [`ThreadPeak::start`]. A guard:
/// measurements on one thread end in the reverse order of their start.
pub struct ThreadPeak {
    counters: Arc<Counters>,
    previous: *const Counters,
}

impl ThreadPeak {
    /// Starts measuring on this thread. A measurement started inside another one also counts
    /// in the outer one.
    pub fn start() -> Self {
        let previous = CURRENT.with(Cell::get);
        let counters = Arc::new(Counters {
            live: AtomicIsize::new(0),
            peak: AtomicIsize::new(0),
            parent: Scope::current().0,
        });
        CURRENT.with(|c| c.set(Arc::as_ptr(&counters)));
        Self { counters, previous }
    }

    /// Bytes above the starting point at the highest moment so far.
    pub fn peak_above_start(&self) -> u64 {
        self.counters.peak.load(Ordering::Relaxed).max(0) as u64
    }
}

impl Drop for ThreadPeak {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| {
            debug_assert_eq!(
                c.get(),
                Arc::as_ptr(&self.counters),
                "measurements out of order"
            );
            c.set(self.previous)
        });
    }
}

/// A measurement that other threads can work inside ([`Scope::enter`]).
#[derive(Clone, Default)]
pub struct Scope(Option<Arc<Counters>>);

impl Scope {
    /// The measurement the current thread counts in (none outside any [`ThreadPeak`]).
    pub fn current() -> Self {
        let p = CURRENT.with(Cell::get);
        if p.is_null() {
            return Scope(None);
        }
        // SAFETY: a non-null pointer in `CURRENT` points into an `Arc` that the guard that set
        // it keeps alive (see `CURRENT`); the increment makes the new `Arc` a reference of its
        // own.
        unsafe {
            Arc::increment_strong_count(p);
            Scope(Some(Arc::from_raw(p)))
        }
    }

    /// Runs `f` on this thread with its allocations counted in this measurement.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(*const Counters);
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = CURRENT.try_with(|c| c.set(self.0));
            }
        }
        let ptr = self.0.as_ref().map_or(std::ptr::null(), Arc::as_ptr);
        let _restore = Restore(CURRENT.with(|c| c.replace(ptr)));
        f()
    }
}
