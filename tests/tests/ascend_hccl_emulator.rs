//! HCCL on the Ascend emulator (`tests/ascend-emu/src/hccl.rs`): ranks are threads, each with
//! its own device (4 emulated devices in this binary). Happy paths of every collective on 2, 3
//! and 4 ranks against a host reference, sub-communicators running side by side, and one test
//! per misuse rule, each expecting the documented code on every rank plus a message from
//! `aclGetRecentErrMsg`.
//!
//! The HCCL symbols are resolved from the emulator library with `dlsym` (the library is already
//! loaded by `dsv4_ascend_sys::runtime()`). The emulator is process-global and the rendezvous
//! timeout is read from the environment, so the tests run one at a time (`serial`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::{Mutex, MutexGuard, OnceLock};

use dsv4_ascend_sys::*;

type Comm = *mut c_void;
const SUCCESS: i32 = 0;
const E_PARA: i32 = 1;
const E_PTR: i32 = 2;
const E_NOT_SUPPORT: i32 = 5;
const E_TIMEOUT: i32 = 9;

const INT8: i32 = 0;
const INT32: i32 = 2;
const FP32: i32 = 4;
const BFP16: i32 = 11;
const SUM: i32 = 0;
const PROD: i32 = 1;
const MAX: i32 = 2;
const MIN: i32 = 3;

const TIMEOUT_VAR: &str = "DSV4_ASCEND_EMU_HCCL_TIMEOUT_S";
/// Rendezvous limit for the tests that expect success (a hang fails instead of waiting 120 s).
const NORMAL_TIMEOUT: &str = "30";

#[repr(C)]
struct RootInfo([u8; 4108]);

type FnAllReduce = unsafe extern "C" fn(*mut c_void, *mut c_void, u64, i32, i32, Comm, aclrtStream) -> i32;

struct Hccl {
    get_root_info: unsafe extern "C" fn(*mut RootInfo) -> i32,
    init: unsafe extern "C" fn(u32, *const RootInfo, u32, *mut Comm) -> i32,
    destroy: unsafe extern "C" fn(Comm) -> i32,
    rank_size: unsafe extern "C" fn(Comm, *mut u32) -> i32,
    rank_id: unsafe extern "C" fn(Comm, *mut u32) -> i32,
    comm_name: unsafe extern "C" fn(Comm, *mut c_char) -> i32,
    error_string: unsafe extern "C" fn(i32) -> *const c_char,
    sub_comm: unsafe extern "C" fn(*mut Comm, u32, *mut u32, u64, u32, *mut c_void, *mut Comm) -> i32,
    all_reduce: FnAllReduce,
    all_gather: unsafe extern "C" fn(*mut c_void, *mut c_void, u64, i32, Comm, aclrtStream) -> i32,
    reduce_scatter: FnAllReduce,
    broadcast: unsafe extern "C" fn(*mut c_void, u64, i32, u32, Comm, aclrtStream) -> i32,
    #[allow(clippy::type_complexity)]
    alltoallv: unsafe extern "C" fn(
        *const c_void,
        *const c_void,
        *const c_void,
        i32,
        *const c_void,
        *const c_void,
        *const c_void,
        i32,
        Comm,
        aclrtStream,
    ) -> i32,
    barrier: unsafe extern "C" fn(Comm, aclrtStream) -> i32,
}

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;

/// A function pointer of type `F` from a symbol address.
///
/// # Safety
/// `p` must be a function with the signature `F`.
unsafe fn fn_ptr<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size; the caller promises the signature.
    unsafe { std::mem::transmute_copy(&p) }
}

fn hccl() -> &'static Hccl {
    static H: OnceLock<Hccl> = OnceLock::new();
    H.get_or_init(|| {
        // Before the emulator initialises (aclInit in runtime()).
        std::env::set_var("DSV4_ASCEND_EMU_DEVICES", "4");
        std::env::remove_var(VISIBLE_DEVICES_VAR);
        std::env::set_var(TIMEOUT_VAR, NORMAL_TIMEOUT);
        dsv4_tests::use_ascend_emulator();
        let api = runtime().unwrap_or_else(|e| panic!("{e}"));
        assert!(api.is_emulator());
        let path = CString::new(std::env::var(EMULATOR_VAR).expect("emulator path")).unwrap();
        // SAFETY: the emulator library, already loaded by runtime(); this takes another reference.
        let lib = unsafe { dlopen(path.as_ptr(), RTLD_NOW) };
        assert!(!lib.is_null(), "dlopen {path:?}");
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: a NUL-terminated symbol name.
                let p = unsafe { dlsym(lib, concat!($name, "\0").as_ptr() as *const c_char) };
                assert!(!p.is_null(), "the emulator does not export {}", $name);
                // SAFETY: the emulator exports it with the header's signature, which the field's
                // type spells out.
                unsafe { fn_ptr(p) }
            }};
        }
        Hccl {
            get_root_info: sym!("HcclGetRootInfo"),
            init: sym!("HcclCommInitRootInfo"),
            destroy: sym!("HcclCommDestroy"),
            rank_size: sym!("HcclGetRankSize"),
            rank_id: sym!("HcclGetRankId"),
            comm_name: sym!("HcclGetCommName"),
            error_string: sym!("HcclGetErrorString"),
            sub_comm: sym!("HcclCreateSubCommConfig"),
            all_reduce: sym!("HcclAllReduce"),
            all_gather: sym!("HcclAllGather"),
            reduce_scatter: sym!("HcclReduceScatter"),
            broadcast: sym!("HcclBroadcast"),
            alltoallv: sym!("HcclAlltoAllV"),
            barrier: sym!("HcclBarrier"),
        }
    })
}

fn api() -> &'static Api {
    hccl();
    runtime().unwrap_or_else(|e| panic!("{e}"))
}

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    hccl();
    g
}

/// The calling thread's recent error message.
fn msg() -> String {
    api().recent_error().unwrap_or_default()
}

