//! `EmulatedDevice` as the CUDA backend uses it: the strict launch checks, memory operations'
//! bounds, a backend kernel (`dsv4_fill_f32`) end to end, and the host GEMM against a naive
//! loop.

use dsv4_backend_cuda::kernels::SOURCES;
use dsv4_backend_cuda::{Device, Gemm, GemmType, KernelArg, LaunchConfig};
use dsv4_cuda_emu::{EmuBuffer, EmulatedDevice, ParamKind};

fn f32s(dev: &EmulatedDevice, v: &[f32]) -> EmuBuffer {
    dev.upload(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap()
}

fn bf16s(dev: &EmulatedDevice, v: &[u16]) -> EmuBuffer {
    dev.upload(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap()
}

fn read_f32(dev: &EmulatedDevice, b: &EmuBuffer) -> Vec<f32> {
    let mut bytes = vec![0u8; dev.len(b)];
    dev.download(b, 0, &mut bytes).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn error_of<T: std::fmt::Debug>(r: dsv4_core::error::Result<T>) -> String {
    let e = r.expect_err("expected an error");
    assert!(matches!(e, dsv4_core::error::Error::Backend { ref backend, .. } if backend == "cuda"), "{e:?}");
    e.to_string()
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn every_backend_kernel_is_compiled_in() {
    for s in SOURCES {
        for k in s.kernels() {
            let info = dsv4_cuda_emu::kernel(k).unwrap_or_else(|| panic!("{k} of {} is missing", s.file));
            assert_eq!(info.file, s.file);
        }
    }
    let fill = dsv4_cuda_emu::kernel("dsv4_fill_f32").unwrap();
    let kinds: Vec<ParamKind> = fill.params.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        vec![ParamKind::Pointer { pointee_const: false, pointee_align: 4 }, ParamKind::LongLong, ParamKind::Float]
    );
    assert_eq!(fill.params[0].type_name, "float*");
}

#[test]
fn fill_kernel_fills() {
    let dev = EmulatedDevice::new();
    for n in [1usize, 255, 256, 257, 10_000] {
        let out = dev.alloc_zeroed(n * 4 + 8).unwrap();
        let blocks = n.div_ceil(256) as u32;
        dev.launch(
            "dsv4_fill_f32",
            LaunchConfig::linear(blocks, 256),
            &[KernelArg::Out(&out, 4), KernelArg::I64(n as i64), KernelArg::F32(2.5)],
        )
        .unwrap();
        let got = read_f32(&dev, &out);
        assert_eq!(got[0], 0.0);
        assert!(got[1..=n].iter().all(|&v| v == 2.5), "n = {n}");
        assert_eq!(got[n + 1], 0.0);
    }
    // A grid smaller than the data: the grid-stride loop covers the rest.
    let out = dev.alloc_zeroed(5000 * 4).unwrap();
    dev.launch(
        "dsv4_fill_f32",
        LaunchConfig::linear(3, 64),
        &[KernelArg::Out(&out, 0), KernelArg::I64(5000), KernelArg::F32(-1.0)],
    )
    .unwrap();
    assert!(read_f32(&dev, &out).iter().all(|&v| v == -1.0));
    assert_eq!(dev.launch_count("dsv4_fill_f32"), 6);
    assert_eq!(dev.launch_count("dsv4emu_test_noop"), 0);
}

#[test]
fn launch_arguments_are_checked() {
    let dev = EmulatedDevice::new();
    let buf = dev.alloc_zeroed(64).unwrap();
    let one = LaunchConfig::linear(1, 32);

    let e = error_of(dev.launch("dsv4_no_such_kernel", one, &[]));
    assert!(e.contains("unknown kernel `dsv4_no_such_kernel`"), "{e}");

    let e = error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 0), KernelArg::I64(16)]));
    assert!(e.contains("2 argument(s) given for 3 parameter(s): dsv4_fill_f32(float*, long long, float)"), "{e}");

    let e =
        error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::In(&buf, 0), KernelArg::I64(16), KernelArg::F32(0.0)]));
    assert!(e.contains("KernelArg::In for a pointer to non-const"), "{e}");
    assert!(e.contains("argument 0") && e.contains("`float*`"), "{e}");

    let e = error_of(dev.launch("dsv4emu_test_reverse", one, &[KernelArg::Out(&buf, 0), KernelArg::Out(&buf, 0)]));
    assert!(e.contains("KernelArg::Out for a pointer to const"), "{e}");

    let e =
        error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 0), KernelArg::I32(16), KernelArg::F32(0.0)]));
    assert!(e.contains("argument 1 (KernelArg::I32)") && e.contains("pass KernelArg::I64"), "{e}");

    let e =
        error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 0), KernelArg::I64(16), KernelArg::I32(0)]));
    assert!(e.contains("pass KernelArg::F32"), "{e}");

    let e = error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::F32(0.0), KernelArg::I64(16), KernelArg::F32(0.0)]));
    assert!(e.contains("pass KernelArg::Out"), "{e}");

    let e =
        error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 68), KernelArg::I64(0), KernelArg::F32(0.0)]));
    assert!(e.contains("byte offset 68 is past the end of its buffer of 64 bytes"), "{e}");

    let e =
        error_of(dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 2), KernelArg::I64(0), KernelArg::F32(0.0)]));
    assert!(e.contains("not a multiple of the pointee's alignment 4"), "{e}");

    // An offset at the very end is a valid (empty) view.
    dev.launch("dsv4_fill_f32", one, &[KernelArg::Out(&buf, 64), KernelArg::I64(0), KernelArg::F32(0.0)]).unwrap();
    assert_eq!(dev.launch_count("dsv4_fill_f32"), 1);
}

