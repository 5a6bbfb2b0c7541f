//! What this machine can do, measured: memory read bandwidth and dot-product throughput of every kernel path the CPU
//! has, with all threads and with one. These are the roofline's two roofs: a decode step is bound by the bytes it
//! streams (weights + KV) ÷ bandwidth, a prefill chunk by its multiply-adds ÷ throughput.
//!
//! Throughput is measured on the kernels the model runs, not on a synthetic loop: `matmul` over a Q8_0 matrix (the
//! int8 path every quantized weight type takes: activations quantized to 8 bits, integer dot products) and over an F32
//! matrix (the f32 FMA path, what attention's score and value sums use). The matrices fit in L2 and a batch of tokens
//! reuses every weight load, so the figure is the kernel's compute roof. Bandwidth is [`super::membw::read_bandwidth`]
//! over a buffer far larger than the last-level cache.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{available, matmul_with, GgmlType, Kernel, MatmulScratch, QMatrix};

/// One kernel path's compute roofs, in operations per second (one multiply-add = 2 operations).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathPeak {
    /// The kernel ("avx512vnni", "avx2", "scalar").
    pub kernel: String,
    /// f32 multiply-add throughput, all threads / one thread (FLOP/s).
    pub f32_flops: f64,
    pub f32_flops_1t: f64,
    /// int8 dot-product throughput on Q8_0 weights, activations quantized per call included (OP/s).
    pub int8_ops: f64,
    pub int8_ops_1t: f64,
}

/// The machine's measured roofs (`hayloft bench machine`'s JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineProfile {
    /// CPU model name (from /proc/cpuinfo where present).
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub cpus: usize,
    /// Threads of the "all threads" figures.
    pub threads: usize,
    /// The kernel hayloft picks on this machine (what the model runs).
    pub kernel: String,
    /// Memory read bandwidth, all threads / one thread (bytes per second).
    pub read_bw: f64,
    pub read_bw_1t: f64,
    /// Every kernel path the CPU can run, fastest first.
    pub paths: Vec<PathPeak>,
    /// Last-level cache bytes (from sysfs; 32 MiB when unknown): the attained rates below stream more than it.
    #[serde(default)]
    pub llc_bytes: usize,
    /// What the running kernel attains on model-shaped work, per weight type (empty unless measured).
    #[serde(default)]
    pub weights: Vec<WeightRate>,
    /// Seconds of one single-token matmul on a tiny matrix: the fixed cost of a call (activation quantization, the
    /// hand-off to the thread pool), paid by every matrix of every decode step.
    #[serde(default)]
    pub matmul_call_s: f64,
    /// Seconds of fixed cost of a single-token matmul large enough to be split over the pool (hand-off and join);
    /// fitted from two sizes of matrices streamed from memory.
    #[serde(default)]
    pub matmul_split_s: f64,
    /// Per-element costs of a layer's work outside matmuls and attention (None unless measured).
    #[serde(default)]
    pub glue: Option<GlueRates>,
    /// What attention attains (measured by the engine; None unless measured).
    #[serde(default)]
    pub attention: Option<AttnRates>,
    /// Sequential read rate of a file not in the page cache (bytes per second; None unless measured).
    #[serde(default)]
    pub disk_read_bw: Option<f64>,
    /// How much faster bytes re-read every step come when they fit in the caches: single-token products over
    /// rotations of growing size against the streamed rotation, ascending in bytes, the last at the streamed size
    /// (speed-up 1). Empty unless measured (then nothing is taken to be cached).
    #[serde(default)]
    pub reuse: Vec<ReusePoint>,
}

/// One point of [`MachineProfile::reuse`]: a step that re-reads `bytes` every time reads them `speedup` times as
/// fast as from memory.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ReusePoint {
    pub bytes: usize,
    pub speedup: f64,
}

/// The running kernel on one weight type, over a rotation of matrices several times the last-level cache (as a
/// model's layers are): single-token products (decode) and 512-token products (a prefill chunk).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightRate {
    /// GGUF type name ("Q4_K", ...).
    pub ty: String,
    /// Weight bytes per second a single-token matmul streams, the call's fixed cost excluded.
    pub gemv_bw: f64,
    /// Operations per second of a 512-token matmul, the activations' preparation excluded.
    pub batch_ops: f64,
    /// Seconds per input element (token × column) of a batched matmul's activation preparation (quantizing the
    /// activations), paid once per call whatever the rows.
    #[serde(default)]
    pub act_s: f64,
    /// Seconds per output element (token × row) of a batched matmul beyond its multiply-adds.
    #[serde(default)]
    pub out_s: f64,
}