/// (code, message if it failed).
fn outcome(code: i32) -> (i32, String) {
    (code, if code == SUCCESS { String::new() } else { msg() })
}

/// Sets the rendezvous timeout for the life of the guard.
struct TimeoutGuard;
impl TimeoutGuard {
    fn set(seconds: &str) -> TimeoutGuard {
        std::env::set_var(TIMEOUT_VAR, seconds);
        TimeoutGuard
    }
}
impl Drop for TimeoutGuard {
    fn drop(&mut self) {
        std::env::set_var(TIMEOUT_VAR, NORMAL_TIMEOUT);
    }
}

// ------------------------------------------------------------------------------ rank threads

/// One rank's thread state: its device set, a stream on it.
struct Rank {
    dev: i32,
    stream: aclrtStream,
}

impl Rank {
    fn new(dev: i32) -> Rank {
        let api = api();
        // SAFETY: plain integer argument.
        assert_eq!(unsafe { api.aclrtSetDevice().unwrap()(dev) }, ACL_SUCCESS, "{}", msg());
        let mut stream = null_mut();
        // SAFETY: out-pointer to a local.
        assert_eq!(unsafe { api.aclrtCreateStream().unwrap()(&mut stream) }, ACL_SUCCESS, "{}", msg());
        Rank { dev, stream }
    }

    /// Device memory holding `bytes`.
    fn buf(&self, bytes: &[u8]) -> *mut c_void {
        dsv4_tests::raw_acl::device_bytes(api(), bytes)
    }

    /// `n` bytes of device memory filled with 0xAB (so unwritten bytes show).
    fn out(&self, n: usize) -> *mut c_void {
        self.buf(&vec![0xAB; n])
    }

    fn sync(&self) -> aclError {
        // SAFETY: a live stream of this thread's device.
        unsafe { api().aclrtSynchronizeStream().unwrap()(self.stream) }
    }

    /// Synchronises, then reads `n` bytes.
    fn read(&self, p: *mut c_void, n: usize) -> Vec<u8> {
        assert_eq!(self.sync(), ACL_SUCCESS, "{}", msg());
        dsv4_tests::raw_acl::download_bytes(api(), p, n)
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        let api = api();
        // SAFETY: this thread's stream and device; failures are irrelevant here.
        unsafe {
            api.aclrtSynchronizeStream().unwrap()(self.stream);
            api.aclrtDestroyStream().unwrap()(self.stream);
        }
    }
}

