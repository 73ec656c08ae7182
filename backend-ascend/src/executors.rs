//! Reusable aclnn executors. GetWorkspaceSize does the host-side validation and tiling of an
//! operator (about 200 µs per call in published profiles); for a decode step that repeats the
//! same shapes every token, that is most of the host time. CANN lets an executor be kept
//! (`aclSetAclOpExecutorRepeatable`) and relaunched with new device addresses
//! (`aclSetInputTensorAddr` / `aclSetOutputTensorAddr`) as long as everything else is
//! unchanged, so executors are cached per operator, operand layout (dtype, shape, strides,
//! offset, storage size) and attributes, and the cache owns the `aclTensor`s they were planned
//! with (the address setters name them).
//!
//! Only operators whose arguments are tensors, `aclScalar`s (their values are part of the key
//! and the cache owns them) and plain attributes use the cache (no tensor lists), whose inputs are contiguous or a transposed matrix (the docs
//! exclude operators that copy internally), and every parameter gets its own `aclTensor`, so
//! "input i" is unambiguous. Set `DSV4_ASCEND_EXECUTOR_CACHE=off` to plan every call afresh.
//! Assumed, not verified on hardware: the docs do not say whether a relaunch may use a
//! different workspace address than the first launch; dsv4 passes a fresh pooled workspace of
//! the planned size.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::Arc;

use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::{aclOpExecutor, aclnnStatus, Api};
use dsv4_core::error::Result;

use crate::acl::{check, err, AclScalar, AclTensor, Device, TensorLayout};

/// Turns the executor cache off (`off`); on by default where the runtime has the API.
pub const EXECUTOR_CACHE_VAR: &str = "DSV4_ASCEND_EXECUTOR_CACHE";

/// Executors kept; beyond this the cache is emptied (after draining the stream).
const CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    op: &'static str,
    inputs: Vec<TensorLayout>,
    outputs: Vec<TensorLayout>,
    scalars: Vec<(i32, u64)>,
    attrs: Vec<i64>,
}

struct Cached {
    exec: *mut aclOpExecutor,
    workspace: u64,
    inputs: Vec<AclTensor>,
    outputs: Vec<AclTensor>,
    /// Kept alive with the executor, which refers to them.
    _scalars: Vec<AclScalar>,
}

pub(crate) struct ExecutorCache {
    api: &'static Api,
    enabled: bool,
    map: HashMap<Key, Cached>,
    pub hits: u64,
    pub misses: u64,
}

/// The symbols the cache needs.
const SYMBOLS: &[&str] =
    &["aclSetAclOpExecutorRepeatable", "aclSetInputTensorAddr", "aclSetOutputTensorAddr", "aclDestroyAclOpExecutor"];

impl ExecutorCache {
    pub fn new(api: &'static Api) -> ExecutorCache {
        let off = std::env::var(EXECUTOR_CACHE_VAR).is_ok_and(|v| v.trim() == "off");
        let enabled = !off && SYMBOLS.iter().all(|s| api.has(s));
        ExecutorCache { api, enabled, map: HashMap::new(), hits: 0, misses: 0 }
    }

    /// Destroys every cached executor (the caller has drained the stream).
    pub fn clear(&mut self) {
        if let Ok(destroy) = self.api.aclDestroyAclOpExecutor() {
            for (_, c) in self.map.drain() {
                // SAFETY: a repeatable executor this cache created and owns; no queued launch
                // uses it any more (the stream was drained).
                unsafe { destroy(c.exec) };
            }
        }
    }
}

/// The planning half of an operator over the given input and output tensors and scalars.
pub(crate) type Plan<'a> = dyn FnOnce(
        &[AclTensor],
        &[AclTensor],
        &[AclScalar],
        *mut u64,
        *mut *mut aclOpExecutor,
    ) -> std::result::Result<aclnnStatus, sys::MissingSymbol>
    + 'a;

