//! The CPU backend's pools (`alloc_pool`, `pool_write`, `pool_read`) and the fused ops that read
//! them (`sparse_attention`, `indexer_select`) over BF16 and FP8 pools.
//!
//! Tolerances: `u = 2^-24` is the f32 unit roundoff and `EPS = 2u`. The fused kernels and the
//! trait's default composition (`PrimitivesOnly`) read the same decoded values from a pool
//! (`RowFormat::decode`), so they compute the same function of the same f32 inputs and differ
//! only in the order of the f32 sums (the composition goes through `matrixmultiply`'s blocked
//! GEMM and a separate softmax). Each side is within `e` of the exact value; they are within
//! `2e` of each other (the bound is derived where it is used). The inputs are chosen so that the
//! dot products are exact in f32 (so both sides get the same logits and the same scores, ties
//! included), which leaves only the softmax and output sums to bound.

use std::ops::Range;

use dsv4_backend_cpu::{CpuBackend, CpuIndex, CpuPool, CpuTensor};
use dsv4_core::backend::{Backend, DevicePool, DeviceTensor, Precision, RowFormat};
use dsv4_core::primitives_only::PrimitivesOnly;

const EPS: f64 = f32::EPSILON as f64;

use dsv4_core::test_data::Rng;

/// The formats under test: f32, bf16, and fp8 with two scale blocks (one partial) or one.
const FORMATS: [RowFormat; 4] =
    [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 16 }, RowFormat::Fp8 { rope: 32 }];
/// Row width: the fp8 formats above then have 80 e4m3 channels (a full and a partial block)
/// or 64 (one block).
const WIDTH: usize = 96;

fn be() -> CpuBackend {
    CpuBackend::new()
}

fn idx(be: &CpuBackend, data: &[i32], shape: &[usize]) -> CpuIndex {
    be.upload_index(data, shape).unwrap()
}

fn tensor(be: &CpuBackend, data: &[f32], shape: &[usize]) -> CpuTensor {
    be.upload(data, shape).unwrap()
}

/// Every row of `pool`, decoded.
fn read_all(be: &CpuBackend, pool: &CpuPool) -> Vec<f32> {
    let n = pool.rows();
    be.download(&be.pool_read(pool, &idx(be, &(0..n as i32).collect::<Vec<_>>(), &[n])).unwrap()).unwrap()
}

