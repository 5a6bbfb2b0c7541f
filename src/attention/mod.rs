//! Attention over the paged KV cache: tiled, online softmax (flash-style), GQA without copying K/V.
//!
//! For one layer, queries `q` (T tokens × n_q_heads × head_dim_k) attend to every cached entry of their KV head whose
//! position is visible: causal (key pos ≤ query pos) and, for sliding-window layers, query pos − key pos < window.
//! No T × L score matrix exists: work is cut into tasks of (KV head, tile of query tokens, range of key blocks); a task
//! walks its key blocks, scores the tile's rows (tile tokens × the query heads sharing the KV head) against one block at a
//! time and folds them into running max / sum / output accumulators. When there are few query tiles (decode), the key
//! blocks of each head are split over several tasks and the partial results are merged (flash-decoding), so every core
//! works. The split is planned for a pool of [`PLAN_THREADS`] threads whatever the pool's size, so the merge order, and
//! with it every bit of the result, is the same on 1 to 16 threads.
//!
//! With a [`Selection`] ([`attend_selected`], decode-time selectors), each KV head reads only the entries chosen for
//! it: whole selected blocks go through the same block path; a partly selected f16 block is read in place with a mask
//! of its selected entries when the task's rows fit one pass of the SIMD fold (decode), and otherwise its entries are
//! gathered into a block-sized tile first. Every path counts the bytes it reads in the cache's read counter.
//!
//! Several sequences of a batched step attend in one call ([`attend_batch`]): each one's tasks are planned as its own
//! call would plan them (the same bits), and all of them go to the pool together.
//!
//! A block offloaded to disk ([`crate::kv::offload`]) is read whole into the task's buffer with one explicit read
//! (counted by the cache as a disk read) and folded like an f16 block; every block the kernel folds is marked as read
//! for the offload LRU.
//!
//! Blocks are folded as f32 tiles (f16 blocks converted whole into the task's buffer), except 4-bit KIVI blocks,
//! which are scored and mixed straight from their codes ([`qtile`]), and f16 blocks of tasks whose rows fit one pass
//! of the AVX-512 or AVX2 fold, which are read in place (each key and value converted where it is loaded). While a
//! block is folded the next one is prefetched: blocks are separate allocations, which hardware prefetchers do not
//! follow. The AVX-512 and AVX2 folds of an f16 block ask for the next f16 block's lines as they work (a key
//! channel's line with each channel, a value row's with each row) rather than in one burst before it: a burst of a
//! whole block's lines fills the core's miss buffers, and the fold then waits on memory instead of working while it
//! arrives (SmolLM2 8K decode on a 2-core Xeon: 39.9 → 44.1 tok/s, 9 alternated runs; 30 layers of SmolLM2's shapes
//! at 8K from memory on a 2-core AVX2-only EPYC, `batched_decode_timing`: 34–43 → 28–31 ms per step). Three compiled variants run the same task code:
//! portable, AVX2 (with the [`wide2`] step) and AVX-512 (with the [`wide`] step), picked with the matmul kernel.
//!
//! `naive_attention` is the plain reference the tests compare against.

#[cfg(target_arch = "x86_64")]
mod avx2q;
#[cfg(target_arch = "x86_64")]
mod f16asm;
mod qtile;
pub mod select;
pub mod sparse;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod wide;
#[cfg(target_arch = "x86_64")]
mod wide2;

use half::slice::HalfFloatSliceExt;

use crate::kv::{BlockData, BlockView, KvCache, OffloadBuf};
pub use select::{GivenScores, Selection};
pub use sparse::{attend_tiles, TileSelection};

/// Query tokens per task tile. Rows of one tile share a causal bound (the tile's largest position), so up to this many
/// rows whose largest position is the newest entry may attend over a stream whose entries are not in position order
/// (see `model::lazy`).
pub const Q_TILE: usize = 16;

/// Tasks the plan aims for (so that every thread gets about two) on pools of up to this many threads, whatever the
/// pool's size: up to 16 threads the split of key blocks, and with it the order in which partial softmaxes are merged,
/// does not depend on the thread count, so attention (and the whole model) gives bit-identical results on 1 to 16
/// threads. Larger pools get 2 tasks per thread.
///
/// Every task pays a fixed cost (its first blocks, a partial softmax to merge, runs of 4-bit blocks cut short at its
/// ends). Aiming at 4 per thread (64 tasks, about 12 blocks each at SmolLM2 8K), that cost was a sixth of a 4-bit
/// cache's decode attention: 30 layers of SmolLM2's shapes at 8K, 2 threads on a 2-core Xeon, plans alternated 40
/// times in one process, median per token `kivi4` 7.49 ms at 64 tasks, 6.79 at 32, 6.20 at 16; f16 12.89 / 12.62 /
/// 12.32 (a temporary test, not committed).
pub const PLAN_THREADS: usize = 16;

/// Fewest key blocks a split of a head's blocks gets (when the head has that many). Each task starts cold (its first
/// blocks are asked for at once and waited on), folds its own partial softmax and adds one more to merge; with 4
/// blocks a task was mostly that fixed cost. 4 → 8 blocks: SmolLM2 decode over 1K-token prompts, `bench batch
/// --streams 1,8 -t 2` on a 2-core Xeon, 2 alternations each, attention per 8-stream step 17.0 / 17.9 → 15.3 / 13.4
/// ms (kivi4) and 21.9 / 21.1 → 17.9 / 19.7 ms (f16). 8 → 32 (a 1K-token head is then one task; 8K heads get 8
/// splits, 24 tasks for SmolLM2's 3 KV heads instead of 33), same command, one build with the value from the
/// environment, 4 alternations: attention per 8-stream step f16 15.7 / 14.4 / 13.6 / 18.4 → 12.5 / 11.6 / 19.4 /
/// 12.6 ms, kivi4 14.5 / 11.8 / 14.7 / 12.3 → 9.1 / 10.6 / 16.1 / 11.5, one stream's 1.9–2.5 → 1.4–2.2 ms; 32
/// against 16, 3 alternations, 32 faster in 5 of 6 pairs. The plan still depends only on the job (a batched
/// sequence splits as it would alone: the same bits); a job of one (KV head, tile) pair gets the floor of
/// [`MIN_PAIR_BLOCKS`].
const MIN_TASK_BLOCKS: usize = 32;

/// A job with a single (KV head, query tile) pair, a one-KV-head model decoding one sequence (Gemma 3 270M), would be
/// one task whenever its head holds fewer than 2 × [`MIN_TASK_BLOCKS`] units (a 512-token sliding window, a 1K-token
/// selection): one thread reading while the others wait. Such a job splits in two when each half gets at least this
/// many units. The floor depends on the job alone, as the rest of the plan.
const MIN_PAIR_BLOCKS: usize = 8;

/// Tasks the attention plan aims for on a pool of `threads` threads (see [`PLAN_THREADS`]).
fn plan_tasks(threads: usize) -> usize {
    2 * threads.max(PLAN_THREADS)
}

#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    /// Query heads; each KV head serves n_q_heads / n_kv_heads of them (GQA).
    pub n_q_heads: usize,
    /// Multiplies q·k before the softmax (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Sliding window: a key is visible only if query_pos − key_pos < window.
    pub window: Option<u32>,
    /// Gemma-2 style logit soft-capping: s ← cap · tanh(s / cap).
    pub softcap: Option<f32>,
}

#[derive(Clone, Copy)]
struct Task {
    /// Which job of the call ([`AttnJob`]) the task works for.
    job: usize,
    kv_head: usize,
    t0: usize,
    t1: usize,
    blk0: usize,
    blk1: usize,
    /// Whether this task folds its head's shared tiles (the first split of a (head, tile) of a sparse call).
    shared: bool,
}

/// One task's working memory: sized once, reused every call.
#[derive(Default)]
struct TaskBuf {
    acc: Vec<f32>,
    /// Scores, then probabilities, of one row against one block.
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The tile's query rows gathered to the stream's kept key channels (ThinK-pruned streams only).
    qg: Vec<f32>,
    /// Entries gathered from partly selected blocks: keys transposed (hk × BT, every channel), values (BT × hv),
    /// positions (BT).
    gk: Vec<f32>,
    gv: Vec<f32>,
    gpos: Vec<u32>,
    /// Entries gathered with a selector's scores ([`GivenScores`]): their scores (rows × BT, [`Tile::F32`]'s
    /// `given`), values (BT × hv) and positions (BT); their keys are not read.
    gs: Vec<f32>,
    sv: Vec<f32>,
    spos: Vec<u32>,
    /// The last offloaded block this task read from disk (sized on first use).
    disk: OffloadBuf,
    /// A 4-bit block's scales folded into the rows' queries, and its value scales (see [`qtile`]).
    qprep: qtile::QPrep,
    /// Probabilities scaled by a 4-bit block's value scales: see [`qtile::scale_probs`].
    pbuf: Vec<f32>,
    /// A run of 4-bit blocks folded together (`wide::fold_q4_run`): each block's preparation, and the run's scores
    /// (8 rows × the run's keys).
    #[cfg(target_arch = "x86_64")]
    qrun: [qtile::QPrep; wide::Q4_RUN],
    #[cfg(target_arch = "x86_64")]
    srun: Vec<f32>,
    /// Bytes this task read.
    read: usize,
}

/// Part of one block a selection reads: block index, entries `[j0, j1)`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    block: u32,
    j0: u32,
    j1: u32,
}

#[derive(Default)]
pub struct AttnScratch {
    tasks: Vec<Task>,
    bufs: Vec<TaskBuf>,
    /// A selection cut at block boundaries, every head's pieces one after another; tasks index into it.
    pieces: Vec<Piece>,
    /// A sparse call's shared entries, gathered once ([`sparse::gather_shared`]).
    shared: sparse::SharedTiles,
}

/// Shapes of one call, shared by all tasks.
struct Shape {
    n_q_heads: usize,
    group: usize,
    hk: usize,
    hv: usize,
    bt: usize,
}