#[test]
fn launch_shapes_are_checked() {
    let dev = EmulatedDevice::new();
    let buf = dev.alloc_zeroed(64).unwrap();
    let args = [KernelArg::Out(&buf, 0), KernelArg::I64(16), KernelArg::F32(1.0)];
    let cfg = |grid, block, shared_bytes| LaunchConfig { grid, block, shared_bytes };
    for (c, what) in [
        (cfg((1, 1, 1), (0, 1, 1), 0), "block"),
        (cfg((1, 1, 1), (1025, 1, 1), 0), "block"),
        (cfg((1, 1, 1), (64, 32, 1), 0), "block"),
        (cfg((1, 1, 1), (1, 1, 65), 0), "block"),
        (cfg((0, 1, 1), (32, 1, 1), 0), "grid"),
        (cfg((1, 0, 1), (32, 1, 1), 0), "grid"),
        (cfg((1, 1, 65536), (32, 1, 1), 0), "grid"),
        (cfg((1, 1, 1), (32, 1, 1), 48 * 1024 + 1), "dynamic shared memory"),
    ] {
        let e = error_of(dev.launch("dsv4_fill_f32", c, &args));
        assert!(e.contains(what), "{c:?}: {e}");
    }
    dev.launch("dsv4_fill_f32", cfg((1, 1, 1), (1024, 1, 1), 48 * 1024), &args).unwrap();
    dev.launch("dsv4_fill_f32", cfg((2, 2, 2), (8, 4, 2), 0), &args).unwrap();
}

#[test]
fn writes_outside_a_buffer_are_reported() {
    let dev = EmulatedDevice::new();
    let buf = dev.alloc_zeroed(40).unwrap();
    // 12 floats into a buffer of 10.
    let e = error_of(dev.launch(
        "dsv4_fill_f32",
        LaunchConfig::linear(1, 32),
        &[KernelArg::Out(&buf, 0), KernelArg::I64(12), KernelArg::F32(1.0)],
    ));
    assert!(
        e.contains("wrote outside its buffers")
            && e.contains("argument 0 (a buffer of 40 bytes) was written up to 8 byte(s) past its end"),
        "{e}"
    );
    // The guard was restored: the next correct launch is clean.
    dev.launch(
        "dsv4_fill_f32",
        LaunchConfig::linear(1, 32),
        &[KernelArg::Out(&buf, 0), KernelArg::I64(10), KernelArg::F32(1.0)],
    )
    .unwrap();
}

