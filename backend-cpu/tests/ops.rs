//! CPU-specific op tests: the compressor's window bookkeeping through the model's own
//! `Compressor` on the CPU backend, against a direct f64 implementation of spec §B.4.3.
//!
//! Every backend op (primitives, pools, the fused V4 ops against spec §B and against the
//! trait's default compositions, bad inputs) is tested once for all backends by the suite in
//! `dsv4_tests::backend_suite`, instantiated for the CPU in `tests/tests/backend_ops_cpu.rs`;
//! packed-weight (FP8/FP4) GEMV details are in `quantized.rs`.
//!
//! Tolerances. `u = 2^-24` is the f32 unit roundoff and `EPS = 2u` (`f32::EPSILON`).

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::{Backend, DeviceTensor};
use dsv4_core::config::RopeParams;
use dsv4_core::kv::layout::CompressorShape;
use dsv4_core::kv::{RowFormat, SeqCompressPlan};
use dsv4_core::model::compressor::Compressor;
use dsv4_core::model::loader::Loader;
use dsv4_core::model::rope::RopeTable;
use dsv4_core::tensor::HostTensor;
use dsv4_core::{Checkpoint, ModelConfig};

const EPS: f64 = f32::EPSILON as f64;

// ------------------------------------------------------------------------------- helpers

use dsv4_core::test_data::{assert_within, Rng};

fn up<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> B::Tensor {
    be.upload(data, shape).unwrap()
}

