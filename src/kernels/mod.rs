//! Quantized matrix multiplication: `y = W·x` for GGUF weight formats, with llama.cpp's numerics.
//!
//! Like llama.cpp's CPU backend, we never multiply f32 activations by dequantized weights: each
//! activation row is first quantized to the weight type's `vec_dot_type` (Q8_0, Q8_1, Q8_K, f16, bf16
//! or f32, see `act.rs`), then the dot products are exact integer sums per block scaled in f32. The
//! results therefore agree with llama.cpp up to f32 summation order (~1e-6 relative), not just up to
//! quantization noise. `tests.rs` checks this against llama.cpp itself: `testdata/llamacpp_dots.fixture`
//! holds results of llama.cpp's own activation quantizers and `vec_dot` functions for every type.
//!
//! Weights are repacked at load time into row groups of 16 rows (see `layout.rs`) so that one SIMD
//! register holds 4 columns of 16 rows and a row group streams sequentially. Kernels:
//! * `avx512vnni`: avx512f/bw/vl + `vpdpbusd` (16 rows × up to 8 tokens per tile);
//! * `avx2`: avx2 + fma + f16c, `vpmaddubsw`/`vpmaddwd` (8 rows × up to 4 tokens);
//! * `scalar`: portable reference.
//!
//! The choice is made once (cached); `HAYLOFT_KERNEL=scalar|avx2|avx512vnni` overrides it (a request the
//! CPU cannot honour falls back to the best available). No AMX instructions are used anywhere.
//!
//! Work is split over rayon's global pool by row groups (at least 64 rows per task when decoding one
//! token) and, when there are few row groups, also by token ranges; activations of a prefill batch are
//! quantized in parallel. Small products run on the calling thread: from outside the pool below ~1M
//! multiply-adds (handing work to the pool costs a cross-thread wake-up), from a pool worker below
//! ~256K. Callers get the most from the pool by running their forward pass inside it
//! (`rayon::scope` / `ThreadPool::install`). After the scratch buffers have grown, `matmul` allocates
//! nothing.

// Index loops over const-generic register tiles read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod layout;
pub mod machine;
pub mod mathfn;
pub mod membw;
pub mod pick;
pub mod prof;
pub mod rowdot;
mod scalar;
pub mod team;
#[cfg(test)]
mod tests;

pub use crate::gguf::GgmlType;
pub use mathfn::{
    add_softmax, exp_neg, gate_mul, gelu_tanh, merge_softmax_parts, silu, softmax_inplace,
    softmax_part, softmax_stats, GateAct,
};
pub use rowdot::{quantize_i8, rows_dot_max_f16, rows_dot_max_i8};

use anyhow::{anyhow, bail};
use layout::{AlignedBuf, Kind, RG};
use smallvec::SmallVec;
use std::sync::OnceLock;

/// A weight matrix W of `rows` output features × `cols` input features.
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    kind: Kind,
    data: AlignedBuf,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} {}x{})", self.ty, self.rows, self.cols)
    }
}

const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

impl QMatrix {
    /// `bytes` = the tensor's raw GGUF bytes (`dims[0]` = cols, `dims[1]` = rows).
    /// Errors if the type is unsupported or the sizes do not match.
    pub fn from_gguf(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> anyhow::Result<Self> {
        Self::from_gguf_with(ty, rows, cols, bytes, &mut |_| {})
    }

    /// [`QMatrix::from_gguf`], calling `done(range)` as each range of `bytes` has been read for the last time (in
    /// order, slab by slab), so that a loader can let the file's pages go while it repacks the rest.
    pub fn from_gguf_with(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> anyhow::Result<Self> {
        let kind = Kind::from_type(ty).ok_or_else(|| {
            anyhow!(
                "weight type {ty} is not supported by the matmul kernels (supported: {SUPPORTED})"
            )
        })?;
        let (bs, bb) = ty
            .block_layout()
            .expect("supported types have a block layout");
        if rows == 0 || cols == 0 {
            bail!("{ty} matrix of {rows}x{cols}: empty matrices are not supported");
        }
        if !cols.is_multiple_of(bs) {
            bail!("{ty} matrix with {cols} columns: a row must be a whole number of {bs}-element {ty} blocks");
        }
        let want = rows.checked_mul(cols / bs * bb);
        if want != Some(bytes.len()) {
            bail!(
                "{ty} matrix of {rows}x{cols} needs {} bytes, got {}",
                want.map_or("more than usize::MAX".to_string(), |w| w.to_string()),
                bytes.len()
            );
        }
        let data = layout::repack(kind, rows, cols, bb, bytes, done);
        Ok(QMatrix {
            ty,
            rows,
            cols,
            kind,
            data,
        })
    }

    /// Dequantize row `row` into `out` (`out.len() == cols`), exactly as ggml's `dequantize_row_*`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows,
            "row {row} out of range ({} rows)",
            self.rows
        );
        assert_eq!(
            out.len(),
            self.cols,
            "dequantize_row: output length must equal cols"
        );
        layout::dequantize_row(self.kind, self.data.as_slice(), self.cols, row, out);
    }

