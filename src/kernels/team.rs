//! A team of threads that stay awake between the many short parallel regions of a forward pass.
//!
//! A decode step of a 135M model is about 250 parallel regions (seven products, attention and a few element-wise ops
//! per layer), each a few microseconds of work on 16 threads. Rayon's idle workers go to sleep within microseconds,
//! and waking one costs tens of microseconds in a virtual machine: measured on a 16-core Xeon, decode got slower from
//! 4 to 16 threads and the first region after each serial op absorbed the wake-ups. A team instead:
//! - has `n − 1` workers plus the calling thread, for a pool of `n` threads (the size of the current rayon pool, so
//!   `--threads` and `ThreadPool::install` decide it as before);
//! - gives each member (the caller too) a contiguous run of a region's indices `0..tasks`, as rayon's halving does
//!   (neighbouring tasks read neighbouring memory: consecutive blocks of one KV stream, say), and a member that
//!   finishes its run takes indices one by one from the others' runs, through one atomic counter per member;
//! - publishes a region by writing one cache line (its tag, task count and job): the counters are reset lazily by
//!   whoever claims from them first, and finished tasks are counted once per run, not once per task. Measured on a
//!   16-core Xeon against a team whose caller reset every member's counter and whose members counted each task on one
//!   shared line (3 rounds, median tok/s of SmolLM2 decode at 16 threads): at 0 tokens 612 -> 669, at 512 416 -> 481;
//! - keeps its workers spinning for [`SPIN`] after a region ends, then parks them on a condition variable, so an
//!   idle process uses no CPU;
//! - is used by one caller at a time: a second caller meanwhile (another sequence's thread, a test) gets rayon instead,
//!   and so does a region started from inside a team task, and a pool with more threads than the machine has cores.
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

/// One member's counter, alone on its cache line.
#[repr(align(64))]
struct Slot(AtomicU64);

/// What a region's caller publishes, on one cache line: workers spin on `nv` and read `job` beside it.
#[repr(align(64))]
struct Region {
    /// (tag << IDX) | tasks of the region running (or last run). A new tag is a new region.
    nv: AtomicU64,
    /// Points at the caller's `Job` (a fat reference on its stack) while the region of `nv` runs.
    job: AtomicPtr<()>,
}