/// Runs `f(rank, state)` on one thread per device of `devices`, returns the results by rank.
fn on_devices<T: Send>(devices: &[i32], f: impl Fn(usize, &Rank) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(r, &d)| {
                let f = &f;
                s.spawn(move || f(r, &Rank::new(d)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

fn on_ranks<T: Send>(n: usize, f: impl Fn(usize, &Rank) -> T + Sync) -> Vec<T> {
    on_devices(&(0..n as i32).collect::<Vec<_>>(), f)
}

/// A root info from a thread with device 0 set.
fn root_info() -> RootInfo {
    std::thread::spawn(|| {
        let _rank = Rank::new(0);
        let mut ri = RootInfo([0; 4108]);
        // SAFETY: out-pointer to a local blob.
        assert_eq!(unsafe { (hccl().get_root_info)(&mut ri) }, SUCCESS, "{}", msg());
        ri
    })
    .join()
    .unwrap()
}

/// A communicator of ranks on devices 0..n; the handles by rank (as integers: they cross threads).
fn world(n: usize) -> Vec<usize> {
    let root = root_info();
    on_ranks(n, |r, _| {
        let mut c = null_mut();
        // SAFETY: a root info and an out-pointer.
        let st = unsafe { (hccl().init)(n as u32, &root, r as u32, &mut c) };
        assert_eq!(st, SUCCESS, "rank {r}: {}", msg());
        c as usize
    })
}

fn destroy_all(comms: &[usize]) {
    for &c in comms {
        // SAFETY: a communicator handle.
        assert_eq!(unsafe { (hccl().destroy)(c as Comm) }, SUCCESS, "{}", msg());
    }
}

/// Asserts every rank failed with `code` and a message containing each of `needles[rank]`.
fn assert_all_failed(results: &[(i32, String)], code: i32, needles: &[&[&str]]) {
    for (r, (c, m)) in results.iter().enumerate() {
        assert_eq!(*c, code, "rank {r}: code {c} ({m})");
        for n in needles[r.min(needles.len() - 1)] {
            assert!(m.contains(n), "rank {r}: message {m:?} lacks {n:?}");
        }
    }
}

// --------------------------------------------------------------------------------- data

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Values whose sums round: distinct per rank and element.
fn sample(rank: usize, n: usize, salt: u32) -> Vec<f32> {
    (0..n).map(|i| ((rank * 131 + i * 17 + salt as usize) as f32 * 0.7311).sin() * (1.0 + i as f32 * 0.37)).collect()
}

/// Elements of `dtype` (FP32 or BFP16) from f32 values.
fn encode(dtype: i32, v: &[f32]) -> Vec<u8> {
    match dtype {
        FP32 => f32_bytes(v),
        BFP16 => v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

fn esize(dtype: i32) -> usize {
    match dtype {
        FP32 | INT32 => 4,
        BFP16 => 2,
        INT8 => 1,
        _ => unreachable!(),
    }
}

/// The rank-order sum of `inputs` (encoded `dtype`), rounding to the type after each addition.
fn rank_order_sum(dtype: i32, inputs: &[Vec<u8>]) -> Vec<u8> {
    match dtype {
        FP32 => {
            let vals: Vec<Vec<f32>> = inputs
                .iter()
                .map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
                .collect();
            let mut acc = vals[0].clone();
            for v in &vals[1..] {
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += x;
                }
            }
            f32_bytes(&acc)
        }
        BFP16 => {
            let vals: Vec<Vec<u16>> = inputs
                .iter()
                .map(|b| b.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect())
                .collect();
            let mut acc = vals[0].clone();
            for v in &vals[1..] {
                for (a, x) in acc.iter_mut().zip(v) {
                    *a = bf16_bits(bf16_value(*a) + bf16_value(*x));
                }
            }
            acc.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => unreachable!(),
    }
}

// ------------------------------------------------------------------------------ happy paths

#[test]
fn all_reduce_sums_in_rank_order_with_identical_bits_on_2_3_4_ranks() {
    let _s = serial();
    let count = 37;
    for n in 2..=4 {
        let comms = world(n);
        for dtype in [FP32, BFP16] {
            let inputs: Vec<Vec<u8>> = (0..n).map(|r| encode(dtype, &sample(r, count, n as u32))).collect();
            let want = rank_order_sum(dtype, &inputs);
            let got = on_ranks(n, |r, rk| {
                let (send, recv) = (rk.buf(&inputs[r]), rk.out(count * esize(dtype)));
                // SAFETY: device buffers of `count` elements on this rank's device.
                let st =
                    unsafe { (hccl().all_reduce)(send, recv, count as u64, dtype, SUM, comms[r] as Comm, rk.stream) };
                assert_eq!(st, SUCCESS, "rank {r}: {}", msg());
                rk.read(recv, count * esize(dtype))
            });
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g, &got[0], "{n} ranks, dtype {dtype}: rank {r}'s bits differ from rank 0's");
                assert_eq!(g, &want, "{n} ranks, dtype {dtype}: rank {r} is not the rank-order sum");
            }
        }
        destroy_all(&comms);
    }
}

/// A host reference over the ranks' inputs.
type Reference = fn(&[Vec<f32>]) -> Vec<f32>;

#[test]
fn all_reduce_max_min_prod_and_integer_sum() {
    let _s = serial();
    let n = 3;
    let comms = world(n);
    let vals = |r: usize| -> Vec<f32> { vec![r as f32 - 1.0, 2.0 - r as f32, 0.5 * (r + 1) as f32, -3.0] };
    let cases: [(i32, Reference); 3] = [
        (MAX, |v| (0..4).map(|i| v.iter().map(|x| x[i]).fold(f32::MIN, f32::max)).collect()),
        (MIN, |v| (0..4).map(|i| v.iter().map(|x| x[i]).fold(f32::MAX, f32::min)).collect()),
        (PROD, |v| (0..4).map(|i| v.iter().map(|x| x[i]).product()).collect()),
    ];
    for (op, reference) in cases {
        let want = f32_bytes(&reference(&(0..n).map(vals).collect::<Vec<_>>()));
        let got = on_ranks(n, |r, rk| {
            let (send, recv) = (rk.buf(&f32_bytes(&vals(r))), rk.out(16));
            // SAFETY: device buffers of 4 elements.
            let st = unsafe { (hccl().all_reduce)(send, recv, 4, FP32, op, comms[r] as Comm, rk.stream) };
            assert_eq!(st, SUCCESS, "{}", msg());
            rk.read(recv, 16)
        });
        assert!(got.iter().all(|g| *g == want), "op {op}: {got:?} vs {want:?}");
    }
    // INT32 sum wraps.
    let ints = |r: usize| -> Vec<i32> { vec![i32::MAX - r as i32, r as i32 * 1000, -7] };
    let got = on_ranks(n, |r, rk| {
        let send = rk.buf(&ints(r).iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
        let recv = rk.out(12);
        // SAFETY: device buffers of 3 elements.
        let st = unsafe { (hccl().all_reduce)(send, recv, 3, INT32, SUM, comms[r] as Comm, rk.stream) };
        assert_eq!(st, SUCCESS, "{}", msg());
        rk.read(recv, 12)
    });
    let want: Vec<u8> =
        (0..3).map(|i| (0..n).fold(0i32, |a, r| a.wrapping_add(ints(r)[i]))).flat_map(|x| x.to_le_bytes()).collect();
    assert!(got.iter().all(|g| *g == want));
    destroy_all(&comms);
}

#[test]
fn all_gather_concatenates_in_rank_order_on_2_3_4_ranks() {
    let _s = serial();
    let count = 5;
    for n in 2..=4 {
        let comms = world(n);
        for dtype in [FP32, BFP16, INT8] {
            let es = esize(dtype);
            let inputs: Vec<Vec<u8>> = (0..n).map(|r| (0..count * es).map(|i| (r * 50 + i) as u8).collect()).collect();
            let want = inputs.concat();
            let got = on_ranks(n, |r, rk| {
                let (send, recv) = (rk.buf(&inputs[r]), rk.out(n * count * es));
                // SAFETY: device buffers of count / n·count elements.
                let st = unsafe { (hccl().all_gather)(send, recv, count as u64, dtype, comms[r] as Comm, rk.stream) };
                assert_eq!(st, SUCCESS, "{}", msg());
                rk.read(recv, n * count * es)
            });
            assert!(got.iter().all(|g| *g == want), "{n} ranks dtype {dtype}");
        }
        destroy_all(&comms);
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_part_of_the_sum_on_2_3_4_ranks() {
    let _s = serial();
    let count = 6;
    for n in 2..=4 {
        let comms = world(n);
        for dtype in [FP32, BFP16] {
            let es = esize(dtype);
            let inputs: Vec<Vec<u8>> = (0..n).map(|r| encode(dtype, &sample(r, n * count, 7))).collect();
            let sum = rank_order_sum(dtype, &inputs);
            let got = on_ranks(n, |r, rk| {
                let (send, recv) = (rk.buf(&inputs[r]), rk.out(count * es));
                // SAFETY: device buffers of n·count / count elements.
                let st = unsafe {
                    (hccl().reduce_scatter)(send, recv, count as u64, dtype, SUM, comms[r] as Comm, rk.stream)
                };
                assert_eq!(st, SUCCESS, "{}", msg());
                rk.read(recv, count * es)
            });
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g, &sum[r * count * es..(r + 1) * count * es], "{n} ranks dtype {dtype} rank {r}");
            }
        }
        destroy_all(&comms);
    }
}

#[test]
fn broadcast_copies_the_root_buffer_from_every_root() {
    let _s = serial();
    for n in 2..=4 {
        let comms = world(n);
        for root in 0..n {
            for dtype in [FP32, BFP16] {
                let data = |r: usize| encode(dtype, &sample(r, 9, root as u32));
                let got = on_ranks(n, |r, rk| {
                    let buf = rk.buf(&data(r));
                    // SAFETY: a device buffer of 9 elements.
                    let st = unsafe { (hccl().broadcast)(buf, 9, dtype, root as u32, comms[r] as Comm, rk.stream) };
                    assert_eq!(st, SUCCESS, "{}", msg());
                    rk.read(buf, 9 * esize(dtype))
                });
                assert!(got.iter().all(|g| *g == data(root)), "{n} ranks root {root}");
            }
        }
        destroy_all(&comms);
    }
}

#[test]
fn alltoallv_delivers_every_chunk_with_zero_counts_to_some_ranks() {
    let _s = serial();
    for n in 2..=4 {
        let comms = world(n);
        // counts[i][j]: elements rank i sends to rank j (zeros included).
        let counts = |i: usize, j: usize| ((i + 2 * j) % 3) as u64;
        let value = |i: usize, j: usize, k: u64| (1000 * i + 100 * j) as f32 + k as f32;
        let got = on_ranks(n, |r, rk| {
            // Send chunks stored in reverse destination order; one spare element after each
            // receive region stays untouched.
            let mut send = vec![];
            let mut sdispls = vec![0u64; n];
            for j in (0..n).rev() {
                sdispls[j] = send.len() as u64;
                send.extend((0..counts(r, j)).map(|k| value(r, j, k)));
            }
            let recv_counts: Vec<u64> = (0..n).map(|i| counts(i, r)).collect();
            let send_counts: Vec<u64> = (0..n).map(|j| counts(r, j)).collect();
            let mut rdispls = vec![0u64; n];
            let mut at = 0;
            for i in 0..n {
                rdispls[i] = at;
                at += recv_counts[i] + 1;
            }
            let sbuf = rk.buf(&f32_bytes(&send).into_iter().chain([0; 4]).collect::<Vec<_>>());
            let rbuf = rk.out(at as usize * 4);
            // SAFETY: host arrays of n entries, device buffers covering every region.
            let st = unsafe {
                (hccl().alltoallv)(
                    sbuf,
                    send_counts.as_ptr() as *const c_void,
                    sdispls.as_ptr() as *const c_void,
                    FP32,
                    rbuf,
                    recv_counts.as_ptr() as *const c_void,
                    rdispls.as_ptr() as *const c_void,
                    FP32,
                    comms[r] as Comm,
                    rk.stream,
                )
            };
            assert_eq!(st, SUCCESS, "rank {r}: {}", msg());
            (rk.read(rbuf, at as usize * 4), rdispls, recv_counts)
        });
        for (r, (bytes, rdispls, recv_counts)) in got.iter().enumerate() {
            for i in 0..n {
                let at = rdispls[i] as usize * 4;
                let want: Vec<u8> = f32_bytes(&(0..recv_counts[i]).map(|k| value(i, r, k)).collect::<Vec<_>>());
                assert_eq!(&bytes[at..at + want.len()], &want[..], "{n} ranks: rank {r} from rank {i}");
                assert_eq!(&bytes[at + want.len()..at + want.len() + 4], &[0xAB; 4], "gap after rank {i}'s chunk");
            }
        }
        assert!((0..n).any(|i| (0..n).any(|j| counts(i, j) == 0)));
        destroy_all(&comms);
    }
}

#[test]
fn barrier_queries_and_error_strings() {
    let _s = serial();
    let comms = world(3);
    let names = on_ranks(3, |r, rk| {
        let c = comms[r] as Comm;
        let (mut size, mut id) = (0u32, 9u32);
        let mut name = [0 as c_char; 128];
        // SAFETY: out-pointers to locals; a 128-byte name buffer.
        unsafe {
            assert_eq!((hccl().rank_size)(c, &mut size), SUCCESS);
            assert_eq!((hccl().rank_id)(c, &mut id), SUCCESS);
            assert_eq!((hccl().comm_name)(c, name.as_mut_ptr()), SUCCESS);
            assert_eq!((hccl().barrier)(c, rk.stream), SUCCESS, "{}", msg());
        }
        assert_eq!((size, id), (3, r as u32));
        assert_eq!(rk.sync(), ACL_SUCCESS);
        // SAFETY: NUL-terminated by the emulator.
        unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
    });
    assert!(!names[0].is_empty() && names.iter().all(|n| *n == names[0]), "{names:?}");
    // SAFETY: static strings.
    let s = |c| unsafe { CStr::from_ptr((hccl().error_string)(c)) }.to_string_lossy().into_owned();
    assert_eq!(s(0), "no error");
    assert_eq!(s(E_PARA), "parameter error");
    assert_eq!(s(E_TIMEOUT), "timeout");
    destroy_all(&comms);
}

#[test]
fn collectives_are_ordered_with_the_stream_and_the_output_needs_a_synchronise() {
    let _s = serial();
    let comms = world(2);
    on_ranks(2, |r, rk| {
        let api = api();
        let send = rk.out(16);
        let recv = rk.out(16);
        let input = f32_bytes(&[r as f32 + 1.0; 4]);
        // Queued on the stream: the collective must see it.
        // SAFETY: a host slice of 16 bytes (pageable: copied at the call, written when the stream runs).
        let st = unsafe {
            api.aclrtMemcpyAsync().unwrap()(
                send,
                16,
                input.as_ptr() as *const c_void,
                16,
                aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE,
                rk.stream,
            )
        };
        assert_eq!(st, ACL_SUCCESS, "{}", msg());
        // SAFETY: device buffers of 4 elements.
        let st = unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) };
        assert_eq!(st, SUCCESS, "{}", msg());
        // Reading the output before synchronising is refused.
        let mut host = [0u8; 16];
        // SAFETY: a host buffer of 16 bytes.
        let st = unsafe {
            api.aclrtMemcpy().unwrap()(
                host.as_mut_ptr() as *mut c_void,
                16,
                recv,
                16,
                aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        assert_ne!(st, ACL_SUCCESS, "read before synchronise was allowed");
        assert!(msg().contains("aclrtSynchronizeStream"));
        assert_eq!(rk.read(recv, 16), f32_bytes(&[3.0; 4]));
    });
    destroy_all(&comms);
}

/// An `HcclCommConfig` as the header's static inline `HcclCommConfigInit` leaves it (2240
/// bytes, version 10), with `name` in hcclCommName.
fn comm_config(name: &str) -> Vec<u8> {
    let mut c = vec![0u8; 2240];
    c[0..8].copy_from_slice(&2240u64.to_le_bytes());
    c[8..12].copy_from_slice(&0xf0f0_f0f0u32.to_le_bytes());
    c[12..16].copy_from_slice(&10u32.to_le_bytes());
    c[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    c[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    c[32..32 + name.len()].copy_from_slice(name.as_bytes());
    c
}

/// HcclCreateSubCommConfig on the calling rank thread.
fn split(parent: usize, ids: Option<&[u32]>, sub_id: u64, sub_rank: u32, config: &mut [u8]) -> (i32, String, usize) {
    let mut p = parent as Comm;
    let mut ids = ids.map(<[u32]>::to_vec);
    let (n, ptr) = match &mut ids {
        Some(v) => (v.len() as u32, v.as_mut_ptr()),
        None => (0, null_mut()),
    };
    let mut sub = 1usize as Comm;
    // SAFETY: pointers to locals / the caller's config.
    let st =
        unsafe { (hccl().sub_comm)(&mut p, n, ptr, sub_id, sub_rank, config.as_mut_ptr() as *mut c_void, &mut sub) };
    let (c, m) = outcome(st);
    (c, m, sub as usize)
}

#[test]
fn sub_communicators_of_two_pairs_run_concurrently() {
    let _s = serial();
    let comms = world(4);
    let results = on_ranks(4, |r, rk| {
        let pair: [u32; 2] = if r < 2 { [0, 1] } else { [2, 3] };
        let (c, m, sub) = split(comms[r], Some(&pair[..]), 1 + (r / 2) as u64, (r % 2) as u32, &mut comm_config(""));
        assert_eq!(c, SUCCESS, "rank {r}: {m}");
        let (mut size, mut id) = (0u32, 0u32);
        let mut name = [0 as c_char; 128];
        // SAFETY: out-pointers to locals.
        unsafe {
            assert_eq!((hccl().rank_size)(sub as Comm, &mut size), SUCCESS);
            assert_eq!((hccl().rank_id)(sub as Comm, &mut id), SUCCESS);
            assert_eq!((hccl().comm_name)(sub as Comm, name.as_mut_ptr()), SUCCESS);
        }
        assert_eq!((size, id), (2, (r % 2) as u32));
        // SAFETY: NUL-terminated.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        assert!(name.ends_with(&format!("_sub_{}", 1 + r / 2)), "{name}");
        // Many all-reduces per pair, interleaving with the other pair's.
        let mut sums = vec![];
        for step in 0..20 {
            let v = f32_bytes(&[(r * 10 + step) as f32; 8]);
            let (send, recv) = (rk.buf(&v), rk.out(32));
            // SAFETY: device buffers of 8 elements.
            let st = unsafe { (hccl().all_reduce)(send, recv, 8, FP32, SUM, sub as Comm, rk.stream) };
            assert_eq!(st, SUCCESS, "rank {r} step {step}: {}", msg());
            sums.push(rk.read(recv, 32));
        }
        // SAFETY: a live sub-communicator.
        assert_eq!(unsafe { (hccl().destroy)(sub as Comm) }, SUCCESS);
        sums
    });
    for (r, sums) in results.iter().enumerate() {
        let base = if r < 2 { 10 } else { 50 };
        for (step, s) in sums.iter().enumerate() {
            assert_eq!(s, &f32_bytes(&[(base + 2 * step) as f32; 8]), "rank {r} step {step}");
        }
    }
    // A split of ranks 0 and 2 with a configured name; ranks 1 and 3 stay out.
    let outs = on_ranks(4, |r, _| {
        let mut cfg = comm_config("evens");
        if r % 2 == 0 {
            split(comms[r], Some(&[0, 2][..]), 7, (r / 2) as u32, &mut cfg)
        } else {
            split(comms[r], None, 0xFFFF_FFFF, 0, &mut cfg)
        }
    });
    for (r, (c, m, sub)) in outs.iter().enumerate() {
        assert_eq!(*c, SUCCESS, "rank {r}: {m}");
        assert_eq!(*sub == 0, r % 2 == 1, "rank {r}: handle {sub:#x}");
        if *sub != 0 {
            let mut name = [0 as c_char; 128];
            // SAFETY: a 128-byte buffer.
            assert_eq!(unsafe { (hccl().comm_name)(*sub as Comm, name.as_mut_ptr()) }, SUCCESS);
            // SAFETY: NUL-terminated.
            assert_eq!(unsafe { CStr::from_ptr(name.as_ptr()) }.to_str().unwrap(), "evens");
            // SAFETY: a live handle.
            assert_eq!(unsafe { (hccl().destroy)(*sub as Comm) }, SUCCESS);
        }
    }
    destroy_all(&comms);
}

// ---------------------------------------------------------------------------- misuse rules

/// All-reduce on a fresh n-rank communicator where each rank chooses (count, dtype, op).
fn all_reduce_each(n: usize, per_rank: impl Fn(usize) -> (u64, i32, i32) + Sync) -> Vec<(i32, String)> {
    let comms = world(n);
    let out = on_ranks(n, |r, rk| {
        let (count, dtype, op) = per_rank(r);
        let (send, recv) = (rk.out(64), rk.out(64));
        // SAFETY: device buffers of 64 bytes; the emulator checks the rest.
        outcome(unsafe { (hccl().all_reduce)(send, recv, count, dtype, op, comms[r] as Comm, rk.stream) })
    });
    destroy_all(&comms);
    out
}

#[test]
fn mismatched_counts_fail_on_every_rank() {
    let _s = serial();
    let res = all_reduce_each(3, |r| (if r == 2 { 4 } else { 8 }, FP32, SUM));
    assert_all_failed(&res, E_PARA, &[&["count differs", "rank 2"]]);
}

#[test]
fn mismatched_data_types_fail_on_every_rank() {
    let _s = serial();
    let res = all_reduce_each(2, |r| (8, if r == 0 { FP32 } else { BFP16 }, SUM));
    assert_all_failed(&res, E_PARA, &[&["data type differs", "FP32", "BFP16"]]);
}

#[test]
fn mismatched_reduce_ops_fail_on_every_rank() {
    let _s = serial();
    let res = all_reduce_each(2, |r| (8, FP32, if r == 0 { SUM } else { MAX }));
    assert_all_failed(&res, E_PARA, &[&["reduce op differs", "SUM", "MAX"]]);
}

#[test]
fn mismatched_broadcast_roots_fail_on_every_rank() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let buf = rk.out(16);
        // SAFETY: a device buffer of 4 elements.
        outcome(unsafe { (hccl().broadcast)(buf, 4, FP32, r as u32, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["root differs"]]);
    destroy_all(&comms);
}

#[test]
fn unsupported_reduction_fails_on_every_rank() {
    let _s = serial();
    // PROD is documented as unsupported for bfp16.
    let res = all_reduce_each(2, |_| (8, BFP16, PROD));
    assert_all_failed(&res, E_NOT_SUPPORT, &[&["PROD", "BFP16"]]);
}

#[test]
fn different_collectives_at_the_same_step_fail_on_every_rank() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        // SAFETY: device buffers of 64 bytes.
        outcome(unsafe {
            if r == 0 {
                (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream)
            } else {
                (hccl().all_gather)(send, recv, 4, FP32, comms[r] as Comm, rk.stream)
            }
        })
    });
    assert_all_failed(&res, E_PARA, &[&["different collectives", "HcclAllReduce", "HcclAllGather"]]);
    destroy_all(&comms);
}

#[test]
fn a_collective_on_a_thread_without_a_device_fails_on_every_rank() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        if r == 1 {
            // SAFETY: plain integer argument.
            assert_eq!(unsafe { api().aclrtResetDevice().unwrap()(rk.dev) }, ACL_SUCCESS);
        }
        // SAFETY: device buffers of 64 bytes.
        let out = outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) });
        if r == 1 {
            // SAFETY: plain integer argument (so the Rank's cleanup runs on its device).
            unsafe { api().aclrtSetDevice().unwrap()(rk.dev) };
        }
        out
    });
    assert_all_failed(&res, E_PARA, &[&["rank 1", "no device is set"]]);
    destroy_all(&comms);
}

