//! Packed FP8 / FP4 / BF16 weights on the CPU backend: the default path (stored bytes decoded
//! inside the GEMV/GEMM) gives bit-identical results to the dequantise-at-load reference
//! path, on the GEMV (few rows) and GEMM (many rows) paths, for `linear`, `grouped_linear`
//! and `embedding`, on shapes that are not multiples of the block sizes; and both agree with
//! an f64 dot product over `quant::dequantize`.

use dsv4_backend_cpu::kernels::{Isa, Rows};
use dsv4_backend_cpu::{CpuBackend, CpuWeight};
use dsv4_core::quant::{dequantize, E4M3_TO_F32};
use dsv4_core::tensor::{DType, HostTensor, StoredWeight, WeightFormat};
use dsv4_core::Backend;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

fn tensor(name: &str, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> HostTensor {
    HostTensor::from_bytes(name, dtype, shape.to_vec(), bytes).unwrap()
}

/// Random FP8 codes (no NaN codes), scales in 2^-10..2^2, E8M0 or F32 scales.
fn fp8(rng: &mut Rng, n: usize, k: usize, f32_scales: bool) -> StoredWeight {
    let q: Vec<u8> = (0..n * k).map(|_| rng.byte()).map(|b| if b & 0x7F == 0x7F { 0x7E } else { b }).collect();
    let (sn, sk) = (n.div_ceil(128), k.div_ceil(128));
    let scale = if f32_scales {
        let v: Vec<u8> = (0..sn * sk).flat_map(|_| (0.001 + rng.f32().abs()).to_le_bytes()).collect();
        tensor("w.scale", DType::F32, &[sn, sk], v)
    } else {
        tensor("w.scale", DType::F8E8M0, &[sn, sk], (0..sn * sk).map(|_| 117 + (rng.next() % 12) as u8).collect())
    };
    StoredWeight::detect(&tensor("w.weight", DType::F8E4M3, &[n, k], q), Some(&scale), &[n, k]).unwrap()
}

fn fp4(rng: &mut Rng, n: usize, k: usize) -> StoredWeight {
    let q: Vec<u8> = (0..n * k / 2).map(|_| rng.byte()).collect();
    let sk = k.div_ceil(32);
    let s: Vec<u8> = (0..n * sk).map(|_| 120 + (rng.next() % 10) as u8).collect();
    StoredWeight::detect(
        &tensor("w.weight", DType::I8, &[n, k / 2], q),
        Some(&tensor("w.scale", DType::F8E8M0, &[n, sk], s)),
        &[n, k],
    )
    .unwrap()
}

fn bf16(rng: &mut Rng, n: usize, k: usize) -> StoredWeight {
    let b: Vec<u8> = (0..n * k).flat_map(|_| half::bf16::from_f32(rng.f32()).to_le_bytes()).collect();
    StoredWeight::float(tensor("w.weight", DType::BF16, &[n, k], b)).unwrap()
}

fn cases() -> Vec<(String, StoredWeight)> {
    let mut rng = Rng(7);
    vec![
        ("fp8 130x257 e8m0".into(), fp8(&mut rng, 130, 257, false)),
        ("fp8 200x96 f32".into(), fp8(&mut rng, 200, 96, true)),
        ("fp8 256x384 e8m0".into(), fp8(&mut rng, 256, 384, false)),
        ("fp4 70x96".into(), fp4(&mut rng, 70, 96)),
        ("fp4 33x40 (partial group)".into(), fp4(&mut rng, 33, 40)),
        ("fp4 128x256".into(), fp4(&mut rng, 128, 256)),
        ("bf16 65x72".into(), bf16(&mut rng, 65, 72)),
    ]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn packed_and_dequantized_linear_are_identical() {
    let be = CpuBackend::new();
    let mut rng = Rng(11);
    for (label, w) in cases() {
        let packed = CpuWeight::from_stored(&w).unwrap();
        let reference = CpuWeight::dequantized(&w).unwrap();
        assert!(!packed.is_dequantized() && reference.is_dequantized());
        assert_eq!(be.weight_shape(&packed), &w.shape[..]);
        let (n, k) = (w.shape[0], w.shape[1]);
        let values = dequantize(&w).unwrap();
        for m in [1, 3, 8, 9, 33] {
            let xs: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
            let x = be.upload(&xs, &[m, k]).unwrap();
            let a = be.download(&be.linear(&x, &packed).unwrap()).unwrap();
            let b = be.download(&be.linear(&x, &reference).unwrap()).unwrap();
            assert_eq!(bits(&a), bits(&b), "{label}, {m} rows: packed differs from dequantised");
            // Against an f64 reference over the exact weights.
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| xs[i * k + c] as f64 * values[j * k + c] as f64).sum::<f64>();
                    let scale: f64 =
                        (0..k).map(|c| (xs[i * k + c] as f64 * values[j * k + c] as f64).abs()).sum::<f64>();
                    let got = a[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale.max(1e-30),
                        "{label}, {m} rows, ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_and_dequantized_grouped_linear_and_embedding_are_identical() {
    let be = CpuBackend::new();
    let mut rng = Rng(5);
    // 4 groups of 65 rows: groups start inside FP8 row blocks (65, 130, 195).
    for w in [fp8(&mut rng, 260, 96, false), fp4(&mut rng, 260, 96), bf16(&mut rng, 260, 96)] {
        let (packed, reference) = (CpuWeight::from_stored(&w).unwrap(), CpuWeight::dequantized(&w).unwrap());
        for m in [1, 12] {
            let xs: Vec<f32> = (0..m * 4 * 96).map(|_| rng.f32()).collect();
            let x = be.upload(&xs, &[m, 4, 96]).unwrap();
            let a = be.download(&be.grouped_linear(&x, &packed, 4).unwrap()).unwrap();
            let b = be.download(&be.grouped_linear(&x, &reference, 4).unwrap()).unwrap();
            assert_eq!(bits(&a), bits(&b), "{:?}, {m} rows", w.format);
        }
        let ids = be.upload_index(&[0, 259, 128, 127, 7], &[5]).unwrap();
        let a = be.download(&be.embedding(&packed, &ids).unwrap()).unwrap();
        let b = be.download(&be.embedding(&reference, &ids).unwrap()).unwrap();
        assert_eq!(bits(&a), bits(&b));
        let values = dequantize(&w).unwrap();
        assert_eq!(bits(&a[96..192]), bits(&values[259 * 96..260 * 96]), "embedding row 259 is exact");
    }
}

#[test]
fn packed_weights_are_zero_copy_views() {
    let mut rng = Rng(3);
    let w = fp4(&mut rng, 64, 64);
    let packed = CpuWeight::from_stored(&w).unwrap();
    assert_eq!(packed.size_bytes(), 64 * 32 + 64 * 2, "FP4 keeps half a byte per value plus its scales");
    assert_eq!(CpuWeight::dequantized(&w).unwrap().size_bytes(), 64 * 64 * 4);
    let w = fp8(&mut rng, 128, 128, false);
    assert!(matches!(w.format, WeightFormat::Fp8Block { rows: 128, cols: 128 }));
    assert_eq!(CpuWeight::from_stored(&w).unwrap().size_bytes(), 128 * 128 + 1);
}

/// NaN codes in a matrix that the decode GEMV folds (E8M0 scales, `k` a multiple of 32) make
/// their rows NaN and leave every other row with the dequantised reference's bits: their row
/// blocks keep the kernel's per-chunk NaN test (`Fp8Blocks::nan_free`), and the row pairs with
/// a NaN take the general path. Were the test skipped, `0x7F` would read as 480. A clean
/// matrix's blocks are found clean (so the kernel runs without the test).
#[test]
fn nan_fp8_codes_in_a_folded_matrix_touch_only_their_rows() {
    let be = CpuBackend::new();
    let mut rng = Rng(5);
    let (n, k) = (256, 256);
    let mut w = fp8(&mut rng, n, k, false);
    let x: Vec<f32> = (0..k).map(|_| rng.f32()).collect();
    let run = |cw: &CpuWeight| be.download(&be.linear(&be.upload(&x, &[1, k]).unwrap(), cw).unwrap()).unwrap();
    let clean = CpuWeight::from_stored(&w).unwrap();
    run(&clean);
    let blocks = |cw: &CpuWeight| (0..2).map(|b| cw.fp8_blocks().unwrap().nan_free.known(b)).collect::<Vec<_>>();
    if Isa::active() != Isa::Scalar {
        assert_eq!(blocks(&clean), [Some(true); 2]);
    }
    let mut q = w.data.bytes().to_vec();
    q[3 * k + 40] = 0x7F;
    q[200 * k + 255] = 0xFF;
    w.data = tensor("w.weight", DType::F8E4M3, &[n, k], q);
    let with_nan = CpuWeight::from_stored(&w).unwrap();
    let (packed, reference) = (run(&with_nan), run(&CpuWeight::dequantized(&w).unwrap()));
    if Isa::active() != Isa::Scalar {
        assert_eq!(blocks(&with_nan), [Some(false); 2]);
    }
    for r in 0..n {
        if r == 3 || r == 200 {
            assert!(packed[r].is_nan(), "row {r} holds a NaN code: {}", packed[r]);
        } else {
            assert_eq!(packed[r].to_bits(), reference[r].to_bits(), "row {r}");
        }
    }
}

#[test]
fn nan_fp8_codes_propagate_and_inconsistent_weights_are_refused() {
    let be = CpuBackend::new();
    let q = vec![0x7Fu8, 0x38, 0x38, 0x38]; // NaN, 1, 1, 1
    let w = StoredWeight::detect(
        &tensor("w.weight", DType::F8E4M3, &[2, 2], q),
        Some(&tensor("w.scale", DType::F8E8M0, &[1, 1], vec![127])),
        &[2, 2],
    )
    .unwrap();
    assert!(E4M3_TO_F32[0x7F].is_nan());
    let y = be
        .download(&be.linear(&be.upload(&[1.0, 1.0], &[1, 2]).unwrap(), &CpuWeight::from_stored(&w).unwrap()).unwrap())
        .unwrap();
    assert!(y[0].is_nan() && y[1] == 2.0);
    // A hand-built weight whose scale does not fit is refused, not read out of bounds.
    let mut bad = w.clone();
    bad.scale = Some(tensor("w.scale", DType::F8E8M0, &[0, 1], vec![]));
    let e = CpuWeight::from_stored(&bad).unwrap_err().to_string();
    assert!(e.contains("w.scale"), "{e}");
    let mut bad = w.clone();
    bad.shape = vec![2, 4];
    assert!(CpuWeight::from_stored(&bad).is_err());
}