#[test]
fn memory_operations_are_bounds_checked() {
    let dev = EmulatedDevice::new();
    let a = dev.upload(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let b = dev.alloc_zeroed(8).unwrap();
    assert_eq!(dev.len(&a), 8);
    let empty = dev.alloc_zeroed(0).unwrap();
    assert_eq!(dev.len(&empty), 0);

    let mut out = [0u8; 4];
    dev.download(&a, 4, &mut out).unwrap();
    assert_eq!(out, [5, 6, 7, 8]);
    let e = error_of(dev.download(&a, 5, &mut out));
    assert!(e.contains("4 byte(s) at offset 5 run past the end of a buffer of 8 bytes"), "{e}");
    let e = error_of(dev.download(&a, usize::MAX, &mut out));
    assert!(e.contains("run past the end"), "{e}");

    dev.copy(&a, 2, &b, 4, 4).unwrap();
    let mut all = [0u8; 8];
    dev.download(&b, 0, &mut all).unwrap();
    assert_eq!(all, [0, 0, 0, 0, 3, 4, 5, 6]);
    assert!(error_of(dev.copy(&a, 6, &b, 0, 4)).contains("copy (source)"));
    assert!(error_of(dev.copy(&a, 0, &b, 6, 4)).contains("copy (destination)"));
    assert!(error_of(dev.copy(&a, 0, &a, 2, 4)).contains("overlap"));
    dev.copy(&a, 0, &a, 4, 4).unwrap();
    dev.copy(&a, 8, &b, 8, 0).unwrap();
    dev.synchronize().unwrap();

    // A buffer of another device is refused everywhere.
    let other = EmulatedDevice::new();
    let foreign = other.alloc_zeroed(8).unwrap();
    assert!(error_of(dev.download(&foreign, 0, &mut out)).contains("another device"));
    assert!(error_of(dev.copy(&a, 0, &foreign, 0, 4)).contains("another device"));
    let e = error_of(dev.launch(
        "dsv4_fill_f32",
        LaunchConfig::linear(1, 32),
        &[KernelArg::Out(&foreign, 0), KernelArg::I64(2), KernelArg::F32(0.0)],
    ));
    assert!(e.contains("launch of `dsv4_fill_f32`") && e.contains("another device"), "{e}");

    assert!(dev.describe().contains("CUDA emulator"));
    assert_eq!(dev.free_memory(), None);
}

#[test]
fn buffers_are_aligned_and_independent() {
    let dev = EmulatedDevice::new();
    let bufs: Vec<EmuBuffer> = (0..8).map(|i| dev.alloc_zeroed(i * 3 + 1).unwrap()).collect();
    for b in &bufs {
        // Through a kernel: the address the kernel gets is the buffer's; fill it and read back.
        let n = dev.len(b) / 4;
        dev.launch(
            "dsv4_fill_f32",
            LaunchConfig::linear(1, 32),
            &[KernelArg::Out(b, 0), KernelArg::I64(n as i64), KernelArg::F32(7.0)],
        )
        .unwrap();
    }
    for b in &bufs {
        let mut bytes = vec![0u8; dev.len(b)];
        dev.download(b, 0, &mut bytes).unwrap();
        let n = bytes.len() / 4;
        assert!(bytes[..4 * n].chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) == 7.0));
        assert!(bytes[4 * n..].iter().all(|&x| x == 0));
    }
}

/// C[i] = A[i] · B[i] (or A[i] · B[i]ᵀ), as f64 sums, the reference for the host GEMM.
fn naive(g: &Gemm, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0f32; g.batch * g.m * g.n];
    for i in 0..g.batch {
        for r in 0..g.m {
            for j in 0..g.n {
                let mut s = 0f64;
                for kk in 0..g.k {
                    let av = a[g.a_offset + i * g.stride_a + r * g.k + kk];
                    let bv = if g.transpose_b {
                        b[g.b_offset + i * g.stride_b + j * g.k + kk]
                    } else {
                        b[g.b_offset + i * g.stride_b + kk * g.n + j]
                    };
                    s += f64::from(av) * f64::from(bv);
                }
                c[i * g.m * g.n + r * g.n + j] = s as f32;
            }
        }
    }
    c
}

fn to_bf16(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v.iter().map(|x| ((x.to_bits() + 0x7fff + ((x.to_bits() >> 16) & 1)) >> 16) as u16).collect();
    let back = bits.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
    (bits, back)
}

