//! `Device::launch`: the checks a real launch would fail (or, worse, not fail) on, then the
//! marshalling into CUDA-style kernelParams and the run.
//!
//! Checked, each with an error naming the kernel and the argument: the kernel exists; the
//! argument count is its parameter count; `KernelArg::In` goes to a `const T*`, `Out` to a
//! `T*`, `I32`/`U32` to `int`/`unsigned int`, `F32` to `float`, `I64` to `long long`; buffer
//! offsets lie inside their buffer and are aligned for the pointee; the launch shape is within
//! CUDA's limits. After the run, a write outside any buffer argument (its guards) is an error.

use dsv4_backend_cuda::{KernelArg, LaunchConfig};
use dsv4_core::error::{Error, Result};

use crate::buffer::EmuBuffer;
use crate::ffi::{self, ArgValue, KernelInfo, ParamKind};

fn err(msg: String) -> Error {
    Error::backend("cuda", msg)
}

fn check_config(name: &str, c: &LaunchConfig) -> Result<()> {
    let (bx, by, bz) = c.block;
    let (gx, gy, gz) = c.grid;
    let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
    if bx == 0 || by == 0 || bz == 0 || threads > 1024 || bx > 1024 || by > 1024 || bz > 64 {
        return Err(err(format!(
            "kernel `{name}`: block {:?} ({threads} threads): each dimension must be at least 1 (z at most 64) and a \
             block has 1 to 1024 threads",
            c.block
        )));
    }
    if gx == 0 || gy == 0 || gz == 0 || gx > 0x7fff_ffff || gy > 65535 || gz > 65535 {
        return Err(err(format!(
            "kernel `{name}`: grid {:?}: each dimension must be at least 1 (x below 2^31, y and z at most 65535)",
            c.grid
        )));
    }
    if c.shared_bytes > 48 * 1024 {
        return Err(err(format!(
            "kernel `{name}`: {} bytes of dynamic shared memory; at most 49152 (48 KiB) without an opt-in",
            c.shared_bytes
        )));
    }
    Ok(())
}

fn signature(k: &KernelInfo) -> String {
    let types: Vec<&str> = k.params.iter().map(|p| p.type_name).collect();
    format!("{}({})", k.name, types.join(", "))
}

/// The `KernelArg`s a parameter of kind `kind` takes.
fn expected(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Pointer { pointee_const: true, .. } => "KernelArg::In",
        ParamKind::Pointer { pointee_const: false, .. } => "KernelArg::Out",
        ParamKind::Int => "KernelArg::I32 or KernelArg::U32",
        ParamKind::LongLong => "KernelArg::I64",
        ParamKind::Float => "KernelArg::F32",
    }
}

/// The value for parameter `i` of `k`, or why `arg` cannot be passed to it.
fn marshal(k: &KernelInfo, i: usize, arg: &KernelArg<'_, EmuBuffer>) -> Result<ArgValue> {
    let p = &k.params[i];
    let what = |a: &str| {
        format!("kernel `{}` ({}): argument {i} ({a}) for parameter {i} of type `{}`", k.name, k.file, p.type_name)
    };
    let buffer = |buf: &EmuBuffer, offset: usize, writes: bool, a: &str| -> Result<ArgValue> {
        let ParamKind::Pointer { pointee_const, pointee_align } = p.kind else {
            return Err(err(format!("{}: a buffer for a parameter that is not a pointer", what(a))));
        };
        if writes && pointee_const {
            return Err(err(format!(
                "{}: KernelArg::Out for a pointer to const, which the kernel cannot write; pass KernelArg::In",
                what(a)
            )));
        }
        if !writes && !pointee_const {
            return Err(err(format!(
                "{}: KernelArg::In for a pointer to non-const, which the kernel may write; pass KernelArg::Out, or \
                 declare the parameter `const`",
                what(a)
            )));
        }
        if offset > buf.len() {
            return Err(err(format!(
                "{}: byte offset {offset} is past the end of its buffer of {} bytes",
                what(a),
                buf.len()
            )));
        }
        if !offset.is_multiple_of(pointee_align) {
            return Err(err(format!(
                "{}: byte offset {offset} is not a multiple of the pointee's alignment {pointee_align}",
                what(a)
            )));
        }
        Ok(ArgValue { ptr: buf.addr(offset).cast() })
    };
    let scalar = |want: ParamKind, a: &str, v: ArgValue| -> Result<ArgValue> {
        if p.kind == want {
            Ok(v)
        } else {
            Err(err(format!("{}: pass {} for it", what(a), expected(p.kind))))
        }
    };
    match *arg {
        KernelArg::In(buf, offset) => buffer(buf, offset, false, "KernelArg::In"),
        KernelArg::Out(buf, offset) => buffer(buf, offset, true, "KernelArg::Out"),
        KernelArg::I32(v) => scalar(ParamKind::Int, "KernelArg::I32", ArgValue { i32: v }),
        KernelArg::U32(v) => scalar(ParamKind::Int, "KernelArg::U32", ArgValue { u32: v }),
        KernelArg::I64(v) => scalar(ParamKind::LongLong, "KernelArg::I64", ArgValue { i64: v }),
        KernelArg::F32(v) => scalar(ParamKind::Float, "KernelArg::F32", ArgValue { f32: v }),
    }
}

/// Checks and runs one launch on this thread (the caller holds the device's stream).
pub(crate) fn launch(name: &str, config: &LaunchConfig, args: &[KernelArg<'_, EmuBuffer>]) -> Result<()> {
    let k = ffi::kernel(name).ok_or_else(|| {
        err(format!(
            "unknown kernel `{name}`: no `extern \"C\" __global__ void {name}(...)` in backend-cuda/kernels/*.cu \
             (as listed by kernels::SOURCES)"
        ))
    })?;
    check_config(name, config)?;
    if args.len() != k.params.len() {
        return Err(err(format!(
            "kernel `{name}` ({}): {} argument(s) given for {} parameter(s): {}",
            k.file,
            args.len(),
            k.params.len(),
            signature(k)
        )));
    }
    let mut values = args.iter().enumerate().map(|(i, a)| marshal(k, i, a)).collect::<Result<Vec<_>>>()?;

    let (gx, gy, gz) = config.grid;
    let (bx, by, bz) = config.block;
    let run = ffi::run(k, &mut values, [gx, gy, gz], [bx, by, bz], config.shared_bytes);

    // Guards of every buffer argument, whether or not the run failed.
    let mut damaged = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if let KernelArg::In(buf, _) | KernelArg::Out(buf, _) = a {
            if args[..i].iter().any(|b| matches!(b, KernelArg::In(x, _) | KernelArg::Out(x, _) if x.same(buf))) {
                continue;
            }
            let (front, back) = buf.guard_damage();
            if front > 0 || back > 0 {
                let mut how = Vec::new();
                if front > 0 {
                    how.push(format!("up to {front} byte(s) before its start"));
                }
                if back > 0 {
                    how.push(format!("up to {back} byte(s) past its end"));
                }
                damaged.push(format!(
                    "argument {i} (a buffer of {} bytes) was written {}",
                    buf.len(),
                    how.join(" and ")
                ));
                buf.restore_guards();
            }
        }
    }
    run.map_err(|msg| err(format!("emulated launch failed: {msg}")))?;
    if !damaged.is_empty() {
        return Err(err(format!("kernel `{name}` wrote outside its buffers: {}", damaged.join("; "))));
    }
    Ok(())
}
