//! Deterministic pseudo-random test data and a bounded-error assertion, shared by the test suites of several crates (the
//! backend op suite, the CPU backend's own tests). Not used by the engine.

/// A 64-bit LCG: the same sequence on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in [-1, 1] on a grid of 1/1000.
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() % 2001) as f32 / 1000.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Uniform in [-1, 1] on a grid of 1/1024: exact in F16 (11 significant bits), rounded
    /// by BF16.
    pub fn grid(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next_u64() % 2049) as f32 / 1024.0 - 1.0).collect()
    }

    /// Small integers in -r..=r (exact in f32, so sums and products of them are exact too).
    pub fn ints(&mut self, n: usize, r: u64) -> Vec<f32> {
        (0..n).map(|_| (self.next_u64() % (2 * r + 1)) as f32 - r as f32).collect()
    }
}

/// Asserts `|got[i] - want[i]| <= bound(i)` for every i (equal infinities pass, NaN never does).
#[track_caller]
pub fn assert_within(what: &str, got: &[f32], want: &[f64], bound: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g as f64 == w {
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(err <= bound(i), "{what}[{i}]: got {g}, want {w} (error {err:e} > bound {:e})", bound(i));
    }
}