/// What the attention kernel attains, f16 cache, head dim 64, 4 query heads per KV head.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttnRates {
    /// Useful operations per second of prefill attention over the keys before a chunk.
    pub prefill_ops: f64,
    /// The same over a chunk's own keys (the causal triangle; masked half not counted). 0 in profiles that predate it.
    #[serde(default)]
    pub prefill_diag_ops: f64,
    /// KV bytes per second one decode step's attention reads, its fixed cost excluded (4 query heads per KV head).
    pub decode_bw: f64,
    /// The same with 8 query heads per KV head (0 in profiles that predate it).
    #[serde(default)]
    pub decode_bw_g8: f64,
    /// The same with 2 query heads per KV head (0 in profiles that predate it).
    #[serde(default)]
    pub decode_bw_g2: f64,
    /// Seconds of one layer's decode attention over a near-empty cache (the fixed cost).
    pub decode_call_s: f64,
    /// The decode rates over KIVI caches, one per width (empty in profiles that predate them): their folds are
    /// bound by arithmetic more than by the bytes they read, so the f16 rate does not carry over.
    #[serde(default)]
    pub kivi: Vec<KiviAttnRate>,
}

/// Decode attention over a KIVI cache of one width: KV bytes of that format per second (its newest 128 entries f16),
/// fixed cost excluded, with 4, 8 and 2 query heads per KV head.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KiviAttnRate {
    pub bits: u8,
    pub decode_bw: f64,
    pub decode_bw_g8: f64,
    /// 0 in profiles that predate it.
    #[serde(default)]
    pub decode_bw_g2: f64,
    /// Prefill over a cache of this width (None in profiles written before it was measured).
    #[serde(default)]
    pub prefill: Option<KiviPrefillRate>,
}

/// Prefill over a KIVI cache of one width: attention reads quantized blocks (the keys before the chunk, and the
/// chunk's own once they leave the residual), and every entry written is quantized when it leaves the residual.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct KiviPrefillRate {
    /// Useful attention operations per second over the keys before a chunk.
    pub ops: f64,
    /// Useful attention operations per second inside a chunk (its causal triangle).
    pub diag_ops: f64,
    /// Writing an entry's keys and values into the cache, quantization included, per element.
    pub append_s: f64,
}

/// Seconds per element of the work a layer does besides its matmuls and attention, measured on the engine's own
/// functions (`hayloft bench machine`): what a forward pass pays per token on top of the operation counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GlueRates {
    /// RMSNorm of a row plus the residual add, per element of the row.
    pub norm_s: f64,
    /// The gated activation `act(gate) ⊙ up`, per feed-forward element.
    pub gate_s: f64,
    /// RoPE, per rotated element (query and key heads).
    pub rope_s: f64,
    /// Writing new keys and values into the cache, per element.
    pub append_s: f64,
}

impl AttnRates {
    /// The triangle's rate (the off-diagonal one for profiles that predate it).
    pub fn diag_ops(&self) -> f64 {
        if self.prefill_diag_ops > 0.0 {
            self.prefill_diag_ops
        } else {
            self.prefill_ops
        }
    }

    /// Seconds per KV byte of decode attention with `group` query heads per KV head: linear in the group between the
    /// two measured (4 and 8), extended above them; smaller groups cost what 4 does.
    pub fn decode_s_per_byte(&self, group: usize) -> f64 {
        per_byte(
            [self.decode_bw_g2, self.decode_bw, self.decode_bw_g8],
            group,
        )
    }

    /// [`Self::decode_s_per_byte`] for a cache stored as KIVI codes of `kivi_bits` (None: f16): KIVI widths take
    /// their own measured rates, and a profile without the width's rate is an error naming it (not the f16 rate in
    /// its place).
    pub fn decode_s_per_byte_of(&self, kivi_bits: Option<u8>, group: usize) -> anyhow::Result<f64> {
        let Some(bits) = kivi_bits else {
            return Ok(self.decode_s_per_byte(group));
        };
        match self.kivi.iter().find(|r| r.bits == bits) {
            Some(r) => Ok(per_byte([r.decode_bw_g2, r.decode_bw, r.decode_bw_g8], group)),
            None => anyhow::bail!(
                "the machine profile has no decode attention rate for {bits}-bit KIVI caches (it predates them): \
                 write it again with `hayloft bench machine --json FILE`"
            ),
        }
    }
}

