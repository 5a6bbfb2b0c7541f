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
}