#[test]
fn a_collective_on_another_device_than_the_ranks_fails_on_every_rank() {
    let _s = serial();
    let comms = world(2);
    // Rank 1 of the communicator is on device 1; its thread runs on device 3.
    let res = on_devices(&[0, 3], |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        // SAFETY: device buffers of 64 bytes.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["rank 1", "device is 3", "on device 1"]]);
    destroy_all(&comms);
}

#[test]
fn a_stream_that_is_not_a_live_stream_of_the_device_fails_on_every_rank() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        let mut stream = rk.stream;
        if r == 1 {
            // SAFETY: out-pointer, then the new stream.
            unsafe {
                assert_eq!(api().aclrtCreateStream().unwrap()(&mut stream), ACL_SUCCESS);
                assert_eq!(api().aclrtDestroyStream().unwrap()(stream), ACL_SUCCESS);
            }
        }
        // SAFETY: device buffers of 64 bytes.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["rank 1", "destroyed"]]);
    destroy_all(&comms);
}

#[test]
fn buffers_that_are_not_large_enough_device_memory_of_the_rank_fail_on_every_rank() {
    let _s = serial();
    let cases: [(&str, &[&str]); 3] = [
        ("too small", &["run past the end"]),
        ("host memory", &["not device memory"]),
        ("other device", &["memory of device 0", "rank 1"]),
    ];
    for (case, needles) in cases {
        let comms = world(2);
        let res = on_ranks(2, |r, rk| {
            let send = rk.out(64);
            let host = [0u8; 64];
            let recv = match (r, case) {
                (1, "too small") => rk.out(8),
                (1, "host memory") => host.as_ptr() as *mut c_void,
                (1, _) => {
                    // Memory of device 0, allocated on this thread.
                    // SAFETY: plain integer arguments.
                    unsafe { api().aclrtSetDevice().unwrap()(0) };
                    let p = rk.out(64);
                    // SAFETY: as above.
                    unsafe { api().aclrtSetDevice().unwrap()(rk.dev) };
                    p
                }
                _ => rk.out(64),
            };
            // SAFETY: the emulator validates the buffers.
            outcome(unsafe { (hccl().all_reduce)(send, recv, 16, FP32, SUM, comms[r] as Comm, rk.stream) })
        });
        let mut all = vec!["rank 1", "recvBuf"];
        all.extend_from_slice(needles);
        assert_all_failed(&res, E_PARA, &[&all]);
        destroy_all(&comms);
    }
}

