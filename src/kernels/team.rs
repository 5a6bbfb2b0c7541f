//! A team of threads that stay awake between the many short parallel regions of a forward pass.
//!
//! A decode step of a 135M model is about 250 parallel regions (seven products, attention and a few element-wise ops
//! per layer), each a few microseconds of work on 16 threads. Rayon's idle workers go to sleep within microseconds,
//! and waking one costs tens of microseconds in a virtual machine: measured on a 16-core Xeon, decode got slower from
//! 4 to 16 threads and the first region after each serial op absorbed the wake-ups. A team instead:
//! - has `n − 1` workers plus the calling thread, for a pool of `n` threads (the size of the current rayon pool, so
//!   `--threads` and `ThreadPool::install` decide it as before);
//! - hands out the indices `0..tasks` of a region one by one through an atomic counter (the caller takes part);
//! - keeps its workers spinning on that counter for [`SPIN`] after a region ends, then parks them on a condition
//!   variable, so an idle process uses no CPU;
//! - is used by one caller at a time: a second caller meanwhile (another sequence's thread, a test) gets rayon instead,
//!   and so does a region started from inside a team task.
//!
//! [`for_each`] is the only entry point. Results do not depend on which thread runs which index: every caller
//! writes each index's output to its own place.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(300);

type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// (generation << 32) | next index to hand out. A claim succeeds only within its generation.
    ctr: AtomicU64,
    /// Tasks of the current generation.
    n: AtomicUsize,
    /// Tasks of the current generation finished.
    done: AtomicUsize,
    /// Points at the caller's `Job` (a fat reference on its stack) while a generation runs.
    job: AtomicPtr<()>,
    /// Held by the caller of a region.
    busy: AtomicBool,
    /// A task of the current generation panicked (the caller panics once all have finished).
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