impl Device {
    /// [`Device::call`] through the executor cache. `inputs` and `outputs` are the operator's
    /// tensor parameters in order (one `aclTensor` each), `scalars` its `aclScalar`s, `attrs`
    /// every other argument's value; `plan` calls GetWorkspaceSize with them.
    #[allow(clippy::too_many_arguments)]
    pub fn call_cached(
        self: &Arc<Self>,
        op: &'static str,
        launch: std::result::Result<sys::pfn::aclnnAdd, sys::MissingSymbol>,
        inputs: Vec<AclTensor>,
        outputs: Vec<AclTensor>,
        scalars: Vec<AclScalar>,
        attrs: &[i64],
        plan: Box<Plan<'_>>,
    ) -> Result<()> {
        let mut cache = self.executors.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.enabled {
            drop(cache);
            return self.call(op, launch, |ws, ex| plan(&inputs, &outputs, &scalars, ws, ex));
        }
        self.enter()?;
        let launch = launch.map_err(|e| err(e.to_string()))?;
        let key = Key {
            op,
            inputs: inputs.iter().map(|t| t.layout.clone()).collect(),
            outputs: outputs.iter().map(|t| t.layout.clone()).collect(),
            scalars: scalars.iter().map(|s| s.key).collect(),
            attrs: attrs.to_vec(),
        };
        let api = self.api;
        if let Some(c) = cache.map.get(&key) {
            let set_in = api.aclSetInputTensorAddr().map_err(|e| err(e.to_string()))?;
            let set_out = api.aclSetOutputTensorAddr().map_err(|e| err(e.to_string()))?;
            for (i, (mine, now)) in c.inputs.iter().zip(&inputs).enumerate() {
                // SAFETY: our repeatable executor, the aclTensor it was planned with at input i,
                // and a live device address (32-byte aligned: pool blocks are).
                check(api, "aclSetInputTensorAddr", unsafe { set_in(c.exec, i, mine.ptr(), now.addr as *mut c_void) })?;
            }
            for (i, (mine, now)) in c.outputs.iter().zip(&outputs).enumerate() {
                // SAFETY: as above, for output i.
                check(api, "aclSetOutputTensorAddr", unsafe {
                    set_out(c.exec, i, mine.ptr(), now.addr as *mut c_void)
                })?;
            }
            let (exec, size) = (c.exec, c.workspace);
            let workspace = (size > 0).then(|| self.alloc(size as usize)).transpose()?;
            cache.hits += 1;
            let ws_ptr = workspace.as_ref().map_or(null_mut(), |b| b.ptr as *mut c_void);
            // SAFETY: the cached executor, a workspace of the planned size (or NULL when it
            // needs none), our live stream; the cache lock keeps other threads off it.
            return check(api, op, unsafe { launch(ws_ptr, size, exec, self.stream) });
        }

        let mut size = 0u64;
        let mut exec: *mut aclOpExecutor = null_mut();
        let status = plan(&inputs, &outputs, &scalars, &mut size, &mut exec).map_err(|e| err(e.to_string()))?;
        check(api, &format!("{op}GetWorkspaceSize"), status)?;
        let repeatable = api.aclSetAclOpExecutorRepeatable().map_err(|e| err(e.to_string()))?;
        // SAFETY: the executor just planned, not yet launched.
        let reusable = unsafe { repeatable(exec) } == 0;
        let workspace = match (size > 0).then(|| self.alloc(size as usize)).transpose() {
            Ok(w) => w,
            Err(e) => {
                if let Ok(destroy) = api.aclDestroyAclOpExecutor() {
                    // SAFETY: planned and never launched; ours to destroy.
                    unsafe { destroy(exec) };
                }
                return Err(e);
            }
        };
        let ws_ptr = workspace.as_ref().map_or(null_mut(), |b| b.ptr as *mut c_void);
        // SAFETY: the executor just planned, a workspace of the size it asked for, our stream.
        let launched = check(api, op, unsafe { launch(ws_ptr, size, exec, self.stream) });
        if !reusable {
            // A single-use executor (released by its launch).
            return launched;
        }
        if let Err(e) = launched {
            if let Ok(destroy) = api.aclDestroyAclOpExecutor() {
                // SAFETY: a repeatable executor whose launch failed; nobody else holds it.
                unsafe { destroy(exec) };
            }
            return Err(e);
        }
        cache.misses += 1;
        if cache.map.len() >= CAPACITY {
            // Drain with the lock held (synchronize takes no cache lock), so no other thread
            // relaunches an executor that is about to be destroyed.
            if let Err(e) = self.synchronize() {
                if let Ok(destroy) = api.aclDestroyAclOpExecutor() {
                    // SAFETY: our repeatable executor, not in the cache; the stream failed.
                    unsafe { destroy(exec) };
                }
                return Err(e);
            }
            cache.clear();
        }
        cache.map.insert(key, Cached { exec, workspace: size, inputs, outputs, _scalars: scalars });
        Ok(())
    }

    /// (hits, misses) of the executor cache; None when it is off.
    pub fn executor_stats(&self) -> Option<(u64, u64)> {
        let c = self.executors.lock().unwrap_or_else(|p| p.into_inner());
        c.enabled.then_some((c.hits, c.misses))
    }
}

// SAFETY: the executor pointers are only used under the Device's mutex, through ACL calls.
unsafe impl Send for ExecutorCache {}
