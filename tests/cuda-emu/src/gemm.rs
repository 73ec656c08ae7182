//! `Device::gemm` on the host: the batched, strided, row-major product that the real device
//! hands to cuBLAS, exactly as `dsv4_backend_cuda::Gemm` documents it, with every operand's
//! range checked against its buffer first. Products are summed in f64 and rounded once to f32
//! (cuBLAS sums in f32 in an unspecified order; the backend's tolerances cover both).

use dsv4_backend_cuda::{Gemm, GemmType};
use dsv4_core::error::{Error, Result};

use crate::buffer::EmuBuffer;

fn err(msg: String) -> Error {
    Error::backend("cuda", format!("emulated gemm: {msg}"))
}

/// The bytes an operand occupies over the whole batch: `[start, end)` of its buffer, or None
/// when it has no element.
fn span(
    what: &str,
    buf: &EmuBuffer,
    elem: usize,
    offset: usize,
    stride: usize,
    batch: usize,
    elems: usize,
) -> Result<Option<(usize, usize)>> {
    if elems == 0 {
        return Ok(None);
    }
    let last = stride
        .checked_mul(batch - 1)
        .and_then(|s| s.checked_add(offset))
        .and_then(|s| s.checked_add(elems))
        .and_then(|e| e.checked_mul(elem));
    match last {
        Some(end) if end <= buf.len() => Ok(Some((offset * elem, end))),
        _ => Err(err(format!(
            "{what}: offset {offset} + stride {stride} × {} + {elems} elements of {elem} bytes run past its buffer of {} \
             bytes",
            batch - 1,
            buf.len()
        ))),
    }
}

fn overlaps(x: Option<(usize, usize)>, y: Option<(usize, usize)>) -> bool {
    matches!((x, y), (Some((a0, a1)), Some((b0, b1))) if a0 < b1 && b0 < a1)
}

/// `count` elements of type `ty` at element `offset` of `buf`, widened to f32.
fn load(buf: &EmuBuffer, ty: GemmType, offset: usize, count: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; count * ty.bytes()];
    buf.read_into(offset * ty.bytes(), &mut bytes);
    match ty {
        GemmType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        GemmType::Bf16 => {
            bytes.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
        }
    }
}

pub(crate) fn gemm(g: &Gemm, a: &EmuBuffer, b: &EmuBuffer, c: &EmuBuffer) -> Result<()> {
    let Gemm {
        batch,
        m,
        n,
        k,
        transpose_b,
        a_type,
        b_type,
        a_offset,
        b_offset,
        c_offset,
        stride_a,
        stride_b,
        stride_c,
    } = *g;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let mk = m.checked_mul(k).ok_or_else(|| err(format!("m {m} × k {k} overflows")))?;
    let kn = k.checked_mul(n).ok_or_else(|| err(format!("k {k} × n {n} overflows")))?;
    let mn = m.checked_mul(n).ok_or_else(|| err(format!("m {m} × n {n} overflows")))?;
    if batch > 1 && stride_c < mn {
        return Err(err(format!(
            "stride_c {stride_c} is less than m × n = {mn} with a batch of {batch}: the batches' results would \
             overlap"
        )));
    }
    let sa = span("A", a, a_type.bytes(), a_offset, stride_a, batch, mk)?;
    let sb = span("B", b, b_type.bytes(), b_offset, stride_b, batch, kn)?;
    let sc = span("C", c, 4, c_offset, stride_c, batch, mn)?;
    if c.same(a) && overlaps(sc, sa) {
        return Err(err("C overlaps A in the same buffer".into()));
    }
    if c.same(b) && overlaps(sc, sb) {
        return Err(err("C overlaps B in the same buffer".into()));
    }

    let mut out = vec![0f32; mn];
    for i in 0..batch {
        let av = load(a, a_type, a_offset + i * stride_a, mk);
        let bv = load(b, b_type, b_offset + i * stride_b, kn);
        // B as [n, k] rows so that every dot product reads both operands contiguously.
        let bt: Vec<f32> = if transpose_b {
            bv
        } else {
            let mut t = vec![0f32; kn];
            for kk in 0..k {
                for j in 0..n {
                    t[j * k + kk] = bv[kk * n + j];
                }
            }
            t
        };
        for r in 0..m {
            let arow = &av[r * k..(r + 1) * k];
            for (j, o) in out[r * n..(r + 1) * n].iter_mut().enumerate() {
                let brow = &bt[j * k..(j + 1) * k];
                *o = arow.iter().zip(brow).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>() as f32;
            }
        }
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        c.write_from((c_offset + i * stride_c) * 4, &bytes);
    }
    Ok(())
}