thread_local! {
    /// Set on team workers and on a caller while its region runs: nested regions go to rayon.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    /// Claims and runs indices of generation `gen` until none are left. A panicking task is caught (the region's
    /// caller reports it once every task has finished, so no task outlives the closure it borrows).
    fn work(&self, gen: u64) {
        loop {
            let v = self.ctr.load(Acquire);
            if v >> 32 != gen {
                return;
            }
            let i = (v & 0xffff_ffff) as usize;
            if i >= self.n.load(Acquire) {
                return;
            }
            if self
                .ctr
                .compare_exchange_weak(v, v + 1, AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: index i of generation `gen` was claimed while that generation ran, and its caller does not
            // return (nor replace `job`) before every claimed index has finished, so the pointer read here (written
            // before the generation was published) is that generation's job and is alive.
            let job = unsafe { *(self.job.load(Acquire) as *const Job<'static>) };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i))).is_err() {
                self.panicked.store(true, Relaxed);
            }
            self.done.fetch_add(1, Release);
        }
    }

    fn worker(self: Arc<Self>) {
        INSIDE.with(|c| c.set(true));
        let mut seen = self.ctr.load(Acquire) >> 32;
        loop {
            // Spin for a new generation, then park.
            let t0 = Instant::now();
            let mut spins = 0u32;
            let gen = loop {
                let g = self.ctr.load(Acquire) >> 32;
                if g != seen {
                    break g;
                }
                spins += 1;
                if spins.is_multiple_of(256) && t0.elapsed() > SPIN {
                    let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    while self.ctr.load(SeqCst) >> 32 == seen {
                        guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                    spins = 0;
                    continue;
                }
                std::hint::spin_loop();
            };
            seen = gen;
            self.work(gen);
        }
    }
}

/// A team of `size − 1` workers; the caller of a region is the last member.
struct Team {
    shared: Arc<Shared>,
}

impl Team {
    fn new(size: usize) -> Option<Self> {
        let shared = Arc::new(Shared {
            ctr: AtomicU64::new(0),
            n: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 1..size {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("hayloft-team-{size}-{i}"))
                .spawn(move || s.worker())
                .ok()?;
        }
        Some(Self { shared })
    }

    /// Runs `f(0..n)` on the team; the caller holds `busy`.
    fn run(&self, n: usize, f: Job<'_>) {
        let s = &*self.shared;
        let gen = (s.ctr.load(Relaxed) >> 32) + 1;
        s.n.store(n, Relaxed);
        s.done.store(0, Relaxed);
        s.panicked.store(false, Relaxed);
        s.job.store(&f as *const Job<'_> as *mut (), Relaxed);
        // Publish: workers that see this generation see the job, n and done above.
        s.ctr.store(gen << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        s.work(gen);
        let mut spins = 0u32;
        while s.done.load(Acquire) < n {
            spins += 1;
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        s.job.store(std::ptr::null_mut(), Relaxed);
        if s.panicked.load(Acquire) {
            panic!("a task of a parallel region panicked");
        }
    }
}

/// The team for pools of `size` threads (made on first use; None if its threads cannot be started).
fn team(size: usize) -> Option<&'static Team> {
    static TEAMS: OnceLock<Mutex<HashMap<usize, &'static Team>>> = OnceLock::new();
    let mut m = TEAMS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = m.get(&size) {
        return Some(t);
    }
    let t: &'static Team = Box::leak(Box::new(Team::new(size)?));
    m.insert(size, t);
    Some(t)
}

/// Runs `f(i)` for every `i` in `0..n`, split over the current pool's threads: on its team when the team is free
/// and this is not a nested region, else through rayon. `n` of 0 or 1, or a pool of one thread, runs here.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    if !INSIDE.with(|c| c.get()) {
        if let Some(t) = team(threads) {
            if t.shared
                .busy
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_ok()
            {
                INSIDE.with(|c| c.set(true));
                // A panicking task must not leave the team marked busy or the flag set.
                struct Release<'a>(&'a AtomicBool);
                impl Drop for Release<'_> {
                    fn drop(&mut self) {
                        INSIDE.with(|c| c.set(false));
                        self.0.store(false, std::sync::atomic::Ordering::Release);
                    }
                }
                let _r = Release(&t.shared.busy);
                t.run(n, &f);
                return;
            }
        }
    }
    (0..n).into_par_iter().for_each(f);
}

/// Runs `f(i, piece)` for each piece `i` of `data` cut into pieces of `chunk` elements (the last may be shorter), as
/// [`for_each`] does: the pieces are disjoint, so each task gets its own `&mut`.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    struct Ptr<T>(*mut T);
    // SAFETY: the pointer is only used to rebuild disjoint pieces of one exclusively borrowed slice.
    unsafe impl<T: Send> Sync for Ptr<T> {}
    unsafe impl<T: Send> Send for Ptr<T> {}
    let chunk = chunk.max(1);
    let (len, p) = (data.len(), Ptr(data.as_mut_ptr()));
    for_each(len.div_ceil(chunk), |i| {
        let a = i * chunk;
        let n = chunk.min(len - a);
        let p = &p;
        // SAFETY: piece i covers [a, a + n) of `data`, which no other piece covers; `data` stays borrowed for the
        // whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(p.0.add(a), n) };
        f(i, piece);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_in_every_pool_size_and_nested_regions_work() {
        for threads in [1, 2, 3, 7, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                for n in [0, 1, 2, 5, 64, 1000] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    for_each(n, |i| {
                        hits[i].fetch_add(1, Relaxed);
                        // A nested region (attention inside a task, say) still covers its indices.
                        let inner: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
                        for_each(3, |j| {
                            inner[j].fetch_add(1, Relaxed);
                        });
                        assert!(inner.iter().all(|x| x.load(Relaxed) == 1));
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Relaxed) == 1),
                        "{threads} threads, {n} tasks"
                    );
                }
            });
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_with_a_ragged_end() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        pool.install(|| {
            let mut v = vec![0usize; 1001];
            for_each_chunk_mut(&mut v, 64, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x += i * 64 + j + 1;
                }
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i + 1));
        });
    }

    #[test]
    fn concurrent_callers_each_get_all_their_indices() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .expect("pool");
        let total = AtomicUsize::new(0);
        pool.install(|| {
            (0..8).into_par_iter().for_each(|_| {
                for _ in 0..50 {
                    let hits: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
                    for_each(37, |i| {
                        hits[i].fetch_add(1, Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
                    total.fetch_add(1, Relaxed);
                }
            });
        });
        assert_eq!(total.load(Relaxed), 400);
    }

    #[test]
    fn workers_park_when_idle_and_wake_for_the_next_region() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(5)
            .build()
            .expect("pool");
        pool.install(|| {
            let sum = AtomicUsize::new(0);
            for_each(10, |i| {
                sum.fetch_add(i, Relaxed);
            });
            std::thread::sleep(SPIN * 20);
            for_each(10, |i| {
                sum.fetch_add(i, Relaxed);
            });
            assert_eq!(sum.load(Relaxed), 90);
        });
    }
}