/// Attention for `layer`. `q`: T × n_q_heads × hk; `q_pos`: T absolute positions; `out`: T × n_q_heads × hv.
/// The cache must already hold the keys/values of these T tokens (append before attend).
pub fn attend(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    out: &mut [f32],
    p: &AttnParams,
    scratch: &mut AttnScratch,
) {
    attend_impl(
        cache,
        layer,
        q,
        q_pos,
        out,
        p,
        Sel::All,
        simd_level(),
        scratch,
    )
}

/// What a call reads: every visible entry, a per-KV-head selection (decode), or per (KV head, query tile) key
/// ranges (sparse prefill, [`sparse`]).
#[derive(Clone, Copy)]
pub enum Sel<'a> {
    All,
    Heads(&'a Selection),
    Tiles(&'a TileSelection),
}

/// Attention for `layer` over the entries `sel` chose for each KV head only (the causal and window masks still
/// apply). Shapes as [`attend`].
#[allow(clippy::too_many_arguments)] // attend's arguments plus the selection
pub fn attend_selected(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    out: &mut [f32],
    p: &AttnParams,
    sel: &Selection,
    scratch: &mut AttnScratch,
) {
    attend_impl(
        cache,
        layer,
        q,
        q_pos,
        out,
        p,
        Sel::Heads(sel),
        simd_level(),
        scratch,
    )
}

/// Leading blocks of (layer, `kv_head`) whose entries all lie before position `lo`: a binary search over the blocks'
/// largest positions, which never decrease along a stream. (Its entries' positions can: LazyLLM's revival appends old
/// positions after newer ones, and a block may end with an old one.)
fn blocks_before(cache: &KvCache, layer: usize, kv_head: usize, n: usize, lo: u32) -> usize {
    let (mut a, mut b) = (0, n);
    while a < b {
        let m = (a + b) / 2;
        let v = cache.block(layer, kv_head, m);
        if v.n > 0 && v.pos[..v.n].iter().all(|&p| p < lo) {
            a = m + 1;
        } else {
            b = m;
        }
    }
    a
}

/// Cuts the entry ranges `ranges` of (layer, `kv_head`) at block boundaries into `pieces`.
fn cut_pieces(
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    ranges: &[(u32, u32)],
    pieces: &mut Vec<Piece>,
) {
    let bt = cache.cfg.block_tokens as u32;
    let len = cache.len(layer, kv_head) as u32;
    for &(lo, hi) in ranges {
        let (mut e, hi) = (lo.min(len), hi.min(len));
        while e < hi {
            let b = e / bt;
            let end = hi.min((b + 1) * bt);
            pieces.push(Piece {
                block: b,
                j0: e - b * bt,
                j1: end - b * bt,
            });
            e = end;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_impl(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    out: &mut [f32],
    p: &AttnParams,
    sel: Sel,
    simd: Simd,
    scratch: &mut AttnScratch,
) {
    let mut one = [AttnJob {
        cache,
        q,
        q_pos,
        out,
        sel,
    }];
    attend_jobs(&mut one, layer, p, simd, scratch);
}

/// One sequence's part of a batched attention call ([`attend_batch`]): its cache, its query rows at their
/// positions, where their output goes, and what it reads.
pub struct AttnJob<'a> {
    pub cache: &'a KvCache,
    /// T × n_q_heads × hk
    pub q: &'a [f32],
    /// T absolute positions.
    pub q_pos: &'a [u32],
    /// T × n_q_heads × hv
    pub out: &'a mut [f32],
    pub sel: Sel<'a>,
}

/// Attention for `layer` of several sequences in one parallel pass: every job's tasks (planned as a call of its own
/// would plan them, so each job's output is that call's, bit for bit) go to the pool together, so a batched decode
/// step pays one dispatch per layer instead of one per sequence. A job reading a [`TileSelection`] must be alone in
/// its call. Caches must share their shapes (KV heads, head dims, block size); their storage types may differ.
pub fn attend_batch(jobs: &mut [AttnJob], layer: usize, p: &AttnParams, scratch: &mut AttnScratch) {
    attend_jobs(jobs, layer, p, simd_level(), scratch)
}

fn attend_jobs(
    jobs: &mut [AttnJob],
    layer: usize,
    p: &AttnParams,
    simd: Simd,
    scratch: &mut AttnScratch,
) {
    let Some(first) = jobs.first() else {
        return;
    };
    let cfg = &first.cache.cfg;
    let n_q_heads = p.n_q_heads;
    let sh = Shape {
        n_q_heads,
        group: n_q_heads / cfg.n_kv_heads,
        hk: cfg.head_dim_k,
        hv: cfg.head_dim_v,
        bt: cfg.block_tokens,
    };
    assert_eq!(n_q_heads % cfg.n_kv_heads, 0);
    for job in jobs.iter() {
        let c = &job.cache.cfg;
        assert!(
            (c.n_kv_heads, c.head_dim_k, c.head_dim_v, c.block_tokens)
                == (cfg.n_kv_heads, sh.hk, sh.hv, sh.bt),
            "the caches of one attention call share their shapes"
        );
        let n_tok = job.q_pos.len();
        assert_eq!(job.q.len(), n_tok * n_q_heads * sh.hk);
        assert_eq!(job.out.len(), n_tok * n_q_heads * sh.hv);
        assert!(
            jobs.len() == 1 || !matches!(job.sel, Sel::Tiles(_)),
            "a job reading a tile selection is alone in its call"
        );
    }

    let want = plan_tasks(rayon::current_num_threads());
    scratch.tasks.clear();
    scratch.pieces.clear();
    let mut with_shared = false;
    for (job_i, job) in jobs.iter().enumerate() {
        let (cache, q_pos, sel) = (job.cache, job.q_pos, job.sel);
        // Plan tasks: split key blocks when there are too few (head, tile) pairs to keep every thread busy. With a
        // window, the leading blocks no query of the call sees are left out of the plan, so a cache that keeps them
        // and one that slid them out split their work alike (and add up the same partial sums).
        let n_tok = q_pos.len();
        let n_tiles = n_tok.div_ceil(Q_TILE);
        let visible_from = p.window.map(|w| {
            q_pos
                .iter()
                .copied()
                .min()
                .unwrap_or(0)
                .saturating_sub(w.saturating_sub(1))
        });
        if let Sel::Tiles(ts) = sel {
            sparse::gather_shared(cache, layer, ts, &mut scratch.shared);
            cache.note_read(scratch.shared.read);
            with_shared = scratch.shared.heads.iter().any(|&(a, b)| a < b);
        }
        for kv_head in 0..cfg.n_kv_heads {
            // Units a task walks: blocks, or the pieces of the selection.
            let (base, nb) = match sel {
                Sel::All | Sel::Tiles(_) => {
                    let n = cache.n_blocks(layer, kv_head);
                    let first =
                        visible_from.map_or(0, |lo| blocks_before(cache, layer, kv_head, n, lo));
                    (first, n - first)
                }
                Sel::Heads(sel) => {
                    let base = scratch.pieces.len();
                    cut_pieces(
                        cache,
                        layer,
                        kv_head,
                        sel.ranges(kv_head),
                        &mut scratch.pieces,
                    );
                    (base, scratch.pieces.len() - base)
                }
            };
            let pairs = cfg.n_kv_heads * n_tiles;
            let floor = if pairs == 1 {
                (nb / MIN_PAIR_BLOCKS).min(2)
            } else {
                1
            };
            let splits = want
                .div_ceil(pairs)
                .clamp(1, nb.div_ceil(MIN_TASK_BLOCKS).max(floor).max(1));
            for tile in 0..n_tiles {
                let (t0, t1) = (tile * Q_TILE, ((tile + 1) * Q_TILE).min(n_tok));
                if let Sel::Tiles(ts) = sel {
                    // The tile's pieces, split at the same block boundaries as the dense plan (so a selection of every
                    // visible entry folds the same blocks in the same tasks: dense bit for bit).
                    let first = scratch.pieces.len();
                    let max_qpos = q_pos[t0..t1].iter().copied().max().unwrap_or(0);
                    sparse::tile_pieces(
                        cache,
                        layer,
                        kv_head,
                        ts.ranges(kv_head, tile),
                        max_qpos,
                        &mut scratch.pieces,
                    );
                    let mut at = first;
                    for s in 0..splits {
                        let blk_end = base + nb * (s + 1) / splits;
                        let start = at;
                        while at < scratch.pieces.len()
                            && (scratch.pieces[at].block as usize) < blk_end
                        {
                            at += 1;
                        }
                        scratch.tasks.push(Task {
                            job: job_i,
                            kv_head,
                            t0,
                            t1,
                            blk0: start,
                            blk1: if s + 1 == splits {
                                scratch.pieces.len()
                            } else {
                                at
                            },
                            shared: s == 0 && with_shared,
                        });
                    }
                    continue;
                }
                // Split points; with a selection, moved past the pieces of the block they fall in, so that no block is
                // read (and counted) by two tasks.
                let cut = |s: usize| {
                    let mut at = base + nb * s / splits;
                    if matches!(sel, Sel::Heads(_)) {
                        while at > base
                            && at < base + nb
                            && scratch.pieces[at].block == scratch.pieces[at - 1].block
                        {
                            at += 1;
                        }
                    }
                    at
                };
                for s in 0..splits {
                    let (blk0, blk1) = (cut(s), cut(s + 1));
                    if blk0 < blk1 || s == 0 {
                        scratch.tasks.push(Task {
                            job: job_i,
                            kv_head,
                            t0,
                            t1,
                            blk0,
                            blk1,
                            shared: false,
                        });
                    }
                }
            }
        }
    }
    let rows_max = Q_TILE * sh.group;
    if scratch.bufs.len() < scratch.tasks.len() {
        scratch
            .bufs
            .resize_with(scratch.tasks.len(), TaskBuf::default);
    }
    for b in &mut scratch.bufs[..scratch.tasks.len()] {
        if b.acc.len() < rows_max * sh.hv || b.k.len() < sh.bt * sh.hk || b.v.len() < sh.bt * sh.hv
        {
            b.acc.resize(rows_max * sh.hv, 0.0);
            b.m.resize(rows_max, 0.0);
            b.l.resize(rows_max, 0.0);
            b.k.resize(sh.bt * sh.hk, 0.0);
            b.v.resize(sh.bt * sh.hv, 0.0);
            b.s.resize(8 * sh.bt, 0.0); // up to 8 rows' scores (the wide fold's chunk)
            b.qg.resize(rows_max * sh.hk, 0.0);
        }
        if jobs
            .iter()
            .any(|j| matches!(j.cache.cfg.dtype, crate::kv::KvDtype::Kivi { bits, .. } if qtile::reads(bits, sh.hv)))
        {
            b.qprep.ensure(rows_max, sh.hk, sh.hv, sh.bt);
            let want = qtile::pbuf_len(sh.hv, sh.bt);
            if b.pbuf.len() < want {
                b.pbuf.resize(want, 0.0);
            }
            #[cfg(target_arch = "x86_64")]
            if sh.bt == 32 {
                for qp in &mut b.qrun {
                    qp.ensure(rows_max.min(8), sh.hk, sh.hv, sh.bt);
                }
                b.srun.resize(wide::RUN_SCRATCH, 0.0);
            }
        }
        if jobs.iter().any(|j| !matches!(j.sel, Sel::All)) && b.gk.len() < sh.bt * sh.hk {
            b.gk.resize(sh.bt * sh.hk, 0.0);
            b.gv.resize(sh.bt * sh.hv, 0.0);
            b.gpos.resize(sh.bt, 0);
            b.gs.resize(rows_max * sh.bt, 0.0);
            b.sv.resize(sh.bt * sh.hv, 0.0);
            b.spos.resize(sh.bt, 0);
        }
    }

    let tasks = &scratch.tasks;
    let pieces = &scratch.pieces[..];
    let bt = sh.bt;
    let shared = with_shared.then_some(&scratch.shared);
    let jobs_ro: &[AttnJob] = jobs;
    // Threads take tasks in order, so the one finishing task i most likely takes task i + threads next (the others
    // took those between): its first blocks are asked for as task i ends. A wrong guess still leaves them in the
    // shared cache for whichever thread takes it.
    let stride = rayon::current_num_threads().max(1);
    let follow = |i: usize| {
        let t = tasks.get(i + stride)?;
        let job = &jobs_ro[t.job];
        matches!(job.sel, Sel::All).then_some(Follow {
            cache: job.cache,
            kv_head: t.kv_head,
            blk0: t.blk0,
            blk1: t.blk1,
        })
    };
    crate::kernels::team::for_each_chunk_mut(&mut scratch.bufs[..tasks.len()], 1, |i, buf| {
        let (buf, task) = (&mut buf[0], &tasks[i]);
        let job = &jobs_ro[task.job];
        let a = TaskArgs {
            cache: job.cache,
            layer,
            q: job.q,
            q_pos: job.q_pos,
            sh: &sh,
            p,
            task,
            pieces: match job.sel {
                Sel::All => None,
                Sel::Heads(_) | Sel::Tiles(_) => Some(pieces),
            },
            // A selector's scores are of the step's one query row.
            scores: match job.sel {
                Sel::Heads(sel) if job.q_pos.len() == 1 => sel.scores(task.kv_head),
                _ => None,
            },
            shared,
            simd,
            follow: follow(i),
        };
        match bt {
            4 => run_dispatch::<4>(simd, &a, buf),
            8 => run_dispatch::<8>(simd, &a, buf),
            16 => run_dispatch::<16>(simd, &a, buf),
            32 => run_dispatch::<32>(simd, &a, buf),
            64 => run_dispatch::<64>(simd, &a, buf),
            _ => unreachable!("KvCache::new accepts only block sizes in BLOCK_TOKEN_CHOICES"),
        }
    });

    for (job_i, job) in jobs.iter().enumerate() {
        let read = tasks
            .iter()
            .zip(&scratch.bufs)
            .filter(|(t, _)| t.job == job_i)
            .map(|(_, b)| b.read)
            .sum();
        job.cache.note_read(read);
    }
    // Merge the splits of each (head, tile) and normalize into `out`.
    let mut i = 0;
    while i < tasks.len() {
        let first = tasks[i];
        let mut j = i;
        while j < tasks.len()
            && tasks[j].job == first.job
            && tasks[j].kv_head == first.kv_head
            && tasks[j].t0 == first.t0
        {
            j += 1;
        }
        let rows = (first.t1 - first.t0) * sh.group;
        for r in 0..rows {
            let m = scratch.bufs[i..j]
                .iter()
                .map(|b| b.m[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let t = first.t0 + r / sh.group;
            let h = first.kv_head * sh.group + r % sh.group;
            let o = &mut jobs[first.job].out[(t * n_q_heads + h) * sh.hv..][..sh.hv];
            o.fill(0.0);
            let mut l = 0.0f32;
            for b in &scratch.bufs[i..j] {
                if b.l[r] == 0.0 {
                    continue;
                }
                let w = (b.m[r] - m).exp();
                l += b.l[r] * w;
                for (od, a) in o.iter_mut().zip(&b.acc[r * sh.hv..][..sh.hv]) {
                    *od += a * w;
                }
            }
            if l > 0.0 {
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
        i = j;
    }
}

/// Which compiled variant of the task code runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Simd {
    Scalar,
    Avx2,
    Avx512,
}

/// The variant for the kernel `crate::kernels::kernel()` chose (HAYLOFT_KERNEL overrides it).
fn simd_level() -> Simd {
    use crate::kernels::Kernel;
    match crate::kernels::kernel() {
        Kernel::Avx512 => Simd::Avx512,
        Kernel::Avx2 => Simd::Avx2,
        Kernel::Scalar => Simd::Scalar,
    }
}

/// Everything a task reads.
struct TaskArgs<'a> {
    cache: &'a KvCache,
    layer: usize,
    q: &'a [f32],
    q_pos: &'a [u32],
    sh: &'a Shape,
    p: &'a AttnParams,
    task: &'a Task,
    /// The selection's pieces (the task's `blk0..blk1` index them); None = every block.
    pieces: Option<&'a [Piece]>,
    /// The selector's scores of the task's KV head for this (one-row) query, if it gave them.
    scores: Option<&'a GivenScores>,
    /// A sparse call's shared tiles (folded by the tasks whose `shared` is set).
    shared: Option<&'a sparse::SharedTiles>,
    /// The compiled variant running (the CPU supports it).
    simd: Simd,
    /// The blocks of the task this thread most likely takes next ([`Follow`]), asked for as this task's last blocks
    /// are folded; None when no dense task follows.
    follow: Option<Follow<'a>>,
}

/// A dense task's first blocks, to ask for before the task starts: a task whose first blocks come cold waits on
/// them (a thread takes a task every 1–3 µs at 8K).
#[derive(Clone, Copy)]
struct Follow<'a> {
    cache: &'a KvCache,
    kv_head: usize,
    blk0: usize,
    blk1: usize,
}

impl<'a> Follow<'a> {
    /// Block `i` of the task's first ones (None past its end).
    fn block(&self, layer: usize, i: usize) -> Option<BlockView<'a>> {
        (self.blk0 + i < self.blk1).then(|| self.cache.block(layer, self.kv_head, self.blk0 + i))
    }
}

/// Whether attention on `simd` over `dtype` blocks of `bt` entries runs an integer fold ([`vnni`] on AVX-512,
/// [`avx2q`] on AVX2), which rounds each block's scaled query to int8 and its probabilities to 16 bits: errors a
/// reference over the dequantized entries does not make (tests).
#[cfg(test)]
fn integer_fold(simd: Simd, dtype: crate::kv::KvDtype, bt: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vnni = vnni::available();
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    matches!(dtype, crate::kv::KvDtype::Kivi { bits: 2 | 4, .. })
        && bt == 32
        && ((simd == Simd::Avx512 && vnni) || simd == Simd::Avx2)
}

/// The CPU's variants, portable first (tests run each).
#[cfg(test)]
fn simd_levels() -> Vec<Simd> {
    use crate::kernels::Kernel;
    crate::kernels::available()
        .into_iter()
        .map(|k| match k {
            Kernel::Avx512 => Simd::Avx512,
            Kernel::Avx2 => Simd::Avx2,
            Kernel::Scalar => Simd::Scalar,
        })
        .collect()
}

/// Query row `r` of the task: the rows of `q`, or (pruned streams) the rows gathered to the stored channels.
#[inline(always)]
fn row_q<'a>(a: &TaskArgs<'a>, qrows: Option<&'a [f32]>, hs: usize, r: usize) -> &'a [f32] {
    let (sh, task) = (a.sh, a.task);
    match qrows {
        None => {
            let t = task.t0 + r / sh.group;
            &a.q[(t * sh.n_q_heads + task.kv_head * sh.group + r % sh.group) * sh.hk..][..sh.hk]
        }
        Some(qg) => &qg[r * hs..][..hs],
    }
}

/// One tile of keys and values as the fold reads it.
#[derive(Clone, Copy)]
enum Tile<'a> {
    /// Keys transposed (hs × BT; `pos.len()` valid columns), values (n × hv); `qrows` as [`row_q`] takes it.
    F32 {
        kt: &'a [f32],
        vb: &'a [f32],
        hs: usize,
        qrows: Option<&'a [f32]>,
        /// The rows' raw scores over the tile's entries, computed by a selector for this query ([`GivenScores`]):
        /// row r's at `given[r · BT..][..BT]`, used in place of `kt` (then empty, nothing read).
        given: Option<&'a [f32]>,
    },
    /// An f16 block read in place (the AVX-512 and AVX2 folds, for tasks of at most one chunk of rows: each key and
    /// value is converted where it is loaded, once, instead of through a converted copy of the block). Layout as
    /// `F32`. Only the entries whose bit is set in `cols` take part (a selection's part of a block: the others score
    /// −∞ and their value rows are not read); `u64::MAX` = every entry.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    F16 {
        kt: &'a [half::f16],
        vb: &'a [half::f16],
        hs: usize,
        qrows: Option<&'a [f32]>,
        cols: u64,
        /// The next block's keys and values, asked for a line at a time while this one is folded (the AVX-512 and AVX2
        /// folds; a burst of prefetches for a whole block stalls once the core's miss buffers are full, and the fold
        /// waits on memory instead of working under it). Empty: nothing to ask for.
        ahead: (Ahead, Ahead),
    },
    /// A 4-bit KIVI block read in place.
    Q4(qtile::Q4<'a>),
}

/// Bytes of a block to ask for while another is folded, a few cache lines at a time ([`Tile::F16`]'s `ahead`).
#[derive(Clone, Copy)]
struct Ahead {
    base: *const u8,
    len: usize,
}

impl Ahead {
    const NONE: Ahead = Ahead {
        base: std::ptr::null(),
        len: 0,
    };

    fn of<T>(s: &[T]) -> Ahead {
        Ahead {
            base: s.as_ptr() as *const u8,
            len: std::mem::size_of_val(s),
        }
    }

    /// Prefetches the cache lines that begin inside bytes [o, o + n) of the span (the span's first line with o = 0,
    /// wherever it begins), so spans that tile the bytes ask for each line once, into every cache level.
    #[inline(always)]
    fn span(self, o: usize, n: usize) {
        self.span_to::<{ PF_L1 }>(o, n)
    }

    /// [`Ahead::span`] into the second-level cache only (the AVX-512 f16 and 4-bit folds; on AVX2 the f16 loops' own
    /// prefetches in [`f16asm`] and the 4-bit fold's spans too). A request to L1 holds one of the core's few line-fill
    /// buffers until its line arrives; one that stops at L2 frees it sooner, so more lines are on the way at once. On a
    /// 2-core AVX-512 Xeon (`batched_decode_timing`, f16, `HL_STREAMS=1 HL_LEN=8192 HL_STEPS=30` or 8 streams of 1K
    /// with `HL_STEPS=60`), every span's hint switched in one build, alternated twice: 8K 10.8–11.2 → 9.6–9.8 ms per
    /// step (none at all: 15.3; `NTA`: 15.4; `T1`: 10.1–10.3; asking for the block after next as well, whole:
    /// 11.7–12.7), 8 × 1K 9.9–10.2 → 8.9–9.0; this build against the one before, five pairs at 8K: 10.28 / 9.73 / 10.82
    /// / 10.47 / 10.94 → 9.46 / 9.69 / 10.01 / 10.20 / 10.33, three at 8 × 1K: 10.38 / 10.69 / 10.34 → 9.53 / 9.97 /
    /// 10.68. The AVX-512 4-bit fold gained nothing measurable there; on a 2-core Zen 4 (AVX-512 VNNI, 2026-12-07) it
    /// did: `kivi4` over 30 SmolLM2-shaped 8K layers from memory (`HL_DTYPE=q4`), one thread (`taskset -c 1`) min 9.78
    /// / 10.85 → 8.41 / 8.34 ms per step, two threads 5.25 / 5.18 / 5.51 → 4.60 / 5.23 / 4.61; `bench speed --kv kivi4`
    /// at 8K 113.0 / 108.5 → 126.2 / 127.6 tok/s (its scales, asked for into L2 as well, came slower: 8.6 → 9.6–9.8
    /// ms). On a 2-core Zen 3 (AVX2), the same harness (`HL_STEPS=100`, 4 pairs of builds): f16 mean 11.5 / 11.8 / 13.0
    /// / 13.6 → 10.0 / 11.6 / 11.9 / 11.0 ms per step, min 9.67 / 10.47 / 10.49 / 9.71 → 9.26 / 9.20 / 9.73 / 9.13;
    /// `kivi4` min 10.24 / 12.47 / 11.02 / 9.26 → 8.62 / 10.69 / 10.21 / 9.12.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn span_l2(self, o: usize, n: usize) {
        self.span_to::<{ PF_L2 }>(o, n)
    }

    #[inline(always)]
    fn span_to<const HINT: i32>(self, o: usize, n: usize) {
        if o >= self.len {
            return;
        }
        let start = self.base as usize;
        let end = start + o + n.min(self.len - o);
        let mut line = if o == 0 {
            start & !63
        } else {
            (start + o + 63) & !63
        };
        while line < end {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint and never faults; the line holds bytes of the span.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<HINT>(line as *const i8)
            };
            line += 64;
        }
    }
}

