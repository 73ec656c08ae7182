//! Rotary tables (spec §A.4): one inverse frequency per interleaved pair, plain RoPE for the
//! `main` table and YaRN-blended frequencies for the `compress` table.
//!
//! The arithmetic follows transformers step by step in f32 (inverse frequencies, then
//! `position · inv_freq` as an f32 product), because the reference computes its angles in
//! f32 even in a float64 run; cos/sin are then taken of that f32 angle.

use crate::config::RopeParams;

#[derive(Debug, Clone)]
pub struct RopeTable {
    /// One entry per rotated pair (`rope_dim / 2`).
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1.0 for V4).
    pub attention_factor: f32,
}

impl RopeTable {
    pub fn new(params: &RopeParams, rope_dim: usize) -> Self {
        let half = rope_dim / 2;
        // pos_freqs = base ** (arange(0, dim, 2) / dim), in f32.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = (2 * i) as f32 / rope_dim as f32;
                (params.theta).powf(e as f64) as f32
            })
            .collect();
        let extrapolation: Vec<f32> = pos_freqs.iter().map(|p| 1.0f32 / p).collect();
        let inv_freq = match &params.yarn {
            None => extrapolation,
            Some(y) => {
                let factor = y.factor as f32;
                let interpolation: Vec<f32> = pos_freqs.iter().map(|p| 1.0f32 / (factor * p)).collect();
                let dim = rope_dim as f64;
                let correction_dim = |rot: f64| {
                    dim * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * params.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                (0..half)
                    .map(|i| {
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation[i] * (1.0 - extrapolation_factor) + extrapolation[i] * extrapolation_factor
                    })
                    .collect()
            }
        };
        RopeTable { inv_freq, attention_factor: params.attention_factor as f32 }
    }

    /// cos and sin, `[positions.len(), rope_dim/2]`, row-major.
    pub fn cos_sin(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32 * self.attention_factor);
                sin.push(angle.sin() as f32 * self.attention_factor);
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    #[test]
    fn flash_yarn_ramp_bounds() {
        // Spec §A.4: for the Flash config low = 15, high = 25: pairs below 15 keep the base
        // frequency, pairs above 25 are divided by the factor exactly.
        let p = RopeParams {
            theta: 160000.0,
            yarn: Some(Yarn {
                factor: 16.0,
                original_max_position_embeddings: 65536.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
            }),
            attention_factor: 1.0,
        };
        let t = RopeTable::new(&p, 64);
        let base = RopeTable::new(&RopeParams { yarn: None, ..p }, 64);
        for i in 0..=15 {
            assert_eq!(t.inv_freq[i], base.inv_freq[i], "pair {i}");
        }
        for i in 25..32 {
            let want = base.inv_freq[i] / 16.0;
            assert!((t.inv_freq[i] - want).abs() <= want * 1e-6, "pair {i}");
        }
        assert!(t.inv_freq[20] < base.inv_freq[20] && t.inv_freq[20] > base.inv_freq[20] / 16.0);
    }
}
