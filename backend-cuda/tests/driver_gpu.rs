//! `DriverDevice` on a real GPU: memory with offsets, a kernel launch (NVRTC, module cache, PTX
//! disk cache), cuBLAS GEMMs in f32 and BF16 against a host reference, and the errors.
//!
//! Runs only when `DSV4_CUDA_DEVICE` names a GPU (`ci/gpu-check.sh` sets it to 0); otherwise it
//! prints why and passes.

use dsv4_backend_cuda::driver::DriverDevice;
use dsv4_backend_cuda::{Device, Gemm, GemmType, KernelArg, LaunchConfig};

fn device() -> Option<DriverDevice> {
    let Ok(ordinal) = std::env::var("DSV4_CUDA_DEVICE") else {
        println!("skipped: set DSV4_CUDA_DEVICE=<ordinal> to run on a GPU");
        return None;
    };
    let ordinal: usize = ordinal.parse().expect("DSV4_CUDA_DEVICE is a device number");
    let dev = DriverDevice::open(ordinal).unwrap_or_else(|e| panic!("DSV4_CUDA_DEVICE={ordinal}: {e}"));
    println!("{}", dev.describe());
    Some(dev)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn memory_moves_with_offsets() {
    let Some(dev) = device() else { return };
    let data: Vec<u8> = (0..=255u8).collect();
    let a = dev.upload(&data).unwrap();
    assert_eq!(dev.len(&a), 256);
    let mut out = vec![0u8; 16];
    dev.download(&a, 100, &mut out).unwrap();
    assert_eq!(out, &data[100..116]);

    let z = dev.alloc_zeroed(64).unwrap();
    dev.copy(&a, 10, &z, 20, 8).unwrap();
    let mut all = vec![1u8; 64];
    dev.download(&z, 0, &mut all).unwrap();
    let mut want = vec![0u8; 64];
    want[20..28].copy_from_slice(&data[10..18]);
    assert_eq!(all, want);

    let empty = dev.upload(&[]).unwrap();
    assert_eq!(dev.len(&empty), 0);
    dev.download(&empty, 0, &mut []).unwrap();
    let e = dev.download(&a, 250, &mut out).unwrap_err().to_string();
    assert!(e.contains("outside a buffer of 256 bytes"), "{e}");
    assert!(dev.free_memory().is_some_and(|f| f > 0));
}

#[test]
fn kernels_compile_load_and_run_and_round_as_written() {
    let Some(dev) = device() else { return };
    let cache = std::env::temp_dir().join(format!("dsv4-ptx-test-{}", std::process::id()));
    let mut dev = dev;
    dev.set_ptx_cache_dir(Some(cache.clone()));
    // dsv4_fill_f32(float* out, i64 n, float value), into the middle of a buffer.
    let buf = dev.alloc_zeroed(40).unwrap();
    let fill = [KernelArg::Out(&buf, 8), KernelArg::I64(6), KernelArg::F32(2.5)];
    dev.launch("dsv4_fill_f32", LaunchConfig::linear(1, 64), &fill).unwrap();
    let mut out = vec![0u8; 40];
    dev.download(&buf, 0, &mut out).unwrap();
    assert_eq!(f32s(&out), [0.0, 0.0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 0.0, 0.0]);
    let cached: Vec<_> =
        std::fs::read_dir(&cache).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(cached.iter().any(|n| n.to_string_lossy().starts_with("elementwise-compute_")), "{cached:?}");

    // dsv4_affine_f32(x, out, n, mul, add): x·mul + add rounds twice (no FMA contraction,
    // `--fmad=false`), as on the CPU: here the product's half-ulp tail is lost, so 0 exactly.
    let x = 1.0f32 + f32::powi(2.0, -12);
    let (mul, add) = (x, -(1.0f32 + f32::powi(2.0, -11)));
    assert_eq!(x * mul + add, 0.0, "the host rounds twice");
    // A second process would take the PTX from the disk cache: a fresh device handle does. Its
    // buffers are its own (a handle refuses another handle's buffers, below).
    let mut again = DriverDevice::open(dev.ordinal()).unwrap();
    again.set_ptx_cache_dir(Some(cache.clone()));
    let xs = again.upload(&f32_bytes(&[x])).unwrap();
    let ys = again.alloc_zeroed(4).unwrap();
    let args =
        [KernelArg::In(&xs, 0), KernelArg::Out(&ys, 0), KernelArg::I64(1), KernelArg::F32(mul), KernelArg::F32(add)];
    again.launch("dsv4_affine_f32", LaunchConfig::linear(1, 32), &args).unwrap_or_else(|e| panic!("{e}"));
    let mut y = [0u8; 4];
    again.download(&ys, 0, &mut y).unwrap();
    assert_eq!(f32s(&y), [0.0]);
    std::fs::remove_dir_all(&cache).ok();

    let e = dev.launch("dsv4_affine_f32", LaunchConfig::linear(1, 32), &args).unwrap_err().to_string();
    assert!(e.contains("a buffer of another CUDA device (or another handle on device"), "{e}");
    let e = dev.launch("dsv4_no_such_kernel", LaunchConfig::linear(1, 32), &[]).unwrap_err().to_string();
    assert!(e.contains("no kernel source defines dsv4_no_such_kernel"), "{e}");
    let e = dev.launch("dsv4_fill_f32", LaunchConfig::linear(1, 32), &[KernelArg::Out(&buf, 41)]).unwrap_err();
    assert!(e.to_string().contains("byte 41"), "{e}");
}

fn bf16(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

/// Runs `g` on the GPU and on the host; inputs are small integers, exact in BF16 and in sums.
fn check_gemm(dev: &DriverDevice, g: Gemm) {
    let a_len = g.a_offset + g.stride_a * (g.batch - 1) + g.m * g.k;
    let b_len = g.b_offset + g.stride_b * (g.batch - 1) + g.k * g.n;
    let c_len = g.c_offset + g.stride_c * (g.batch - 1) + g.m * g.n;
    let a: Vec<f32> = (0..a_len).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    let b: Vec<f32> = (0..b_len).map(|i| ((i * 5 % 13) as f32) - 6.0).collect();
    let mut want = vec![-1.0f32; c_len];
    for i in 0..g.batch {
        for r in 0..g.m {
            for c in 0..g.n {
                let mut s = 0.0;
                for l in 0..g.k {
                    let av = a[g.a_offset + i * g.stride_a + r * g.k + l];
                    let bv = match g.transpose_b {
                        false => b[g.b_offset + i * g.stride_b + l * g.n + c],
                        true => b[g.b_offset + i * g.stride_b + c * g.k + l],
                    };
                    s += av * bv;
                }
                want[g.c_offset + i * g.stride_c + r * g.n + c] = s;
            }
        }
    }
    let bytes = |v: &[f32]| match g.a_type {
        GemmType::F32 => f32_bytes(v),
        GemmType::Bf16 => v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect(),
    };
    let (da, db) = (dev.upload(&bytes(&a)).unwrap(), dev.upload(&bytes(&b)).unwrap());
    let dc = dev.upload(&f32_bytes(&vec![-1.0; c_len])).unwrap();
    dev.gemm(&g, &da, &db, &dc).unwrap_or_else(|e| panic!("{g:?}: {e}"));
    let mut got = vec![0u8; c_len * 4];
    dev.download(&dc, 0, &mut got).unwrap();
    let got = f32s(&got);
    // Between the batches' results C keeps its -1s: nothing outside C_i is written.
    assert_eq!(got, want, "{g:?}");
}

#[test]
fn cublas_gemms_match_the_row_major_definition() {
    let Some(dev) = device() else { return };
    for t in [GemmType::F32, GemmType::Bf16] {
        for transpose_b in [false, true] {
            for (batch, m, n, k, shared_b) in [(1, 3, 5, 4, false), (3, 2, 7, 9, false), (2, 33, 17, 65, true)] {
                check_gemm(
                    &dev,
                    Gemm {
                        batch,
                        m,
                        n,
                        k,
                        transpose_b,
                        a_type: t,
                        b_type: t,
                        a_offset: 3,
                        b_offset: 1,
                        c_offset: 2,
                        stride_a: m * k + 4,
                        stride_b: if shared_b { 0 } else { k * n + 1 },
                        stride_c: m * n + 3,
                    },
                );
            }
        }
    }
    // k = 0: an empty sum is 0.
    let g = Gemm {
        batch: 2,
        m: 2,
        n: 3,
        k: 0,
        transpose_b: false,
        a_type: GemmType::F32,
        b_type: GemmType::F32,
        a_offset: 0,
        b_offset: 0,
        c_offset: 0,
        stride_a: 0,
        stride_b: 0,
        stride_c: 6,
    };
    let (a, b) = (dev.alloc_zeroed(4).unwrap(), dev.alloc_zeroed(4).unwrap());
    let c = dev.upload(&f32_bytes(&[7.0; 12])).unwrap();
    dev.gemm(&g, &a, &b, &c).unwrap();
    let mut out = vec![0u8; 48];
    dev.download(&c, 0, &mut out).unwrap();
    assert_eq!(f32s(&out), [0.0; 12]);
    // Mixed operand types are refused, and so are operands too short for the extent.
    let mixed = Gemm { k: 1, b_type: GemmType::Bf16, ..g };
    assert!(dev.gemm(&mixed, &a, &b, &c).unwrap_err().to_string().contains("F32 or BF16"));
    let short = Gemm { k: 4, ..g };
    assert!(dev.gemm(&short, &a, &b, &c).unwrap_err().to_string().contains("outside a buffer"));
}