impl AttnRates {
    /// The prefill rates of a cache stored as KIVI codes of `bits`: a profile without them is an error naming the
    /// width (not the f16 rates in their place).
    pub fn kivi_prefill(&self, bits: u8) -> anyhow::Result<KiviPrefillRate> {
        match self.kivi.iter().find(|r| r.bits == bits).and_then(|r| r.prefill) {
            Some(r) => Ok(r),
            None => anyhow::bail!(
                "the machine profile has no prefill rates for {bits}-bit KIVI caches (it predates them): \
                 write it again with `hayloft bench machine --json FILE`"
            ),
        }
    }
}

/// Seconds per byte with `group` query heads per KV head from the rates measured with 2, 4 and 8 (0: not measured,
/// in an older profile): linear in the group between the measured groups, extended beyond them. Without the rate of
/// 2, smaller groups cost what 4 does; without the rate of 8, larger ones too. A fold bound by its arithmetic (the
/// KIVI widths) does less per entry for fewer rows; one bound by the bus (f16) about the same.
fn per_byte([bw2, bw4, bw8]: [f64; 3], group: usize) -> f64 {
    let t4 = 1.0 / bw4;
    let g = group as f64;
    if group < 4 {
        if bw2 <= 0.0 {
            return t4;
        }
        let t2 = 1.0 / bw2;
        return (t2 + (g - 2.0) * (t4 - t2) / 2.0).max(0.1 * t2.min(t4));
    }
    if bw8 <= 0.0 {
        return t4;
    }
    let t8 = 1.0 / bw8;
    (t4 + (g - 4.0) * (t8 - t4) / 4.0).max(0.1 * t4)
}

impl MachineProfile {
    /// The attained rates of weight type `ty` (None when the profile did not measure it).
    pub fn weight_rate(&self, ty: GgmlType) -> Option<&WeightRate> {
        let name = ty.to_string();
        self.weights.iter().find(|w| w.ty == name)
    }

    /// How many times faster than from memory a decode step reads its weights when it re-reads `bytes` every step
    /// (its working set): see [`reuse_speedup`].
    pub fn reuse_speedup(&self, bytes: f64) -> f64 {
        reuse_speedup(&self.reuse, bytes)
    }

    /// The roofs of the kernel the model runs (the first path when that one was not measured).
    pub fn active(&self) -> Option<&PathPeak> {
        self.paths
            .iter()
            .find(|p| p.kernel == self.kernel)
            .or(self.paths.first())
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        use anyhow::Context;
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the machine profile {}", path.display()))?;
        serde_json::from_str(&s).with_context(|| {
            format!(
                "{}: not a machine profile (write one with `hayloft bench machine --json FILE`)",
                path.display()
            )
        })
    }
}

/// The speed-up a reuse curve gives a working set of `bytes`: interpolated in log-bytes between the measured points,
/// the first point's speed-up below it, 1 past the last (and 1 for an empty curve: a profile that did not measure it).
fn reuse_speedup(pts: &[ReusePoint], bytes: f64) -> f64 {
    let Some(first) = pts.first() else {
        return 1.0;
    };
    if bytes <= first.bytes as f64 {
        return first.speedup.max(1.0);
    }
    for w in pts.windows(2) {
        let (a, b) = (w[0], w[1]);
        if bytes <= b.bytes as f64 {
            let (la, lb) = ((a.bytes as f64).ln(), (b.bytes as f64).ln());
            let f = if lb > la {
                (bytes.ln() - la) / (lb - la)
            } else {
                1.0
            };
            return (a.speedup + f * (b.speedup - a.speedup)).max(1.0);
        }
    }
    1.0
}

/// How long each throughput figure is measured (the best of the repetitions in that time counts).
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub per_figure: Duration,
    /// Bytes of the bandwidth buffer.
    pub bw_bytes: usize,
    /// Bytes of the disk probe's file.
    pub disk_bytes: usize,
}

impl Effort {
    pub const FULL: Effort = Effort {
        per_figure: Duration::from_millis(400),
        bw_bytes: 1 << 30,
        disk_bytes: 512 << 20,
    };
    pub const QUICK: Effort = Effort {
        per_figure: Duration::from_millis(120),
        bw_bytes: 256 << 20,
        disk_bytes: 64 << 20,
    };
}

