//! The thread-block runtime through the emulator's own test kernels (`cpp/selftest.cu`):
//! reductions and shuffles give the right numbers for several block sizes, barriers order
//! shared-memory traffic, thread coordinates are CUDA's, and barrier misuse is an error rather
//! than a hang.

use dsv4_backend_cuda::{Device, KernelArg, LaunchConfig};
use dsv4_cuda_emu::{EmuBuffer, EmulatedDevice};

fn f32s(dev: &EmulatedDevice, v: &[f32]) -> EmuBuffer {
    dev.upload(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap()
}

fn i32s(dev: &EmulatedDevice, v: &[i32]) -> EmuBuffer {
    dev.upload(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap()
}

fn read_f32(dev: &EmulatedDevice, b: &EmuBuffer) -> Vec<f32> {
    let mut bytes = vec![0u8; dev.len(b)];
    dev.download(b, 0, &mut bytes).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_i32(dev: &EmulatedDevice, b: &EmuBuffer) -> Vec<i32> {
    let mut bytes = vec![0u8; dev.len(b)];
    dev.download(b, 0, &mut bytes).unwrap();
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Small integers, so that every sum is exact whatever the order.
fn ints(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 24) as f32 - 128.0).collect()
}

fn error_of(r: dsv4_core::error::Result<()>) -> String {
    match r {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn block_sum_and_max_for_several_block_sizes() {
    let dev = EmulatedDevice::new();
    for threads in [32u32, 64, 96, 256, 1024] {
        for n_per_block in [1usize, 31, 100, 3000] {
            let blocks = 3usize;
            let input = ints(blocks * n_per_block, threads);
            let inp = f32s(&dev, &input);
            let all = dev.alloc_zeroed(blocks * threads as usize * 4).unwrap();
            for (kernel, is_sum) in [("dsv4emu_test_block_sum", true), ("dsv4emu_test_block_max", false)] {
                dev.launch(
                    kernel,
                    LaunchConfig::linear(blocks as u32, threads),
                    &[KernelArg::In(&inp, 0), KernelArg::Out(&all, 0), KernelArg::I32(n_per_block as i32)],
                )
                .unwrap();
                let got = read_f32(&dev, &all);
                for b in 0..blocks {
                    let slice = &input[b * n_per_block..(b + 1) * n_per_block];
                    let want =
                        if is_sum { slice.iter().sum::<f32>() } else { slice.iter().copied().fold(f32::MIN, f32::max) };
                    for t in 0..threads as usize {
                        assert_eq!(
                            got[b * threads as usize + t],
                            want,
                            "{kernel}, {threads} threads, {n_per_block} per block, block {b}, thread {t}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(dev.launch_count("dsv4emu_test_block_sum"), 20);
    assert_eq!(dev.launch_count("dsv4emu_test_block_max"), 20);
}

#[test]
fn warp_shuffles_exchange_lanes() {
    let dev = EmulatedDevice::new();
    for threads in [32u32, 128, 1024] {
        let blocks = 2u32;
        let n = (threads * blocks) as usize;
        let fin: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let iin: Vec<i32> = (0..n).map(|i| (i as i32) * 3 - 1000).collect();
        let (fb, ib) = (f32s(&dev, &fin), i32s(&dev, &iin));
        let (fout, iout, wsum) =
            (dev.alloc_zeroed(n * 4).unwrap(), dev.alloc_zeroed(n * 4).unwrap(), dev.alloc_zeroed(n * 4).unwrap());
        for lane_mask in [0i32, 1, 5, 16, 31] {
            dev.launch(
                "dsv4emu_test_shuffle",
                LaunchConfig::linear(blocks, threads),
                &[
                    KernelArg::In(&fb, 0),
                    KernelArg::In(&ib, 0),
                    KernelArg::Out(&fout, 0),
                    KernelArg::Out(&iout, 0),
                    KernelArg::Out(&wsum, 0),
                    KernelArg::I32(lane_mask),
                ],
            )
            .unwrap();
            let (gf, gi, gs) = (read_f32(&dev, &fout), read_i32(&dev, &iout), read_f32(&dev, &wsum));
            for i in 0..n {
                let src = (i & !31) | ((i & 31) ^ lane_mask as usize);
                assert_eq!(gf[i], fin[src], "float shuffle, {threads} threads, mask {lane_mask}, thread {i}");
                assert_eq!(gi[i], iin[src], "int shuffle, {threads} threads, mask {lane_mask}, thread {i}");
                // dsv4_warp_sum's butterfly: exact here (halves of small integers).
                let warp_sum: f32 = fin[i & !31..(i & !31) + 32].iter().sum();
                assert_eq!(gs[i], warp_sum, "warp sum, {threads} threads, thread {i}");
            }
        }
    }
}

#[test]
fn barriers_order_shared_memory_traffic() {
    let dev = EmulatedDevice::new();
    for threads in [1u32, 7, 32, 100, 512, 1024] {
        let blocks = 3usize;
        let n = blocks * threads as usize;
        let input: Vec<i32> = (0..n).map(|i| (i as i32 * 7919) % 1000 - 500).collect();
        let inp = i32s(&dev, &input);
        let out = dev.alloc_zeroed(n * 4).unwrap();
        dev.launch(
            "dsv4emu_test_scan",
            LaunchConfig::linear(blocks as u32, threads),
            &[KernelArg::In(&inp, 0), KernelArg::Out(&out, 0)],
        )
        .unwrap();
        let got = read_i32(&dev, &out);
        for b in 0..blocks {
            let mut acc = 0;
            for t in 0..threads as usize {
                acc += input[b * threads as usize + t];
                assert_eq!(got[b * threads as usize + t], acc, "{threads} threads, block {b}, thread {t}");
            }
        }
    }
}

#[test]
fn dynamic_shared_memory_is_per_launch_and_poisoned() {
    let dev = EmulatedDevice::new();
    let threads = 64u32;
    let input: Vec<f32> = (0..threads as usize * 4).map(|i| i as f32).collect();
    let inp = f32s(&dev, &input);
    let out = dev.alloc_zeroed(input.len() * 4).unwrap();
    let config = LaunchConfig { grid: (4, 1, 1), block: (threads, 1, 1), shared_bytes: threads * 4 };
    dev.launch("dsv4emu_test_reverse", config, &[KernelArg::In(&inp, 0), KernelArg::Out(&out, 0)]).unwrap();
    let got = read_f32(&dev, &out);
    for b in 0..4 {
        for t in 0..threads as usize {
            assert_eq!(got[b * threads as usize + t], input[b * threads as usize + threads as usize - 1 - t]);
        }
    }

    // Unwritten dynamic shared memory reads as 0xff bytes (-1 as int, NaN as float).
    let words = dev.alloc_zeroed(32 * 4).unwrap();
    let config = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_bytes: 32 * 4 };
    dev.launch("dsv4emu_test_read_shared", config, &[KernelArg::Out(&words, 0)]).unwrap();
    assert!(read_i32(&dev, &words).iter().all(|&w| w == -1));

    // Writing one word past it is reported.
    let config = LaunchConfig { grid: (1, 1, 1), block: (32, 1, 1), shared_bytes: 16 * 4 };
    let e = error_of(dev.launch("dsv4emu_test_shared_overflow", config, &[KernelArg::I32(16)]));
    assert!(e.contains("past the end of the 64 bytes of dynamic shared memory"), "{e}");
    // ... and not when it stays inside.
    dev.launch("dsv4emu_test_shared_overflow", config, &[KernelArg::I32(15)]).unwrap();
}

#[test]
fn thread_and_block_coordinates_are_cudas() {
    let dev = EmulatedDevice::new();
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let per_block = (block.0 * block.1 * block.2) as usize;
    let blocks = (grid.0 * grid.1 * grid.2) as usize;
    let out = dev.alloc_zeroed(blocks * per_block * 16).unwrap();
    dev.launch("dsv4emu_test_indices", LaunchConfig { grid, block, shared_bytes: 0 }, &[KernelArg::Out(&out, 0)])
        .unwrap();
    let got = read_i32(&dev, &out);
    for b in 0..blocks {
        for t in 0..per_block {
            let g = b * per_block + t;
            let want = [
                (t % block.0 as usize) as i32,
                (t / block.0 as usize % block.1 as usize) as i32,
                (t / (block.0 * block.1) as usize) as i32,
                b as i32,
            ];
            assert_eq!(&got[4 * g..4 * g + 4], &want, "block {b}, thread {t}");
        }
    }
}

#[test]
fn every_parameter_kind_reaches_the_kernel() {
    let dev = EmulatedDevice::new();
    let a = f32s(&dev, &[0.0, 3.25]);
    let out = dev.alloc_zeroed(6 * 4).unwrap();
    let l: i64 = -0x1234_5678_9abc;
    dev.launch(
        "dsv4emu_test_params",
        LaunchConfig::linear(1, 32),
        &[
            KernelArg::In(&a, 4),
            KernelArg::Out(&out, 0),
            KernelArg::I32(-5),
            KernelArg::U32(0xdead_beef),
            KernelArg::I64(l),
            KernelArg::F32(-1.5),
        ],
    )
    .unwrap();
    let got: Vec<u32> = read_i32(&dev, &out).into_iter().map(|v| v as u32).collect();
    assert_eq!(
        got,
        vec![
            3.25f32.to_bits(),
            -5i32 as u32,
            0xdead_beef,
            l as u64 as u32,
            ((l as u64) >> 32) as u32,
            (-1.5f32).to_bits()
        ]
    );
    dev.launch("dsv4emu_test_noop", LaunchConfig::linear(2, 1), &[]).unwrap();
}

#[test]
fn common_cuh_math_matches_the_host() {
    let dev = EmulatedDevice::new();
    let input = [0.5f32, -1.75, 3.0, 1e-3, 100.0, -0.0, 1.0 + f32::EPSILON, 65504.0];
    let n = input.len();
    let inp = f32s(&dev, &input);
    let out = dev.alloc_zeroed(8 * n * 4).unwrap();
    let bf = dev.alloc_zeroed(n * 2).unwrap();
    dev.launch(
        "dsv4emu_test_math",
        LaunchConfig::linear(1, 32),
        &[KernelArg::In(&inp, 0), KernelArg::Out(&out, 0), KernelArg::Out(&bf, 0), KernelArg::I32(n as i32)],
    )
    .unwrap();
    let got = read_f32(&dev, &out);
    for (i, &x) in input.iter().enumerate() {
        let bf16 = {
            let u = x.to_bits();
            ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
        };
        let exp = if x == 0.0 { 0 } else { x.abs().log2().floor() as i32 + 1 };
        let want = [
            x.exp(),
            x.abs().ln(),
            1.0 / x.abs().sqrt(),
            x.mul_add(x, 1.0),
            x.floor(),
            if x == 0.0 { x } else { x / 2f32.powi(exp) },
            2f32.powi(exp),
            f32::from_bits(u32::from(bf16) << 16),
        ];
        for (j, w) in want.iter().enumerate() {
            let g = got[8 * i + j];
            assert!(g == *w || (g.is_infinite() && w.is_infinite()), "x = {x}, function {j}: {g} vs {w}");
        }
    }
}

#[test]
fn divergent_syncthreads_is_an_error_not_a_hang() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc_zeroed(256 * 4).unwrap();
    for split in [1u32, 100, 255] {
        let e = error_of(dev.launch(
            "dsv4emu_test_divergent_sync",
            LaunchConfig::linear(2, 256),
            &[KernelArg::Out(&out, 0), KernelArg::U32(split)],
        ));
        assert!(e.contains("divergent barrier"), "{e}");
        assert!(e.contains("dsv4emu_test_divergent_sync") && e.contains("block (0, 0, 0)"), "{e}");
    }
    for n in [1u32, 31, 200] {
        let e = error_of(dev.launch(
            "dsv4emu_test_early_exit_sync",
            LaunchConfig::linear(1, 256),
            &[KernelArg::Out(&out, 0), KernelArg::U32(n)],
        ));
        assert!(e.contains("divergent barrier"), "{e}");
    }
    // Every thread reaching it is fine, and the runtime is usable after the failures.
    dev.launch(
        "dsv4emu_test_divergent_sync",
        LaunchConfig::linear(2, 256),
        &[KernelArg::Out(&out, 0), KernelArg::U32(256)],
    )
    .unwrap();
    dev.launch(
        "dsv4emu_test_early_exit_sync",
        LaunchConfig::linear(1, 256),
        &[KernelArg::Out(&out, 0), KernelArg::U32(256)],
    )
    .unwrap();
    assert!(read_f32(&dev, &out).iter().all(|&v| v == 1.0));
    assert_eq!(dev.launch_count("dsv4emu_test_divergent_sync"), 1);
}

#[test]
fn deadlock_is_an_error_not_a_hang() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc_zeroed(64 * 4).unwrap();
    let e = error_of(dev.launch("dsv4emu_test_deadlock", LaunchConfig::linear(1, 64), &[KernelArg::Out(&out, 0)]));
    assert!(e.contains("deadlock"), "{e}");
    assert!(e.contains("32 wait at __syncthreads(), 32 at __shfl_xor_sync"), "{e}");
}

#[test]
fn shuffle_misuse_is_an_error() {
    let dev = EmulatedDevice::new();
    let out = dev.alloc_zeroed(64 * 4).unwrap();
    let shuffle = |threads: u32, mask: u32, lane_mask: i32| {
        dev.launch(
            "dsv4emu_test_shuffle_args",
            LaunchConfig::linear(1, threads),
            &[KernelArg::Out(&out, 0), KernelArg::U32(mask), KernelArg::I32(lane_mask)],
        )
    };
    let e = error_of(shuffle(48, u32::MAX, 1));
    assert!(e.contains("block of 48 threads, not a multiple of 32"), "{e}");
    let e = error_of(shuffle(32, 0xffff, 1));
    assert!(e.contains("mask 0x0000ffff"), "{e}");
    let e = error_of(shuffle(32, u32::MAX, 32));
    assert!(e.contains("lane mask 32 is outside 0..31"), "{e}");
    shuffle(64, u32::MAX, 3).unwrap();
    let got = read_f32(&dev, &out);
    assert!((0..64).all(|i| got[i] == ((i & !31) | ((i & 31) ^ 3)) as f32));
}

#[test]
fn concurrent_launches_from_two_threads() {
    let shared = EmulatedDevice::new();
    std::thread::scope(|s| {
        for seed in 0..2u32 {
            let shared = &shared;
            s.spawn(move || {
                let own = EmulatedDevice::new();
                for round in 0..20u32 {
                    let dev = if round % 2 == 0 { &own } else { shared };
                    let threads = [32u32, 256, 1024][(round as usize + seed as usize) % 3];
                    let n_per_block = 500 + round as usize * 13 + seed as usize;
                    let input = ints(4 * n_per_block, seed * 100 + round);
                    let inp = f32s(dev, &input);
                    let all = dev.alloc_zeroed(4 * threads as usize * 4).unwrap();
                    dev.launch(
                        "dsv4emu_test_block_sum",
                        LaunchConfig::linear(4, threads),
                        &[KernelArg::In(&inp, 0), KernelArg::Out(&all, 0), KernelArg::I32(n_per_block as i32)],
                    )
                    .unwrap();
                    let got = read_f32(dev, &all);
                    for b in 0..4 {
                        let want: f32 = input[b * n_per_block..(b + 1) * n_per_block].iter().sum();
                        assert!(got[b * threads as usize..(b + 1) * threads as usize].iter().all(|&v| v == want));
                    }
                }
                assert_eq!(own.launch_count("dsv4emu_test_block_sum"), 10);
            });
        }
    });
    assert_eq!(shared.launch_count("dsv4emu_test_block_sum"), 20);
}

/// Reverse order really starts the last thread first (so a race shows in one of the orders):
/// with no barrier, the last writer of a racy store is the last thread to start.
#[test]
fn reverse_order_starts_the_last_thread_first() {
    for (dev, want) in [(EmulatedDevice::new(), 127), (EmulatedDevice::reverse_thread_order(), 0)] {
        let out = i32s(&dev, &[-5; 3]);
        dev.launch("dsv4emu_test_last_writer", LaunchConfig::linear(3, 128), &[KernelArg::Out(&out, 0)]).unwrap();
        assert_eq!(read_i32(&dev, &out), vec![want; 3]);
    }
}
