//! The Ascend backend's pools of the paged decoding state (`alloc_pool`, `pool_write`,
//! `pool_read`) on dsv4's CPU emulator of AscendCL, and the emulator's `aclnnInplaceIndexCopy`
//! that `pool_write` runs on. Emulator-verified, not hardware-verified.
//!
//! * F32 and BF16 pools round-trip rows exactly as `RowFormat::round_trip`, fresh rows and `-1`
//!   slots read as zeros, and a write touches only the rows it names (checked against the CPU
//!   backend's pools too).
//! * Slots outside the pool or repeated are errors, whether the index came from the host or was
//!   computed on the device; fp8 pools are refused off the 950 with a message that names the way
//!   out (`ascend_kv_fp8_950.rs` holds them on a 950).
//! * `sparse_attention` and `indexer_select` over Ascend pools equal the CPU backend's within
//!   1e-6 (relative to the largest value), and pick the same rows.
//! * Through the raw FFI: the emulator's aclnnInplaceIndexCopy checks shapes, dtypes and aliasing
//!   when planning, and faults on out-of-range or repeated indices when the kernel runs.

use std::ffi::c_void;
use std::ops::Range;
use std::ptr::null_mut;

use dsv4_ascend_sys::*;
use dsv4_backend_ascend::AscendBackend;
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::{Backend, DevicePool, DeviceTensor, Precision, RowFormat};
use dsv4_tests::raw_acl::{api, recent_error as msg};

const TOLERANCE: f64 = 1e-6;
const WIDTH: usize = 40;

fn ascend() -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open(0).unwrap_or_else(|e| panic!("{e}"))
}

/// Deterministic values in [-1, 1) with all 23 mantissa bits in use (so BF16 rounds them).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next() as f64 / (1u64 << 30) as f64 - 1.0) as f32).collect()
    }

    /// A permutation of 0..n.
    fn perm(&mut self, n: usize) -> Vec<i32> {
        let mut v: Vec<i32> = (0..n as i32).collect();
        for i in (1..n).rev() {
            v.swap(i, self.next() as usize % (i + 1));
        }
        v
    }
}

/// Every row of `pool`, decoded.
fn read_all<B: Backend>(be: &B, pool: &B::Pool) -> Vec<f32> {
    let all: Vec<i32> = (0..pool.rows() as i32).collect();
    let out = be.pool_read(pool, &be.upload_index(&all, &[all.len()]).unwrap()).unwrap();
    assert_eq!(out.shape(), [pool.rows(), pool.width()]);
    be.download(&out).unwrap()
}

/// `rows` rows at `slots` of a fresh `[total, WIDTH]` pool, on any backend.
fn pool_with<B: Backend>(be: &B, format: RowFormat, total: usize, slots: &[i32], rows: &[f32]) -> B::Pool {
    let mut pool = be.alloc_pool(total, WIDTH, format).unwrap();
    let idx = be.upload_index(slots, &[slots.len()]).unwrap();
    be.pool_write(&mut pool, &idx, &be.upload(rows, &[slots.len(), WIDTH]).unwrap()).unwrap();
    pool
}