    /// Bytes of weight data held (the packed form: what one pass over the matrix streams).
    pub fn n_bytes(&self) -> usize {
        self.data.len()
    }
}

/// Reusable buffers (quantized activations): one set per weight kind of a [`matmul_many`] call. Grows on first
/// use; after warm-up `matmul` allocates nothing.
#[derive(Default)]
pub struct MatmulScratch {
    sets: Vec<ActBufs>,
}

/// One input quantized for one weight kind.
#[derive(Default)]
struct ActBufs {
    qa: Vec<i8>,
    f1: Vec<f32>,
    f2: Vec<f32>,
    i1: Vec<i32>,
    fx: Vec<f32>,
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Implementations of the dot-product kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    Avx2,
    Avx512,
}

impl Kernel {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512vnni",
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx512() -> bool {
    false
}

/// The kernel for a `HAYLOFT_KERNEL` value (None: the best the CPU has).
pub(crate) fn select_kernel(request: Option<&str>) -> Kernel {
    let best = if has_avx512() {
        Kernel::Avx512
    } else if has_avx2() {
        Kernel::Avx2
    } else {
        Kernel::Scalar
    };
    match request.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("scalar") => Kernel::Scalar,
        Some("avx2") if has_avx2() => Kernel::Avx2,
        Some("avx512") | Some("avx512vnni") if has_avx512() => Kernel::Avx512,
        _ => best,
    }
}

/// The kernels available on this CPU, portable first.
pub(crate) fn available() -> Vec<Kernel> {
    let mut v = vec![Kernel::Scalar];
    if has_avx2() {
        v.push(Kernel::Avx2);
    }
    if has_avx512() {
        v.push(Kernel::Avx512);
    }
    v
}

pub(crate) fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| select_kernel(std::env::var("HAYLOFT_KERNEL").ok().as_deref()))
}

/// Which implementation runs ("avx512vnni", "avx2", "scalar"), for logs and stats.
pub fn kernel_name() -> &'static str {
    kernel().name()
}

/// What a kernel reads: the packed weights, the prepared activations and where to write.
#[derive(Clone, Copy)]
pub(crate) struct Ctx {
    pub kind: Kind,
    pub data: *const u8,
    pub rows: usize,
    pub cols: usize,
    /// Weight blocks (records) per row.
    pub n_blk: usize,
    /// Bytes per record.
    pub rec: usize,
    pub qa: *const i8,
    pub f1: *const f32,
    pub f2: *const f32,
    pub i1: *const i32,
    pub fx: *const f32,
    pub y: *mut f32,
}

/// How far past the record it is reading a quantized kernel asks for weights, in bytes (a few records of the K-quants,
/// a dozen of Q4_1). A row group is one sequential stream, yet the hardware prefetchers alone fed decode's products
/// at 10-12 GB/s where the machine reads 18 (2-core Xeon, weights from memory): Qwen2.5-0.5B decode spent 28 ms per
/// token, 22 with these requests (distances 2 to 16 KiB measured, 4 KiB among the best on every model).
#[cfg(target_arch = "x86_64")]
pub(crate) const WEIGHT_AHEAD: usize = 4096;

/// Asks for the cache lines of the `rec` bytes [`WEIGHT_AHEAD`] past `p` (the record being read), into L1. Past the
/// end of the matrix this asks for lines nobody reads, which is harmless: a prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn ask_weights_ahead(p: *const u8, rec: usize) {
    ask_weights_ahead_to::<{ std::arch::x86_64::_MM_HINT_T0 }>(p, rec)
}