struct Shared {
    region: Region,
    /// Per member m: (tag << IDX) | next index of m's run `m·n/size .. (m+1)·n/size`. A counter still tagged with an
    /// earlier region belongs to a run nobody has started: the first member to claim from it (its owner, or a thief
    /// whose own run is done) resets it with one compare-exchange, so publishing a region writes one cache line,
    /// not one per member.
    ctr: Box<[Slot]>,
    /// Tasks finished, over all regions (the caller waits for its region's share).
    done: Slot,
    /// Tasks handed out, over all regions; written by the caller only.
    issued: AtomicU64,
    /// Held by the caller of a region.
    busy: AtomicBool,
    /// A task of the current region panicked (the caller panics once all have finished).
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

thread_local! {
    /// Set on team workers and on a caller while its region runs: nested regions go to rayon.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Bits of a task index in a counter (and of the task count in `Region::nv`); the tag has the other 40.
const IDX: u32 = 24;
const LOW: u64 = (1 << IDX) - 1;

impl Shared {
    /// Claims and runs indices of the region published as `nv`, member `me`'s own run first, then what is left of
    /// the others'. Finished tasks are added to `done` once per run, not once per task (16 threads adding to one
    /// counter after every task queue on its cache line). A panicking task is caught (the region's caller reports
    /// it once every task has finished, so no task outlives the closure it borrows).
    fn work(&self, nv: u64, me: usize) {
        let size = self.ctr.len();
        let (tag, n) = (nv >> IDX, (nv & LOW) as usize);
        for k in (0..size).map(|j| (me + j) % size) {
            let (start, end) = (k * n / size, (k + 1) * n / size);
            if start >= end {
                continue;
            }
            let c = &self.ctr[k].0;
            let mut finished = 0u64;
            let mut v = c.load(Acquire);
            loop {
                let (i, next) = if v >> IDX == tag {
                    let i = (v & LOW) as usize;
                    if i >= end {
                        break;
                    }
                    (i, v + 1)
                } else if self.region.nv.load(Acquire) == nv {
                    // Not yet started in this region (its tag is an earlier one): claim its first index. The
                    // exchange fails if anyone touched the counter since `v` was read, this region's reset included.
                    (start, tag << IDX | (start + 1) as u64)
                } else {
                    break; // a later region has started: this one is over
                };
                if let Err(now) = c.compare_exchange_weak(v, next, AcqRel, Acquire) {
                    v = now;
                    continue;
                }
                // SAFETY: index i of this region was claimed while the region ran, and its caller does not return
                // (nor publish another job) before every claimed index has finished, so the pointer read here
                // (written before the region was published) is this region's job and is alive.
                let job = unsafe { *(self.region.job.load(Acquire) as *const Job<'static>) };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i))).is_err() {
                    self.panicked.store(true, Relaxed);
                }
                finished += 1;
                v = c.load(Acquire);
            }
            if finished > 0 {
                self.done.0.fetch_add(finished, Release);
            }
            if v >> IDX != tag && self.region.nv.load(Acquire) != nv {
                return;
            }
        }
    }

    fn worker(self: Arc<Self>, me: usize) {
        INSIDE.with(|c| c.set(true));
        let mut seen = self.region.nv.load(Acquire) >> IDX;
        loop {
            // Spin for a new region, then park.
            let t0 = Instant::now();
            let mut spins = 0u32;
            let nv = loop {
                let nv = self.region.nv.load(Acquire);
                if nv >> IDX != seen {
                    break nv;
                }
                spins += 1;
                if spins.is_multiple_of(256) && t0.elapsed() >= SPIN {
                    let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    while self.region.nv.load(SeqCst) >> IDX == seen {
                        guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                    spins = 0;
                    continue;
                }
                std::hint::spin_loop();
            };
            seen = nv >> IDX;
            self.work(nv, me);
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
            region: Region {
                nv: AtomicU64::new(0),
                job: AtomicPtr::new(std::ptr::null_mut()),
            },
            ctr: (0..size.max(1)).map(|_| Slot(AtomicU64::new(0))).collect(),
            done: Slot(AtomicU64::new(0)),
            issued: AtomicU64::new(0),
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
                .spawn(move || s.worker(i))
                .ok()?;
        }
        Some(Self { shared })
    }

    /// Runs `f(0..n)` on the team; the caller holds `busy`.
    fn run(&self, n: usize, f: Job<'_>) {
        let s = &*self.shared;
        let tag = tag((s.region.nv.load(Relaxed) >> IDX) + 1);
        let target = s.issued.load(Relaxed) + n as u64;
        s.issued.store(target, Relaxed);
        // Publish the job, then the region (whose store releases the job to every worker that sees the new tag).
        s.region.job.store(&f as *const Job<'_> as *mut (), Release);
        let nv = tag << IDX | n as u64;
        s.region.nv.store(nv, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        s.work(nv, 0);
        let mut spins = 0u32;
        while s.done.0.load(Acquire) < target {
            spins += 1;
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if s.panicked.swap(false, AcqRel) {
            panic!("a task of a parallel region panicked");
        }
    }
}

/// A region's tag: the low 40 bits of its number, never 0 (the counters' initial tag): 10¹² regions, years of
/// decoding, before one repeats.
fn tag(g: u64) -> u64 {
    match g & ((1 << (64 - IDX)) - 1) {
        0 => 1,
        t => t,
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

/// Cores of the machine.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f(i)` for every `i` in `0..n`, split over the current pool's threads: on its team when the team is free
/// and this is not a nested region, else through rayon. `n` of 0 or 1, or a pool of one thread, runs here. A pool of
/// more threads than the machine has cores always goes through rayon: spinning threads would take cores from those
/// with work (measured on 2 cores, 4 threads decoded about 30 % slower on a team than through rayon).
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    if threads > cores() || !on_team(threads, n, &f) {
        (0..n).into_par_iter().for_each(f);
    }
}

/// Runs `f(0..n)` on the team of `size` threads if this is not a nested region and the team is free; false (nothing
/// run) otherwise.
fn on_team(size: usize, n: usize, f: Job<'_>) -> bool {
    if INSIDE.with(|c| c.get()) || n as u64 > LOW {
        return false;
    }
    let Some(t) = team(size) else {
        return false;
    };
    if t.shared
        .busy
        .compare_exchange(false, true, Acquire, Relaxed)
        .is_err()
    {
        return false;
    }
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
    t.run(n, f);
    true
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

    /// Every index of `0..n` once: counts per index after `run(n, count)`.
    fn hits(n: usize, run: impl FnOnce(usize, &(dyn Fn(usize) + Sync))) -> Vec<usize> {
        let h: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        run(n, &|i| {
            h[i].fetch_add(1, Relaxed);
        });
        h.iter().map(|x| x.load(Relaxed)).collect()
    }

    #[test]
    fn every_index_runs_once_on_teams_of_every_size_with_nested_regions() {
        // On the team directly (whatever this machine's cores), then through the public entry in pools.
        // (Sizes no other test here uses: a team busy with another test's region would refuse.)
        for size in [6, 9, 10, 14] {
            for n in [2, 5, 64, 1000] {
                let h = hits(n, |n, f| {
                    let outer = |i: usize| {
                        f(i);
                        // A nested region (attention inside a task, say) still covers its indices, through rayon.
                        assert!(hits(3, |m, g| for_each(m, g)).iter().all(|&c| c == 1));
                    };
                    assert!(on_team(size, n, &outer), "team of {size} was free");
                });
                assert!(
                    h.iter().all(|&c| c == 1),
                    "team of {size}, {n} tasks: {h:?}"
                );
            }
        }
        for threads in [1, 2, 3, 7, 16] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                for n in [0, 1, 2, 5, 64, 1000] {
                    let h = hits(n, |n, f| for_each(n, f));
                    assert!(h.iter().all(|&c| c == 1), "{threads} threads, {n} tasks");
                }
            });
        }
    }

    #[test]
    fn back_to_back_regions_of_different_sizes_never_run_a_stale_index() {
        // A worker late for a small region must not claim indices of it against the next region's size (it would
        // run a finished job, or an index twice): short regions and long ones alternate, each with its own closure.
        for round in 0..20000 {
            let n = if round % 2 == 0 { 3 } else { 200 + round % 7 };
            let h = hits(n, |n, f| assert!(on_team(15, n, f)));
            assert!(h.iter().all(|&c| c == 1), "round {round}, {n} tasks: {h:?}");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_with_a_ragged_end() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
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
    fn concurrent_callers_of_one_team_each_get_all_their_indices() {
        // Eight threads race for one team of 12: whoever finds it busy runs its region itself.
        let (on, off) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        let h = hits(37, |n, f| {
                            if on_team(12, n, f) {
                                on.fetch_add(1, Relaxed);
                            } else {
                                off.fetch_add(1, Relaxed);
                                (0..n).for_each(f);
                            }
                        });
                        assert!(h.iter().all(|&c| c == 1));
                    }
                });
            }
        });
        assert_eq!(on.load(Relaxed) + off.load(Relaxed), 1600);
        assert!(on.load(Relaxed) > 0);
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller_and_the_team_stays_usable() {
        let r = std::panic::catch_unwind(|| {
            let f = |i: usize| assert!(i != 5, "task 5 fails");
            on_team(11, 20, &f)
        });
        assert!(r.is_err());
        assert!(hits(20, |n, f| assert!(on_team(11, n, f)))
            .iter()
            .all(|&c| c == 1));
    }

    #[test]
    fn workers_park_when_idle_and_wake_for_the_next_region() {
        let sum = AtomicUsize::new(0);
        let add = |i: usize| {
            sum.fetch_add(i, Relaxed);
        };
        assert!(on_team(13, 10, &add));
        std::thread::sleep(SPIN * 20);
        assert!(on_team(13, 10, &add));
        assert_eq!(sum.load(Relaxed), 90);
    }
}