/// Values spanning several magnitudes per row (so fp8 blocks get different scales).
fn row_values(rng: &mut Rng, n: usize, width: usize) -> Vec<f32> {
    (0..n * width).map(|i| rng.f32() * [0.01f32, 1.0, 37.0, 900.0][(i / 13) % 4]).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The rows of `data` written at `slots` of a new pool of `rows` rows.
fn pool_with(be: &CpuBackend, format: RowFormat, rows: usize, slots: &[i32], data: &[f32]) -> CpuPool {
    let width = data.len() / slots.len();
    let mut pool = be.alloc_pool(rows, width, format).unwrap();
    be.pool_write(&mut pool, &idx(be, slots, &[slots.len()]), &tensor(be, data, &[slots.len(), width])).unwrap();
    pool
}

// ------------------------------------------------------------------------- pool memory

#[test]
fn pool_reports_its_geometry() {
    let be = be();
    for format in FORMATS {
        let pool = be.alloc_pool(10, WIDTH, format).unwrap();
        assert_eq!((pool.rows(), pool.width(), pool.format()), (10, WIDTH, format));
        assert_eq!(pool.bytes(), 10 * format.row_bytes(WIDTH), "{format:?}");
    }
    assert_eq!(be.alloc_pool(3, 512, RowFormat::Fp8 { rope: 64 }).unwrap().bytes(), 3 * 584);
    // Empty pools are fine.
    let empty = be.alloc_pool(0, WIDTH, RowFormat::Bf16).unwrap();
    assert_eq!(empty.bytes(), 0);
    let none = be.pool_read(&empty, &idx(&be, &[-1, -1], &[2])).unwrap();
    assert_eq!(be.download(&none).unwrap(), vec![0.0; 2 * WIDTH]);
}

#[test]
fn round_trip_per_format_equals_the_row_codec() {
    let be = be();
    let mut rng = Rng(1);
    let (rows, n) = (12, 5);
    let slots = [7, 0, 11, 3, 4];
    for format in FORMATS {
        let values = row_values(&mut rng, n, WIDTH);
        let mut pool = be.alloc_pool(rows, WIDTH, format).unwrap();
        be.pool_write(&mut pool, &idx(&be, &slots, &[n]), &tensor(&be, &values, &[n, WIDTH])).unwrap();
        // Read back in another order and shape: [2, 3] slots -> [2, 3, WIDTH].
        let read = [4, 11, -1, 0, 7, 3];
        let got = be.pool_read(&pool, &idx(&be, &read, &[2, 3])).unwrap();
        assert_eq!(got.shape(), &[2, 3, WIDTH]);
        let got = be.download(&got).unwrap();
        for (j, &s) in read.iter().enumerate() {
            let want = match slots.iter().position(|&w| w == s) {
                Some(i) => format.round_trip(&values[i * WIDTH..(i + 1) * WIDTH]),
                None => vec![0.0; WIDTH],
            };
            assert_eq!(bits(&got[j * WIDTH..(j + 1) * WIDTH]), bits(&want), "{format:?}: read {j} (slot {s})");
            // The same row through the row accessors.
            if s >= 0 {
                let mut row = vec![f32::NAN; WIDTH];
                pool.read_row(s as usize, &mut row);
                assert_eq!(bits(&row), bits(&want), "{format:?}: read_row({s})");
                match format {
                    RowFormat::F32 => assert_eq!(bits(pool.f32_row(s as usize).unwrap()), bits(&want)),
                    _ => assert!(pool.f32_row(s as usize).is_none()),
                }
            }
        }
        if format == RowFormat::F32 {
            // f32 is stored exactly: the round trip is the identity.
            assert_eq!(bits(&got[..WIDTH]), bits(&values[4 * WIDTH..5 * WIDTH]));
        } else {
            assert_ne!(bits(&got[..WIDTH]), bits(&values[4 * WIDTH..5 * WIDTH]), "{format:?} rounds");
        }
    }
}

#[test]
fn fresh_rows_and_minus_one_read_as_zeros() {
    let be = be();
    let mut rng = Rng(2);
    for format in FORMATS {
        let mut pool = be.alloc_pool(4, WIDTH, format).unwrap();
        assert!(read_all(&be, &pool).iter().all(|&v| v.to_bits() == 0), "{format:?}: a new pool is +0.0");
        let values = row_values(&mut rng, 4, WIDTH);
        be.pool_write(&mut pool, &idx(&be, &[0, 1, 2, 3], &[4]), &tensor(&be, &values, &[4, WIDTH])).unwrap();
        let got = be.download(&be.pool_read(&pool, &idx(&be, &[-1, 2, -1], &[3])).unwrap()).unwrap();
        assert!(got[..WIDTH].iter().chain(&got[2 * WIDTH..]).all(|&v| v.to_bits() == 0), "{format:?}");
        assert_eq!(bits(&got[WIDTH..2 * WIDTH]), bits(&format.round_trip(&values[2 * WIDTH..3 * WIDTH])));
    }
}

#[test]
fn writes_are_in_place_and_touch_only_the_named_rows() {
    let be = be();
    let mut rng = Rng(3);
    let rows = 9;
    for format in FORMATS {
        let mut pool = be.alloc_pool(rows, WIDTH, format).unwrap();
        let first = row_values(&mut rng, rows, WIDTH);
        let all: Vec<i32> = (0..rows as i32).collect();
        be.pool_write(&mut pool, &idx(&be, &all, &[rows]), &tensor(&be, &first, &[rows, WIDTH])).unwrap();
        let before = read_all(&be, &pool);
        // Overwrite rows 6 and 2 (in that order) only.
        let second = row_values(&mut rng, 2, WIDTH);
        be.pool_write(&mut pool, &idx(&be, &[6, 2], &[2]), &tensor(&be, &second, &[2, WIDTH])).unwrap();
        let after = read_all(&be, &pool);
        for r in 0..rows {
            let got = &after[r * WIDTH..(r + 1) * WIDTH];
            let want = match r {
                6 => format.round_trip(&second[..WIDTH]),
                2 => format.round_trip(&second[WIDTH..]),
                _ => before[r * WIDTH..(r + 1) * WIDTH].to_vec(),
            };
            assert_eq!(bits(got), bits(&want), "{format:?}: row {r}");
        }
        // A write of no rows changes nothing.
        be.pool_write(&mut pool, &idx(&be, &[], &[0]), &tensor(&be, &[], &[0, WIDTH])).unwrap();
        assert_eq!(bits(&read_all(&be, &pool)), bits(&after));
    }
}

#[test]
fn bad_slots_and_shapes_are_errors_and_change_nothing() {
    let be = be();
    let mut rng = Rng(4);
    for format in FORMATS {
        let mut pool = be.alloc_pool(5, WIDTH, format).unwrap();
        let values = row_values(&mut rng, 5, WIDTH);
        be.pool_write(&mut pool, &idx(&be, &[0, 1, 2, 3, 4], &[5]), &tensor(&be, &values, &[5, WIDTH])).unwrap();
        let before = bits(&read_all(&be, &pool));
        let two = tensor(&be, &row_values(&mut rng, 2, WIDTH), &[2, WIDTH]);
        // Each error names the op and the offending slot or shapes.
        type Case = (&'static str, Vec<i32>, Vec<usize>, &'static [&'static str]);
        let cases: Vec<Case> = vec![
            ("slot past the end", vec![1, 5], vec![2], &["5", "outside"]),
            ("slot -1", vec![-1, 0], vec![2], &["-1"]),
            ("negative slot", vec![0, -7], vec![2], &["-7"]),
            ("repeated slot", vec![3, 3], vec![2], &["slot 3 is written twice"]),
            ("slots not 1-D", vec![0, 1], vec![1, 2], &["[1, 2]", "[2, 96]"]),
            ("more slots than rows", vec![0, 1, 2], vec![3], &["[3]", "[2, 96]"]),
        ];
        for (what, slots, shape, needles) in cases {
            let e = be.pool_write(&mut pool, &idx(&be, &slots, &shape), &two).unwrap_err().to_string();
            let named = needles.iter().all(|n| e.contains(n));
            assert!(named && e.contains("pool_write") && e.contains("cpu"), "{format:?} {what}: {e}");
        }
        // Values of the wrong width or rank.
        let narrow = tensor(&be, &vec![0.5; 2 * (WIDTH - 1)], &[2, WIDTH - 1]);
        assert!(be.pool_write(&mut pool, &idx(&be, &[0, 1], &[2]), &narrow).is_err(), "{format:?}: narrow rows");
        let flat = tensor(&be, &vec![0.5; 2 * WIDTH], &[2 * WIDTH]);
        assert!(be.pool_write(&mut pool, &idx(&be, &[0, 1], &[2]), &flat).is_err(), "{format:?}: 1-D values");
        // A rejected write (even one whose first slots are fine) leaves the pool as it was.
        assert_eq!(bits(&read_all(&be, &pool)), before, "{format:?}");
        // Reads: out of range or below -1 are errors.
        for bad in [[0, 5], [-2, 0], [i32::MIN, 0]] {
            let e = be.pool_read(&pool, &idx(&be, &bad, &[2])).unwrap_err().to_string();
            let value = if bad[1] == 5 { 5 } else { bad[0] };
            assert!(e.contains("pool_read") && e.contains(&value.to_string()), "{format:?}: {e}");
        }
    }
}

#[test]
fn impossible_allocations_are_errors_not_aborts() {
    let be = be();
    for (rows, width, format) in [
        (usize::MAX, 1, RowFormat::F32),                  // rows × row_bytes overflows
        (usize::MAX / 2, 2, RowFormat::Bf16),             // overflows by a little
        (1usize << 40, 1 << 20, RowFormat::F32),          // 2^62 bytes: no address space holds it
        (1usize << 50, 512, RowFormat::Fp8 { rope: 64 }), // ~2^59 bytes
        (2, usize::MAX / 4, RowFormat::Bf16),             // a row too wide to count its bytes
    ] {
        let e = be.alloc_pool(rows, width, format).unwrap_err().to_string();
        assert!(e.contains("alloc_pool") && e.contains(&width.to_string()), "{rows} x {width} {format:?}: {e}");
    }
}

/// Resident set size of this process in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_large_pool_commits_no_memory_until_written() {
    let be = be();
    let Some(start) = rss_kib() else {
        eprintln!("no /proc/self/status: skipped");
        return;
    };
    // 1 GiB of BF16 rows (2^19 rows of 1024 values).
    let (rows, width) = (1usize << 19, 1024);
    let mut pool = match be.alloc_pool(rows, width, RowFormat::Bf16) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("the system refused 1 GiB ({e}): skipped");
            return;
        }
    };
    assert_eq!(pool.bytes(), 1 << 30);
    let grown = rss_kib().unwrap().saturating_sub(start);
    assert!(grown < 128 << 10, "allocating the pool committed {grown} KiB");
    // The far end is usable and zero until written.
    let last = idx(&be, &[rows as i32 - 1], &[1]);
    assert!(be.download(&be.pool_read(&pool, &last).unwrap()).unwrap().iter().all(|&v| v == 0.0));
    be.pool_write(&mut pool, &last, &tensor(&be, &vec![1.5; width], &[1, width])).unwrap();
    assert_eq!(be.download(&be.pool_read(&pool, &last).unwrap()).unwrap(), vec![1.5; width]);
    let grown = rss_kib().unwrap().saturating_sub(start);
    assert!(grown < 128 << 10, "writing one row committed {grown} KiB");
}