/// [`ask_weights_ahead`] into L2 only. A prefetch into L1 holds one of the core's few line-fill buffers until its
/// line arrives from memory; one into L2 waits in the L2's longer queue, so more lines are in flight. The AVX-512
/// products use it: on a 2-core Xeon that reads 35 GB/s, single-token products over 512 MiB of weights (`bench
/// machine`'s rotation) went from 17.3-17.8 to 21.7-22.1 GB/s (Q4_1) and 16.1-16.5 to 19.2-19.3 (Q4_K), Q8_0
/// unchanged; from 64 MiB (in the last-level cache) no change.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn ask_weights_ahead_l2(p: *const u8, rec: usize) {
    ask_weights_ahead_to::<{ std::arch::x86_64::_MM_HINT_T2 }>(p, rec)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn ask_weights_ahead_to<const HINT: i32>(p: *const u8, rec: usize) {
    let ahead = p.wrapping_add(WEIGHT_AHEAD);
    let mut o = 0;
    while o < rec {
        // SAFETY: a prefetch is a hint and never faults; the address is only computed (wrapping), never read.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(ahead.wrapping_add(o) as *const i8) };
        o += 64;
    }
}

// SAFETY: the pointers are only read, except `y`, which tasks write in disjoint (row, token) ranges.
unsafe impl Sync for Ctx {}
unsafe impl Send for Ctx {}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint parts of a buffer to rayon tasks.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// `y[t][r] = sum_c W[r][c] * x[t][c]` for t in 0..n_tok. x: n_tok*cols (row-major), y: n_tok*rows.
/// Threads via rayon's global pool.
pub fn matmul(w: &QMatrix, x: &[f32], n_tok: usize, y: &mut [f32], scratch: &mut MatmulScratch) {
    matmul_with(kernel(), w, x, n_tok, y, scratch)
}

/// Quantize the activations for `w`'s kind into the scratch buffers.
fn prepare(k: Kernel, kind: Kind, cols: usize, x: &[f32], n_tok: usize, s: &mut ActBufs) {
    let (nq, n1, n2, ni, nx) = act::act_sizes(kind, cols);
    grow(&mut s.qa, nq * n_tok);
    grow(&mut s.f1, n1 * n_tok);
    grow(&mut s.f2, n2 * n_tok);
    grow(&mut s.i1, ni * n_tok);
    grow(&mut s.fx, nx * n_tok);
    if kind == Kind::F32 {
        return;
    }
    let ptrs = (
        SendPtr(s.qa.as_mut_ptr()),
        SendPtr(s.f1.as_mut_ptr()),
        SendPtr(s.f2.as_mut_ptr()),
        SendPtr(s.i1.as_mut_ptr()),
        SendPtr(s.fx.as_mut_ptr()),
    );
    let one = move |t: usize| {
        let p = ptrs;
        // SAFETY: each token writes only its own slices of the (grown) scratch buffers.
        let a = unsafe {
            act::ActRow {
                qa: std::slice::from_raw_parts_mut(p.0 .0.add(t * nq), nq),
                f1: std::slice::from_raw_parts_mut(p.1 .0.add(t * n1), n1),
                f2: std::slice::from_raw_parts_mut(p.2 .0.add(t * n2), n2),
                i1: std::slice::from_raw_parts_mut(p.3 .0.add(t * ni), ni),
                fx: std::slice::from_raw_parts_mut(p.4 .0.add(t * nx), nx),
            }
        };
        act::quantize_row(kind, &x[t * cols..(t + 1) * cols], a, k != Kernel::Scalar);
    };
    if n_tok >= 8 && rayon::current_num_threads() > 1 {
        const ROWS: usize = 8;
        team::for_each(n_tok.div_ceil(ROWS), |c| {
            (c * ROWS..(c * ROWS + ROWS).min(n_tok)).for_each(one)
        });
    } else {
        (0..n_tok).for_each(one);
    }
}

/// Elements below which [`par_rows`] runs on the calling thread: a hand-off to the pool costs a few microseconds,
/// about what one thread needs for this many element-wise operations.
const PAR_ROWS_MIN: usize = 1 << 14;

/// Runs `f(first_row, rows)` over `data` (rows of `row` elements), split into about two runs of whole rows per
/// thread of the current pool when there is enough work, else once over all of it. For the element-wise ops of a
/// prefill chunk (norms, RoPE, residual additions): left serial, they grow to a third of the pass at 16 threads.
pub fn par_rows(data: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let threads = rayon::current_num_threads();
    let n_rows = data.len() / row.max(1);
    if threads <= 1 || data.len() < PAR_ROWS_MIN || n_rows < 2 {
        f(0, data);
        return;
    }
    let per = n_rows
        .div_ceil(2 * threads)
        .max(PAR_ROWS_MIN.div_ceil(4 * row.max(1)));
    team::for_each_chunk_mut(data, per * row, |i, c| f(i * per, c));
}