/// Prefetch hints of [`Ahead::span`] and [`Ahead::span_l2`].
#[cfg(target_arch = "x86_64")]
const PF_L1: i32 = std::arch::x86_64::_MM_HINT_T0;
#[cfg(target_arch = "x86_64")]
const PF_L2: i32 = std::arch::x86_64::_MM_HINT_T2;
#[cfg(not(target_arch = "x86_64"))]
const PF_L1: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
#[allow(dead_code)]
const PF_L2: i32 = 0;

/// No block to prefetch from inside the fold.
const NO_AHEAD: (Ahead, Ahead) = (Ahead::NONE, Ahead::NONE);

/// Asks for `next` while `blk` is folded: when `spread` (the AVX-512 or AVX2 fold of an f16 block takes it) and both
/// are f16 blocks in RAM, only its positions now and its keys and values returned for the fold to ask for as it works;
/// likewise, when `spread_q4` (the AVX2 fold reads 4-bit blocks in place) and both are quantized blocks, its scales
/// and positions now and its key and value codes returned; otherwise the whole block now, and nothing returned.
fn ask_ahead(blk: &BlockView, next: &BlockView, spread: bool, spread_q4: bool) -> (Ahead, Ahead) {
    match (blk.f16_parts(), next.f16_parts()) {
        (Some(_), Some((k, v))) if spread => {
            next.prefetch_pos();
            return (Ahead::of(k), Ahead::of(v));
        }
        _ => {}
    }
    match (blk.quant_codes(), next.quant_codes()) {
        (Some(_), Some((k, v))) if spread_q4 => {
            next.prefetch_scales();
            (Ahead::of(k), Ahead::of(v))
        }
        _ => {
            next.prefetch();
            NO_AHEAD
        }
    }
}