#[test]
fn a_destroyed_or_never_created_communicator_is_refused() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        if r == 1 {
            // SAFETY: rank 1's live handle.
            assert_eq!(unsafe { (hccl().destroy)(comms[1] as Comm) }, SUCCESS);
        }
        // SAFETY: device buffers of 64 bytes.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["rank 1", "destroyed"]]);
    let mut size = 0;
    // SAFETY: handles and an out-pointer; the emulator validates the handles.
    unsafe {
        assert_eq!((hccl().rank_size)(comms[1] as Comm, &mut size), E_PARA);
        assert!(msg().contains("destroyed"), "{}", msg());
        assert_eq!((hccl().destroy)(comms[1] as Comm), E_PARA, "double destroy");
        assert_eq!((hccl().destroy)(comms[0] as Comm), SUCCESS);
        assert_eq!((hccl().rank_size)(0x1234_5670 as Comm, &mut size), E_PARA);
        assert!(msg().contains("not a communicator"), "{}", msg());
    }
    // A never-created handle in a collective fails the caller.
    let res = on_ranks(1, |_, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        // SAFETY: device buffers; a bogus handle.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, 0xdead_0000 as Comm, rk.stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["not a communicator"]]);
}

fn init_each(
    n: usize,
    root: &RootInfo,
    devices: &[i32],
    per_rank: impl Fn(usize) -> (u32, u32) + Sync,
) -> Vec<(i32, String)> {
    on_devices(&devices[..n], |r, _| {
        let (n_ranks, rank) = per_rank(r);
        let mut c = null_mut();
        // SAFETY: a root info blob and an out-pointer.
        let st = unsafe { (hccl().init)(n_ranks, root, rank, &mut c) };
        let out = outcome(st);
        if st == SUCCESS {
            // SAFETY: the new handle.
            unsafe { (hccl().destroy)(c) };
        }
        out
    })
}