/// Measures every kernel path the CPU has (or only the one the model runs, `all_paths` false), on the current rayon
/// pool (all its threads) and on a one-thread pool.
pub fn measure(effort: Effort, all_paths: bool) -> Result<MachineProfile> {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let threads = rayon::current_num_threads();
    let reps = |bytes: usize| if bytes >= 1 << 29 { 5 } else { 8 };
    let read_bw = super::membw::read_bandwidth(effort.bw_bytes, reps(effort.bw_bytes));
    let read_bw_1t = one.install(|| super::membw::read_bandwidth(effort.bw_bytes, 3));
    let mut paths = Vec::new();
    let active = super::kernel();
    for k in available().into_iter().rev() {
        if !all_paths && k != active {
            continue;
        }
        let f32_flops = throughput(k, GgmlType::F32, effort.per_figure)?;
        let int8_ops = throughput(k, GgmlType::Q8_0, effort.per_figure)?;
        let (f32_flops_1t, int8_ops_1t) = one.install(|| -> Result<(f64, f64)> {
            Ok((
                throughput(k, GgmlType::F32, effort.per_figure)?,
                throughput(k, GgmlType::Q8_0, effort.per_figure)?,
            ))
        })?;
        paths.push(PathPeak {
            kernel: k.name().to_string(),
            f32_flops,
            f32_flops_1t,
            int8_ops,
            int8_ops_1t,
        });
    }
    Ok(MachineProfile {
        cpu: cpu_model(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads,
        kernel: super::kernel_name().to_string(),
        read_bw,
        read_bw_1t,
        paths,
        llc_bytes: llc_bytes(),
        weights: Vec::new(),
        matmul_call_s: 0.0,
        matmul_split_s: 0.0,
        glue: None,
        attention: None,
        disk_read_bw: None,
        reuse: Vec::new(),
    })
}

/// The weight types whose attained rates [`measure_weights`] takes: every type the matmul kernels run but F32 (a
/// model whose matrix has a type missing from the profile is refused by the cost model, not guessed).
pub const MEASURED_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::F16,
    GgmlType::BF16,
];

/// A rotation of random matrices of type `ty`, `rows × cols` each: enough to fill `total` bytes, at least `min_n`.
fn rotation(
    ty: GgmlType,
    (rows, cols): (usize, usize),
    total: usize,
    min_n: usize,
) -> Result<(Vec<QMatrix>, usize)> {
    let bytes = ty
        .bytes_for((rows * cols) as u64)
        .ok_or_else(|| anyhow::anyhow!("{ty}: {cols} columns is not a whole number of blocks"))?
        as usize;
    let mats = (0..(total / bytes).max(min_n))
        .map(|i| QMatrix::from_gguf(ty, rows, cols, &sane_bytes(bytes, i)))
        .collect::<Result<Vec<_>>>()?;
    Ok((mats, bytes))
}

/// Fills `p.weights`, `p.matmul_call_s` and `p.matmul_split_s` for the running kernel, on a worker of the current
/// pool (as the engine calls matmuls: from inside its pool, where splitting a call costs work stealing, not a wake-up
/// from outside).
pub fn measure_weights(p: &mut MachineProfile, effort: Effort) -> Result<()> {
    rayon::scope(|_| measure_weights_in_pool(p, effort))
}