#[test]
fn f32_and_bf16_pools_round_trip_and_write_in_place() {
    let (be, cpu) = (ascend(), CpuBackend::new());
    let mut rng = Rng(7);
    for format in [RowFormat::F32, RowFormat::Bf16] {
        let mut pool = be.alloc_pool(9, WIDTH, format).unwrap();
        assert_eq!((pool.rows(), pool.width(), pool.format()), (9, WIDTH, format));
        assert_eq!(pool.bytes(), 9 * format.row_bytes(WIDTH));
        // A fresh pool is zero (the emulator's fresh device memory is NaN bytes).
        assert!(read_all(&be, &pool).iter().all(|&v| v == 0.0), "{format:?}: fresh rows");

        let first = rng.vec(3 * WIDTH);
        let slots = [5, 1, 8];
        let idx = be.upload_index(&slots, &[3]).unwrap();
        be.pool_write(&mut pool, &idx, &be.upload(&first, &[3, WIDTH]).unwrap()).unwrap();
        let mut want = vec![0f32; 9 * WIDTH];
        for (i, &s) in slots.iter().enumerate() {
            let row = format.round_trip(&first[i * WIDTH..(i + 1) * WIDTH]);
            want[s as usize * WIDTH..(s as usize + 1) * WIDTH].copy_from_slice(&row);
        }
        if format == RowFormat::Bf16 {
            assert_ne!(format.round_trip(&first), first, "the test values must need rounding");
        }
        assert_eq!(read_all(&be, &pool), want, "{format:?}: after the first write");

        // Reads of any shape; -1 gives zeros.
        let read = be.pool_read(&pool, &be.upload_index(&[8, -1, 1, 5, -1, 8], &[2, 3]).unwrap()).unwrap();
        assert_eq!(read.shape(), [2, 3, WIDTH]);
        let got = be.download(&read).unwrap();
        for (j, s) in [8i32, -1, 1, 5, -1, 8].into_iter().enumerate() {
            let row = &got[j * WIDTH..(j + 1) * WIDTH];
            if s < 0 {
                assert!(row.iter().all(|&v| v == 0.0), "{format:?}: slot -1 must read zeros");
            } else {
                assert_eq!(row, &want[s as usize * WIDTH..(s as usize + 1) * WIDTH], "{format:?}: slot {s}");
            }
        }

        // Overwrite row 1 and write row 0: rows 5 and 8 keep their values.
        let second = rng.vec(2 * WIDTH);
        let idx = be.upload_index(&[0, 1], &[2]).unwrap();
        be.pool_write(&mut pool, &idx, &be.upload(&second, &[2, WIDTH]).unwrap()).unwrap();
        want[..2 * WIDTH].copy_from_slice(&format.round_trip(&second));
        assert_eq!(read_all(&be, &pool), want, "{format:?}: after the second write");

        // The CPU backend's pool holds the same values after the same writes.
        let mut cpu_pool = pool_with(&cpu, format, 9, &slots, &first);
        let idx = cpu.upload_index(&[0, 1], &[2]).unwrap();
        cpu.pool_write(&mut cpu_pool, &idx, &cpu.upload(&second, &[2, WIDTH]).unwrap()).unwrap();
        assert_eq!(read_all(&cpu, &cpu_pool), want, "{format:?}: CPU backend");

        // Writing nothing is fine; an empty read has the right shape.
        let none = be.upload_index(&[], &[0]).unwrap();
        be.pool_write(&mut pool, &none, &be.upload(&[], &[0, WIDTH]).unwrap()).unwrap();
        assert_eq!(be.pool_read(&pool, &none).unwrap().shape(), [0, WIDTH]);
    }
}

/// An index `[values.len()]` computed on the device (its values are not known on the host):
/// each value v is the top-1 position of a one-hot row, minus 1, concatenated.
fn device_index(be: &AscendBackend, values: &[i32]) -> dsv4_backend_ascend::AscendIndex {
    let parts: Vec<_> = values
        .iter()
        .map(|&v| {
            let len = v.max(0) as usize + 2;
            let mut onehot = vec![0f32; len];
            onehot[(v + 1) as usize] = 1.0;
            let (_, pos) = be.topk(&be.upload(&onehot, &[len]).unwrap(), 1).unwrap();
            be.offset_index(&pos, -1).unwrap()
        })
        .collect();
    let idx = be.concat_index(&parts.iter().collect::<Vec<_>>(), 0).unwrap();
    assert_eq!(be.download_index(&idx).unwrap(), values);
    idx
}

