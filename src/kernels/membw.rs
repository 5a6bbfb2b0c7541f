//! Memory read bandwidth, measured: what a bandwidth-bound decode step can at best reach.

use std::time::Instant;

use rayon::prelude::*;

/// Read bandwidth in bytes per second: the best of `reps` parallel passes (all rayon threads) summing a buffer of
/// `bytes` (make it several times the last-level cache).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1024);
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(64 * 1024)
            .map(|c| {
                // Four independent sums so the loads are not serialized on one add chain.
                let mut a = [0u64; 4];
                for q in c.chunks_exact(4) {
                    for i in 0..4 {
                        a[i] = a[i].wrapping_add(q[i]);
                    }
                }
                a.iter().fold(0u64, |x, y| x.wrapping_add(*y))
            })
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / dt);
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_is_positive_and_finite() {
        let b = super::read_bandwidth(1 << 22, 2);
        assert!(b.is_finite() && b > 1e6, "{b}");
    }

    /// Reads `buf` (64-byte lines) once, doing `w` × 8 register-only FMAs per line that no load feeds: the
    /// arithmetic could run entirely under the memory stream.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn read_with_work(buf: &[u8], w: usize, ahead: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut x = _mm512_setzero_si512();
        let m = _mm512_set1_ps(0.999);
        let mut f = [_mm512_setzero_ps(); 8];
        for line in buf.chunks_exact(64) {
            if ahead > 0 {
                _mm_prefetch::<_MM_HINT_T2>(line.as_ptr().wrapping_add(ahead) as *const i8);
            }
            x = _mm512_xor_si512(x, _mm512_loadu_si512(line.as_ptr() as *const __m512i));
            for _ in 0..w {
                for a in f.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, m, m);
                }
            }
        }
        let s: f32 = f.iter().map(|a| _mm512_reduce_add_ps(*a)).sum();
        s + _mm512_reduce_add_epi32(x) as f32
    }

    /// Timing harness, not a check (ignored; run by hand): whether this machine overlaps arithmetic with a memory
    /// stream. One thread reads 192 MiB once per pass while doing W × 8 zmm FMAs per 64-byte line that depend on no
    /// load, and the same work over 1 MiB that stays in L2; if compute and memory overlapped, the streamed rate would
    /// stay at W = 0's until the arithmetic alone is slower, and if they add, it follows 1 / (1 / hot + 1 / cold₀),
    /// printed beside it. Explains why the f16 decode fold's rate from memory is below both its in-cache rate and
    /// the machine's read bandwidth. `cargo test --release --lib reads_and_register_work -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn reads_and_register_work_timing() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::kernels::has_avx512() {
                eprintln!("needs AVX-512");
                return;
            }
            let cold: Vec<u8> = (0..192usize << 20).map(|i| i as u8).collect();
            let hot: Vec<u8> = (0..1usize << 20).map(|i| i as u8).collect();
            let rate = |buf: &[u8], w: usize, reps: usize, ahead: usize| {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps {
                        // SAFETY: AVX-512 checked above.
                        std::hint::black_box(unsafe {
                            read_with_work(
                                std::hint::black_box(buf),
                                std::hint::black_box(w),
                                ahead,
                            )
                        });
                    }
                    best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
                }
                buf.len() as f64 / best / 1e9
            };
            let cold0 = rate(&cold, 0, 1, 0);
            for w in [0usize, 1, 2, 4, 8] {
                let h = rate(&hot, w, 64, 0);
                let c = rate(&cold, w, 1, 0);
                let pf = rate(&cold, w, 1, 4096);
                let add = 1.0 / (1.0 / h + 1.0 / cold0);
                eprintln!(
                    "W {w}: in L2 {h:6.1} GB/s, from memory {c:5.1} ({pf:5.1} asking 4 KiB ahead), if they added \
                     {add:5.1}, if they overlapped {:5.1}",
                    h.min(cold0)
                );
            }
        }
    }
}