#[test]
fn gemm_matches_a_naive_loop() {
    let dev = EmulatedDevice::new();
    let cases = [
        // (batch, m, n, k, transpose_b, stride_b shared, bf16 b)
        (1, 1, 1, 1, false, false, false),
        (1, 5, 7, 3, false, false, false),
        (3, 4, 6, 8, true, false, false),
        (4, 3, 5, 9, false, true, false),
        (2, 6, 4, 5, true, true, true),
        (2, 17, 33, 64, false, false, true),
        (1, 3, 4, 0, false, false, false),
    ];
    for (batch, m, n, k, transpose_b, shared_b, bf16_b) in cases {
        let (a_offset, b_offset, c_offset) = (3, 5, 2);
        let stride_a = m * k + 1;
        let stride_b = if shared_b { 0 } else { k * n + 2 };
        let stride_c = m * n + 3;
        let a = noise(a_offset + batch * stride_a, 1);
        let b = noise(b_offset + batch.max(1) * (k * n + 2), 2);
        let g = Gemm {
            batch,
            m,
            n,
            k,
            transpose_b,
            a_type: GemmType::F32,
            b_type: if bf16_b { GemmType::Bf16 } else { GemmType::F32 },
            a_offset,
            b_offset,
            c_offset,
            stride_a,
            stride_b,
            stride_c,
        };
        let (bbuf, bvals) = if bf16_b {
            let (bits, back) = to_bf16(&b);
            (bf16s(&dev, &bits), back)
        } else {
            (f32s(&dev, &b), b.clone())
        };
        let abuf = f32s(&dev, &a);
        let c = dev.alloc_zeroed((c_offset + batch * stride_c) * 4).unwrap();
        dev.gemm(&g, &abuf, &bbuf, &c).unwrap();
        let got = read_f32(&dev, &c);
        let want = naive(&g, &a, &bvals);
        for i in 0..batch {
            for e in 0..m * n {
                assert_eq!(got[c_offset + i * stride_c + e], want[i * m * n + e], "{g:?}: batch {i}, element {e}");
            }
            // Untouched between the batches' results.
            if i + 1 < batch {
                assert!(got[c_offset + i * stride_c + m * n..c_offset + (i + 1) * stride_c].iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn gemm_operands_are_checked() {
    let dev = EmulatedDevice::new();
    let a = dev.alloc_zeroed(4 * 12).unwrap();
    let b = dev.alloc_zeroed(4 * 12).unwrap();
    let c = dev.alloc_zeroed(4 * 9).unwrap();
    let g = Gemm {
        batch: 1,
        m: 3,
        n: 3,
        k: 4,
        transpose_b: true,
        a_type: GemmType::F32,
        b_type: GemmType::F32,
        a_offset: 0,
        b_offset: 0,
        c_offset: 0,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
    dev.gemm(&g, &a, &b, &c).unwrap();
    assert!(error_of(dev.gemm(&Gemm { a_offset: 1, ..g }, &a, &b, &c)).contains("A: offset 1"));
    assert!(error_of(dev.gemm(&Gemm { b_offset: 1, ..g }, &a, &b, &c)).contains("B: offset 1"));
    assert!(error_of(dev.gemm(&Gemm { c_offset: 1, ..g }, &a, &b, &c)).contains("C: offset 1"));
    assert!(error_of(dev.gemm(&Gemm { batch: 2, stride_c: 9, ..g }, &a, &b, &c)).contains("C: offset 0 + stride 9"));
    assert!(error_of(dev.gemm(&Gemm { batch: 2, stride_c: 4, ..g }, &a, &b, &c)).contains("would overlap"));
    // BF16 B: half the bytes, so a B of 12 f32 holds 24 bf16.
    dev.gemm(&Gemm { b_type: GemmType::Bf16, b_offset: 12, ..g }, &a, &b, &c).unwrap();
    assert!(error_of(dev.gemm(&Gemm { b_type: GemmType::Bf16, b_offset: 13, ..g }, &a, &b, &c)).contains("B:"));
    // C may not alias an input.
    let big = dev.alloc_zeroed(4 * 64).unwrap();
    let e = error_of(dev.gemm(&Gemm { c_offset: 4, ..g }, &big, &b, &big));
    assert!(e.contains("C overlaps A"), "{e}");
    dev.gemm(&Gemm { c_offset: 12, ..g }, &big, &b, &big).unwrap();
}
