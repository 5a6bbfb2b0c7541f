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
}

impl MachineProfile {
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

/// How long each throughput figure is measured (the best of the repetitions in that time counts).
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub per_figure: Duration,
    /// Bytes of the bandwidth buffer.
    pub bw_bytes: usize,
}

impl Effort {
    pub const FULL: Effort = Effort {
        per_figure: Duration::from_millis(400),
        bw_bytes: 1 << 30,
    };
    pub const QUICK: Effort = Effort {
        per_figure: Duration::from_millis(120),
        bw_bytes: 256 << 20,
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
    })
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
    matmul_with(k, &w, &x, n_tok, &mut y, &mut s); // warm-up: scratch, caches, pool
    let ops = 2.0 * (rows * cols * n_tok) as f64;
    let t_start = Instant::now();
    let mut best = 0.0f64;
    let mut reps = 0;
    while reps < 3 || t_start.elapsed() < budget {
        let t0 = Instant::now();
        // Several products per timing so one pool wake-up does not dominate the scalar-free fast paths.
        for _ in 0..4 {
            matmul_with(k, &w, &x, n_tok, &mut y, &mut s);
        }
        let dt = t0.elapsed().as_secs_f64();
        best = best.max(4.0 * ops / dt);
        reps += 1;
    }
    std::hint::black_box(&y);
    Ok(best)
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

    #[test]
    fn every_path_is_measured_with_finite_positive_roofs() {
        let effort = Effort {
            per_figure: Duration::from_millis(5),
            bw_bytes: 4 << 20,
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
