//! Host memory of the emulated Ascend runtime stays bounded however many operators a process
//! launches. The emulator used to keep every destroyed object, and every executor its launch
//! released, with everything it held (the kernel closure, the operand descriptions): about
//! 2.5 MB per decode step of the `official` fixture, never given back, which made the
//! emulator suites grow to tens of GB. Now it keeps a small record of the last 65536 destroyed
//! objects only (use after destroy is still reported, whatever the age of the handle).
//!
//! RSS is process-wide, so the tests of this binary take turns.

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use dsv4_ascend_sys::*;
use dsv4_core::kv::KvDtype;
use dsv4_core::model::Logits;
use dsv4_core::{Backend, Batch, Checkpoint, Model, ModelConfig};
use dsv4_tests::raw_acl::{api, malloc, recent_error as msg, tensor};
use dsv4_tests::{fixtures_dir, kv_config, read_reference};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// VmRSS of this process, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

const MB: usize = 1 << 20;

/// One-token decode steps of the `official` fixture on the emulated device: after a warm-up,
/// 60 more steps add well under 40 MB of host memory (the executor cache and the KV pool still
/// grow a little; before the fix: about 150 MB).
#[test]
fn decoding_on_the_emulator_does_not_accumulate_host_memory() {
    let _turn = serial();
    dsv4_tests::use_ascend_emulator();
    let case = fixtures_dir().join("official");
    let cfg = ModelConfig::from_dir(&case).unwrap();
    let ckpt = Checkpoint::open(&case).unwrap();
    let (warm, measured) = (10, 60);
    let ids: Vec<u32> = read_reference(&case).input_ids.into_iter().cycle().take(warm + measured).collect();
    let be = dsv4_backend_ascend::open(0).unwrap();
    let model = Model::load(&be, cfg, &ckpt, &mut |_, _, _| {}).unwrap();
    let mut cache = model.new_cache(&be, kv_config(&model.cfg, KvDtype::F32, 1, ids.len(), 1)).unwrap();
    let mut seq = cache.new_sequence();
    let mut before = 0;
    for pos in 0..ids.len() {
        if pos == warm {
            before = rss();
        }
        let b = Batch::new(&[(&ids[pos..pos + 1], pos)]).unwrap();
        let logits = model.step(&be, &b, &mut cache, &mut [&mut seq], Logits::All).unwrap();
        assert!(be.download(&logits).unwrap().iter().all(|v| v.is_finite()));
    }
    let grown = rss().saturating_sub(before);
    eprintln!("{measured} decode steps: host memory +{:.1} MB", grown as f64 / MB as f64);
    assert!(grown < 40 * MB, "{measured} decode steps grew the host memory by {} MB", grown / MB);
}

/// 50 000 single-use executors planned, launched and released, with their tensors and
/// scalars destroyed, hold on to well under 16 MB (before the fix: every one was kept, over
/// 50 MB); a handle destroyed long before is still reported as destroyed.
#[test]
fn destroyed_objects_and_launched_executors_are_not_kept() {
    let _turn = serial();
    let api = api();
    let mut s = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { api.aclrtCreateStream().unwrap()(&mut s) }, ACL_SUCCESS, "{}", msg(api));
    let f = aclDataType::ACL_FLOAT;
    let (p, q) = (malloc(api, 4096), malloc(api, 4096));
    let first = tensor(api, p, &[1024], f);
    // SAFETY: a live tensor of ours.
    assert_eq!(unsafe { api.aclDestroyTensor().unwrap()(first) }, ACLNN_SUCCESS, "{}", msg(api));
    let round = |n: usize| {
        for i in 0..n {
            let (x, out) = (tensor(api, p, &[1024], f), tensor(api, q, &[1024], f));
            let mut two = 2.0f32;
            // SAFETY: a live f32; live objects and out-pointers; then our objects, each
            // destroyed once after the launch (the queued kernel keeps what it needs).
            unsafe {
                let k = api.aclCreateScalar().unwrap()(&mut two as *mut f32 as *mut c_void, f);
                let (mut ws, mut ex) = (0u64, null_mut());
                let st = api.aclnnMulsGetWorkspaceSize().unwrap()(x, k, out, &mut ws, &mut ex);
                assert_eq!(st, ACLNN_SUCCESS, "{}", msg(api));
                assert_eq!(ws, 0);
                assert_eq!(api.aclnnMuls().unwrap()(null_mut(), 0, ex, s), ACLNN_SUCCESS, "{}", msg(api));
                assert_eq!(api.aclDestroyScalar().unwrap()(k), ACLNN_SUCCESS, "{}", msg(api));
                assert_eq!(api.aclDestroyTensor().unwrap()(x), ACLNN_SUCCESS, "{}", msg(api));
                assert_eq!(api.aclDestroyTensor().unwrap()(out), ACLNN_SUCCESS, "{}", msg(api));
                if i % 1000 == 999 {
                    assert_eq!(api.aclrtSynchronizeStream().unwrap()(s), ACL_SUCCESS, "{}", msg(api));
                }
            }
        }
    };
    // Enough to fill the emulator's records of destroyed objects (and their table).
    round(70_000);
    let before = rss();
    round(50_000);
    let grown = rss().saturating_sub(before);
    eprintln!("50 000 launches: host memory +{:.1} MB", grown as f64 / MB as f64);
    assert!(grown < 16 * MB, "50 000 launches grew the host memory by {} MB", grown / MB);
    // SAFETY: a handle destroyed 480 000 objects ago (long forgotten); the emulator validates it.
    assert_eq!(unsafe { api.aclDestroyTensor().unwrap()(first) }, ACLNN_ERR_PARAM_INVALID);
    assert!(msg(api).contains("double destroy"), "{}", msg(api));
    // SAFETY: our stream, drained.
    unsafe {
        assert_eq!(api.aclrtSynchronizeStream().unwrap()(s), ACL_SUCCESS, "{}", msg(api));
        assert_eq!(api.aclrtDestroyStream().unwrap()(s), ACL_SUCCESS, "{}", msg(api));
    }
}
