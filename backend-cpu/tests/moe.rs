//! The CPU's fused expert FFNs (`expert_ffn`, `moe_experts`: all chosen experts in two
//! parallel passes) give exactly the trait's composition (three `linear`s, the SwiGLU ops, and
//! a gather / scatter-add per expert), on the GEMV (few rows) and GEMM (many rows) paths, with
//! FP4 and BF16 experts, and refuse bad expert ids.

use dsv4_backend_cpu::{CpuBackend, CpuWeight};
use dsv4_core::backend::{composed, ExpertWeights};
use dsv4_core::precision::Precision;
use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
use dsv4_core::Backend;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

fn tensor(name: &str, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> HostTensor {
    HostTensor::from_bytes(name, dtype, shape.to_vec(), bytes).unwrap()
}

/// An `[n, k]` weight: FP4 with E8M0 group scales, or BF16.
fn weight(rng: &mut Rng, n: usize, k: usize, fp4: bool) -> CpuWeight {
    let w = if fp4 {
        let q: Vec<u8> = (0..n * k / 2).map(|_| rng.next() as u8).collect();
        // Now and then a 0 byte (2⁻¹²⁷), which the kernels decode apart.
        let s: Vec<u8> = (0..n * k.div_ceil(32))
            .map(|_| if rng.next().is_multiple_of(50) { 0 } else { 122 + (rng.next() % 6) as u8 })
            .collect();
        StoredWeight::detect(
            &tensor("w.weight", DType::I8, &[n, k / 2], q),
            Some(&tensor("w.scale", DType::F8E8M0, &[n, k.div_ceil(32)], s)),
            &[n, k],
        )
        .unwrap()
    } else {
        let b: Vec<u8> = (0..n * k).flat_map(|_| half::bf16::from_f32(rng.f32() * 0.3).to_le_bytes()).collect();
        StoredWeight::float(tensor("w.weight", DType::BF16, &[n, k], b)).unwrap()
    };
    CpuWeight::from_stored(&w).unwrap()
}

fn expert(rng: &mut Rng, d: usize, inter: usize, fp4: bool) -> ExpertWeights<CpuWeight> {
    ExpertWeights {
        w1: weight(rng, inter, d, fp4),
        w2: weight(rng, d, inter, fp4),
        w3: weight(rng, inter, d, fp4),
        low_bit: fp4,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The trait's default `expert_ffn`: three linears and the SwiGLU composition, each output
/// rounded to BF16 where `act` rounds, the linears' inputs e4m3-quantised where it simulates
/// the official quantisation (on low-bit experts).
fn composed_ffn(
    be: &CpuBackend,
    x: &<CpuBackend as Backend>::Tensor,
    e: &ExpertWeights<CpuWeight>,
    act: Precision,
) -> Vec<f32> {
    let x = &act.linear_input(be, x, e.low_bit).unwrap();
    let g = act.act_of(be, be.linear(x, &e.w1)).unwrap();
    let u = act.act_of(be, be.linear(x, &e.w3)).unwrap();
    let g = be.clamp(&g, f32::NEG_INFINITY, 10.0).unwrap();
    let u = be.clamp(&u, -10.0, 10.0).unwrap();
    let h = be.binary(&be.unary(&g, dsv4_core::backend::UnaryOp::Silu).unwrap(), &u, dsv4_core::backend::BinaryOp::Mul);
    let h = act.act_of(be, h).unwrap();
    let h = act.linear_input(be, &h, e.low_bit).unwrap();
    be.download(&act.act_of(be, be.linear(&h, &e.w2)).unwrap()).unwrap()
}

#[test]
fn fused_experts_equal_the_composition_bit_for_bit() {
    let be = CpuBackend::new();
    let mut rng = Rng(17);
    // d = 160 and inter = 96: blocks of rows that do not divide evenly. d = 256 and inter = 640:
    // whole 128-value blocks, so one-row FP4 jobs in bf16 take `kernels::fp4_bf16` (on a CPU
    // with AVX512-BF16 that uses it: `DSV4_CPU_BF16_PRODUCTS`, on in CI), in more than one 512-row block.
    let n_experts = 8;
    for (d, inter, fp4, act) in [(160, 96), (256, 640)]
        .into_iter()
        .flat_map(|(d, i)| [true, false].into_iter().flat_map(move |f| Precision::ALL.map(move |a| (d, i, f, a))))
    {
        let experts: Vec<_> = (0..n_experts).map(|_| expert(&mut rng, d, inter, fp4)).collect();
        for (t, k) in [(1, 3), (2, 2), (5, 3), (40, 4)] {
            // Large inputs so that the clamps at ±10 are reached; BF16 values in bf16, as the
            // graph feeds them.
            let xs: Vec<f32> = (0..t * d).map(|_| rng.f32() * 8.0).collect();
            let x = act.act(&be, &be.upload(&xs, &[t, d]).unwrap()).unwrap();
            let e0 = &experts[0];
            let fused = be.download(&be.expert_ffn(&x, e0, 10.0, act).unwrap()).unwrap();
            if act.rounds_to_bf16() {
                assert!(fused.iter().all(|v| v.to_bits() & 0xffff == 0), "bf16 expert outputs are BF16 values");
            }
            assert_eq!(bits(&fused), bits(&composed_ffn(&be, &x, e0, act)), "expert_ffn, {t} rows, fp4 {fp4}, {act}");
            // Distinct experts per row; expert 5 chosen by every row when t > 1.
            let ids: Vec<i32> =
                (0..t * k).map(|i| if i % k == 0 { 5 } else { ((i * 7 + i / k) % n_experts) as i32 }).collect();
            let ids: Vec<i32> = ids
                .chunks(k)
                .flat_map(|row| {
                    let mut seen = vec![];
                    row.iter().map(move |&e| {
                        let mut e = e;
                        while seen.contains(&e) {
                            e = (e + 1) % n_experts as i32;
                        }
                        seen.push(e);
                        e
                    })
                })
                .collect();
            let w: Vec<f32> = (0..t * k).map(|_| rng.f32()).collect();
            let w = be.upload(&w, &[t, k]).unwrap();
            let fused = be.download(&be.moe_experts(&x, &ids, &w, &experts, 10.0, act).unwrap()).unwrap();
            let reference =
                be.download(&composed::moe_experts(&be, &x, &ids, &w, &experts, 10.0, act).unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&reference), "moe_experts, {t} rows, top-{k}, fp4 {fp4}, {act}");
        }
        let x = be.upload(&vec![0.5; d], &[1, d]).unwrap();
        let w = be.upload(&[1.0], &[1, 1]).unwrap();
        let e = be.moe_experts(&x, &[n_experts as i32], &w, &experts, 10.0, act).unwrap_err();
        assert!(e.to_string().contains("expert id 8 is outside 0..8"), "{e}");
    }
}