/// Whether a product of `work` padded multiply-adds is split over a pool of `threads` (or runs on the calling thread).
/// Handing work to the pool from outside it (a cross-thread wake-up, ~5-10 us) only pays for bigger products than
/// from a pool worker (work stealing, ~1 us).
fn splits_work(threads: usize, work: usize) -> bool {
    let min_work = if rayon::current_thread_index().is_some() {
        1 << 18
    } else {
        1 << 20
    };
    threads > 1 && work >= min_work
}

/// Whether a single-token product with `w` is split over the current pool when called from one of its workers (as
/// the engine calls it): the cost model charges such a call the pool's hand-off.
pub fn gemv_splits(w: &QMatrix, threads: usize) -> bool {
    threads > 1 && w.rows.div_ceil(RG) * RG * w.cols >= 1 << 18
}

/// `matmul` with an explicit kernel (tests compare them).
pub(crate) fn matmul_with(
    k: Kernel,
    w: &QMatrix,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    s: &mut MatmulScratch,
) {
    matmul_many_with(k, &[w], x, n_tok, &mut [y], s)
}

/// `ys[m] = ws[m] · x` for several matrices of one input (Q, K and V; gate and up): the input is quantized once per
/// weight kind among them, and all the products share one parallel region. The same results, bit for bit, as
/// separate [`matmul`] calls. At most [`MANY`] matrices.
pub fn matmul_many(
    ws: &[&QMatrix],
    x: &[f32],
    n_tok: usize,
    ys: &mut [&mut [f32]],
    scratch: &mut MatmulScratch,
) {
    matmul_many_with(kernel(), ws, x, n_tok, ys, scratch)
}

/// Most matrices one [`matmul_many`] call takes.
pub const MANY: usize = 4;

/// Multiply-adds below which a single token's product is not cut into smaller tasks: a quarter of a microsecond of
/// work. At 4x this, on 16 threads the 576 × 576 output projection of SmolLM2 was 5 tasks, so 11 threads waited while
/// 5 worked; measured on a 16-core Xeon (3 rounds, median tok/s of SmolLM2 decode at 16 threads): at 0 669 -> 759, at
/// 512 481 -> 541. At 2 threads both were within noise.
const MIN_TASK_WORK: usize = 1 << 14;

/// How one product is cut into tasks: row-group chunks × token chunks.
#[derive(Clone, Copy)]
struct Cut {
    n_rg: usize,
    rg_chunk: usize,
    tok_chunk: usize,
    n_tc: usize,
    tasks: usize,
}

fn cut(rows: usize, cols: usize, n_tok: usize, threads: usize) -> Cut {
    let n_rg = rows.div_ceil(RG);
    let want = threads * 4;
    let min_rg = if n_tok == 1 {
        MIN_TASK_WORK.div_ceil(RG * cols).max(1)
    } else {
        1
    };
    let rg_chunk = n_rg.div_ceil(want).max(min_rg).min(n_rg.max(1));
    let n_rc = n_rg.div_ceil(rg_chunk);
    let mut tok_chunk = n_tok;
    if n_rc < want && n_tok > 8 {
        let split = (want / n_rc).max(1);
        tok_chunk = n_tok.div_ceil(split).next_multiple_of(8);
    }
    let n_tc = n_tok.div_ceil(tok_chunk);
    Cut {
        n_rg,
        rg_chunk,
        tok_chunk,
        n_tc,
        tasks: n_rc * n_tc,
    }
}