#[test]
fn a_missing_or_garbage_root_info_is_refused() {
    let _s = serial();
    let zeros = RootInfo([0; 4108]);
    let res = init_each(2, &zeros, &[0, 1], |r| (2, r as u32));
    assert_all_failed(&res, E_PARA, &[&["missing root info"]]);
    let mut forged = root_info();
    forged.0[16] ^= 0x5a;
    let res = init_each(2, &forged, &[0, 1], |r| (2, r as u32));
    assert_all_failed(&res, E_PARA, &[&["missing root info"]]);
    // A root info forms one communicator only.
    let used = root_info();
    let ok = init_each(2, &used, &[0, 1], |r| (2, r as u32));
    assert!(ok.iter().all(|(c, _)| *c == SUCCESS), "{ok:?}");
    let res = init_each(2, &used, &[0, 1], |r| (2, r as u32));
    assert_all_failed(&res, E_PARA, &[&["already formed"]]);
    // NULL pointers.
    // SAFETY: NULL arguments are checked.
    assert_eq!(unsafe { (hccl().init)(2, null(), 0, null_mut()) }, E_PTR);
}

#[test]
fn a_duplicate_rank_id_fails_init_on_every_rank() {
    let _s = serial();
    let root = root_info();
    let res = init_each(3, &root, &[0, 1, 2], |r| (3, if r == 2 { 0 } else { r as u32 }));
    // The two ranks that joined first fail once the duplicate arrives, whatever the order.
    assert_all_failed(&res, E_PARA, &[&["joined twice"]]);
}