fn down<B: Backend>(be: &B, t: &B::Tensor) -> Vec<f32> {
    be.download(t).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `(Σ a·b, Σ|a·b|)` in f64.
fn dot64(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> (f64, f64) {
    a.into_iter().zip(b).fold((0.0, 0.0), |(s, m), (x, y)| (s + x * y, m + (x * y).abs()))
}

// ---------------------------------------------------------------------- compressor windows

/// A compressor of hidden size 8 built through the public loader, with its parameters.
struct CompressorCase {
    m: usize,
    overlap: bool,
    dim: usize,
    d: usize,
    wkv: Vec<f32>,
    wgate: Vec<f32>,
    ape: Vec<f32>,
    norm: Vec<f32>,
    rope: RopeTable,
    eps: f32,
}

impl CompressorCase {
    fn new(rng: &mut Rng, m: usize, overlap: bool, dim: usize) -> Self {
        let d = 8;
        let width = if overlap { 2 * dim } else { dim };
        CompressorCase {
            m,
            overlap,
            dim,
            d,
            wkv: rng.vec(width * d),
            wgate: rng.vec(width * d).iter().map(|v| 2.0 * v).collect(),
            ape: rng.vec(m * width),
            norm: rng.vec(dim).iter().map(|v| 1.0 + 0.5 * v).collect(),
            rope: RopeTable::new(&RopeParams { theta: 10000.0, yarn: None, attention_factor: 1.0 }, 4),
            eps: 1e-6,
        }
    }

    fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    fn load(&self, be: &CpuBackend) -> Compressor<CpuBackend> {
        let (w, d) = (self.width(), self.d);
        let ckpt = Checkpoint::from_tensors(vec![
            HostTensor::from_f32("c.wkv.weight", vec![w, d], &self.wkv).unwrap(),
            HostTensor::from_f32("c.wgate.weight", vec![w, d], &self.wgate).unwrap(),
            HostTensor::from_f32("c.ape", vec![self.m, w], &self.ape).unwrap(),
            HostTensor::from_f32("c.norm.weight", vec![self.dim], &self.norm).unwrap(),
        ])
        .unwrap();
        let cfg = ModelConfig::from_json_str(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "layer_types": ["sliding_attention"], "rms_norm_eps": 1e-6}"#,
        )
        .unwrap();
        let mut progress = |_: usize, _: usize, _: u64| {};
        let mut ld = Loader::new(be, &ckpt, &mut progress);
        Compressor::load(&mut ld, &cfg, "c", self.m, self.overlap, self.dim).unwrap()
    }

    /// Feeds `x` (`[S, 8]`, positions 0..S) in chunks; checks the entry count after every
    /// chunk (entry w appears exactly when token w·m + m − 1 has been fed); returns the entries.
    fn run(&self, be: &CpuBackend, comp: &Compressor<CpuBackend>, x: &[f32], chunks: &[usize]) -> Vec<f32> {
        let shape = CompressorShape { ratio: self.m, overlap: self.overlap, dim: self.dim };
        let mut carry = be.alloc_pool(2 * shape.carry_rows(), self.width(), RowFormat::F32).unwrap();
        let mut entries = vec![];
        let mut start = 0;
        for &c in chunks {
            let xt = up(be, &x[start * self.d..(start + c) * self.d], &[c, self.d]);
            let plan = SeqCompressPlan::lone(be, &shape, start, c).unwrap();
            let new = comp.step(be, &mut carry, &plan, &xt, &self.rope, dsv4_core::Precision::F32).unwrap();
            start += c;
            let completed = start / self.m - plan.windows_before;
            let rows = new.as_ref().map_or(0, |e| e.shape()[0]);
            assert_eq!(rows, completed, "entries after {start} tokens (chunks {chunks:?})");
            if let Some(e) = new {
                entries.extend(down(be, &e));
            }
        }
        entries
    }

    /// Spec §B.4.3 in f64: window w pools tokens w·m..w·m+m−1 (HCA), or the first halves of
    /// window w−1 and the second halves of window w (CSA; nothing before window 0), then
    /// RMSNorm with `norm` and RoPE of the trailing channels at position w·m.
    fn reference(&self, x: &[f32], tokens: usize) -> Vec<f64> {
        let (m, d, dim, width) = (self.m, self.d, self.dim, self.width());
        let proj = |w: &[f32], t: usize, c: usize| {
            dot64(w[c * d..(c + 1) * d].iter().map(|&v| v as f64), x[t * d..(t + 1) * d].iter().map(|&v| v as f64)).0
        };
        let a = |t: usize, c: usize| proj(&self.wkv, t, c);
        let z = |t: usize, c: usize| proj(&self.wgate, t, c) + self.ape[(t % m) * width + c] as f64;
        let mut out = vec![];
        for w in 0..tokens / m {
            let mut e = vec![0.0; dim];
            for (c, ec) in e.iter_mut().enumerate() {
                let mut cand: Vec<(f64, f64)> = vec![];
                if self.overlap {
                    if w > 0 {
                        cand.extend(((w - 1) * m..w * m).map(|t| (z(t, c), a(t, c))));
                    }
                    cand.extend((w * m..(w + 1) * m).map(|t| (z(t, dim + c), a(t, dim + c))));
                } else {
                    cand.extend((w * m..(w + 1) * m).map(|t| (z(t, c), a(t, c))));
                }
                let max = cand.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
                let den: f64 = cand.iter().map(|p| (p.0 - max).exp()).sum();
                *ec = cand.iter().map(|p| (p.0 - max).exp() * p.1).sum::<f64>() / den;
            }
            let r = 1.0 / (e.iter().map(|v| v * v).sum::<f64>() / dim as f64 + self.eps as f64).sqrt();
            let mut e: Vec<f64> = e.iter().zip(&self.norm).map(|(v, &g)| v * r * g as f64).collect();
            let (cos, sin) = self.rope.cos_sin(&[w * m]);
            let half = cos.len();
            for i in 0..half {
                let (p0, p1) = (dim - 2 * half + 2 * i, dim - 2 * half + 2 * i + 1);
                let (ev, od) = (e[p0], e[p1]);
                e[p0] = ev * cos[i] as f64 - od * sin[i] as f64;
                e[p1] = od * cos[i] as f64 + ev * sin[i] as f64;
            }
            out.extend(e);
        }
        out
    }
}

#[test]
fn compressor_windows_pool_exactly_their_tokens() {
    let be = CpuBackend::new();
    let mut rng = Rng(17);
    for (m, overlap, dim) in [(4, true, 6), (3, false, 6), (4, false, 5)] {
        let case = CompressorCase::new(&mut rng, m, overlap, dim);
        let comp = case.load(&be);
        let tokens = 14;
        let x = rng.vec(tokens * case.d);
        let want = case.reference(&x, tokens);
        assert_eq!(want.len(), tokens / m * dim);
        // Whole prompt, token by token, and chunks that start and end inside windows.
        for chunks in
            [vec![14], vec![1; 14], vec![3, 3, 3, 5], vec![m, m, tokens - 2 * m], vec![5, 9], vec![m - 1, 1, 10]]
        {
            let got = case.run(&be, &comp, &x, &chunks);
            // Projections are 8-term dot products, the pool a softmax over <= 2m candidates,
            // then an RMSNorm and a rotation: a few tens of roundings relative to the entry's
            // scale (RMSNorm makes every entry O(|norm|) <= 1.5).
            assert_within(&format!("m={m} overlap={overlap} chunks {chunks:?}"), &got, &want, |i| {
                (case.d + 2 * m + 16) as f64 * 4.0 * EPS * (1.0 + want[i].abs())
            });
        }
        // Which entries a token reaches: perturb one token at a time and see which entries change.
        let base = case.run(&be, &comp, &x, &[tokens]);
        for p in 0..tokens {
            let mut x2 = x.clone();
            for v in &mut x2[p * case.d..(p + 1) * case.d] {
                *v += 0.5;
            }
            let got = case.run(&be, &comp, &x2, &[tokens]);
            let w = p / m;
            for e in 0..tokens / m {
                // HCA: only window w. CSA: entry w (second halves) and entry w + 1 (first halves
                // as the previous window).
                let reaches = e == w || (overlap && e == w + 1);
                let changed = bits(&got[e * dim..(e + 1) * dim]) != bits(&base[e * dim..(e + 1) * dim]);
                assert_eq!(changed, reaches, "m={m} overlap={overlap}: token {p} and entry {e}");
            }
        }
    }
}

#[test]
fn csa_entry_zero_ignores_its_missing_previous_window() {
    // The first halves of window 0 belong to entry 1 only. Entry 0's "previous window" slots have
    // score −inf, so its pool is the softmax over window 0's second halves alone: making the
    // first-half projections (wkv and wgate rows 0..dim) anything at all leaves entry 0 unchanged
    // bit for bit, and changes entry 1.
    let be = CpuBackend::new();
    let mut rng = Rng(18);
    let (m, dim) = (4, 6);
    let case = CompressorCase::new(&mut rng, m, true, dim);
    let x = rng.vec(8 * case.d);
    let base = case.run(&be, &case.load(&be), &x, &[8]);
    let mut other = CompressorCase {
        wkv: case.wkv.clone(),
        wgate: case.wgate.clone(),
        ..CompressorCase::new(&mut rng, m, true, dim)
    };
    other.ape = case.ape.clone();
    other.norm = case.norm.clone();
    for v in other.wkv[..dim * case.d].iter_mut().chain(other.wgate[..dim * case.d].iter_mut()) {
        *v = 40.0 * *v + 3.0;
    }
    let got = case.run(&be, &other.load(&be), &x, &[8]);
    assert_eq!(bits(&got[..dim]), bits(&base[..dim]), "entry 0 depends on first halves");
    assert_ne!(bits(&got[dim..]), bits(&base[dim..]), "entry 1 ignores window 0's first halves");
    // And entry 0 is the f64 pool of the second halves only.
    let want = case.reference(&x, 8);
    assert_within("entry 0", &base[..dim], &want[..dim], |i| 64.0 * EPS * (1.0 + want[i].abs()));
}

/// The CPU's `hc_pre` (norm and mixing GEMV as ops, the rest in one pass) gives exactly the
/// composition's bits for every output, for mHC's sizes and odd ones (no tokens, one stream,
/// D = 1, no Sinkhorn iterations; n = 8 goes through the composition itself), with the two
/// epsilons distinct so that swapping them fails; and refuses a mixing weight of the wrong
/// width and an `x` that is not `[T, n, D]`, as the composition does.
#[test]
fn hc_pre_is_the_composition_bit_for_bit() {
    use dsv4_backend_cpu::CpuWeight;
    use dsv4_core::backend::composed;
    use dsv4_core::tensor::{DType, StoredWeight};
    let be = CpuBackend::new();
    let mut rng = Rng(0x5eed_4c9e);
    let f32_weight = |rng: &mut Rng, rows: usize, cols: usize| {
        let bytes: Vec<u8> = (0..rows * cols).flat_map(|_| (rng.f32() * 0.1).to_le_bytes()).collect();
        let t = HostTensor::from_bytes("hc_fn", DType::F32, vec![rows, cols], bytes).unwrap();
        CpuWeight::from_stored(&StoredWeight::float(t).unwrap()).unwrap()
    };
    let bits =
        |t: &<CpuBackend as Backend>::Tensor| be.download(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (t, n, d) in
        [(1, 4, 64), (3, 4, 32), (2, 1, 8), (2, 3, 16), (1, 7, 4), (2, 8, 4), (2, 4, 1), (0, 4, 8), (33, 4, 2048)]
    {
        let w = (2 + n) * n;
        let fn_w = f32_weight(&mut rng, w, n * d);
        let x: Vec<f32> = (0..t * n * d).map(|_| rng.f32() * 2.0).collect();
        let base: Vec<f32> = (0..w).map(|_| rng.f32() * 0.5).collect();
        let x = up(&be, &x, &[t, n, d]);
        let (base, scale) = (up(&be, &base, &[w]), up(&be, &[0.7, 1.3, 2.1], &[3]));
        for iters in [0, 1, 20] {
            let got = be.hc_pre(&x, &fn_w, &base, &scale, iters, 1e-3, 0.5).unwrap();
            let want = composed::hc_pre(&be, &x, &fn_w, &base, &scale, iters, 1e-3, 0.5).unwrap();
            for (k, (g, w)) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)].into_iter().enumerate() {
                assert_eq!(g.shape(), w.shape(), "t={t} n={n} d={d} output {k}");
                assert_eq!(bits(g), bits(w), "t={t} n={n} d={d} iters={iters} output {k}");
            }
        }
        // A mixing weight of the wrong width: both refuse.
        let bad = f32_weight(&mut rng, w, n * d + 1);
        assert!(be.hc_pre(&x, &bad, &base, &scale, 20, 1e-6, 1e-6).is_err());
        assert!(composed::hc_pre(&be, &x, &bad, &base, &scale, 20, 1e-6, 1e-6).is_err());
        let flat = up(&be, &vec![0.5; t * n * d], &[t, n * d]);
        assert!(be.hc_pre(&flat, &fn_w, &base, &scale, 20, 1e-6, 1e-6).is_err());
    }
}