/// [`ask_ahead`] for a selection's next block, of which only `parts` are read: a block read whole is asked for as
/// [`ask_ahead`] does; of one read in part, its keys (read whole), positions and the parts' value rows only, now.
fn ask_ahead_pieces<'p>(
    blk: &BlockView,
    next: &BlockView,
    spread: bool,
    parts: impl Iterator<Item = &'p Piece> + Clone,
    hv: usize,
) -> (Ahead, Ahead) {
    let whole = parts
        .clone()
        .next()
        .is_some_and(|q| q.j0 == 0 && q.j1 as usize == next.n);
    if whole {
        return ask_ahead(blk, next, spread, false);
    }
    match (blk.f16_parts(), next.f16_parts()) {
        (Some(_), Some((k, v))) if spread => {
            // The fold asks for these as it works: the keys, and the value rows from the first part to the last.
            next.prefetch_pos();
            let j0 = parts.clone().next().map_or(0, |q| q.j0 as usize);
            let j1 = parts.last().map_or(0, |q| q.j1 as usize);
            (Ahead::of(k), Ahead::of(&v[j0 * hv..j1 * hv]))
        }
        _ => {
            next.prefetch_entries(parts.map(|q| (q.j0 as usize, q.j1 as usize)));
            NO_AHEAD
        }
    }
}

fn run_dispatch<const BT: usize>(simd: Simd, a: &TaskArgs, buf: &mut TaskBuf) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the kernel selection checked AVX-512F/BW/VL (and AVX2, FMA, F16C) on this CPU.
        Simd::Avx512 => return unsafe { run_task_avx512::<BT>(a, buf) },
        // SAFETY: the kernel selection checked AVX2, FMA and F16C on this CPU.
        Simd::Avx2 => return unsafe { run_task_avx2::<BT>(a, buf) },
        Simd::Scalar => {}
    }
    let _ = simd;
    run_task::<BT>(a, buf)
}

/// The same code as `run_task`, compiled with AVX-512 enabled: conversions and the softmax run 16 lanes wide and
/// `fold` takes the register-blocked [`wide`] kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn run_task_avx512<const BT: usize>(a: &TaskArgs, buf: &mut TaskBuf) {
    run_task::<BT>(a, buf)
}

/// The same code as `run_task`, compiled with AVX2/FMA/F16C enabled so its loops vectorize 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_task_avx2<const BT: usize>(a: &TaskArgs, buf: &mut TaskBuf) {
    run_task::<BT>(a, buf)
}

pub use crate::kernels::exp_neg;

/// s[j] = q · k_j for the BT keys of a block stored transposed (`kt[d · BT + j]`).
#[inline(always)]
fn score_block<const BT: usize>(kt: &[f32], q: &[f32], s: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if BT == 32 && simd != Simd::Scalar {
        // SAFETY: every variant but Scalar runs only where AVX2 and FMA were found; kt has q.len() · 32 elements and
        // s has 32.
        unsafe { score_block32_avx2(kt, q, s) };
        return;
    }
    let _ = simd;
    let s: &mut [f32; BT] = (&mut s[..BT]).try_into().expect("BT scores");
    s.fill(0.0);
    for (col, &qd) in kt.chunks_exact(BT).zip(q) {
        for j in 0..BT {
            s[j] += qd * col[j];
        }
    }
}

/// 32 keys at once: four 8-lane accumulators stay in registers, one broadcast and four FMAs per key dimension.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_block32_avx2(kt: &[f32], q: &[f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(kt.len() >= q.len() * 32 && s.len() >= 32);
    let (mut a0, mut a1, mut a2, mut a3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let base = kt.as_ptr();
    for (d, &qd) in q.iter().enumerate() {
        let qv = _mm256_set1_ps(qd);
        let col = base.add(d * 32);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(col), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(col.add(8)), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(col.add(16)), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(col.add(24)), a3);
    }
    let out = s.as_mut_ptr();
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out.add(8), a1);
    _mm256_storeu_ps(out.add(16), a2);
    _mm256_storeu_ps(out.add(24), a3);
}