fn measure_weights_in_pool(p: &mut MachineProfile, effort: Effort) -> Result<()> {
    let k = super::kernel();
    let (rows, cols) = (1024, 2048);
    // Enough matrices that the rotation streams several times the last-level cache, like a model's layers.
    // (Half the bandwidth probe's buffer at most: 512 MiB for the full profile, 128 MiB for --quick.)
    let target = (16 * p.llc_bytes).clamp(64 << 20, (effort.bw_bytes / 2).max(64 << 20));
    let mut s = MatmulScratch::default();
    let x1: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect(); // 1 × cols
    let mut y1 = vec![0.0f32; rows]; // 1 × rows

    // Seconds per single-token product over a rotation streamed from memory: the median pass, not the best, since
    // a decode step streams its weights once amid other work and gets a typical pass, not a lucky one.
    let mut gemv = |mats: &[QMatrix], s: &mut MatmulScratch| {
        median_of(effort.per_figure, || {
            for w in mats {
                matmul_with(k, w, &x1[..w.cols], 1, &mut y1[..w.rows], s);
            }
        }) / mats.len() as f64
    };
    // The fixed cost of a call that runs on the calling thread: a 16 × 256 Q8_0 product is a few hundred bytes.
    let (tiny, _) = rotation(GgmlType::Q8_0, (16, 256), 0, 200)?;
    let call = gemv(&tiny, &mut s);
    // The fixed cost of a call split over the pool: from a small and a large Q8_0 rotation, both streamed from
    // memory, t = split + bytes / rate.
    let (small, b_small) = rotation(GgmlType::Q8_0, (256, 1024), target, 2)?;
    let t_small = gemv(&small, &mut s);
    drop(small);
    let (big, b_big) = rotation(GgmlType::Q8_0, (rows, cols), target, 2)?;
    let t_big = gemv(&big, &mut s);
    drop(big);
    let (bs, bb) = (b_small as f64, b_big as f64);
    let split = ((t_small * bb - t_big * bs) / (bb - bs)).clamp(call, 0.9 * t_small);
    // (type, its matrix's bytes, seconds per single-token product, batch ops/s, seconds per activation, per output)
    let mut per_type = Vec::new();
    let nb = 512;
    let xb: Vec<f32> = (0..nb * cols)
        .map(|i| (i % 13) as f32 * 0.1 - 0.6)
        .collect(); // nb × cols
    let mut yb = vec![0.0f32; nb * 4 * rows]; // nb × 4·rows (the largest shape below)
    for ty in MEASURED_TYPES {
        let (mats, bytes) = rotation(ty, (rows, cols), target, 2)?;
        let t1 = gemv(&mats, &mut s);
        // A 512-token product costs t = tokens·cols·act + tokens·rows·out + 2·rows·cols·tokens / rate: preparing
        // the activations (quantizing them) does not grow with the rows, finishing the outputs (scales, horizontal
        // sums, stores) not with the columns. Fit the three to four shapes.
        let few = &mats[..mats.len().min(8)];
        // The median pass, as for the single-token products: a prefill runs its products chunk after chunk amid
        // other work and gets typical passes, not the best one.
        let batch = |w: &[QMatrix], s: &mut MatmulScratch, yb: &mut [f32]| {
            median_of(effort.per_figure, || {
                for m in w {
                    matmul_with(k, m, &xb[..nb * m.cols], nb, &mut yb[..nb * m.rows], s);
                }
            }) / w.len() as f64
        };
        let mut eqs = Vec::new();
        // The fourth shape writes 8 MiB of outputs per call, past a core's L2, as a feed-forward product of a
        // prefill chunk does (Qwen2.5's gate: 512 × 4864 floats), so the per-output cost is fitted over the output
        // sizes real products have, not only over outputs that stay in L2.
        for (r, c) in [(rows, cols), (128, cols), (rows, 512), (4 * rows, 512)] {
            let t = if (r, c) == (rows, cols) {
                batch(few, &mut s, &mut yb)
            } else {
                let (m, _) = rotation(ty, (r, c), 0, few.len())?;
                batch(&m, &mut s, &mut yb)
            };
            let n = nb as f64;
            eqs.push(([n * c as f64, n * r as f64, 2.0 * (r * c) as f64 * n], t));
        }
        let [act, out, inv_rate] = least_squares3(&eqs);
        let full = eqs[0].1;
        let rate = 1.0 / inv_rate.max(0.05 * full / eqs[0].0[2]);
        let (act, out) = (act.max(0.0), out.max(0.0));
        per_type.push((ty, bytes, t1, rate, act, out));
    }
    // Weights re-read every step come faster while they fit in the caches (and a small model's may, where the
    // last-level cache is large): Q8_0 rotations growing from 8 MiB to half the streamed one, each one's rate over
    // the streamed rotation's. A larger working set is never taken to be faster than a smaller one.
    let streamed = per_type
        .iter()
        .find(|t| t.0 == GgmlType::Q8_0)
        .map(|t| t.1 as f64 / t.2);
    p.reuse.clear();
    if let Some(streamed) = streamed {
        let mut mib = 8usize;
        let mut best = f64::INFINITY;
        while (mib << 20) * 2 <= target {
            let (mats, bytes) = rotation(GgmlType::Q8_0, (rows, cols), mib << 20, 2)?;
            let rate = bytes as f64 / gemv(&mats, &mut s);
            best = best.min((rate / streamed).max(1.0));
            p.reuse.push(ReusePoint {
                bytes: bytes * mats.len(),
                speedup: best,
            });
            mib = mib * 3 / 2;
        }
        p.reuse.push(ReusePoint {
            bytes: target,
            speedup: 1.0,
        });
    }
    p.matmul_call_s = call;
    p.matmul_split_s = split;
    p.weights = per_type
        .into_iter()
        .map(|(ty, bytes, gemv, batch_ops, act_s, out_s)| WeightRate {
            ty: ty.to_string(),
            // What is left once the fixed cost is taken out (never less than a twentieth of the product).
            gemv_bw: bytes as f64 / (gemv - split).max(gemv * 0.05),
            batch_ops,
            act_s,
            out_s,
        })
        .collect();
    Ok(())
}