#[test]
fn mismatched_rank_counts_fail_init_on_every_rank() {
    let _s = serial();
    let root = root_info();
    let res = init_each(2, &root, &[0, 1], |r| (2 + r as u32, r as u32));
    assert_all_failed(&res, E_PARA, &[&["ranks but the ranks that joined before pass"]]);
}

#[test]
fn two_ranks_on_one_device_fail_init() {
    let _s = serial();
    let root = root_info();
    let res = init_each(2, &root, &[1, 1], |r| (2, r as u32));
    assert_all_failed(&res, E_PARA, &[&["both on device 1"]]);
}

#[test]
fn a_rank_id_out_of_range_fails_init_on_every_rank() {
    let _s = serial();
    let root = root_info();
    let res = init_each(2, &root, &[0, 1], |r| (2, if r == 1 { 2 } else { 0 }));
    assert_all_failed(&res, E_PARA, &[&["out of range"]]);
}

#[test]
fn init_without_a_device_fails() {
    let _s = serial();
    let root = root_info();
    let res = std::thread::spawn(move || {
        let mut c = null_mut();
        // SAFETY: a root info blob and an out-pointer.
        outcome(unsafe { (hccl().init)(1, &root, 0, &mut c) })
    })
    .join()
    .unwrap();
    assert_all_failed(&[res], E_PARA, &[&["no device is set"]]);
}

/// AlltoAllV on a fresh 2-rank communicator, each rank giving (sendCounts, sdispls, recvCounts,
/// rdispls) with 8-element send / receive buffers.
fn alltoallv_each(per_rank: impl Fn(usize) -> [[u64; 2]; 4] + Sync) -> Vec<(i32, String)> {
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let [sc, sd, rc, rd] = per_rank(r);
        let (send, recv) = (rk.out(32), rk.out(32));
        // SAFETY: host arrays of 2 entries; the emulator validates the device side.
        outcome(unsafe {
            (hccl().alltoallv)(
                send,
                sc.as_ptr() as *const c_void,
                sd.as_ptr() as *const c_void,
                FP32,
                recv,
                rc.as_ptr() as *const c_void,
                rd.as_ptr() as *const c_void,
                FP32,
                comms[r] as Comm,
                rk.stream,
            )
        })
    });
    destroy_all(&comms);
    res
}

#[test]
fn inconsistent_alltoallv_counts_fail_on_every_rank() {
    let _s = serial();
    // Rank 0 sends 2 elements to rank 1, which expects 3 from rank 0.
    let res =
        alltoallv_each(|r| if r == 0 { [[1, 2], [0, 1], [1, 1], [0, 1]] } else { [[1, 1], [0, 1], [3, 1], [0, 3]] });
    assert_all_failed(&res, E_PARA, &[&["do not pair up", "rank 0 sends 2", "rank 1 expects 3"]]);
}