#[test]
fn bad_slots_and_shapes_are_errors_and_leave_the_pool_unchanged() {
    let be = ascend();
    let mut rng = Rng(11);
    for format in [RowFormat::F32, RowFormat::Bf16] {
        let rows = rng.vec(4 * WIDTH);
        let mut pool = pool_with(&be, format, 4, &[0, 1, 2, 3], &rows);
        let before = read_all(&be, &pool);
        let vals = be.upload(&rng.vec(2 * WIDTH), &[2, WIDTH]).unwrap();
        for (slots, want) in [
            (vec![1, 4], "pool_write: index 4 is outside the 4 rows of the pool"),
            (vec![-1, 2], "pool_write: index -1 (no entry) is not allowed"),
            (vec![3, 3], "pool_write: slot 3 is written twice (entries 0 and 1)"),
        ] {
            let host = be.upload_index(&slots, &[2]).unwrap();
            // The same slots computed on the device (no host copy: checked after a download).
            for idx in [host, device_index(&be, &slots)] {
                let e = be.pool_write(&mut pool, &idx, &vals).unwrap_err().to_string();
                assert!(e.contains(want), "{format:?} {slots:?}: {e}");
            }
        }
        let idx = be.upload_index(&[0, 1], &[2]).unwrap();
        let wide = be.upload(&rng.vec(2 * (WIDTH + 1)), &[2, WIDTH + 1]).unwrap();
        let e = be.pool_write(&mut pool, &idx, &wide).unwrap_err().to_string();
        assert!(e.contains("want [n] and [n, 40]"), "{e}");
        let e = be.pool_write(&mut pool, &be.upload_index(&[0, 1, 2], &[3]).unwrap(), &vals).unwrap_err();
        assert!(e.to_string().contains("slots [3]"), "{e}");
        assert_eq!(read_all(&be, &pool), before, "{format:?}: a refused write changed the pool");
        // Reads of slots known on the host are checked too (-1 is "no entry", -2 is not).
        for (slots, want) in [
            ([0, 4], "pool_read: index 4 is outside the 4 rows of the pool"),
            ([-2, 0], "pool_read: index -2 is negative"),
        ] {
            let e = be
                .pool_read(&pool, &be.upload_index(&slots, &[2]).unwrap())
                .err()
                .expect("a bad slot must be refused")
                .to_string();
            assert!(e.contains(want), "{format:?}: {e}");
        }
    }
}

#[test]
fn fp8_pools_are_refused_with_the_way_out() {
    let be = ascend();
    let e = be.alloc_pool(4, 512, RowFormat::Fp8 { rope: 64 }).err().expect("fp8 must be refused").to_string();
    for part in ["fp8 KV rows need aclnnCast's FLOAT8_E4M3FN paths", "only the Ascend 950", "--kv-dtype bf16"] {
        assert!(e.contains(part), "{e}");
    }
}

/// max |a - b| / max |b| (infinite when anything is not finite).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(f64::MIN_POSITIVE);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn sparse_attention_over_a_pool_matches_the_cpu_backend() {
    let (be, cpu) = (ascend(), CpuBackend::new());
    let mut rng = Rng(3);
    let (total, n, t, h, k) = (24, 17, 5, 3, 7);
    for format in [RowFormat::F32, RowFormat::Bf16] {
        // n rows at scattered slots of a larger pool; the rest stay zero.
        let slots: Vec<i32> = rng.perm(total)[..n].to_vec();
        let rows = rng.vec(n * WIDTH);
        let (pa, pc) = (pool_with(&be, format, total, &slots, &rows), pool_with(&cpu, format, total, &slots, &rows));
        let q = rng.vec(t * h * WIDTH);
        let sinks = rng.vec(h);
        // Each query's picks: pool rows (some never written), with -1 padding; the last query
        // sees nothing at all.
        let mut idx = vec![-1i32; t * k];
        for (qi, picks) in idx.chunks_mut(k).enumerate().take(t - 1) {
            for (j, p) in picks.iter_mut().enumerate().take(k - qi % 3) {
                *p = ((qi * 5 + j * 7) % total) as i32;
            }
        }
        let scale = (WIDTH as f32).powf(-0.5);
        let a = be
            .sparse_attention(
                &be.upload(&q, &[t, h, WIDTH]).unwrap(),
                &pa,
                &be.upload_index(&idx, &[t, k]).unwrap(),
                &be.upload(&sinks, &[h]).unwrap(),
                scale,
                Precision::F32,
            )
            .unwrap();
        let c = cpu
            .sparse_attention(
                &cpu.upload(&q, &[t, h, WIDTH]).unwrap(),
                &pc,
                &cpu.upload_index(&idx, &[t, k]).unwrap(),
                &cpu.upload(&sinks, &[h]).unwrap(),
                scale,
                Precision::F32,
            )
            .unwrap();
        assert_eq!(a.shape(), [t, h, WIDTH]);
        let (a, c) = (be.download(&a).unwrap(), cpu.download(&c).unwrap());
        let d = rel_diff(&a, &c);
        println!("{format:?}: sparse_attention, Ascend vs CPU: relative difference {d:e}");
        assert!(d <= TOLERANCE, "{format:?}: relative difference {d:e}");
        assert!(a[(t - 1) * h * WIDTH..].iter().all(|&v| v == 0.0), "a query with no keys attends to the sink only");
    }
}