/// One online-softmax step over a block's (masked) scores `s`, given the row's running max `m_old`: turns `s` into
/// e^(s − m_new) in place and returns (m_new, α = e^(m_old − m_new), Σ e^(s − m_new)), or None when every score is
/// masked. The max and the sum reduce over 8 independent lanes so the loops vectorize.
#[inline(always)]
fn block_softmax(s: &mut [f32], m_old: f32) -> Option<(f32, f32, f32)> {
    let mut mx = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let blk_max = rest
        .iter()
        .chain(&mx)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if blk_max == f32::NEG_INFINITY {
        return None;
    }
    let m_new = if blk_max > m_old { blk_max } else { m_old };
    let alpha = exp_neg(m_old - m_new); // 0 when m_old = −∞
    for x in s.iter_mut() {
        *x = exp_neg(*x - m_new);
    }
    // A partial block's last entries go to lanes j mod 8 like the rest: the sum then has the same bits as over the
    // whole block with its missing entries at 0 (x + 0 = x), which is how a prefill row sees a block its causal mask
    // cuts, so decoding a token and reading it in a prefill give the same sum.
    let mut acc = [0.0f32; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    Some((m_new, alpha, acc.iter().sum::<f32>()))
}

/// One task: rows = (query token in tile) × (query head in the KV head's group). Leaves unnormalized output in
/// `buf.acc`, the running max in `buf.m` and the running sum of exp in `buf.l` (0 when no key was visible).
/// `BT` = tokens per KV block, a constant so the block's scores live in registers.
#[inline(always)]
fn run_task<const BT: usize>(a: &TaskArgs, buf: &mut TaskBuf) {
    let (cache, layer, q, sh, task) = (a.cache, a.layer, a.q, a.sh, a.task);
    let (hk, hv, g) = (sh.hk, sh.hv, sh.group);
    let rows = (task.t1 - task.t0) * g;
    buf.acc[..rows * hv].fill(0.0);
    buf.m[..rows].fill(f32::NEG_INFINITY);
    buf.l[..rows].fill(0.0);
    buf.read = 0;
    let tile_pos = &a.q_pos[task.t0..task.t1];
    let max_qpos = tile_pos.iter().copied().max().unwrap_or(0);
    // A stream with pruned key channels (ThinK) stores `hs` < hk channels: gather them from each query row once.
    let channels = cache.key_channels(layer, task.kv_head);
    if let Some(ch) = channels {
        let hs = ch.len();
        for r in 0..rows {
            let t = task.t0 + r / g;
            let qr = &q[(t * sh.n_q_heads + task.kv_head * g + r % g) * hk..][..hk];
            for (x, &c) in buf.qg[r * hs..][..hs].iter_mut().zip(ch) {
                *x = qr[c as usize];
            }
        }
    }
    let interleave = ahead_f16::<BT>(a);
    // The AVX2 fold reads this task's whole 4-bit blocks in place and asks for the next one's codes as it works.
    let spread_q4 = a.simd == Simd::Avx2 && BT == 32 && sh.hv.is_multiple_of(8);
    let Some(pieces) = a.pieces else {
        #[cfg(target_arch = "x86_64")]
        let runs = q4_runs::<BT>(a, channels.map(<[u16]>::len));
        // A run asks for the next run's blocks as it folds, so only the task's first run would start cold, and
        // at short contexts a task is one run: ask for its blocks all at once, so their misses overlap instead of
        // each part's miss stalling the preparation in turn.
        #[cfg(target_arch = "x86_64")]
        if runs {
            for i in task.blk0..(task.blk0 + wide::Q4_RUN).min(task.blk1) {
                cache.block(layer, task.kv_head, i).prefetch();
            }
        }
        let mut b = task.blk0;
        while b < task.blk1 {
            let blk = cache.block(layer, task.kv_head, b);
            if blk.n == 0 || blk.pos[0] > max_qpos {
                // Positions ascend within a stream: nothing here or later is visible to this tile.
                break;
            }
            // A run of 2 to 4 whole 4-bit blocks goes through one fold (the task's last blocks make shorter runs).
            #[cfg(target_arch = "x86_64")]
            if runs && task.blk1 - b >= 2 {
                let n = (task.blk1 - b).min(wide::Q4_RUN);
                let view = |i: usize| cache.block(layer, task.kv_head, b + i.min(n - 1));
                let views = [view(0), view(1), view(2), view(3)];
                if views.iter().all(|v| q4_whole(a, v)) {
                    // The next run's quantized blocks are asked for as this run works ([`wide::RunAhead`]); the
                    // first other block (the f16 residual's first) now.
                    let mut next: [Option<BlockView>; wide::Q4_RUN] = [None, None, None, None];
                    // This task's next run, or at its end the first run of the task that likely follows.
                    let last = b + n >= task.blk1;
                    let mut asked = false;
                    for (i, slot) in next.iter_mut().enumerate() {
                        let v = if last {
                            a.follow.and_then(|f| f.block(layer, i))
                        } else {
                            (b + n + i < task.blk1)
                                .then(|| cache.block(layer, task.kv_head, b + n + i))
                        };
                        match v {
                            Some(v) if v.quant_codes().is_some() => *slot = Some(v),
                            // Only the first block that is not 4-bit (the f16 residual's first): its fold asks for
                            // the next one as it works. Asking for the whole residual at once (4 f16 blocks, 512 lines
                            // at SmolLM2's shapes) stalled the thread until the fill buffers drained: 8 streams of
                            // `kivi4` with 1K entries (`batched_decode_timing`, variants alternated step by step in
                            // one process, 3 runs): 11.9 / 14.4 / 3.1 ms per step (the last with 2 streams in cache)
                            // against 11.1 / 13.4 / 2.9 asking for the first only.
                            Some(v) if !asked => {
                                v.prefetch();
                                asked = true;
                            }
                            _ => {}
                        }
                    }
                    fold_q4_run(a, &views, n, channels.is_some(), buf, &next);
                    b += n;
                    continue;
                }
            }
            // Blocks are separate allocations the hardware prefetchers do not follow: ask for the next one now, so
            // its bytes arrive while this one is folded (one block ahead measured best: 27 GB/s against 18 without).
            // The AVX-512 and AVX2 folds of an f16 block ask for the next f16 block themselves, spread over their work.
            let mut ahead = NO_AHEAD;
            if b + 1 < task.blk1 {
                ahead = ask_ahead(
                    &blk,
                    &cache.block(layer, task.kv_head, b + 1),
                    interleave,
                    spread_q4,
                );
            } else if let Some(f) = a.follow.and_then(|f| f.block(layer, 0)) {
                // The task's last block: the first of the task that likely follows.
                ahead = ask_ahead(&blk, &f, interleave, spread_q4);
            }
            fold_view::<BT>(a, &blk, channels.is_some(), buf, ahead);
            b += 1;
        }
        return;
    };
    // The head's shared entries, gathered once for the call: every tile folds the same tiles.
    if let (true, Some(st)) = (task.shared, a.shared) {
        let (t0, t1) = st.heads[task.kv_head];
        let stride = sparse::SharedTiles::stride(hk, hv, BT);
        for t in t0..t1 {
            let (kt, vb) = st.kv[t * stride..][..stride].split_at(hk * BT);
            let n = st.n[t];
            let tile = Tile::F32 {
                kt,
                vb: &vb[..n * hv],
                hs: hk,
                qrows: None,
                given: None,
            };
            let TaskBuf {
                s, m, l, acc, pbuf, ..
            } = &mut *buf;
            fold::<BT>(a, tile, &st.pos[t * BT..][..n], s, m, l, acc, pbuf);
        }
    }
    // Selected pieces: whole blocks take the block path; parts of blocks are gathered into a tile of BT entries.
    let mut ng = 0;
    // Entries gathered with the selector's scores (a decode step's rows only), in a tile of their own.
    let mut ns = 0;
    // The given scores (a decode step's rows only, every part holding them) and the entries they cover.
    let given = a
        .scores
        .filter(|gs| rows == g && gs.holds_rows(rows))
        .map(|gs| (gs, gs.lo(), gs.hi()));
    // The block whose keys `buf.k` holds converted (pieces of one block follow each other).
    let mut converted = usize::MAX;
    let task_pieces = &pieces[task.blk0..task.blk1];
    // The next piece in another block: its block is prefetched while this one is folded (as the dense path does).
    let mut ahead = 0;
    // Whether the block after the current one was asked for (by a block read in part, two blocks ahead).
    let mut asked_next = false;
    for (i, pc) in task_pieces.iter().enumerate() {
        let blk = cache.block(layer, task.kv_head, pc.block as usize);
        let (j0, j1) = (pc.j0 as usize, pc.j1 as usize);
        if blk.pos[j0] > max_qpos {
            // Pieces ascend: nothing here or later is visible to this tile.
            break;
        }
        ahead = ahead.max(i + 1);
        while ahead < task_pieces.len() && task_pieces[ahead].block == pc.block {
            ahead += 1;
        }
        let whole = j0 == 0 && j1 == blk.n;
        if let (Some((gs, lo, hi)), BlockData::F16 { v: vh, .. }, None) =
            (given, blk.data, blk.channels)
        {
            let base = pc.block as usize * BT;
            if base + j0 >= lo && base + j1 <= hi {
                // Entries the selector scored for this query: their scores and values gathered into a tile, their
                // keys not read. The value rows a few pieces on are asked for now (scattered pieces in separate
                // blocks, which the hardware prefetchers do not follow).
                if let Some(np) = task_pieces.get(i + GIVEN_AHEAD) {
                    let next = cache.block(layer, task.kv_head, np.block as usize);
                    if let BlockData::F16 { v, .. } = next.data {
                        Ahead::of(&v[np.j0 as usize * hv..np.j1 as usize * hv]).span(0, usize::MAX);
                    }
                }
                blk.mark_read();
                buf.read += (j1 - j0) * (2 * hv + 4);
                let mut j = j0;
                while j < j1 {
                    if ns == BT {
                        fold_given::<BT>(a, ns, buf);
                        ns = 0;
                    }
                    // Up to the end of the part holding the entry (a split scan's parts meet anywhere; they are
                    // adjacent, so every entry of [lo, hi) has one).
                    let part = gs.part_at(base + j).expect("given scores cover [lo, hi)");
                    let off = base + j - part.lo as usize;
                    let m = (j1 - j).min(BT - ns).min(part.len() - off);
                    for r in 0..rows {
                        buf.gs[r * BT + ns..][..m].copy_from_slice(&part.row(r)[off..][..m]);
                    }
                    to_f32(
                        &vh[j * hv..][..m * hv],
                        &mut buf.sv[ns * hv..][..m * hv],
                        a.simd,
                    );
                    buf.spos[ns..ns + m].copy_from_slice(&blk.pos[j..j + m]);
                    ns += m;
                    j += m;
                }
                continue;
            }
        }
        // A whole f16 block folded by the AVX-512 or AVX2 fold asks for the next piece's f16 block itself, as it works.
        let mut next_kv = NO_AHEAD;
        let first = i == 0 || task_pieces[i - 1].block != pc.block;
        // The next block was asked for already when the block before this one was read in part (below).
        if ahead < task_pieces.len() && first && (whole || !asked_next) {
            let nb = task_pieces[ahead].block;
            let next = cache.block(layer, task.kv_head, nb as usize);
            let parts = task_pieces[ahead..].iter().take_while(|q| q.block == nb);
            next_kv = ask_ahead_pieces(&blk, &next, whole && interleave, parts, hv);
        }
        if ahead < task_pieces.len() && first && !whole {
            // A block read in part folds in a fraction of a whole one's time, too little to wait out a miss on the
            // next block: its pieces ask for the block after the next one (the next one was asked for a block ago).
            let nb = task_pieces[ahead].block;
            let far = ahead
                + task_pieces[ahead..]
                    .iter()
                    .take_while(|q| q.block == nb)
                    .count();
            if let Some(fb) = task_pieces.get(far).map(|q| q.block) {
                let f = cache.block(layer, task.kv_head, fb as usize);
                let parts = task_pieces[far..].iter().take_while(|q| q.block == fb);
                f.prefetch_entries(parts.map(|q| (q.j0 as usize, q.j1 as usize)));
            }
        }
        if first {
            asked_next = !whole;
        }
        if whole {
            fold_view::<BT>(a, &blk, channels.is_some(), buf, next_kv);
            converted = usize::MAX;
            continue;
        }
        let on_disk = matches!(blk.data, BlockData::Disk(_));
        if blk.channels.is_none()
            && (on_disk || matches!(blk.data, BlockData::F16 { .. }))
            && wide_f16::<BT>(a)
        {
            // Part of an f16 block, read in place: the block's pieces (they follow each other) as a mask of its
            // entries. Keys are read whole (each channel's row of the block is one or two cache lines, touched
            // anyway) and counted whole; values and positions only for the selected entries. A block offloaded to
            // disk is read whole into the task's buffer (its read counted there) and folded the same way, so that
            // offload changes no bit of the result.
            if i > 0 && task_pieces[i - 1].block == pc.block {
                continue; // folded with the block's first piece
            }
            let (mut cols, mut picked) = (0u64, 0);
            for q in task_pieces[i..].iter().take_while(|q| q.block == pc.block) {
                cols |= (u64::MAX >> (64 - (q.j1 - q.j0))) << q.j0;
                picked += (q.j1 - q.j0) as usize;
            }
            blk.mark_read();
            if !on_disk {
                buf.read += 2 * hk * BT + picked * (2 * hv + 4);
            }
            let TaskBuf {
                s,
                m,
                l,
                acc,
                pbuf,
                disk,
                ..
            } = &mut *buf;
            let (kh, vh) = match blk.data {
                BlockData::F16 { k: kh, v: vh } => (&kh[..], &vh[..]),
                _ => blk.read_offloaded(disk).expect("a disk block"),
            };
            let tile = Tile::F16 {
                kt: &kh[..hk * BT],
                vb: &vh[..blk.n * hv],
                hs: hk,
                qrows: None,
                cols,
                ahead: NO_AHEAD,
            };
            fold::<BT>(a, tile, blk.pos, s, m, l, acc, pbuf);
            continue;
        }
        // Part of an f16 block: its keys are converted whole (each channel's row of the block is one or two cache
        // lines, touched anyway) and counted whole; values and positions only for the selected entries. A block
        // offloaded to disk is read whole into the task's buffer (its read counted there), then taken the same way.
        let f16_part =
            blk.channels.is_none() && (on_disk || matches!(blk.data, BlockData::F16 { .. }));
        if f16_part {
            blk.mark_read();
            if converted != pc.block as usize {
                let TaskBuf { k, disk, .. } = &mut *buf;
                let kh = match blk.data {
                    BlockData::F16 { k: kh, .. } => &kh[..],
                    _ => blk.read_offloaded(disk).expect("a disk block").0,
                };
                kh[..hk * BT].convert_to_f32_slice(&mut k[..hk * BT]);
                if !on_disk {
                    buf.read += 2 * hk * BT;
                }
                converted = pc.block as usize;
            }
            if !on_disk {
                buf.read += (j1 - j0) * (2 * hv + 4);
            }
        } else {
            buf.read += (j1 - j0) * blk.entry_bytes();
        }
        let mut j = j0;
        while j < j1 {
            if ng == BT {
                fold_gathered::<BT>(a, ng, buf);
                ng = 0;
            }
            // Copy a run of entries [j, j + m) into the tile at ng: column runs of the transposed keys, value rows.
            let m = (j1 - j).min(BT - ng);
            let TaskBuf {
                gk,
                gv,
                gpos,
                k,
                disk,
                ..
            } = buf;
            match (blk.data, f16_part) {
                (_, true) => {
                    let vh = match blk.data {
                        BlockData::F16 { v: vh, .. } => &vh[..],
                        _ => blk.read_offloaded(disk).expect("a disk block").1,
                    };
                    for c in 0..hk {
                        gk[c * BT + ng..][..m].copy_from_slice(&k[c * BT + j..][..m]);
                    }
                    vh[j * hv..][..m * hv].convert_to_f32_slice(&mut gv[ng * hv..][..m * hv]);
                }
                (BlockData::F32 { k: kf, v: vf }, _) if blk.channels.is_none() => {
                    for c in 0..hk {
                        gk[c * BT + ng..][..m].copy_from_slice(&kf[c * BT + j..][..m]);
                    }
                    gv[ng * hv..][..m * hv].copy_from_slice(&vf[j * hv..][..m * hv]);
                }
                _ => {
                    // Quantized or channel-pruned blocks: entry by entry, every channel (pruned ones read as 0).
                    for i in 0..m {
                        let key = &mut k[..hk];
                        blk.read_key(j + i, key);
                        for (c, &x) in key.iter().enumerate() {
                            gk[c * BT + ng + i] = x;
                        }
                        blk.read_value(j + i, &mut gv[(ng + i) * hv..][..hv]);
                    }
                }
            }
            gpos[ng..ng + m].copy_from_slice(&blk.pos[j..j + m]);
            ng += m;
            j += m;
        }
    }
    if ng > 0 {
        fold_gathered::<BT>(a, ng, buf);
    }
    if ns > 0 {
        fold_given::<BT>(a, ns, buf);
    }
}

/// Pieces ahead whose value rows a fold with given scores asks for.
const GIVEN_AHEAD: usize = 4;

/// Whether the task's whole 4-bit (or 2-bit, [`qtile::reads`]) blocks may go to [`wide::fold_q4_run`] in runs: the integer fold runs here, with
/// blocks of 32, at most 8 rows (one decode token's group), no soft-cap, a value head dim of whole 64-channel groups
/// and stored key channels (`hs`: the kept ones of a pruned stream) in multiples of 16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn q4_runs<const BT: usize>(a: &TaskArgs, hs: Option<usize>) -> bool {
    let rows = (a.task.t1 - a.task.t0) * a.sh.group;
    BT == 32
        && int8_fold::<BT>(a.simd) == qtile::Int8::Vnni
        && rows <= 8
        && a.p.softcap.is_none()
        && a.sh.hv.is_multiple_of(64)
        && hs.unwrap_or(a.sh.hk).is_multiple_of(16)
        && matches!(a.cache.cfg.dtype, crate::kv::KvDtype::Kivi { bits, .. } if qtile::reads_nibbles(bits, a.sh.hv))
}