pub(crate) fn matmul_many_with(
    k: Kernel,
    ws: &[&QMatrix],
    x: &[f32],
    n_tok: usize,
    ys: &mut [&mut [f32]],
    s: &mut MatmulScratch,
) {
    assert!(
        !ws.is_empty() && ws.len() <= MANY && ws.len() == ys.len(),
        "matmul_many: 1 to {MANY} matrices, one output each"
    );
    let cols = ws[0].cols;
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(
            w.cols, cols,
            "matmul_many: the matrices must share one input width"
        );
        assert_eq!(
            x.len(),
            n_tok * cols,
            "matmul: x must hold n_tok*cols values"
        );
        assert_eq!(
            y.len(),
            n_tok * w.rows,
            "matmul: y must hold n_tok*rows values"
        );
    }
    if n_tok == 0 {
        return;
    }
    // Quantize the input once per distinct kind: set[m] is the buffer set of matrix m.
    let mut kinds: SmallVec<[Kind; MANY]> = SmallVec::new();
    let mut set = [0usize; MANY];
    for (m, w) in ws.iter().enumerate() {
        set[m] = match kinds.iter().position(|&kd| kd == w.kind) {
            Some(j) => j,
            None => {
                kinds.push(w.kind);
                kinds.len() - 1
            }
        };
    }
    if s.sets.len() < kinds.len() {
        s.sets.resize_with(kinds.len(), ActBufs::default);
    }
    {
        let _q = prof::scope(prof::Phase::Quantize);
        for (j, &kind) in kinds.iter().enumerate() {
            prepare(k, kind, cols, x, n_tok, &mut s.sets[j]);
        }
    }
    let ctxs: SmallVec<[Ctx; MANY]> = ws
        .iter()
        .zip(ys.iter_mut())
        .enumerate()
        .map(|(m, (w, y))| {
            let a = &s.sets[set[m]];
            Ctx {
                kind: w.kind,
                data: w.data.as_slice().as_ptr(),
                rows: w.rows,
                cols,
                n_blk: cols / w.kind.block(),
                rec: w.kind.rec_bytes(),
                qa: a.qa.as_ptr(),
                f1: a.f1.as_ptr(),
                f2: a.f2.as_ptr(),
                i1: a.i1.as_ptr(),
                fx: if w.kind == Kind::F32 {
                    x.as_ptr()
                } else {
                    a.fx.as_ptr()
                },
                y: y.as_mut_ptr(),
            }
        })
        .collect();
    let run = |m: usize, rg0: usize, rg1: usize, t0: usize, t1: usize| {
        // SAFETY: kernels are only chosen when the CPU has their features; buffers are sized above;
        // tasks get disjoint (matrix, row group, token) ranges.
        unsafe { run_kernel(k, &ctxs[m], rg0, rg1, t0, t1) }
    };
    let threads = rayon::current_num_threads();
    let work: usize = ws
        .iter()
        .map(|w| w.rows.div_ceil(RG) * RG * cols * n_tok)
        .sum();
    if !splits_work(threads, work) {
        for (m, w) in ws.iter().enumerate() {
            run(m, 0, w.rows.div_ceil(RG), 0, n_tok);
        }
        return;
    }
    let cuts: SmallVec<[Cut; MANY]> = ws
        .iter()
        .map(|w| cut(w.rows, cols, n_tok, threads))
        .collect();
    let tasks: usize = cuts.iter().map(|c| c.tasks).sum();
    team::for_each(tasks, |mut i| {
        let mut m = 0;
        while i >= cuts[m].tasks {
            i -= cuts[m].tasks;
            m += 1;
        }
        let c = cuts[m];
        let (rc, tc) = (i / c.n_tc, i % c.n_tc);
        run(
            m,
            rc * c.rg_chunk,
            ((rc + 1) * c.rg_chunk).min(c.n_rg),
            tc * c.tok_chunk,
            ((tc + 1) * c.tok_chunk).min(n_tok),
        );
    });
}

unsafe fn run_kernel(k: Kernel, c: &Ctx, rg0: usize, rg1: usize, t0: usize, t1: usize) {
    match k {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => avx512::run(c, rg0, rg1, t0, t1),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::run(c, rg0, rg1, t0, t1),
        _ => scalar::run(c, rg0, rg1, t0, t1),
    }
}

// ---------------------------------------------------------------------------------------------------
// f16 conversions.

/// Convert IEEE half-precision bits to f32 (F16C when available).
pub fn f16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: features checked; lengths equal.
        unsafe { f16c::to_f32(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

/// Convert f32 to IEEE half-precision bits, rounding to nearest even (F16C when available).
pub fn f32_to_f16_slice(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16_slice: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: features checked; lengths equal.
        unsafe { f16c::to_f16(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

/// Round f32 values to f16 precision (kept as f32).
pub(crate) fn f32_to_f16_round(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: features checked.
        unsafe { f16c::round(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_bits(src[j]).to_f32();
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f16(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_f32(src[j]).to_bits();
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn round(src: &[f32], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_f32(src[j]).to_f32();
        }
    }
}