/// Least-squares fit of three coefficients to three or more equations `a · x = t`, each weighed by 1 / t (so every
/// shape's time counts by its relative error, not its size): the normal equations of the columns scaled to a largest
/// element of 1, solved by [`solve3`]. Zeros when they are singular.
fn least_squares3(eqs: &[([f64; 3], f64)]) -> [f64; 3] {
    let mut scale = [0.0f64; 3];
    for (a, t) in eqs {
        for j in 0..3 {
            scale[j] = scale[j].max((a[j] / t).abs());
        }
    }
    if scale.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
        return [0.0; 3];
    }
    // Rows of the normal equations: (Aᵀ A) y = Aᵀ 1, A's rows a / t with columns scaled by 1 / scale.
    let mut n = [([0.0f64; 3], 0.0f64); 3];
    for (a, t) in eqs {
        let r = [0, 1, 2].map(|j| a[j] / t / scale[j]);
        for i in 0..3 {
            for j in 0..3 {
                n[i].0[j] += r[i] * r[j];
            }
            n[i].1 += r[i];
        }
    }
    let y = solve3(&n);
    [0, 1, 2].map(|j| y[j] / scale[j])
}

/// Solves three linear equations `a · x = t` (Cramer's rule); x is zero where the system is singular.
fn solve3(eqs: &[([f64; 3], f64)]) -> [f64; 3] {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let a = [eqs[0].0, eqs[1].0, eqs[2].0];
    let d = det(a);
    if d.abs() < f64::MIN_POSITIVE {
        return [0.0; 3];
    }
    let mut x = [0.0; 3];
    for (j, xj) in x.iter_mut().enumerate() {
        let mut m = a;
        for (i, row) in m.iter_mut().enumerate() {
            row[j] = eqs[i].1;
        }
        *xj = det(m) / d;
    }
    x
}