/// Whether `blk` is a full 4-bit (or widened 2-bit) block every row of the task sees whole (a run's block).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn q4_whole(a: &TaskArgs, blk: &BlockView) -> bool {
    let BlockData::Quant(qb) = blk.data else {
        return false;
    };
    if !qtile::reads_nibbles(qb.bits, a.sh.hv) || blk.n != a.sh.bt {
        return false;
    }
    // The block's smallest and largest positions bound the rest. Not its first and last entries: LazyLLM's revival
    // appends old positions after newer ones, so a block's positions need not ascend.
    let (lo, hi) = pos_bounds(&blk.pos[..blk.n]);
    a.q_pos[a.task.t0..a.task.t1]
        .iter()
        .all(|&q| hi <= q && a.p.window.is_none_or(|w| q - lo < w))
}

/// Folds the first `n` (2 to 4) of `views`, whole 4-bit blocks ([`q4_whole`]), into the task's rows at once
/// ([`wide::fold_q4_run`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fold_q4_run<'a>(
    a: &TaskArgs<'a>,
    views: &[BlockView<'a>; wide::Q4_RUN],
    n: usize,
    pruned: bool,
    buf: &'a mut TaskBuf,
    next: &[Option<BlockView<'a>>; wide::Q4_RUN],
) {
    let mut ahead = wide::RunAhead::NONE;
    for (i, v) in next.iter().enumerate() {
        if let Some((k, val)) = v.as_ref().and_then(BlockView::quant_codes) {
            ahead.k[i] = Ahead::of(k);
            ahead.v[i] = Ahead::of(val);
        }
    }
    let (hv, rows, scale) = (a.sh.hv, (a.task.t1 - a.task.t0) * a.sh.group, a.p.scale);
    for v in &views[..n] {
        v.mark_read();
        buf.read += v.n * v.entry_bytes();
    }
    let TaskBuf {
        qg,
        qrun,
        srun,
        m,
        l,
        acc,
        ..
    } = buf;
    let qrows = if pruned { Some(&qg[..]) } else { None };
    let prep = |qp: &'a mut qtile::QPrep, v: &BlockView<'a>| {
        let BlockData::Quant(qb) = v.data else {
            unreachable!("a run holds 4-bit or 2-bit blocks")
        };
        let hs = v.hk;
        qp.prepare::<32>(qb, hv, rows, qtile::Int8::Vnni, move |r| {
            row_q(a, qrows, hs, r)
        })
    };
    // The next run's block i's scales and positions are asked for as this run's block i is prepared.
    let scales = |i: usize| {
        if let Some(v) = &next[i] {
            v.prefetch_scales();
        }
    };
    let [p0, p1, p2, p3] = qrun;
    let [v0, v1, v2, v3] = views;
    // SAFETY: `q4_runs` checked the CPU (the integer fold), hv and the rows; `q4_whole` every block.
    unsafe {
        match n {
            4 => {
                scales(0);
                let q0 = prep(p0, v0);
                scales(1);
                let q1 = prep(p1, v1);
                scales(2);
                let q2 = prep(p2, v2);
                scales(3);
                let q4s = [q0, q1, q2, prep(p3, v3)];
                wide::fold_q4_run::<4, 128>(&q4s, rows, scale, hv, srun, m, l, acc, &ahead)
            }
            // A run of fewer than 4 blocks is its task's last: what follows it is the next task's first blocks, of
            // which the fold asks for as many as the run has blocks.
            3 => {
                (0..3).for_each(scales);
                let q4s = [prep(p0, v0), prep(p1, v1), prep(p2, v2)];
                wide::fold_q4_run::<3, 96>(&q4s, rows, scale, hv, srun, m, l, acc, &ahead)
            }
            _ => {
                (0..2).for_each(scales);
                let q4s = [prep(p0, v0), prep(p1, v1)];
                wide::fold_q4_run::<2, 64>(&q4s, rows, scale, hv, srun, m, l, acc, &ahead)
            }
        }
    };
    #[cfg(test)]
    if COUNT_Q4_RUNS.load(std::sync::atomic::Ordering::Relaxed) {
        Q4_RUNS_FOLDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs [`fold_q4_run`] folded so far while [`COUNT_Q4_RUNS`] is set (tests check that their cases take it).
#[cfg(all(test, target_arch = "x86_64"))]
static Q4_RUNS_FOLDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether [`fold_q4_run`] counts its runs: off unless a test asks, so that the timing harnesses of a test build do
/// not pay a locked add, contended by both threads, for every run (it took a fifth of the samples of the 4-bit task
/// loop in a `perf` profile of `batched_decode_timing`).
#[cfg(all(test, target_arch = "x86_64"))]
static COUNT_Q4_RUNS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Folds a whole block (any format) into the task's rows. `ahead`: the next block's f16 keys and values, for the
/// AVX-512 or AVX2 fold of an f16 block to prefetch as it works ([`Tile::F16`]); empty when the caller prefetched it
/// already.
#[inline(always)]
fn fold_view<const BT: usize>(
    a: &TaskArgs,
    blk: &BlockView,
    pruned: bool,
    buf: &mut TaskBuf,
    ahead: (Ahead, Ahead),
) {
    let (n, hs, hv) = (blk.n, blk.hk, a.sh.hv);
    if let Some(w) = a.p.window {
        let min_qpos = a.q_pos[a.task.t0..a.task.t1]
            .iter()
            .copied()
            .min()
            .unwrap_or(0);
        // The block's largest position, not its last: LazyLLM's revival appends old positions after newer ones.
        let newest = pos_bounds(&blk.pos[..n]).1;
        if (newest as u64) + (w as u64) <= min_qpos as u64 {
            ahead.0.span(0, usize::MAX);
            ahead.1.span(0, usize::MAX);
            return; // the whole block is outside every row's window
        }
    }
    blk.mark_read();
    buf.read += n * blk.entry_bytes();
    let TaskBuf {
        k,
        v,
        s,
        m,
        l,
        acc,
        qg,
        disk,
        qprep,
        pbuf,
        ..
    } = buf;
    let simd = a.simd;
    let qrows = if pruned { Some(&qg[..]) } else { None };
    // kt: hs × BT (keys transposed), vb: n × hv, as f32.
    let (kt, vb): (&[f32], &[f32]) = match blk.data {
        BlockData::F16 { k: kh, v: vh } if wide_f16::<BT>(a) => {
            let tile = Tile::F16 {
                kt: &kh[..hs * BT],
                vb: &vh[..n * hv],
                hs,
                qrows,
                cols: u64::MAX,
                ahead,
            };
            fold::<BT>(a, tile, blk.pos, s, m, l, acc, pbuf);
            return;
        }
        BlockData::F16 { k: kh, v: vh } => {
            to_f32(&kh[..hs * BT], &mut k[..hs * BT], simd);
            to_f32(&vh[..n * hv], &mut v[..n * hv], simd);
            (&k[..hs * BT], &v[..n * hv])
        }
        BlockData::F32 { k: kf, v: vf } => (&kf[..hs * BT], &vf[..n * hv]),
        BlockData::Quant(qb) if qtile::reads(qb.bits, hv) && n == BT => {
            // 8-bit, 4-bit (or widened 2-bit) KIVI block: scored and mixed from its codes, nothing dequantized.
            let rows = (a.task.t1 - a.task.t0) * a.sh.group;
            let mut q4 = qprep.prepare::<BT>(qb, hv, rows, int8_fold::<BT>(simd), |r| {
                row_q(a, qrows, hs, r)
            });
            q4.ahead = ahead;
            fold::<BT>(a, Tile::Q4(q4), blk.pos, s, m, l, acc, pbuf);
            return;
        }
        BlockData::Quant(qb) => {
            // A partial block (or 2-bit rows of odd bytes): dequantize this block only, into the task's scratch.
            qb.keys_into::<BT>(&mut k[..hs * BT]);
            qb.values_into(n, hv, &mut v[..n * hv]);
            (&k[..hs * BT], &v[..n * hv])
        }
        BlockData::Disk(_) => {
            // Offloaded block: read from the cache's file into this task's scratch, then as an f16 block.
            let (kh, vh) = blk.read_offloaded(disk).expect("a disk block");
            to_f32(&kh[..hs * BT], &mut k[..hs * BT], simd);
            to_f32(&vh[..n * hv], &mut v[..n * hv], simd);
            (&k[..hs * BT], &v[..n * hv])
        }
    };
    // A block the fold does not read in place does not ask for the next one as it works: ask for it now.
    ahead.0.span(0, usize::MAX);
    ahead.1.span(0, usize::MAX);
    let tile = Tile::F32 {
        kt,
        vb,
        hs,
        qrows,
        given: None,
    };
    fold::<BT>(a, tile, blk.pos, s, m, l, acc, pbuf);
}

/// Whether the task's f16 blocks go to the AVX-512 or AVX2 fold as they are ([`Tile::F16`]): its rows fit one
/// chunk of that fold, so converting each key and value where it is loaded converts it once, as the copy would; on
/// AVX2 also two chunks (a decode step of a 7- or 8-query group converts each twice, still cheaper than a copy's
/// store and reload: Qwen2.5's 8K attention about 40 % less on a Zen 3, docs/results.md).
#[inline(always)]
fn wide_f16<const BT: usize>(a: &TaskArgs) -> bool {
    let rows = (a.task.t1 - a.task.t0) * a.sh.group;
    #[cfg(target_arch = "x86_64")]
    match a.simd {
        Simd::Avx512 if BT.is_multiple_of(16) && BT <= 64 && a.sh.hv.is_multiple_of(16) => {
            return rows <= wide::chunk_rows::<BT>()
        }
        Simd::Avx2 if BT.is_multiple_of(8) && BT <= 64 && a.sh.hv.is_multiple_of(8) => {
            return rows <= 2 * wide2::CHUNK
        }
        _ => {}
    }
    let _ = rows;
    false
}

/// Whether the task's f16 blocks go to the AVX-512 or AVX2 fold as they are, which prefetches the next block itself
/// ([`Tile::F16`]'s `ahead`).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn ahead_f16<const BT: usize>(a: &TaskArgs) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(a.simd, Simd::Avx512 | Simd::Avx2) {
        return wide_f16::<BT>(a);
    }
    false
}

/// Which integer fold reads a 4-bit block of BT keys on `simd`: the AVX-512 one ([`vnni`]) where the CPU has VNNI,
/// the AVX2 one ([`avx2q`]); both take blocks of 32.
#[inline(always)]
fn int8_fold<const BT: usize>(simd: Simd) -> qtile::Int8 {
    #[cfg(target_arch = "x86_64")]
    if BT == 32 {
        match simd {
            Simd::Avx512 if vnni::available() => return qtile::Int8::Vnni,
            Simd::Avx2 => return qtile::Int8::Avx2,
            _ => {}
        }
    }
    let _ = simd;
    qtile::Int8::Off
}

/// f16 → f32 for a whole block: 16 lanes at a time with AVX-512, 8 with AVX2, else `half`'s conversion.
#[inline(always)]
fn to_f32(src: &[half::f16], dst: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: the Avx512 variant runs only where the kernel selection found AVX-512F on this CPU.
        unsafe { wide::f16_to_f32(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        // SAFETY: the Avx2 variant runs only where the kernel selection found AVX2, FMA and F16C on this CPU.
        unsafe { wide2::f16_to_f32(src, dst) };
        return;
    }
    let _ = simd;
    src.convert_to_f32_slice(dst);
}

/// Folds the `n` gathered entries (every key channel) into the task's rows.
#[inline(always)]
fn fold_gathered<const BT: usize>(a: &TaskArgs, n: usize, buf: &mut TaskBuf) {
    let TaskBuf {
        gk,
        gv,
        gpos,
        s,
        m,
        l,
        acc,
        pbuf,
        ..
    } = buf;
    let hk = a.sh.hk;
    let tile = Tile::F32 {
        kt: &gk[..hk * BT],
        vb: &gv[..n * a.sh.hv],
        hs: hk,
        qrows: None,
        given: None,
    };
    fold::<BT>(a, tile, &gpos[..n], s, m, l, acc, pbuf);
}

/// Folds the `n` entries gathered with a selector's scores ([`TaskBuf::gs`], `sv`, `spos`): no key is read.
fn fold_given<const BT: usize>(a: &TaskArgs, n: usize, buf: &mut TaskBuf) {
    let TaskBuf {
        gs,
        sv,
        spos,
        s,
        m,
        l,
        acc,
        pbuf,
        ..
    } = buf;
    let rows = (a.task.t1 - a.task.t0) * a.sh.group;
    let tile = Tile::F32 {
        kt: &[],
        vb: &sv[..n * a.sh.hv],
        hs: a.sh.hk,
        qrows: None,
        given: Some(&gs[..rows * BT]),
    };
    fold::<BT>(a, tile, &spos[..n], s, m, l, acc, pbuf);
}

/// The online-softmax step of every row of the task over one tile of keys (`pos`: the tile's n positions).
/// `pbuf`: scratch for a 4-bit tile's scaled probabilities ([`qtile::pbuf_len`]).
#[allow(clippy::too_many_arguments)] // the tile and the four running accumulators
#[inline(always)]
fn fold<const BT: usize>(
    a: &TaskArgs,
    tile: Tile,
    pos: &[u32],
    s_buf: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    pbuf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let hv = a.sh.hv;
        if BT.is_multiple_of(16) && BT <= 64 && hv.is_multiple_of(16) && a.simd == Simd::Avx512 {
            // SAFETY: the Avx512 variant runs only where the kernel selection found AVX-512 (with AVX2, FMA, F16C);
            // the buffers have the sizes `wide::fold` asserts (s_buf holds 8 × BT).
            unsafe { wide::fold::<BT>(a, &tile, pos, s_buf, m, l, acc, pbuf) };
            return;
        }
        if BT.is_multiple_of(8) && BT <= 64 && hv.is_multiple_of(8) && a.simd == Simd::Avx2 {
            // SAFETY: the Avx2 variant runs only where the kernel selection found AVX2, FMA and F16C; the buffers
            // have the sizes `wide2::fold` asserts.
            unsafe { wide2::fold::<BT>(a, &tile, pos, s_buf, m, l, acc, pbuf) };
            return;
        }
    }
    let (sh, p, task) = (a.sh, a.p, a.task);
    let (hv, g) = (sh.hv, sh.group);
    let n = pos.len();
    let rows = (task.t1 - task.t0) * g;
    let tile_pos = &a.q_pos[task.t0..task.t1];
    let all_visible = all_visible(tile_pos, pos, p.window);
    for r in 0..rows {
        let qpos = tile_pos[r / g];
        // s[j] = q·k_j for the tile's keys.
        let s = &mut s_buf[..BT];
        match tile {
            Tile::F32 {
                given: Some(gs), ..
            } => s.copy_from_slice(&gs[r * BT..][..BT]),
            Tile::F32 { kt, hs, qrows, .. } => {
                score_block::<BT>(kt, row_q(a, qrows, hs, r), s, a.simd)
            }
            Tile::Q4(q4) => qtile::scores_row::<BT>(&q4, r, s),
            Tile::F16 { .. } => unreachable!("f16 tiles go to the AVX-512 and AVX2 folds only"),
        }
        let s = &mut s[..n];
        // Scale, soft-cap, mask (elementwise), then the tile's softmax step.
        if all_visible && p.softcap.is_none() {
            for sj in s.iter_mut() {
                *sj *= p.scale;
            }
        } else {
            for (j, sj) in s.iter_mut().enumerate() {
                let mut x = *sj * p.scale;
                if let Some(c) = p.softcap {
                    x = c * (x / c).tanh();
                }
                let kpos = pos[j];
                if !all_visible && (kpos > qpos || p.window.is_some_and(|w| qpos - kpos >= w)) {
                    x = f32::NEG_INFINITY;
                }
                *sj = x;
            }
        }
        let Some((m_new, alpha, lsum)) = block_softmax(s, m[r]) else {
            continue;
        };
        let a = &mut acc[r * hv..][..hv];
        match tile {
            Tile::F32 { vb, .. } => pv_f32(s, vb, alpha, a),
            Tile::F16 { .. } => unreachable!("f16 tiles go to the AVX-512 and AVX2 folds only"),
            Tile::Q4(q4) => {
                qtile::scale_probs::<BT>(&q4, s, 1, n, pbuf);
                let (pq, pc) = pbuf.split_at(qtile::pc_offset::<BT>(q4.ng));
                qtile::pv_row::<BT>(&q4, pq, pc, n, alpha, a);
            }
        }
        m[r] = m_new;
        l[r] = l[r] * alpha + lsum;
    }
}

/// a ← α·a + Σ_j p_j · v_j over the rows of `vb` (n × a.len()), four keys per pass over the accumulator.
#[inline(always)]
fn pv_f32(s: &[f32], vb: &[f32], alpha: f32, a: &mut [f32]) {
    let hv = a.len();
    if alpha != 1.0 {
        a.iter_mut().for_each(|x| *x *= alpha);
    }
    // One pass: a += p0·v0 + p1·v1 + p2·v2 + p3·v3 over the four rows from `j` on.
    let pass = |a: &mut [f32], pq: [f32; 4], j: usize, last: usize| {
        let v = |i: usize| &vb[(j + i.min(last)) * hv..][..hv];
        let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
        for d in 0..hv {
            a[d] += pq[0] * v0[d] + pq[1] * v1[d] + pq[2] * v2[d] + pq[3] * v3[d];
        }
    };
    let mut quads = s.chunks_exact(4);
    let mut j = 0;
    for pq in quads.by_ref() {
        pass(a, [pq[0], pq[1], pq[2], pq[3]], j, 3);
        j += 4;
    }
    // The last 1–3 keys as one more pass, the missing keys at p = 0 over the last row that exists (0 · v): the same
    // bits as a pass whose last keys a causal mask cuts, which is how a prefill row sees the block.
    let rest = quads.remainder();
    if !rest.is_empty() {
        let mut pq = [0.0f32; 4];
        pq[..rest.len()].copy_from_slice(rest);
        pass(a, pq, j, rest.len() - 1);
    }
}

/// Reference attention over the same cache: materializes the full score row per query (for tests only).
pub fn naive_attention(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    p: &AttnParams,
) -> Vec<f32> {
    naive_attention_over(cache, layer, q, q_pos, p, None)
}

/// [`naive_attention`] over the entries `sel` chose only (every entry when None).
pub fn naive_attention_over(
    cache: &KvCache,
    layer: usize,
    q: &[f32],
    q_pos: &[u32],
    p: &AttnParams,
    sel: Option<&Selection>,
) -> Vec<f32> {
    let n_q_heads = p.n_q_heads;
    let cfg = &cache.cfg;
    let (hk, hv) = (cfg.head_dim_k, cfg.head_dim_v);
    let group = n_q_heads / cfg.n_kv_heads;
    let mut out = vec![0.0f32; q_pos.len() * n_q_heads * hv];
    let (mut kbuf, mut vbuf) = (vec![0.0f32; hk], vec![0.0f32; hv]);
    for (t, &qpos) in q_pos.iter().enumerate() {
        for h in 0..n_q_heads {
            let kvh = h / group;
            let qr = &q[(t * n_q_heads + h) * hk..][..hk];
            let mut scores = Vec::new();
            let mut vals: Vec<Vec<f64>> = Vec::new();
            let bt = cache.cfg.block_tokens;
            for (b, blk) in cache.blocks(layer, kvh).enumerate() {
                for j in 0..blk.n {
                    let e = b * bt + j;
                    if sel.is_some_and(|s| !s.contains(kvh, e)) {
                        continue;
                    }
                    let kpos = blk.pos[j];
                    if kpos > qpos || p.window.is_some_and(|w| qpos - kpos >= w) {
                        continue;
                    }
                    // Keys read with pruned channels as 0, quantized blocks dequantized.
                    blk.read_key(j, &mut kbuf);
                    blk.read_value(j, &mut vbuf);
                    let k: Vec<f64> = kbuf.iter().map(|&x| x as f64).collect();
                    let v: Vec<f64> = vbuf.iter().map(|&x| x as f64).collect();
                    let mut s: f64 =
                        qr.iter().zip(&k).map(|(a, b)| *a as f64 * b).sum::<f64>() * p.scale as f64;
                    if let Some(c) = p.softcap {
                        s = c as f64 * (s / c as f64).tanh();
                    }
                    scores.push(s);
                    vals.push(v);
                }
            }
            if scores.is_empty() {
                continue;
            }
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(t * n_q_heads + h) * hv..][..hv];
            for (wi, v) in w.iter().zip(&vals) {
                for d in 0..hv {
                    o[d] += (wi / z * v[d]) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod chunking_tests;

/// Whether every key of a tile (positions `pos`) is visible to every query of `tile_pos` (causal, and inside the
/// sliding window if any): then the fold skips per-key masking.
fn all_visible(tile_pos: &[u32], pos: &[u32], window: Option<u32>) -> bool {
    let max_qpos = tile_pos.iter().copied().max().unwrap_or(0);
    let min_qpos = tile_pos.iter().copied().min().unwrap_or(0);
    let (pmin, pmax) = pos_bounds(pos);
    pmax <= min_qpos && window.is_none_or(|w| max_qpos - pmin < w)
}

/// The smallest and largest of a tile's key positions ((u32::MAX, 0) for none). A block's first and last entries do
/// not bound it: LazyLLM's revival appends old positions after newer ones.
#[inline]
fn pos_bounds(pos: &[u32]) -> (u32, u32) {
    pos.iter()
        .fold((u32::MAX, 0), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

#[cfg(test)]
mod batch_timing;