#[test]
fn indexer_select_over_a_pool_matches_the_cpu_backend() {
    let (be, cpu) = (ascend(), CpuBackend::new());
    let mut rng = Rng(5);
    let (total, n, t, heads, k, offset) = (40, 23, 6, 4, 8, 100);
    for format in [RowFormat::F32, RowFormat::Bf16] {
        // The sequence's keys live at scattered pool rows, key i at row key_rows[i].
        let key_rows: Vec<i32> = rng.perm(total)[..n].to_vec();
        let keys = rng.vec(n * WIDTH);
        let (pa, pc) =
            (pool_with(&be, format, total, &key_rows, &keys), pool_with(&cpu, format, total, &key_rows, &keys));
        let q = rng.vec(t * heads * WIDTH);
        let w: Vec<f32> = rng.vec(t * heads).iter().map(|v| v * 0.5).collect();
        // Causal-looking ranges, one of them shorter than k (so some picks are -1).
        let valid: Vec<Range<usize>> = (0..t).map(|i| 0..(5 + 3 * i).min(n)).collect();
        let a = be
            .indexer_select(
                &be.upload(&q, &[t, heads, WIDTH]).unwrap(),
                &pa,
                &be.upload_index(&key_rows, &[n]).unwrap(),
                &be.upload(&w, &[t, heads]).unwrap(),
                &valid,
                k,
                offset,
                Precision::F32,
            )
            .unwrap();
        let c = cpu
            .indexer_select(
                &cpu.upload(&q, &[t, heads, WIDTH]).unwrap(),
                &pc,
                &cpu.upload_index(&key_rows, &[n]).unwrap(),
                &cpu.upload(&w, &[t, heads]).unwrap(),
                &valid,
                k,
                offset,
                Precision::F32,
            )
            .unwrap();
        assert_eq!(a.shape(), [t, k]);
        let (a, c) = (be.download_index(&a).unwrap(), cpu.download_index(&c).unwrap());
        // Same picks as sets (the order among near-equal scores is not compared).
        for (qi, (ra, rc)) in a.chunks(k).zip(c.chunks(k)).enumerate() {
            let (mut sa, mut sc) = (ra.to_vec(), rc.to_vec());
            sa.sort();
            sc.sort();
            assert_eq!(sa, sc, "{format:?}: query {qi}");
            let valid_rows: Vec<i32> = key_rows[valid[qi].clone()].iter().map(|r| r + offset).collect();
            assert!(ra.iter().all(|p| *p == -1 || valid_rows.contains(p)), "{format:?}: query {qi} picked {ra:?}");
            assert_eq!(ra.iter().filter(|p| **p == -1).count(), k.saturating_sub(valid[qi].len()));
        }
    }
}

// ------------------------------------------------------------------ the emulator's operator

fn malloc(api: &Api, bytes: usize) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: out-pointer to a local.
    let st = unsafe { api.aclrtMalloc().unwrap()(&mut p, bytes, aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST) };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
    p
}

/// A view of `dims` with `strides` from element `off` of `data` (storage: `storage` elements).
fn view(
    api: &Api,
    data: *mut c_void,
    dims: &[i64],
    st: &[i64],
    off: i64,
    storage: i64,
    dt: aclDataType,
) -> *mut aclTensor {
    // SAFETY: arrays valid for the call; the emulator validates the rest.
    let t = unsafe {
        api.aclCreateTensor().unwrap()(
            dims.as_ptr(),
            dims.len() as u64,
            dt,
            st.as_ptr(),
            off,
            aclFormat::ACL_FORMAT_ND,
            [storage].as_ptr(),
            1,
            data,
        )
    };
    assert!(!t.is_null(), "{}", msg(api));
    t
}