#[test]
fn alltoallv_regions_outside_the_buffers_fail_on_every_rank() {
    let _s = serial();
    // Rank 1's receive region from rank 0 starts at element 6 and holds 4: past the 8 elements.
    let res =
        alltoallv_each(|r| if r == 0 { [[1, 4], [0, 1], [1, 1], [0, 1]] } else { [[1, 1], [0, 1], [4, 1], [6, 0]] });
    assert_all_failed(&res, E_PARA, &[&["rank 1", "receive region for rank 0", "run past the end"]]);
}

#[test]
fn a_rank_that_never_arrives_times_out_the_others() {
    let _s = serial();
    let comms = world(3);
    let _t = TimeoutGuard::set("0.5");
    let res = on_ranks(3, |r, rk| {
        if r == 2 {
            return (SUCCESS, String::new());
        }
        let (send, recv) = (rk.out(16), rk.out(16));
        // SAFETY: device buffers of 4 elements.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&res[..2], E_TIMEOUT, &[&["timed out", "ranks [2] never called it"]]);
    // The latecomer, and any later collective, gets the timeout too (the communicator is poisoned).
    let late = on_devices(&[2, 0], |i, rk| {
        let r = if i == 0 { 2 } else { 0 };
        let (send, recv) = (rk.out(16), rk.out(16));
        // SAFETY: device buffers of 4 elements.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&late, E_TIMEOUT, &[&["unusable after an earlier failure", "timed out"]]);
    destroy_all(&comms);
}

#[test]
fn a_rank_that_never_joins_times_out_init() {
    let _s = serial();
    let root = root_info();
    let _t = TimeoutGuard::set("0.5");
    let res = init_each(2, &root, &[0, 1], |r| (3, r as u32));
    assert_all_failed(&res, E_TIMEOUT, &[&["ranks [2] never joined"]]);
}

#[test]
fn a_failed_collective_poisons_the_communicator() {
    let _s = serial();
    let comms = world(2);
    let res = on_ranks(2, |r, rk| {
        let (send, recv) = (rk.out(64), rk.out(64));
        // SAFETY: device buffers of 64 bytes.
        let first = outcome(unsafe {
            (hccl().all_reduce)(send, recv, if r == 0 { 4 } else { 2 }, FP32, SUM, comms[r] as Comm, rk.stream)
        });
        assert_eq!(first.0, E_PARA);
        // A well-formed collective afterwards fails at once with the first failure.
        // SAFETY: as above.
        outcome(unsafe { (hccl().all_reduce)(send, recv, 4, FP32, SUM, comms[r] as Comm, rk.stream) })
    });
    assert_all_failed(&res, E_PARA, &[&["unusable after an earlier failure", "count differs"]]);
    destroy_all(&comms);
}

#[test]
fn sub_communicator_misuse_is_refused() {
    let _s = serial();
    let comms = world(3);
    // Members that disagree on rankIds fail together.
    let res = on_ranks(2, |r, _| {
        let ids = [[0u32, 1], [1, 2]][r];
        let (c, m, _) = split(comms[r], Some(&ids[..]), 3, 0, &mut comm_config(""));
        (c, m)
    });
    assert_all_failed(&res, E_PARA, &[&["passes rankIds"]]);
    // Refused before the rendezvous (every member errs alike, so nobody waits): rankIds not
    // ascending, subCommRankId not the caller's index, the caller not a member, a config that
    // HcclCommConfigInit did not initialise.
    let res = on_ranks(3, |r, _| {
        let mut out = vec![];
        let (c, m, _) = split(comms[r], Some(&[2, 1, 0][..]), 4, 2 - r as u32, &mut comm_config(""));
        out.push((c, m, "ascending"));
        let (c, m, _) = split(comms[r], Some(&[0, 1, 2][..]), 5, (r as u32 + 1) % 3, &mut comm_config(""));
        out.push((c, m, "is at index"));
        let others: Vec<u32> = (0..3).filter(|&o| o != r as u32).collect();
        let (c, m, _) = split(comms[r], Some(&others[..]), 6, 0, &mut comm_config(""));
        out.push((c, m, "does not contain the caller's rank"));
        let mut bad = comm_config("");
        bad[8] = 0;
        let (c, m, _) = split(comms[r], Some(&[0, 1, 2][..]), 7, r as u32, &mut bad);
        out.push((c, m, "HcclCommConfigInit"));
        out
    });
    for (r, outs) in res.iter().enumerate() {
        for (c, m, needle) in outs {
            assert_eq!(*c, E_PARA, "rank {r}: {m}");
            assert!(m.contains(needle), "rank {r}: {m:?} lacks {needle:?}");
        }
    }
    // Splitting a sub-communicator is not supported; members disagreeing on the name fail.
    let res = on_ranks(3, |r, _| {
        let (c, m, sub) = split(comms[r], Some(&[0, 1, 2][..]), 8, r as u32, &mut comm_config(""));
        assert_eq!(c, SUCCESS, "{m}");
        let (c2, m2, _) = split(sub, Some(&[0, 1, 2][..]), 9, r as u32, &mut comm_config(""));
        // SAFETY: the sub-communicator.
        assert_eq!(unsafe { (hccl().destroy)(sub as Comm) }, SUCCESS);
        let name = if r == 0 { "a" } else { "b" };
        let (c3, m3, _) = split(comms[r], Some(&[0, 1, 2][..]), 10, r as u32, &mut comm_config(name));
        [(c2, m2), (c3, m3)]
    });
    for (r, [(c2, m2), (c3, m3)]) in res.iter().enumerate() {
        assert_eq!(*c2, E_NOT_SUPPORT, "rank {r}: {m2}");
        assert!(m2.contains("sub-communicator"), "{m2}");
        assert_eq!(*c3, E_PARA, "rank {r}: {m3}");
        assert!(m3.contains("asks for the name"), "{m3}");
    }
    destroy_all(&comms);
}
