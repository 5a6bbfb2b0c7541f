//! Test support at the bottom of the crate, compiled only for tests (`cfg(test)` for the unit tests, the `testutil`
//! feature for the integration tests, which turn it on through the self dev-dependency in Cargo.toml).
//!
//! [`Rng`] is the one seeded generator every test draws its random data from.

/// xorshift64 (Marsaglia, shifts 13/7/17): small, seeded, the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose state is `seed` scrambled (SplitMix64's finalizer): small seeds like 1, 2, 3 start far apart
    /// and far from zero. `Rng(state)` uses the state as given.
    pub fn seeded(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self(z ^ (z >> 31))
    }

    /// The next 64 raw bits. A zero state (xorshift's fixed point) is replaced by a fixed non-zero one, so any seed
    /// works.
    pub fn next_u64(&mut self) -> u64 {
        if self.0 == 0 {
            self.0 = 0x9E37_79B9_7F4A_7C15;
        }
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1), from the top 24 bits.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    /// Uniform in 0..n (n > 0; modulo bias is negligible for test sizes).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A uniform byte (bits 32..40: xorshift's low bits are its weakest).
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 32) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_sequence_and_zero_seed_works() {
        let (mut a, mut b, mut c) = (Rng(42), Rng(42), Rng(43));
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        let mut z = Rng(0);
        let xz: Vec<u64> = (0..8).map(|_| z.next_u64()).collect();
        assert!(xz.iter().all(|&x| x != 0), "{xz:?}");
        let u = Rng(5).vec(1000, 1.0);
        assert!(u.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = u.iter().sum::<f32>() / u.len() as f32;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }
}