// --------------------------------------------------------------------- fused ops over pools

/// Multiples of `1/steps` in [-r, r].
fn grid(rng: &mut Rng, n: usize, r: u64, steps: u64) -> Vec<f32> {
    (0..n).map(|_| (rng.next_u64() % (2 * steps * r + 1)) as f32 / steps as f32 - r as f32).collect()
}

#[test]
fn sparse_attention_over_bf16_and_fp8_pools_matches_the_composition() {
    let cpu = be();
    let composed = PrimitivesOnly(CpuBackend::new());
    let mut rng = Rng(5);
    let (t, h, d, k, rows) = (4, 3, WIDTH, 6, 11);
    let scale = (d as f32).powf(-0.5);
    // Key n lives at pool row slots[n]; rows 1, 5 and 8 are never written (zero).
    let slots = [9, 0, 4, 10, 2, 7, 3, 6];
    // Keys: multiples of 1/128 in [-4, 4] (BF16 rounds those of 9 significant bits), with ±4 in
    // each FP8 scale block (channels 0 and 64), so every block's scale is 2^-6 and its codes
    // are multiples of 1/2 (exact below 8 in e4m3, rounded to integers above). Decoded, every
    // key is still a multiple of 2^-7; with queries on the 1/64 grid in [-1, 1] every product
    // is a multiple of 2^-13 and every partial dot product is below 96·4 < 2^9: 22 bits, exact
    // in f32 in any order. So both sides compute identical logits and differ only in the
    // softmax sum and the output sum.
    let mut kv = grid(&mut rng, slots.len() * d, 4, 128);
    for row in kv.chunks_mut(d) {
        row[0] = 4.0;
        row[64] = -4.0;
    }
    let q = grid(&mut rng, t * h * d, 1, 64);
    let sinks = [0.25f32, -2.0, 1.5];
    #[rustfmt::skip]
    let ids: Vec<i32> = vec![
        9, 0, -1, 4, 10, 1,   // row 1: a zero row that is attended to
        -1, -1, -1, -1, -1, -1,
        2, 7, 3, 6, 9, 0,
        6, -1, 6, 5, -1, 8,   // a row listed twice counts twice
    ];
    let (qt, it, st) = (tensor(&cpu, &q, &[t, h, d]), idx(&cpu, &ids, &[t, k]), tensor(&cpu, &sinks, &[h]));
    for format in FORMATS {
        let pool = pool_with(&cpu, format, rows, &slots, &kv);
        let fused = cpu.download(&cpu.sparse_attention(&qt, &pool, &it, &st, scale, Precision::F32).unwrap()).unwrap();
        let want = composed
            .download(&composed.sparse_attention(&qt, &pool, &it, &st, scale, Precision::F32).unwrap())
            .unwrap();
        let decoded = read_all(&cpu, &pool);
        if format != RowFormat::F32 {
            assert_ne!(bits(&decoded[9 * d..10 * d]), bits(&kv[..d]), "{format:?} rounds the keys");
        }
        // The fused kernel reads exactly the decoded rows: over an f32 pool holding the decoded
        // values it gives the same bits.
        let f32_pool = pool_with(&cpu, RowFormat::F32, rows, &(0..rows as i32).collect::<Vec<_>>(), &decoded);
        let again =
            cpu.download(&cpu.sparse_attention(&qt, &f32_pool, &it, &st, scale, Precision::F32).unwrap()).unwrap();
        assert_eq!(bits(&fused), bits(&again), "{format:?}: fused over the decoded f32 rows");
        // Bound. The logits, their max and their exps are the same f32 values on both sides
        // (see above), so each side differs from the exact function of those exps only by
        // (a) the denominator, a sum of K + 1 positive terms: (K + 1)·u relative, plus the
        // division: p_j within (K + 2)·u relative; (b) the output Σ_j p_j·v_jc, K products summed
        // in f32 in any order: K·u·Σ_j p_j·|v_jc|. Each side is within (2K + 2)·u·Σ_j p_j·|v_jc|,
        // so the two within (4K + 4)·u = (2K + 2)·EPS of that (+2·EPS for second-order terms),
        // with p_j the exact probabilities (computed here in f64, from the exact logits).
        for ti in 0..t {
            let keys: Vec<&[f32]> = ids[ti * k..(ti + 1) * k]
                .iter()
                .filter(|&&i| i >= 0)
                .map(|&i| &decoded[i as usize * d..(i as usize + 1) * d])
                .collect();
            for hi in 0..h {
                let qh = &q[(ti * h + hi) * d..(ti * h + hi + 1) * d];
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|v| qh.iter().zip(*v).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64)
                    .collect();
                let max = logits.iter().copied().fold(sinks[hi] as f64, f64::max);
                let den = (sinks[hi] as f64 - max).exp() + logits.iter().map(|l| (l - max).exp()).sum::<f64>();
                let p: Vec<f64> = logits.iter().map(|l| (l - max).exp() / den).collect();
                for c in 0..d {
                    let mass: f64 = p.iter().zip(&keys).map(|(p, v)| p * v[c].abs() as f64).sum();
                    let bound = (2 * k + 4) as f64 * EPS * mass;
                    let i = (ti * h + hi) * d + c;
                    let err = (fused[i] as f64 - want[i] as f64).abs();
                    assert!(
                        err <= bound,
                        "{format:?} [{ti}, {hi}, {c}]: {} vs {} ({err:e} > {bound:e})",
                        fused[i],
                        want[i]
                    );
                }
            }
        }
        assert!(fused[h * d..2 * h * d].iter().all(|&v| v == 0.0), "{format:?}: no keys, sink only");
        // Key indices outside the pool are errors.
        for bad in [rows as i32, -2] {
            let bad = idx(&cpu, &[vec![bad], vec![0; k - 1]].concat().repeat(t), &[t, k]);
            assert!(cpu.sparse_attention(&qt, &pool, &bad, &st, scale, Precision::F32).is_err(), "{format:?}");
        }
        let narrow = pool_with(&cpu, format, 2, &[0, 1], &vec![0.5; 2 * (d - 8)]);
        assert!(cpu
            .sparse_attention(&qt, &narrow, &idx(&cpu, &vec![0; t * k], &[t, k]), &st, scale, Precision::F32)
            .is_err());
    }
}