/// Sequential read rate of a `bytes`-long file written under `dir`, flushed and dropped from the page cache before
/// it is read back (the file is removed after).
pub fn disk_read_bandwidth(dir: &std::path::Path, bytes: usize) -> Result<f64> {
    use anyhow::Context;
    use std::io::{Read, Write};
    use std::os::unix::io::AsRawFd;
    let path = dir.join(format!(".hayloft-disk-probe-{}", std::process::id()));
    let run = || -> Result<f64> {
        let chunk = sane_bytes(1 << 20, 3);
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..bytes.div_ceil(1 << 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        // SAFETY: a plain advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        drop(f);
        let mut f = std::fs::File::open(&path)?;
        // SAFETY: as above.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut buf = vec![0u8; 4 << 20];
        let t0 = Instant::now();
        let mut n = 0usize;
        loop {
            let r = f.read(&mut buf)?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok(n as f64 / t0.elapsed().as_secs_f64())
    };
    let r = run().with_context(|| format!("disk read probe {}", path.display()));
    let _ = std::fs::remove_file(&path);
    r
}

/// The best time of `f` in seconds over repetitions filling `budget` (at least three).
pub fn best_of(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut reps = 0;
    f(); // warm-up
    while reps < 3 || start.elapsed() < budget {
        let t0 = Instant::now();
        f();
        best = best.min(t0.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

/// The median time of `f` over at least 5 runs and `budget` (after a warm-up run).
pub fn median_of(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut t = Vec::new();
    f(); // warm-up
    while t.len() < 5 || start.elapsed() < budget {
        let t0 = Instant::now();
        f();
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// `n` bytes whose every byte lies in 0x10..0x3C, so any f16/bf16/f32 field read from them (scales, minimums, the
/// values of float types) is a small positive normal number and every quantized field is valid: timing data for any
/// weight type.
fn sane_bytes(n: usize, seed: usize) -> Vec<u8> {
    let mut h = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    (0..n)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            0x10 + (h % 0x2C) as u8
        })
        .collect()
}

/// The last-level cache's size from sysfs (the largest cache of CPU 0), or 32 MiB.
pub fn llc_bytes() -> usize {
    let mut best = 0usize;
    for i in 0..8 {
        let p = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
        let Ok(s) = std::fs::read_to_string(&p) else {
            continue;
        };
        let s = s.trim();
        let (num, mul) = match s.strip_suffix('K') {
            Some(n) => (n, 1 << 10),
            None => match s.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (s, 1),
            },
        };
        if let Ok(v) = num.parse::<usize>() {
            best = best.max(v * mul);
        }
    }
    if best == 0 {
        32 << 20
    } else {
        best
    }
}

/// Operations per second of `matmul` on kernel `k` for an L2-resident `ty` matrix and a 64-token batch: the best
/// repetition within `budget` (at least three).
fn throughput(k: Kernel, ty: GgmlType, budget: Duration) -> Result<f64> {
    // 256 × 512 f32 = 512 KiB; 512 × 1024 Q8_0 ≈ 544 KiB: both well inside a 1–2 MiB L2, per thread's share smaller.
    let (rows, cols) = match ty {
        GgmlType::F32 => (256, 512),
        _ => (512, 1024),
    };
    let n_tok = 64;
    let bytes = match ty {
        GgmlType::F32 => (0..rows * cols)
            .flat_map(|i| (((i * 7919) % 1000) as f32 * 1e-3 - 0.5).to_le_bytes())
            .collect::<Vec<u8>>(),
        _ => q8_0_bytes(rows, cols),
    };
    let w = QMatrix::from_gguf(ty, rows, cols, &bytes)?;
    let x: Vec<f32> = (0..n_tok * cols)
        .map(|i| ((i * 104_729) % 2001) as f32 * 1e-3 - 1.0)
        .collect(); // n_tok × cols
    let mut y = vec![0.0f32; n_tok * rows]; // n_tok × rows
    let mut s = MatmulScratch::default();
    let ops = 2.0 * (rows * cols * n_tok) as f64;
    // Several products per timing so one pool wake-up does not dominate the fast paths.
    let t = best_of(budget, || {
        for _ in 0..4 {
            matmul_with(k, &w, &x, n_tok, &mut y, &mut s);
        }
    });
    std::hint::black_box(&y);
    Ok(4.0 * ops / t)
}

/// A Q8_0 matrix's bytes (per 32 values: f16 scale, 32 int8): varied values, scale 1/64.
fn q8_0_bytes(rows: usize, cols: usize) -> Vec<u8> {
    let scale = half::f16::from_f32(1.0 / 64.0).to_bits().to_le_bytes();
    let mut b = Vec::with_capacity(rows * cols / 32 * 34);
    for blk in 0..rows * cols / 32 {
        b.extend_from_slice(&scale);
        b.extend((0..32).map(|i| (((blk * 31 + i * 17) % 255) as i32 - 127) as i8 as u8));
    }
    b
}

/// The CPU's model name, or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reuse curve: 1 without points, the first point's speed-up below it, log-linear between points, 1 past
    /// the last; never below 1, never rising with the bytes.
    #[test]
    fn reuse_speedup_interpolates_the_measured_points() {
        assert_eq!(reuse_speedup(&[], 1e6), 1.0);
        let pt = |mib: usize, speedup| ReusePoint {
            bytes: mib << 20,
            speedup,
        };
        let pts = [pt(8, 3.0), pt(32, 2.0), pt(128, 1.0)];
        assert_eq!(reuse_speedup(&pts, 1024.0), 3.0);
        assert_eq!(reuse_speedup(&pts, (8 << 20) as f64), 3.0);
        let mid = reuse_speedup(&pts, (16 << 20) as f64);
        assert!((mid - 2.5).abs() < 1e-9, "{mid}");
        assert!((reuse_speedup(&pts, (64 << 20) as f64) - 1.5).abs() < 1e-9);
        assert_eq!(reuse_speedup(&pts, (1u64 << 33) as f64), 1.0);
        let mut last = f64::INFINITY;
        for mib in 1..300usize {
            let x = reuse_speedup(&pts, (mib << 20) as f64);
            assert!(x <= last && x >= 1.0, "{mib} MiB: {x}");
            last = x;
        }
    }

    /// The three-shape fit recovers known per-element costs and rate exactly.
    #[test]
    fn the_matmul_fit_recovers_its_coefficients() {
        let (act, out, inv) = (1.3e-10, 4.0e-10, 1.0 / 1.2e12);
        let eqs: Vec<([f64; 3], f64)> = [(1024usize, 2048usize), (128, 2048), (1024, 512)]
            .iter()
            .map(|&(r, c)| {
                let a = [
                    512.0 * c as f64,
                    512.0 * r as f64,
                    2.0 * (r * c) as f64 * 512.0,
                ];
                (a, a[0] * act + a[1] * out + a[2] * inv)
            })
            .collect();
        let x = solve3(&eqs);
        for (got, want) in x.iter().zip([act, out, inv]) {
            assert!((got - want).abs() <= 1e-9 * want, "{x:?}");
        }
        // A singular system gives zeros, not infinities.
        assert_eq!(solve3(&[eqs[0], eqs[0], eqs[1]]), [0.0; 3]);
        // Four consistent shapes: least squares recovers them too; a fourth time off by 10 % moves the fit.
        let mut four = eqs.clone();
        let a = [512.0 * 512.0, 512.0 * 4096.0, 2.0 * 4096.0 * 512.0 * 512.0];
        four.push((a, a[0] * act + a[1] * out + a[2] * inv));
        let x = least_squares3(&four);
        for (got, want) in x.iter().zip([act, out, inv]) {
            assert!((got - want).abs() <= 1e-6 * want, "{x:?}");
        }
        four[3].1 *= 1.1;
        let y = least_squares3(&four);
        assert!(y[1] > out * 1.01, "{y:?}");
        assert_eq!(least_squares3(&[eqs[0], eqs[0], eqs[0]]), [0.0; 3]);
    }

    #[test]
    fn decode_attention_time_follows_the_group_between_the_measured_ones() {
        let r = AttnRates {
            prefill_ops: 1e11,
            prefill_diag_ops: 5e10,
            decode_bw: 20e9,
            decode_bw_g8: 10e9,
            decode_bw_g2: 40e9,
            decode_call_s: 1e-6,
            kivi: Vec::new(),
        };
        let t = |g| r.decode_s_per_byte(g);
        assert_eq!(t(4), 1.0 / 20e9);
        assert!((t(8) - 1.0 / 10e9).abs() < 1e-22);
        assert!((t(6) - 0.75e-10).abs() < 1e-22);
        // Below 4, between the rates of 2 and 4 (0.25e-10 and 0.5e-10 s per byte).
        assert!((t(2) - 0.25e-10).abs() < 1e-22);
        assert!((t(3) - 0.375e-10).abs() < 1e-22);
        assert!((t(1) - 0.125e-10).abs() < 1e-22);
        // Profiles that predate the rates of 8 and 2: every group costs what 4 does.
        let old = AttnRates {
            decode_bw_g8: 0.0,
            decode_bw_g2: 0.0,
            ..r
        };
        assert_eq!(old.decode_s_per_byte(8), 1.0 / 20e9);
        assert_eq!(old.decode_s_per_byte(1), 1.0 / 20e9);
    }

    #[test]
    fn every_path_is_measured_with_finite_positive_roofs() {
        let effort = Effort {
            per_figure: Duration::from_millis(5),
            bw_bytes: 4 << 20,
            disk_bytes: 1 << 20,
        };
        let only = measure(effort, false).unwrap();
        assert_eq!(only.paths.len(), 1);
        assert_eq!(only.paths[0].kernel, crate::kernels::kernel_name());
        let p = measure(effort, true).unwrap();
        assert_eq!(p.paths.len(), available().len());
        assert!(p.read_bw.is_finite() && p.read_bw > 1e6);
        assert!(p.read_bw_1t.is_finite() && p.read_bw_1t > 1e6);
        for k in &p.paths {
            for v in [k.f32_flops, k.f32_flops_1t, k.int8_ops, k.int8_ops_1t] {
                assert!(v.is_finite() && v > 1e6, "{k:?}");
            }
        }
        assert_eq!(p.active().unwrap().kernel, crate::kernels::kernel_name());
        // The JSON round-trips.
        let back: MachineProfile =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back.paths.len(), p.paths.len());
    }
}