/// The CPU's `compressor_pool` (one pass per window) gives exactly the composition's bits
/// (softmax over axis 1, product, `reduce` over axis 1) for the compressor's sizes and odd ones
/// (one candidate row, many, widths around the vector lengths, no windows, c = 1 which goes
/// through the composition itself), with scores far apart, masked (`-inf`) candidates and a
/// fully masked lane, and kv magnitudes from 2^-12 to 2^12 (a different summation order
/// would show); and refuses mismatched shapes and shapes that are not 3-D as the composition
/// does.
#[test]
fn compressor_pool_is_the_composition_bit_for_bit() {
    use dsv4_core::backend::composed;
    let be = CpuBackend::new();
    let mut rng = Rng(0xc0b1_9e55);
    let bits =
        |t: &<CpuBackend as Backend>::Tensor| be.download(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (w, l, c) in [(1, 8, 64), (3, 2, 33), (5, 8, 2), (2, 1, 16), (4, 16, 7), (2, 8, 1), (0, 8, 4), (40, 8, 576)] {
        let n = w * l * c;
        let kv: Vec<f32> = (0..n).map(|_| rng.f32() * 2f32.powi((rng.f32() * 12.0) as i32)).collect();
        let mut score: Vec<f32> = (0..n).map(|_| rng.f32() * 8.0).collect();
        // A masked candidate here and there, and window 0's channel 0 masked entirely.
        for (i, v) in score.iter_mut().enumerate() {
            if i % 7 == 3 || (i < l * c && i % c == 0) {
                *v = f32::NEG_INFINITY;
            }
        }
        let (kv, score) = (up(&be, &kv, &[w, l, c]), up(&be, &score, &[w, l, c]));
        let got = be.compressor_pool(&kv, &score).unwrap();
        let want = composed::compressor_pool(&be, &kv, &score).unwrap();
        assert_eq!(got.shape(), want.shape(), "w={w} l={l} c={c}");
        assert_eq!(bits(&got), bits(&want), "w={w} l={l} c={c}");
        if n > 0 {
            let wide = up(&be, &vec![0.5; w * l * (c + 1)], &[w, l, c + 1]);
            assert!(be.compressor_pool(&kv, &wide).is_err());
            assert!(composed::compressor_pool(&be, &kv, &wide).is_err());
        }
    }
    // Not [W, L, c]: an error from both, not a panic (a 2-D pair passes softmax, product and
    // sum; the composition's reshape to [W, c] indexed a third dimension).
    let flat = up(&be, &[0.5; 12], &[3, 4]);
    for e in [be.compressor_pool(&flat, &flat).unwrap_err(), composed::compressor_pool(&be, &flat, &flat).unwrap_err()]
    {
        assert!(e.to_string().contains("are not both [W, L, c] of one shape"), "{e}");
    }
}

/// The CPU's `hc_post` (one pass) gives exactly the composition's bits (broadcast product,
/// batched `matmul` of `combᵀ` through the `gemm` crate, sum) for mHC's sizes and odd ones
/// (no tokens, one stream, D = 1, eight streams, a wide D), with values of both signs and
/// magnitudes far apart (so that a different summation order would show), and refuses the
/// shapes the composition refuses.
#[test]
fn hc_post_is_the_composition_bit_for_bit() {
    use dsv4_core::backend::composed;
    let be = CpuBackend::new();
    let mut rng = Rng(0x0c0f_fee5);
    let bits =
        |t: &<CpuBackend as Backend>::Tensor| be.download(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (t, n, d) in
        [(1, 4, 64), (3, 4, 33), (2, 1, 8), (2, 3, 16), (2, 8, 5), (4, 4, 1), (4, 4, 2), (0, 4, 8), (9, 4, 2048)]
    {
        // Magnitudes from 2^-12 to 2^12: sums whose rounding depends on the order.
        let val = |rng: &mut Rng| rng.f32() * 2f32.powi((rng.f32() * 12.0) as i32);
        let x: Vec<f32> = (0..t * n * d).map(|_| val(&mut rng)).collect();
        let y: Vec<f32> = (0..t * d).map(|_| val(&mut rng)).collect();
        let post: Vec<f32> = (0..t * n).map(|_| val(&mut rng)).collect();
        let comb: Vec<f32> = (0..t * n * n).map(|_| val(&mut rng)).collect();
        let (x, y) = (up(&be, &x, &[t, n, d]), up(&be, &y, &[t, d]));
        let (post, comb) = (up(&be, &post, &[t, n]), up(&be, &comb, &[t, n, n]));
        let got = be.hc_post(&x, &y, &post, &comb).unwrap();
        let want = composed::hc_post(&be, &x, &y, &post, &comb).unwrap();
        assert_eq!(got.shape(), want.shape(), "t={t} n={n} d={d}");
        assert_eq!(bits(&got), bits(&want), "t={t} n={n} d={d}");
        // A post of the wrong width (with tokens: an empty one reshapes to anything) and an x
        // that is not [T, n, D]: both refuse.
        if t > 0 {
            let bad = up(&be, &vec![1.0; t * (n + 1)], &[t, n + 1]);
            assert!(be.hc_post(&x, &y, &bad, &comb).is_err());
            assert!(composed::hc_post(&be, &x, &y, &bad, &comb).is_err());
        }
        let flat = up(&be, &vec![0.5; t * n * d], &[t, n * d]);
        assert!(be.hc_post(&flat, &y, &post, &comb).is_err());
    }
}

/// `hc_post` against the composition on the values where fused and unfused arithmetic part:
/// signed zeros, subnormals, products that overflow or underflow, infinities and NaNs, for
/// 1 to 9 streams and 520 (n ≤ 2 and n > 512 go through the composition itself: the `gemm`
/// crate sums those otherwise; a review found their bits differing from the kernel's), widths
/// around the vector lengths and enough tokens to split across threads. A NaN only has to be
/// a NaN (Rust leaves which payload an operation returns unspecified).
#[test]
fn hc_post_is_the_composition_bit_for_bit_on_special_values() {
    use dsv4_core::backend::composed;
    let be = CpuBackend::new();
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut val = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let base = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        match s % 16 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::INFINITY,
            3 => f32::NEG_INFINITY,
            4 => f32::NAN,
            5 => f32::from_bits(1 + (s >> 44) as u32),  // subnormal
            6 => -f32::from_bits(1 + (s >> 44) as u32), // subnormal
            7 => f32::MAX * base,
            8 => base * 1e-30, // products underflow, to -0.0 for opposite signs
            _ => base * 2f32.powi((s % 200) as i32 - 100),
        }
    };
    let down_bits = |t: &<CpuBackend as Backend>::Tensor| {
        be.download(t)
            .unwrap()
            .iter()
            .map(|&v| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() })
            .collect::<Vec<_>>()
    };
    let shapes = [(1, 2), (3, 7), (2, 16), (2, 17), (1, 63), (1, 65), (2, 1024), (1, 4097), (97, 40)];
    for (n, (t, d)) in (1..=9).flat_map(|n| shapes.map(|s| (n, s))).chain([(520, (1, 2)), (520, (1, 70))]) {
        {
            let x: Vec<f32> = (0..t * n * d).map(|_| val()).collect();
            let y: Vec<f32> = (0..t * d).map(|_| val()).collect();
            let post: Vec<f32> = (0..t * n).map(|_| val()).collect();
            let comb: Vec<f32> = (0..t * n * n).map(|_| val()).collect();
            let (x, y) = (up(&be, &x, &[t, n, d]), up(&be, &y, &[t, d]));
            let (post, comb) = (up(&be, &post, &[t, n]), up(&be, &comb, &[t, n, n]));
            let got = be.hc_post(&x, &y, &post, &comb).unwrap();
            let want = composed::hc_post(&be, &x, &y, &post, &comb).unwrap();
            assert_eq!(down_bits(&got), down_bits(&want), "t={t} n={n} d={d}");
        }
    }
}

/// The CPU's `sinkhorn` (one loop) gives exactly the composition's bits (reduce, affine,
/// broadcast division per step), for the mHC sizes and odd ones, and falls back to the
/// composition for lines of 8 or more.
#[test]
fn sinkhorn_is_the_composition_bit_for_bit() {
    use dsv4_core::backend::composed;
    let be = CpuBackend::new();
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    for (t, n) in [(1, 4), (3, 4), (2, 1), (2, 3), (1, 7), (2, 8), (1, 9)] {
        for iters in [0, 1, 2, 20] {
            let data: Vec<f32> = (0..t * n * n).map(|_| next() * 3.0 + 1e-3).collect();
            let comb = be.upload(&data, &[t, n, n]).unwrap();
            let got = be.download(&be.sinkhorn(&comb, iters, 1e-6).unwrap()).unwrap();
            let want = be.download(&composed::sinkhorn(&be, &comb, iters, 1e-6).unwrap()).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "t={t} n={n} iters={iters}");
        }
    }
}