/// Keys that are small integers plus noise below the formats' resolution at that size: BF16 and
/// FP8 (scale 2^-7 for a block whose largest magnitude is 2, so 128·(±1, ±2) = ±128, ±256) decode
/// them to the integers exactly, f32 keeps the noise.
fn noisy_int_keys(rng: &mut Rng, n: usize, dh: usize) -> Vec<f32> {
    let mut keys = rng.ints(n * dh, 2);
    // Make every row's largest magnitude 2, so every FP8 block has the same scale.
    for row in keys.chunks_mut(dh) {
        row[0] = 2.0;
    }
    keys.iter().map(|&v| if v == 0.0 { 0.0 } else { v * (1.0 + 0.0004 * (rng.f32() + 1.5)) }).collect()
}

#[test]
fn indexer_select_over_bf16_and_fp8_pools_matches_the_composition() {
    let cpu = be();
    let composed = PrimitivesOnly(CpuBackend::new());
    let mut rng = Rng(6);
    // dI = 4 (scale 1/2), integer queries and power-of-two weights: with keys that decode to
    // integers every score is exact in f32 whatever the summation order, so the fused kernel
    // and the composition must agree exactly, ties included.
    let (t, nh, dh, n, k, offset, rows) = (6, 2, 4, 7, 4, 1000, 12);
    let q = rng.ints(t * nh * dh, 2);
    let mut keys = noisy_int_keys(&mut rng, n, dh);
    // Keys 1 and 4 decode to the same integers (a tie for every query), key 4 at the lower row.
    let key1: Vec<f32> = keys[dh..2 * dh].iter().map(|v| v * (1.0 + 0.0003)).collect();
    keys[4 * dh..5 * dh].copy_from_slice(&key1);
    let key_rows = [5, 11, 0, 7, 2, 9, 3];
    #[rustfmt::skip]
    let w: Vec<f32> = vec![
        1.0, 0.5,
        2.0, -0.25,
        -1.0, -0.5,
        0.25, 1.0,
        1.0, 1.0,
        0.0, 0.0,
    ];
    let valid: Vec<Range<usize>> = vec![0..0, 0..2, 0..7, 2..5, 0..7, 1..7];
    let (qt, wt, kr) = (tensor(&cpu, &q, &[t, nh, dh]), tensor(&cpu, &w, &[t, nh]), idx(&cpu, &key_rows, &[n]));
    for format in [RowFormat::Bf16, RowFormat::Fp8 { rope: 0 }, RowFormat::Fp8 { rope: 2 }] {
        let pool = pool_with(&cpu, format, rows, &key_rows, &keys);
        let decoded = read_all(&cpu, &pool);
        for r in key_rows {
            let row = &decoded[r as usize * dh..(r as usize + 1) * dh];
            assert!(row.iter().all(|v| v.fract() == 0.0), "{format:?}: row {r} decodes to integers: {row:?}");
        }
        let fused = cpu.indexer_select(&qt, &pool, &kr, &wt, &valid, k, offset, Precision::F32).unwrap();
        let fused = cpu.download_index(&fused).unwrap();
        let want = composed.indexer_select(&qt, &pool, &kr, &wt, &valid, k, offset, Precision::F32).unwrap();
        assert_eq!(fused, composed.download_index(&want).unwrap(), "{format:?}");
        // Picks are pool rows + offset, within each query's valid keys, and -1 past them.
        for (ti, r) in valid.iter().enumerate() {
            let picks = &fused[ti * k..(ti + 1) * k];
            let allowed: Vec<i32> = key_rows[r.clone()].iter().map(|&row| row + offset).collect();
            assert!(picks.iter().all(|p| *p == -1 || allowed.contains(p)), "{format:?} query {ti}: {picks:?}");
            assert_eq!(picks.iter().filter(|&&p| p != -1).count(), r.len().min(k), "{format:?} query {ti}");
        }
        // All-zero weights: every score ties and the lowest key numbers win (not the lowest rows).
        assert_eq!(&fused[5 * k..6 * k], &[11 + offset, offset, 7 + offset, 2 + offset], "{format:?}");
        // The tie between keys 1 and 4 goes to key 1 (row 11) before key 4 (row 2), though row 2
        // is lower, wherever both are picked.
        for ti in 0..t {
            let picks = &fused[ti * k..(ti + 1) * k];
            let (p1, p4) = (picks.iter().position(|&p| p == 11 + offset), picks.iter().position(|&p| p == 2 + offset));
            if let (Some(p1), Some(p4)) = (p1, p4) {
                assert!(p1 < p4, "{format:?} query {ti}: {picks:?}");
            }
        }
        // The fused kernel reads exactly the decoded rows: same picks over an f32 pool of them.
        let f32_pool = pool_with(&cpu, RowFormat::F32, rows, &(0..rows as i32).collect::<Vec<_>>(), &decoded);
        let again = cpu.indexer_select(&qt, &f32_pool, &kr, &wt, &valid, k, offset, Precision::F32).unwrap();
        assert_eq!(fused, cpu.download_index(&again).unwrap(), "{format:?}: over the decoded f32 rows");
    }
    // Over the f32 keys themselves the noise breaks the tie the other way for some query:
    // the BF16/FP8 results above really come from the decoded rows.
    let f32_pool = pool_with(&cpu, RowFormat::F32, rows, &key_rows, &keys);
    let bf16_pool = pool_with(&cpu, RowFormat::Bf16, rows, &key_rows, &keys);
    let exact = cpu
        .download_index(&cpu.indexer_select(&qt, &f32_pool, &kr, &wt, &valid, k, offset, Precision::F32).unwrap())
        .unwrap();
    let rounded = cpu
        .download_index(&cpu.indexer_select(&qt, &bf16_pool, &kr, &wt, &valid, k, offset, Precision::F32).unwrap())
        .unwrap();
    assert_ne!(exact, rounded, "the f32 noise changes some pick");
}