/// A contiguous view of the whole of `data`.
fn tensor(api: &Api, data: *mut c_void, dims: &[i64], dt: aclDataType) -> *mut aclTensor {
    let st: Vec<i64> = (0..dims.len()).map(|i| dims[i + 1..].iter().product()).collect();
    view(api, data, dims, &st, 0, dims.iter().product(), dt)
}

fn upload<T: Copy>(api: &Api, dst: *mut c_void, v: &[T]) {
    let bytes = std::mem::size_of_val(v);
    // SAFETY: a host slice of `bytes` bytes; the emulator checks the device side.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            dst,
            bytes,
            v.as_ptr() as *const c_void,
            bytes,
            aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
}

fn download(api: &Api, src: *mut c_void, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // SAFETY: a host buffer of n floats.
    let st = unsafe {
        api.aclrtMemcpy().unwrap()(
            v.as_mut_ptr() as *mut c_void,
            n * 4,
            src,
            n * 4,
            aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    };
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
    v
}

/// aclnnInplaceIndexCopyGetWorkspaceSize; Ok(executor, workspace size) or the status.
fn plan(
    api: &Api,
    dst: *mut aclTensor,
    dim: i64,
    idx: *mut aclTensor,
    src: *mut aclTensor,
) -> Result<(*mut aclOpExecutor, u64), i32> {
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects (or ones the emulator rejects) and out-pointers to locals.
    let st = unsafe { api.aclnnInplaceIndexCopyGetWorkspaceSize().unwrap()(dst, dim, idx, src, &mut ws, &mut ex) };
    if st == ACLNN_SUCCESS {
        Ok((ex, ws))
    } else {
        Err(st)
    }
}

/// Plans, launches on the default stream with a fresh workspace, synchronises; the status of
/// the synchronisation (where kernel faults surface).
fn run(api: &Api, dst: *mut aclTensor, dim: i64, idx: *mut aclTensor, src: *mut aclTensor) -> aclError {
    let (ex, ws) = plan(api, dst, dim, idx, src).unwrap_or_else(|st| panic!("{st}: {}", msg(api)));
    let w = if ws > 0 { malloc(api, ws as usize) } else { null_mut() };
    // SAFETY: the executor just planned, a workspace of the size it asked for, the default stream.
    assert_eq!(unsafe { api.aclnnInplaceIndexCopy().unwrap()(w, ws, ex, null_mut()) }, ACLNN_SUCCESS, "{}", msg(api));
    // SAFETY: the default stream.
    unsafe { api.aclrtSynchronizeStream().unwrap()(null_mut()) }
}

#[test]
fn emulated_index_copy_writes_slices_in_place_along_any_dim() {
    let api = api();
    let (f, i32_, i64_) = (aclDataType::ACL_FLOAT, aclDataType::ACL_INT32, aclDataType::ACL_INT64);
    // selfRef [3, 4] = 0..12; copy two columns along dim 1 from a [3, 2] source, index INT64.
    let p = malloc(api, 12 * 4);
    upload(api, p, &(0..12).map(|v| v as f32).collect::<Vec<_>>());
    let (s, i) = (malloc(api, 6 * 4), malloc(api, 2 * 8));
    upload(api, s, &[100f32, 101., 110., 111., 120., 121.]);
    upload(api, i, &[3i64, 0]);
    let st = run(api, tensor(api, p, &[3, 4], f), 1, tensor(api, i, &[2], i64_), tensor(api, s, &[3, 2], f));
    assert_eq!(st, ACL_SUCCESS, "{}", msg(api));
    assert_eq!(download(api, p, 12), [101., 1., 2., 100., 111., 5., 6., 110., 121., 9., 10., 120.]);
    // A strided selfRef (every other row of a [4, 2] block) along dim 0 with INT32 indices.
    let q = malloc(api, 8 * 4);
    upload(api, q, &[0f32; 8]);
    let (s, i) = (malloc(api, 2 * 4), malloc(api, 4));
    upload(api, s, &[7f32, 8.]);
    upload(api, i, &[1i32]);
    let dst = view(api, q, &[2, 2], &[4, 1], 0, 8, f);
    assert_eq!(run(api, dst, 0, tensor(api, i, &[1], i32_), tensor(api, s, &[1, 2], f)), ACL_SUCCESS, "{}", msg(api));
    assert_eq!(download(api, q, 8), [0., 0., 0., 0., 7., 8., 0., 0.]);
}

#[test]
fn emulated_index_copy_checks_shapes_dtypes_and_aliasing_when_planning() {
    let api = api();
    let (f, bf, i32_) = (aclDataType::ACL_FLOAT, aclDataType::ACL_BF16, aclDataType::ACL_INT32);
    let (p, s, i) = (malloc(api, 64), malloc(api, 64), malloc(api, 64));
    let dst = tensor(api, p, &[4, 4], f);
    let idx = tensor(api, i, &[2], i32_);
    let cases: [(*mut aclTensor, i64, *mut aclTensor, &str); 6] = [
        (idx, 0, tensor(api, s, &[2, 4], bf), "must have the same dtype"),
        (idx, 0, tensor(api, s, &[2, 3], f), "differ off dim"),
        (idx, 0, tensor(api, s, &[3, 4], f), "has 3 entries along dim 0 but index has 2"),
        (idx, 2, tensor(api, s, &[2, 4], f), "out of range"),
        (tensor(api, i, &[1, 2], i32_), 0, tensor(api, s, &[2, 4], f), "0-D or 1-D"),
        (tensor(api, i, &[2], aclDataType::ACL_FLOAT), 0, tensor(api, s, &[2, 4], f), "INT32, INT64"),
    ];
    for (idx, dim, src, want) in cases {
        assert_eq!(plan(api, dst, dim, idx, src).err(), Some(ACLNN_ERR_PARAM_INVALID), "{want}");
        let m = msg(api);
        assert!(m.contains(want), "{want}: {m}");
    }
    // The source is rows 2..4 of selfRef itself, or the index lies inside selfRef's block.
    let aliased = view(api, p, &[2, 4], &[4, 1], 8, 16, f);
    assert_eq!(plan(api, dst, 0, idx, aliased).err(), Some(ACLNN_ERR_PARAM_INVALID));
    let m = msg(api);
    assert!(m.contains("source") && m.contains("shares device memory with selfRef"), "{m}");
    let inside = view(api, p, &[2], &[1], 14, 16, i32_);
    assert_eq!(plan(api, dst, 0, inside, tensor(api, s, &[2, 4], f)).err(), Some(ACLNN_ERR_PARAM_INVALID));
    let m = msg(api);
    assert!(m.contains("index") && m.contains("shares device memory"), "{m}");
    // Disjoint parts of one block are fine: the first two rows of selfRef are written from the
    // last two rows of the same allocation seen as a separate tensor.
    let block = malloc(api, 8 * 4 * 4);
    let (top, bottom) = (view(api, block, &[2, 4], &[4, 1], 0, 32, f), view(api, block, &[2, 4], &[4, 1], 16, 32, f));
    assert!(plan(api, top, 0, idx, bottom).is_ok(), "{}", msg(api));
}

#[test]
fn emulated_index_copy_faults_on_out_of_range_and_repeated_indices() {
    let api = api();
    let (f, i32_) = (aclDataType::ACL_FLOAT, aclDataType::ACL_INT32);
    let (p, s) = (malloc(api, 16 * 4), malloc(api, 8 * 4));
    upload(api, p, &[0f32; 16]);
    upload(api, s, &[1f32; 8]);
    for (ids, want) in [
        ([1i32, 4], "index 4 (entry 1) is outside 0..4"),
        ([-1, 0], "index -1 (entry 0)"),
        ([2, 2], "index 2 appears twice"),
    ] {
        let i = malloc(api, 8);
        upload(api, i, &ids);
        let st = run(api, tensor(api, p, &[4, 4], f), 0, tensor(api, i, &[2], i32_), tensor(api, s, &[2, 4], f));
        assert_eq!(st, ACL_ERROR_RT_AICORE_EXCEPTION, "{ids:?}");
        let m = msg(api);
        assert!(m.contains(want), "{want}: {m}");
        // Nothing was written.
        assert_eq!(download(api, p, 16), [0f32; 16]);
    }
}