#[test]
fn indexer_select_checks_key_rows_against_the_pool() {
    let cpu = be();
    let mut rng = Rng(7);
    let (t, nh, dh, n) = (2, 2, 4, 3);
    let pool = pool_with(&cpu, RowFormat::Bf16, 5, &[0, 1, 2], &rng.vec(n * dh));
    let (qt, wt) = (tensor(&cpu, &rng.vec(t * nh * dh), &[t, nh, dh]), tensor(&cpu, &[1.0; 4], &[t, nh]));
    let valid = vec![0..3, 0..3];
    for (rows, bad) in [([0, 5, 1], "5"), ([0, -1, 1], "-1")] {
        let e = cpu
            .indexer_select(&qt, &pool, &idx(&cpu, &rows, &[n]), &wt, &valid, 2, 0, Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("indexer_select") && e.contains(bad), "{e}");
    }
    // A valid range past the N keys, key rows that are not 1-D, and a pool of another width.
    let rows = idx(&cpu, &[4, 3, 2], &[n]);
    assert!(cpu.indexer_select(&qt, &pool, &rows, &wt, &[0..3, 0..4], 2, 0, Precision::F32).is_err());
    assert!(cpu
        .indexer_select(&qt, &pool, &idx(&cpu, &[4, 3, 2], &[1, 3]), &wt, &valid, 2, 0, Precision::F32)
        .is_err());
    let wide = pool_with(&cpu, RowFormat::Bf16, 3, &[0, 1, 2], &rng.vec(n * 2 * dh));
    assert!(cpu.indexer_select(&qt, &wide, &rows, &wt, &valid, 2, 0, Precision::F32).is_err());
    // Rows in any order: picks are the rows + offset.
    let got = cpu.indexer_select(&qt, &pool, &rows, &wt, &valid, 3, 10, Precision::F32).unwrap();
    let mut picks = cpu.download_index(&got).unwrap();
    picks.sort();
    assert_eq!(picks, vec![12, 12, 13, 13, 14, 14]);
}
