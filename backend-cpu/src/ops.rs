//! `Backend` for the CPU: every primitive, on contiguous f32 buffers.

use std::mem::MaybeUninit;
use std::sync::Arc;

use dsv4_core::act_quant::{fake_quant_row, hadamard_row};
use dsv4_core::backend::{
    composed, Backend, BinaryOp, DeviceTensor, ExpertWeights, FakeQuant, ReduceOp, RowFormat, UnaryOp,
};
use dsv4_core::backend_checks::{self as checks, IndexBounds};
use dsv4_core::error::{Error, Result};
use dsv4_core::precision::Precision;
use dsv4_core::tensor::StoredWeight;
use ndarray::{s, ArrayView2, ArrayView3, ArrayViewD, Axis, IxDyn, Zip};

use crate::kernels::weights::dot_many;
use crate::kernels::Isa;
use crate::kernels::{amx, bf16_gemm, fp4_bf16, mhc, norm, round};
use crate::moe::{expert_ffns, FfnJob};
use crate::pool::CpuPool;
use crate::storage::{CpuIndex, CpuTensor, CpuWeight, DEQUANTIZE_ENV};
use crate::{par, CpuBackend};

/// The granularity of weight-row blocks of parallel tasks: a task's rows are a multiple of it
/// ([`gemv_rows_per_task`], [`prefill_rows_per_task`], `moe.rs`).
pub(crate) const ROW_BLOCK: usize = 64;

fn err(msg: impl Into<String>) -> Error {
    Error::backend("cpu", msg)
}

/// The bounds of an index's values, for the range checks of `dsv4_core::backend_checks`.
fn bounds(idx: &CpuIndex) -> Option<IndexBounds> {
    IndexBounds::of(&idx.data)
}

fn owned(view: ArrayViewD<'_, f32>) -> CpuTensor {
    let shape = view.shape().to_vec();
    let data = view.as_standard_layout().into_owned().into_raw_vec_and_offset().0;
    CpuTensor::new(shape, data)
}

/// Inputs with at most this many rows take the GEMV path in `linear_block`.
const GEMV_MAX_ROWS: usize = 8;

/// Weight rows per parallel task of a GEMV: for a matrix of at least two [`ROW_BLOCK`]s per
/// thread, about 8 tasks per thread (enough to even out a thread that starts late), in whole
/// [`ROW_BLOCK`]s. Fewer, larger tasks than prefill's: each task pays a set-up (checking and
/// folding the input, see `kernels::fp8_fold`) that a GEMV's few multiply-adds per weight row
/// do not hide in 64-row tasks. A smaller matrix (mHC's `[24, 4 · hidden]` mixing weights, the
/// router) is split evenly over the threads instead of going whole to one of them.
fn gemv_rows_per_task(rows: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    if rows < 2 * ROW_BLOCK * threads {
        return rows.div_ceil(threads).next_multiple_of(2).max(1);
    }
    rows.div_ceil(8 * threads).div_ceil(ROW_BLOCK) * ROW_BLOCK
}

/// Input rows per parallel task of a matrix product whose weight is a single task's rows
/// ([`prefill_rows_per_task`]): enough rows for the GEMM's 8-row tiles to stream well, few
/// enough that a 512-token prefill makes four tasks. The last piece takes the remainder
/// ([`input_pieces`]).
const PREFILL_INPUT_ROWS_PER_TASK: usize = 128;

/// The pieces `m` input rows are cut into for a weight of one task's rows: `(first row, rows)`,
/// every piece [`PREFILL_INPUT_ROWS_PER_TASK`] rows but the last, which takes the remainder
/// (128 to 255 rows); one piece for fewer than 256 rows. Each piece is more than 64 rows, so
/// it takes the same GEMM path as the whole would (never the GEMV of 8 rows or fewer, never the
/// `gemm` crate's other k-blocking for 64 rows or fewer), and the cuts depend on `m` alone.
fn input_pieces(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let pieces = (m / PREFILL_INPUT_ROWS_PER_TASK).max(1);
    (0..pieces).map(move |p| {
        let first = p * PREFILL_INPUT_ROWS_PER_TASK;
        (first, if p + 1 == pieces { m - first } else { PREFILL_INPUT_ROWS_PER_TASK })
    })
}

/// Interleaved-pair RoPE (`Backend::rope`) of token `ti`'s heads `tok` (`d` values each, the
/// trailing `2·half` rotated by the angles of row `ti` of `cos` and `sin`), in place.
fn rope_token(tok: &mut [f32], d: usize, cos: &CpuTensor, sin: &CpuTensor, ti: usize, half: usize, inverse: bool) {
    let sign = if inverse { -1.0f32 } else { 1.0 };
    let (c, s) = (&cos.data[ti * half..(ti + 1) * half], &sin.data[ti * half..(ti + 1) * half]);
    for head in tok.chunks_mut(d.max(1)) {
        let rope = &mut head[d - 2 * half..];
        for i in 0..half {
            let (e, o) = (rope[2 * i], rope[2 * i + 1]);
            let si = sign * s[i];
            rope[2 * i] = e * c[i] - o * si;
            rope[2 * i + 1] = o * c[i] + e * si;
        }
    }
}

/// Weight rows per parallel task of a matrix product of many input rows (prefill): a quarter
/// of the matrix, in whole [`ROW_BLOCK`]s, between [`ROW_BLOCK`] and [`PREFILL_ROWS_PER_TASK`]
/// (so a matrix of up to 256 rows keeps its 64-row tasks, and any matrix at least four tasks
/// or 256-row ones). A function of the matrix's row count alone, never of the thread count or
/// of other matrices: a GEMM's bits depend on its shape (the `gemm` crate's blocking), so
/// `linear` and the fused expert FFNs (`moe.rs`) must cut a matrix the same way on every
/// machine to give the same results.
pub(crate) fn prefill_rows_per_task(rows: usize) -> usize {
    let most = (rows / 4).next_multiple_of(ROW_BLOCK).clamp(ROW_BLOCK, PREFILL_ROWS_PER_TASK);
    rows.div_ceil(rows.div_ceil(most).max(1)).next_multiple_of(ROW_BLOCK).max(ROW_BLOCK)
}

/// The largest block of weight rows one prefill GEMM takes ([`prefill_rows_per_task`]). Each
/// block packs the input afresh: in 64-row blocks the routed experts of a 512-token chunk of
/// the 0.75 B benchmark model (about 96 tokens an expert) spent a tenth of their time packing;
/// 128-row blocks (what their 512-row matrices get) made them about 10% faster, 256-row ones
/// 5-15% (f32) and 15% (bf16) (`tests/moe_bench.rs`, 2 threads). Larger blocks also mean fewer
/// tasks: measured on 2 threads only.
const PREFILL_ROWS_PER_TASK: usize = 256;

/// `y[m, n] = Σ_k x[m, k] · w[n, k]` for a block of weight rows, f32 accumulation.
///
/// Few input rows (decode): [`dot_many`] reads each weight row once, in its stored form, and
/// decodes it in registers for every input row; its summation order is the same on every
/// instruction set, and the same for a packed weight and its dequantised-at-load copy. The
/// exception: one BF16 input row (`x_bf16`) on an FP4 weight with E8M0 scales goes through
/// [`fp4_bf16`] where the CPU has AVX512-BF16 and uses it ([`bf16_gemm::chosen`]; exact
/// products, another summation order).
/// Many input rows (prefill): the block is widened once (exactly) and multiplied by
/// [`crate::gemm::matmul_nt_weights`] (the AVX-512 or AVX2 kernel, or the `gemm` crate);
/// when the input holds BF16 values only (`x_bf16`, the `bf16` precision) and the widened rows
/// are BF16 values too (BF16 weights, FP8/FP4 times power-of-two scales), by a BF16 GEMM
/// ([`crate::kernels::amx`] on AMX tiles where the CPU has them, else
/// [`crate::kernels::bf16_gemm`] where chosen: exact products, f32 accumulation, another
/// summation order).
///
/// The widened rows (and `dot_many`'s transposed outputs) go to a buffer kept per thread
/// ([`SCRATCH`]): a new zeroed buffer per block cost its allocation and a `memset` of up to
/// `n · k` values that the widening overwrites anyway (about 2% of a 2048-token prefill of the
/// 0.75 B benchmark model in `perf`).
pub(crate) fn linear_block(
    x: ArrayView2<'_, f32>,
    x_bf16: bool,
    w: &CpuWeight,
    start: usize,
    n: usize,
) -> ndarray::Array2<f32> {
    // Taken out of the cell for the call: a nested call (none today) would find it empty and
    // use a buffer of its own, never a borrow error.
    let mut scratch = SCRATCH.take();
    let y = linear_block_with(x, x_bf16, w, start, n, &mut scratch);
    if scratch.capacity() <= SCRATCH_KEPT_VALUES {
        SCRATCH.set(scratch);
    }
    y
}

/// An expert's `w1` and `w3` rows `start..start + n` applied to the same input rows: what
/// [`gate_up_block`] gives.
pub(crate) enum GateUp {
    /// `[m, 2n]`: each input row's `n` w1 outputs, then its `n` w3 outputs.
    Joint(ndarray::Array2<f32>),
    /// `[m, n]` each: w1's outputs, w3's outputs.
    Apart(ndarray::Array2<f32>, ndarray::Array2<f32>),
}

impl GateUp {
    /// Input row `i`'s `n` w1 (gate) and `n` w3 (up) outputs.
    pub(crate) fn row(&self, i: usize, n: usize) -> (&[f32], &[f32]) {
        match self {
            GateUp::Joint(y) => y.as_slice().expect("standard layout")[i * 2 * n..(i + 1) * 2 * n].split_at(n),
            GateUp::Apart(g, u) => (
                &g.as_slice().expect("standard layout")[i * n..(i + 1) * n],
                &u.as_slice().expect("standard layout")[i * n..(i + 1) * n],
            ),
        }
    }
}

/// [`linear_block`] of `w1` and of `w3` (rows `start..start + n` of each) on the same input
/// rows, with the same bits. Where the f32 kernel widens the packed weights itself (a routed
/// expert's tokens in a prefill: [`widened_product`]), both blocks are one product of `2n`
/// weight rows, so the input rows are packed into the kernel's panels once instead of twice
/// (the packing, a strided transposing read, was about a tenth of the routed experts' kernel
/// time in `tests/moe_bench.rs`); each output is the same FMA chain either way. Elsewhere, two
/// [`linear_block`] calls.
pub(crate) fn gate_up_block(
    x: ArrayView2<'_, f32>,
    x_bf16: bool,
    w1: &CpuWeight,
    w3: &CpuWeight,
    start: usize,
    n: usize,
) -> GateUp {
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    match widened_product(xs, x.nrows(), x_bf16, &[w1, w3], start, n) {
        Some(y) => GateUp::Joint(y),
        None => GateUp::Apart(linear_block(x, x_bf16, w1, start, n), linear_block(x, x_bf16, w3, start, n)),
    }
}

/// Rows `start..start + n` of each weight of `ws`, one weight after another (`[m, ws.len()·n]`
/// out), applied to the `m` rows of `xs` by the f32 kernel that widens packed rows itself, 8 at
/// a time ([`crate::kernels::f32_gemm::matmul_nt_widened_weights`]): for fewer input rows than
/// weight rows (routed experts), with the bits of widening the rows first and
/// `matmul_nt_weights`. None where it does not apply: a few input rows (the GEMV path), BF16
/// products, a weight held as f32, weights of different widths, or a shape the kernel declines.
fn widened_product(
    xs: &[f32],
    m: usize,
    x_bf16: bool,
    ws: &[&CpuWeight],
    start: usize,
    n: usize,
) -> Option<ndarray::Array2<f32>> {
    let (k, rows) = (ws.first()?.cols, ws.len() * n);
    let applies = m > GEMV_MAX_ROWS
        && m < rows
        && crate::kernels::f32_gemm::available()
        && !(x_bf16 && crate::kernels::bf16_prefill_products())
        && ws.iter().all(|w| w.cols == k && w.f32_rows(start, n).is_none());
    if !applies {
        return None;
    }
    let mut y = ndarray::Array2::<f32>::zeros((m, rows));
    // One buffer of decoded scales per weight.
    let mut scales: Vec<Vec<f32>> = vec![Vec::new(); ws.len()];
    let mut widen = |i: usize, row: &mut [f32]| ws[i / n].row_f32(start + i % n, &mut scales[i / n], row);
    let out = y.as_slice_mut().expect("standard layout");
    crate::kernels::f32_gemm::matmul_nt_widened_weights(xs, &mut widen, out, m, k, rows).then_some(y)
}

/// [`linear_block`] written into `out`, one slice of `n` values per input row (a task's
/// block of a larger [`par::Unwritten`] output, from [`column_blocks`] or
/// [`group_row_blocks`]), every value of it. Panics if the slices do not match the block.
fn linear_block_into(
    x: ArrayView2<'_, f32>,
    x_bf16: bool,
    w: &CpuWeight,
    start: usize,
    n: usize,
    out: Vec<&mut [MaybeUninit<f32>]>,
) {
    write_rows(out, &linear_block(x, x_bf16, w, start, n));
}

/// Row `i` of `y` into segment `i` of `out`: every value of every segment written (the
/// `Unwritten::assume_written` of the callers rests on it). Panics unless there is one segment
/// per row of `y`, each a row long.
pub(crate) fn write_rows(out: Vec<&mut [MaybeUninit<f32>]>, y: &ndarray::Array2<f32>) {
    assert_eq!(out.len(), y.nrows(), "write_rows: {} segments for {} rows", out.len(), y.nrows());
    for (segment, row) in out.into_iter().zip(y.outer_iter()) {
        par::write_mapped(segment, row.as_slice().expect("standard layout"), |v| v);
    }
}

/// The largest [`SCRATCH`] a thread keeps between calls, in f32 values (8 MiB): a `linear`
/// task's rows widened (256 rows of V4-Flash's 4096 or 8192 inputs: 4 or 8 MiB). A bigger one
/// (256 rows of a wider matrix: V4-Pro's `wo_b`) is freed after the call, so a many-core
/// machine does not keep 16 MiB a thread.
const SCRATCH_KEPT_VALUES: usize = 2 << 20;

thread_local! {
    /// [`linear_block`]'s buffer of this thread, at most [`SCRATCH_KEPT_VALUES`] kept between
    /// calls, as the GEMM keeps its packing buffer.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A row-major matrix of rows of `width` values (`out`) cut into column blocks of `block`
/// values (the last one narrower): element `j` holds block `j` of every row, in row order, as
/// disjoint mutable slices that parallel tasks can each fill.
pub(crate) fn column_blocks<T>(out: &mut [T], width: usize, block: usize) -> Vec<Vec<&mut [T]>> {
    let block = block.max(1);
    let mut blocks: Vec<Vec<&mut [T]>> = (0..width.div_ceil(block)).map(|_| Vec::new()).collect();
    for row in out.chunks_exact_mut(width.max(1)) {
        for (j, segment) in row.chunks_mut(block).enumerate() {
            blocks[j].push(segment);
        }
    }
    blocks
}

/// A task of `linear`'s prefill: (first weight row, first input row, the row segments of its
/// rectangle of the output).
type LinearTask<'a> = (usize, usize, Vec<&'a mut [MaybeUninit<f32>]>);

/// A block of [`group_row_blocks`]: (group, first column within the group), and the block's
/// row segments.
type GroupBlock<'a, T> = ((usize, usize), Vec<&'a mut [T]>);

/// The tasks of a grouped product's output `out` (`[m, groups, r]`, row-major): every group's
/// `r` columns cut into blocks of `per` (the last one narrower), each block `(group, first
/// column within the group)` with its row segments, in row order, as disjoint mutable slices.
fn group_row_blocks<T>(out: &mut [T], groups: usize, r: usize, per: usize) -> Vec<GroupBlock<'_, T>> {
    // No values, no tasks (a task of 0 columns would still hold a segment per row for nothing).
    if groups == 0 || r == 0 {
        return Vec::new();
    }
    let (r, per) = (r.max(1), per.max(1));
    let blocks_per_group = r.div_ceil(per);
    let mut tasks: Vec<GroupBlock<'_, T>> = (0..groups * blocks_per_group)
        .map(|i| ((i / blocks_per_group, i % blocks_per_group * per), Vec::new()))
        .collect();
    for row in out.chunks_exact_mut(groups * r) {
        for (g, group) in row.chunks_exact_mut(r).enumerate() {
            for (b, segment) in group.chunks_mut(per).enumerate() {
                tasks[g * blocks_per_group + b].1.push(segment);
            }
        }
    }
    tasks
}

/// `scratch[..len]`, growing `scratch` (never shrinking it) as needed: the values are whatever
/// an earlier call left, for a caller that overwrites them all.
fn scratch_of(scratch: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    &mut scratch[..len]
}

fn linear_block_with(
    x: ArrayView2<'_, f32>,
    x_bf16: bool,
    w: &CpuWeight,
    start: usize,
    n: usize,
    scratch: &mut Vec<f32>,
) -> ndarray::Array2<f32> {
    let m = x.nrows();
    let xs = x.as_standard_layout();
    let xs = xs.as_slice().expect("standard layout");
    // f32 products on a packed weight with fewer input rows than weight rows (routed experts):
    // the kernel widens the weight 8 rows at a time itself.
    if let Some(y) = widened_product(xs, m, x_bf16, &[w], start, n) {
        return y;
    }
    let mut y = ndarray::Array2::<f32>::zeros((m, n));
    if m == 0 {
        return y;
    }
    if m <= GEMV_MAX_ROWS {
        if m == 1 {
            gemv(xs, x_bf16, w, start, y.as_slice_mut().expect("standard layout"));
        } else {
            // dot_many writes row j's m outputs together: [n, m], transposed into y [m, n].
            let scratch = scratch_of(scratch, n * m);
            dot_many(Isa::active(), w, start, n, xs, scratch);
            crate::gemm::transpose(scratch, n, m, y.as_slice_mut().expect("standard layout"));
        }
        return y;
    }
    let wb: &[f32] = match w.f32_rows(start, n) {
        Some(rows) => rows,
        None => {
            let scratch = scratch_of(scratch, n * w.cols);
            w.rows_f32(start, n, scratch);
            scratch
        }
    };
    let out = y.as_slice_mut().expect("standard layout");
    // BF16 products where chosen: AMX tiles first (Xeons since Sapphire Rapids), else
    // `vdpbf16ps`; either declines a weight whose widened rows are not all BF16 values.
    if x_bf16 && amx::chosen() && amx::matmul_nt_amx(xs, wb, out, m, w.cols, n) {
        return y;
    }
    if x_bf16 && bf16_gemm::chosen() && bf16_gemm::matmul_nt_bf16(xs, wb, out, m, w.cols, n) {
        return y;
    }
    crate::gemm::matmul_nt_weights(xs, wb, out, m, w.cols, n);
    y
}

/// One input row `xs` (`[w.cols]`) times weight rows `start..start + out.len()`, written to
/// `out`: the decode case of [`linear_block`].
fn gemv(xs: &[f32], x_bf16: bool, w: &CpuWeight, start: usize, out: &mut [f32]) {
    // BF16 inputs on FP4 experts: the vdpbf16ps kernel (another summation order).
    if x_bf16 && bf16_gemm::chosen() {
        if let Some((codes, scales)) = w.fp4_e8m0() {
            if fp4_bf16::gemv(codes, scales, w.cols, start, xs, out) {
                return;
            }
        }
    }
    dot_many(Isa::active(), w, start, out.len(), xs, out);
}

/// One input row through all of `w`'s rows, in parallel tasks of [`gemv_rows_per_task`] rows
/// that write straight into the output: `linear` (`group_rows` = all rows, `x` `[K]`) and
/// `grouped_linear` (`x` `[groups, K]`, group `g` = weight rows `g·group_rows..`, multiplied
/// with `x[g]`). A task whose rows span groups multiplies them group by group.
fn gemv_tasks(x: &CpuTensor, w: &CpuWeight, group_rows: usize, threads: usize) -> Vec<f32> {
    let (k, per_task) = (w.cols, gemv_rows_per_task(w.rows, threads));
    par::filled(w.rows, per_task, k * w.rows, |b, piece| {
        let start = b * per_task;
        let mut row = start;
        while row < start + piece.len() {
            let g = row / group_rows;
            let end = ((g + 1) * group_rows).min(start + piece.len());
            gemv(&x.data[g * k..(g + 1) * k], x.bf16, w, row, &mut piece[row - start..end - start]);
            row = end;
        }
    })
}

/// Softmax of one lane in place, as the `softmax` op computes it.
fn softmax_lane(lane: &mut [f32]) {
    let max = lane.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        // Every entry masked: no mass anywhere (torch would give NaN).
        lane.fill(0.0);
        return;
    }
    lane.iter_mut().for_each(|v| *v = (*v - max).exp());
    // ndarray's sum (eight unrolled partial sums), as this op has always summed.
    let sum: f32 = ndarray::ArrayView1::from(&lane[..]).sum();
    lane.iter_mut().for_each(|v| *v /= sum);
}

/// The logistic function, as the `unary` op's `Sigmoid` computes it.
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Sinkhorn normalisation of one `[n, n]` matrix `m` (`n` < 8) in place, with the
/// composition's arithmetic (see the `sinkhorn` op).
fn sinkhorn_in_place(m: &mut [f32], n: usize, iters: usize, eps: f32) {
    if n == 0 {
        return;
    }
    let mut sums = [0f32; 8];
    let col_norm = |m: &mut [f32], sums: &mut [f32; 8]| {
        for (k, s) in sums.iter_mut().enumerate().take(n) {
            *s = (0..n).fold(0.0f32, |acc, j| acc + m[j * n + k]) * 1.0 + eps;
        }
        for row in m.chunks_exact_mut(n) {
            row.iter_mut().zip(&sums[..n]).for_each(|(v, s)| *v /= s);
        }
    };
    let row_norm = |m: &mut [f32], sums: &mut [f32; 8]| {
        for (j, s) in sums.iter_mut().enumerate().take(n) {
            *s = m[j * n..(j + 1) * n].iter().fold(0.0f32, |acc, &v| acc + v) * 1.0 + eps;
        }
        for (row, s) in m.chunks_exact_mut(n).zip(&sums[..n]) {
            row.iter_mut().for_each(|v| *v /= s);
        }
    };
    col_norm(m, &mut sums);
    for _ in 1..iters {
        row_norm(m, &mut sums);
        col_norm(m, &mut sums);
    }
}

/// The concatenation along `axis` of row-major tensors of `shapes` into one of `shape` (as
/// `checks::concat` gives it): for each index of the axes before `axis`, each input's contiguous
/// run in turn. Plain copies, where ndarray's `concatenate` plus a standard-layout copy took
/// 7-8 us for the few-KB tensors of a decode step.
fn concat_rows<T: Copy>(shape: &[usize], shapes: &[&[usize]], data: &[&[T]], axis: usize) -> Vec<T> {
    let len: usize = shape.iter().product();
    if len == 0 {
        return Vec::new();
    }
    let runs: Vec<usize> = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    let mut out = Vec::with_capacity(len);
    for o in 0..shape[..axis].iter().product() {
        for (d, &run) in data.iter().zip(&runs) {
            out.extend_from_slice(&d[o * run..(o + 1) * run]);
        }
    }
    out
}

/// [`concat_rows`] of f32 tensors, copied by the team a piece of [`CONCAT_PIECE`] output values
/// at a time: the serial copy left the other threads waiting (the compressor's concatenations,
/// 2% of a 512-token prefill of the 0.75 B benchmark model in `dsv4 bench --profile`).
fn concat_values(shape: &[usize], shapes: &[&[usize]], data: &[&[f32]], axis: usize) -> Vec<f32> {
    let len: usize = shape.iter().product();
    // A small one (a decode step's, or an empty one) serially, as it was: no zeroing, no walk
    // per piece.
    if len < par::MIN_WORK {
        return concat_rows(shape, shapes, data, axis);
    }
    // Values of each input per index of the axes before `axis`, and of the output (not 0, as
    // `len` is not).
    let runs: Vec<usize> = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    let outer_run: usize = runs.iter().sum();
    par::filled(len, CONCAT_PIECE, len, |i, mut piece| {
        let mut at = i * CONCAT_PIECE;
        while !piece.is_empty() {
            // Output value `at` is value `r` of outer index `o`'s runs, in input order.
            let (o, mut r) = (at / outer_run, at % outer_run);
            for (d, &run) in data.iter().zip(&runs) {
                if r >= run {
                    r -= run;
                    continue;
                }
                let n = (run - r).min(piece.len());
                let (head, rest) = piece.split_at_mut(n);
                head.copy_from_slice(&d[o * run + r..o * run + r + n]);
                piece = rest;
                at += n;
                break;
            }
        }
    })
}

/// Output values per piece of [`concat_values`] (64 KiB).
const CONCAT_PIECE: usize = 1 << 14;

/// `f(a, b)` elementwise over the broadcast `shape` (checked by the caller).
fn elementwise(a: &CpuTensor, b: &CpuTensor, shape: Vec<usize>, f: impl Fn(f32, f32) -> f32 + Sync) -> CpuTensor {
    if a.shape == b.shape {
        let data = par::zip_values(&a.data, &b.data, f);
        return CpuTensor::new(a.shape.clone(), data);
    }
    let (av, bv) = (a.view(), b.view());
    let ab = av.broadcast(IxDyn(&shape)).expect("checked broadcast");
    let bb = bv.broadcast(IxDyn(&shape)).expect("checked broadcast");
    // Parallel over the outer axis: each piece is one outer index of the broadcast views.
    let inner: usize = shape[1..].iter().product();
    let len: usize = shape.iter().product();
    let out = par::filled(len, inner, len, |i, o| {
        let (a, b) = (ab.index_axis(Axis(0), i), bb.index_axis(Axis(0), i));
        let mut ov = ndarray::ArrayViewMutD::from_shape(IxDyn(&shape[1..]), o).expect("piece shape");
        Zip::from(&mut ov).and(&a).and(&b).for_each(|o, &x, &y| *o = f(x, y));
    });
    CpuTensor::new(shape, out)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Index = CpuIndex;
    type Weight = CpuWeight;
    type Pool = CpuPool;

    fn name(&self) -> &str {
        "cpu"
    }

    fn describe(&self) -> String {
        format!(
            "CPU reference backend ({} threads, {} kernels, f32 accumulation)",
            self.threads(),
            crate::kernels::Isa::active().name()
        )
    }

    /// `MemAvailable` from `/proc/meminfo`, capped by the memory cgroup's headroom
    /// ([`crate::host_memory`]).
    fn free_memory(&self) -> Option<usize> {
        crate::host_memory::available()
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        checks::upload(self.name(), data.len(), shape)?;
        Ok(CpuTensor::new(shape.to_vec(), data.to_vec()))
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.to_vec())
    }

    fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<CpuIndex> {
        checks::upload_index(self.name(), data.len(), shape)?;
        Ok(CpuIndex::new(shape.to_vec(), data.to_vec()))
    }

    fn download_index(&self, t: &CpuIndex) -> Result<Vec<i32>> {
        Ok(t.data.to_vec())
    }

    /// Keeps the stored form (zero-copy; FP8/FP4 decoded inside the GEMM). With
    /// `DSV4_CPU_DEQUANTIZE=1` in the environment every weight is dequantised to f32 at load
    /// instead: the reference path, 4 bytes per value.
    fn upload_weight(&self, w: &StoredWeight) -> Result<CpuWeight> {
        if std::env::var_os(DEQUANTIZE_ENV).is_some_and(|v| v == "1") {
            CpuWeight::dequantized(w)
        } else {
            CpuWeight::from_stored(w)
        }
    }

    fn weight_shape<'w>(&self, w: &'w CpuWeight) -> &'w [usize] {
        &w.shape
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn full(&self, shape: &[usize], value: f32) -> Result<CpuTensor> {
        checks::full(self.name(), shape)?;
        Ok(CpuTensor::new(shape.to_vec(), vec![value; shape.iter().product()]))
    }

    /// Host memory from `alloc_zeroed`: committed by the OS only as rows are written.
    fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<CpuPool> {
        CpuPool::new(rows, width, format)
    }

    fn pool_write(&self, pool: &mut CpuPool, slots: &CpuIndex, values: &CpuTensor) -> Result<()> {
        pool.write(slots, values)
    }

    fn pool_read(&self, pool: &CpuPool, slots: &CpuIndex) -> Result<CpuTensor> {
        pool.read(slots)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight) -> Result<CpuTensor> {
        let shape = checks::linear(self.name(), &x.shape, &w.shape)?;
        let k = w.cols;
        let m = x.numel() / k.max(1);
        let rows_per_task =
            if m <= GEMV_MAX_ROWS { gemv_rows_per_task(w.rows, self.threads()) } else { prefill_rows_per_task(w.rows) };
        if m == 1 {
            return Ok(CpuTensor::new(shape, gemv_tasks(x, w, w.rows, self.threads())));
        }
        let xv = ArrayView2::from_shape((m, k), &x.data).expect("2-D view");
        let row_tasks = w.rows.div_ceil(rows_per_task);
        // A matrix of one task's rows (mHC's `[24, 4 · hidden]` mixing weights, the indexer's
        // head weights) would run on one thread: its input rows are cut as well, into pieces
        // that depend on `m` alone (never on the thread count, see `prefill_rows_per_task`).
        // Only for the f32 kernel (AVX-512 or AVX2), whose outputs do not depend on how many rows it
        // takes: the `gemm` crate's k-blocking does (m = 300 against 128 + 172 rows differ
        // at k = 600), and so may the BF16 GEMM's.
        let cut = row_tasks == 1 && !x.bf16 && crate::kernels::f32_gemm::available();
        let pieces: Vec<(usize, usize)> = if cut { input_pieces(m).collect() } else { vec![(0, m)] };
        let mut out = par::Unwritten::new(m * w.rows);
        // Task (weight block j, input piece p) writes its own rectangle of `out`, split off
        // here as row segments, so the copy runs inside the parallel tasks (it ran on the
        // calling thread after them, about 3% of a prefill's samples, with the other threads
        // idle meanwhile).
        let mut tasks: Vec<LinearTask> = Vec::with_capacity(row_tasks * pieces.len());
        let mut rest = out.values();
        for &(first, rows) in &pieces {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(rows * w.rows);
            rest = tail;
            for (j, segments) in column_blocks(piece, w.rows, rows_per_task).into_iter().enumerate() {
                tasks.push((j * rows_per_task, first, segments));
            }
        }
        assert!(rest.is_empty(), "linear: the input pieces cover {} of {m} rows", m - rest.len() / w.rows.max(1));
        par::for_each_owned(tasks, m * k * w.rows, |(start, first, segments)| {
            let n = rows_per_task.min(w.rows - start);
            let piece = xv.slice(s![first..first + segments.len(), ..]);
            linear_block_into(piece, x.bf16, w, start, n, segments);
        });
        // SAFETY: the pieces cut every row of `out` once, `column_blocks` every piece's rows
        // into blocks that each went to one task, `for_each_owned` ran every task (it panics,
        // never reaching this line, if one did), and `linear_block_into` writes every value
        // of its segments.
        let out = unsafe { out.assume_written() };
        Ok(CpuTensor::new(shape, out))
    }

    fn grouped_linear(&self, x: &CpuTensor, w: &CpuWeight, groups: usize) -> Result<CpuTensor> {
        let shape = checks::grouped_linear(self.name(), &x.shape, &w.shape, groups)?;
        let (m, k, r) = (shape[0], x.shape[2], shape[2]);
        if m == 1 {
            return Ok(CpuTensor::new(shape, gemv_tasks(x, w, r, self.threads())));
        }
        let xv = ArrayView3::from_shape((m, groups, k), &x.data).expect("3-D view");
        let mut out = par::Unwritten::new(m * groups * r);
        // Each group's rows are cut as `linear` cuts a matrix of `r` rows, so a group gives the
        // bits `linear` gives on its rows (a few input rows: `dot_many` computes each output
        // alone, so any cut does), and the team gets more tasks than groups: with one task per
        // group, V4's two `wo_a` groups were two tasks for the whole team (on 2 threads the
        // `wo_a` of the 0.75 B benchmark model's prefill ran at 53% of the FMA peak against
        // 72-81% for the other projections). Task (g, b) writes its own rectangle of
        // `out[.., g, ..]`, as `linear`'s tasks do.
        let per = if m <= GEMV_MAX_ROWS { gemv_rows_per_task(r, self.threads()) } else { prefill_rows_per_task(r) };
        // Each group's input rows made contiguous once, for all of the group's tasks (each task
        // copied its strided slice itself: 4 MiB per task for a `wo_a` group of the 0.75 B
        // benchmark model's 512-token prefill). That is a second copy of `x` while the op runs
        // (256 MiB for V4-Flash's `wo_a` input of a 2048-token chunk).
        let inputs: Vec<Vec<f32>> = if groups > 1 && per < r {
            par::map(groups, m * k, |g| {
                let mut rows = Vec::with_capacity(m * k);
                (0..m).for_each(|i| rows.extend_from_slice(&x.data[(i * groups + g) * k..(i * groups + g + 1) * k]));
                rows
            })
        } else {
            Vec::new()
        };
        let tasks = group_row_blocks(out.values(), groups, r, per);
        par::for_each_owned(tasks, m * k * w.rows, |((g, start), segments)| {
            let n = per.min(r - start);
            let xg = match inputs.get(g) {
                Some(rows) => ArrayView2::from_shape((m, k), &rows[..]).expect("group input shape"),
                None => xv.slice(s![.., g, ..]),
            };
            linear_block_into(xg, x.bf16, w, g * r + start, n, segments)
        });
        // SAFETY: `group_row_blocks` cuts every row of `out` into blocks that each went to one
        // task, `for_each_owned` ran every task (it panics, never reaching this line, if one
        // did), and `linear_block_into` writes every value of its segments.
        let out = unsafe { out.assume_written() };
        Ok(CpuTensor::new(vec![m, groups, r], out))
    }

    fn embedding(&self, table: &CpuWeight, ids: &CpuIndex) -> Result<CpuTensor> {
        let shape = checks::embedding(self.name(), &table.shape, &ids.shape, bounds(ids))?;
        let d = table.cols;
        let mut out = vec![0f32; ids.data.len() * d];
        for (i, &id) in ids.data.iter().enumerate() {
            table.rows_f32(id as usize, 1, &mut out[i * d..(i + 1) * d]);
        }
        Ok(CpuTensor::new(shape, out))
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor, transpose_b: bool) -> Result<CpuTensor> {
        let checks::MatmulDims { batch, m, k, n, shared_b, out: shape } =
            checks::matmul(self.name(), &a.shape, &b.shape, transpose_b)?;
        let b_stride = if shared_b { 0 } else { k * n };
        let out = par::filled(batch * m * n, m * n, batch * m * n * k, |i, o| {
            let a = &a.data[i * m * k..(i + 1) * m * k];
            let b = &b.data[i * b_stride..i * b_stride + k * n];
            if transpose_b {
                crate::gemm::matmul_nt(a, b, o, m, k, n);
            } else {
                crate::gemm::matmul_nn(a, b, o, m, k, n);
            }
        });
        Ok(CpuTensor::new(shape, out))
    }

    fn unary(&self, x: &CpuTensor, op: UnaryOp) -> Result<CpuTensor> {
        checks::unary(self.name(), &x.shape)?;
        // One instantiation per op (a `fn` pointer would be an indirect call per element).
        let data = match op {
            UnaryOp::Sigmoid => par::map_values(&x.data, sigmoid),
            UnaryOp::Silu => {
                // The vectorised SiLU every CPU path shares (`kernels::act`: the fused experts
                // must give this op's bits).
                let isa = Isa::active();
                par::map_slices(&x.data, |src, dst| crate::kernels::act::silu_slice(isa, src, dst))
            }
            UnaryOp::Softplus => par::map_values(&x.data, |v| if v > 20.0 { v } else { v.exp().ln_1p() }),
            UnaryOp::Sqrt => par::map_values(&x.data, f32::sqrt),
            UnaryOp::Rsqrt => par::map_values(&x.data, |v| 1.0 / v.sqrt()),
            UnaryOp::Exp => par::map_values(&x.data, f32::exp),
            UnaryOp::Relu => par::map_values(&x.data, |v| v.max(0.0)),
            UnaryOp::Neg => par::map_values(&x.data, |v| -v),
            UnaryOp::Square => par::map_values(&x.data, |v| v * v),
        };
        Ok(CpuTensor::new(x.shape.clone(), data))
    }

    fn binary(&self, a: &CpuTensor, b: &CpuTensor, op: BinaryOp) -> Result<CpuTensor> {
        let shape = checks::binary(self.name(), &a.shape, &b.shape)?;
        // One instantiation per op (a `fn` pointer would be an indirect call per element).
        Ok(match op {
            BinaryOp::Add => elementwise(a, b, shape, |x, y| x + y),
            BinaryOp::Sub => elementwise(a, b, shape, |x, y| x - y),
            BinaryOp::Mul => elementwise(a, b, shape, |x, y| x * y),
            BinaryOp::Div => elementwise(a, b, shape, |x, y| x / y),
            BinaryOp::Max => elementwise(a, b, shape, f32::max),
            BinaryOp::Min => elementwise(a, b, shape, f32::min),
        })
    }

    fn affine(&self, x: &CpuTensor, mul: f32, add: f32) -> Result<CpuTensor> {
        checks::affine(self.name(), &x.shape)?;
        Ok(CpuTensor::new(x.shape.clone(), par::map_values(&x.data, |v| v * mul + add)))
    }

    fn clamp(&self, x: &CpuTensor, min: f32, max: f32) -> Result<CpuTensor> {
        checks::clamp(self.name(), &x.shape)?;
        Ok(CpuTensor::new(x.shape.clone(), par::map_values(&x.data, |v| v.max(min).min(max))))
    }

    fn round_to_bf16(&self, x: &CpuTensor) -> Result<CpuTensor> {
        checks::unary(self.name(), &x.shape)?;
        if x.bf16 {
            return Ok(x.clone());
        }
        let isa = Isa::active();
        let data = par::map_slices(&x.data, |src, dst| {
            dst.copy_from_slice(src);
            round::round_bf16_slice(isa, dst)
        });
        Ok(CpuTensor::new(x.shape.clone(), data).with_bf16(true))
    }

    /// In place where `x` holds its buffer alone (a rounding point's fresh result): no new
    /// tensor, whose zeroing and first-touch page faults cost as much as the rounding. A
    /// shared buffer goes through `round_to_bf16`. The same values either way.
    fn round_to_bf16_owned(&self, x: CpuTensor) -> Result<CpuTensor> {
        checks::unary(self.name(), &x.shape)?;
        if x.bf16 {
            return Ok(x);
        }
        let CpuTensor { shape, data, bf16 } = x;
        let mut data = match Arc::try_unwrap(data) {
            Ok(data) => data,
            Err(shared) => return self.round_to_bf16(&CpuTensor { shape, data: shared, bf16 }),
        };
        let isa = Isa::active();
        let len = data.len();
        par::chunks_mut(&mut data, par::VALUES_GRAIN, len, |_, piece| round::round_bf16_slice(isa, piece));
        Ok(CpuTensor::new(shape, data).with_bf16(true))
    }

    /// `act_quant::fake_quant_rows` in place of the composition's download and upload; the
    /// result keeps `x`'s BF16 flag (quantised values of BF16 values are BF16 values, and
    /// keeping the flag makes the following GEMM the one the composition's consumer would get
    /// from this backend's own ops).
    fn fake_quant(&self, x: &CpuTensor, q: FakeQuant) -> Result<CpuTensor> {
        checks::unary(self.name(), &x.shape)?;
        let width = x.shape.last().copied().unwrap_or(1);
        let mut data = x.data.to_vec();
        par::chunks_mut(&mut data, width.max(1), 8 * x.numel(), |_, row| fake_quant_row(row, q));
        Ok(CpuTensor::new(x.shape.clone(), data).with_bf16(x.bf16))
    }

    fn hadamard(&self, x: &CpuTensor) -> Result<CpuTensor> {
        checks::unary(self.name(), &x.shape)?;
        let width = x.shape.last().copied().unwrap_or(1).max(1);
        let mut data = x.data.to_vec();
        let work = 2 * x.numel() * width.next_power_of_two().ilog2().max(1) as usize;
        par::chunks_mut(&mut data, width, work, |_, row| hadamard_row(row));
        Ok(CpuTensor::new(x.shape.clone(), data))
    }

    fn reduce(&self, x: &CpuTensor, axis: usize, op: ReduceOp) -> Result<CpuTensor> {
        let shape = checks::reduce(self.name(), &x.shape, axis)?;
        let v = x.view();
        let len = x.shape[axis] as f32;
        let r = match op {
            ReduceOp::Sum => v.sum_axis(Axis(axis)),
            ReduceOp::Mean => v.sum_axis(Axis(axis)).mapv(|s| s / len),
            ReduceOp::Max => v.fold_axis(Axis(axis), f32::NEG_INFINITY, |&m, &e| m.max(e)),
        };
        Ok(CpuTensor::new(shape, r.as_standard_layout().into_owned().into_raw_vec_and_offset().0))
    }

    fn softmax(&self, x: &CpuTensor, axis: usize) -> Result<CpuTensor> {
        checks::softmax(self.name(), &x.shape, axis)?;
        let mut out = x.data.to_vec();
        let len = out.len();
        if axis + 1 == x.shape.len() {
            par::chunks_mut(&mut out, x.shape[axis], len, |_, row| softmax_lane(row));
            return Ok(CpuTensor::new(x.shape.clone(), out));
        }
        let mut view = ndarray::ArrayViewMutD::from_shape(IxDyn(&x.shape), &mut out).expect("shape matches data");
        let mut buf = Vec::new();
        for mut lane in view.lanes_mut(Axis(axis)) {
            buf.clear();
            buf.extend(lane.iter());
            softmax_lane(&mut buf);
            lane.iter_mut().zip(&buf).for_each(|(o, &v)| *o = v);
        }
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: Option<&CpuTensor>, eps: f32) -> Result<CpuTensor> {
        checks::rms_norm(self.name(), &x.shape, weight.map(|w| &w.shape[..]))?;
        let d = x.shape[x.shape.len() - 1];
        let isa = Isa::active();
        let out = par::filled(x.data.len(), d, x.data.len(), |i, o| {
            norm::rms_norm_row(isa, &x.data[i * d..i * d + o.len()], weight.map(|w| &w.data[..]), eps, o)
        });
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn rope(&self, x: &CpuTensor, cos: &CpuTensor, sin: &CpuTensor, inverse: bool) -> Result<CpuTensor> {
        let (t, heads, d, half) = checks::rope(self.name(), &x.shape, &cos.shape, &sin.shape)?;
        // Each task copies its tokens and rotates their rotary channels: a serial copy of the
        // whole input first (64 MiB for the queries of a 512-token V4-Flash prefill, 64 heads
        // of 512) left the other threads waiting.
        let out = par::filled(t * heads * d, heads * d, t * heads * d, |ti, tok| {
            tok.copy_from_slice(&x.data[ti * heads * d..ti * heads * d + tok.len()]);
            rope_token(tok, d, cos, sin, ti, half, inverse);
        });
        debug_assert_eq!(out.len(), t * heads * d);
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    /// In place where `x` holds its buffer alone (every caller in the model graph passes a
    /// fresh tensor): only the rotary channels are read and written, where `rope` copies every
    /// channel of every head into a new buffer (in `perf`, that copy and the new buffer's
    /// zeroing and page faults were about 3% of a 512-token prefill of the 0.75 B benchmark
    /// model). A shared buffer goes through `rope`. The same arithmetic either way.
    fn rope_owned(&self, x: CpuTensor, cos: &CpuTensor, sin: &CpuTensor, inverse: bool) -> Result<CpuTensor> {
        let (t, heads, d, half) = checks::rope(self.name(), &x.shape, &cos.shape, &sin.shape)?;
        let CpuTensor { shape, data, bf16 } = x;
        let mut data = match Arc::try_unwrap(data) {
            Ok(data) => data,
            Err(shared) => return self.rope(&CpuTensor { shape, data: shared, bf16 }, cos, sin, inverse),
        };
        assert_eq!(data.len(), t * heads * d, "rope_owned: a tensor of {:?} holds {} values", shape, data.len());
        par::chunks_mut(&mut data, (heads * d).max(1), t * heads * 2 * half, |ti, tok| {
            rope_token(tok, d, cos, sin, ti, half, inverse)
        });
        // Rotated values are no longer BF16 values in general: the flag is dropped, as `rope`'s
        // new tensor never has it.
        Ok(CpuTensor::new(shape, data))
    }

    fn reshape(&self, x: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        checks::reshape(self.name(), &x.shape, shape)?;
        Ok(CpuTensor { shape: shape.to_vec(), data: x.data.clone(), bf16: x.bf16 })
    }

    fn transpose(&self, x: &CpuTensor, a: usize, b: usize) -> Result<CpuTensor> {
        checks::transpose(self.name(), &x.shape, a, b)?;
        let mut v = x.view();
        v.swap_axes(a, b);
        Ok(owned(v).with_bf16(x.bf16))
    }

    fn narrow(&self, x: &CpuTensor, axis: usize, start: usize, len: usize) -> Result<CpuTensor> {
        checks::narrow(self.name(), &x.shape, axis, start, len)?;
        if axis == 0 {
            let row: usize = x.shape[1..].iter().product();
            let mut shape = x.shape.clone();
            shape[0] = len;
            return Ok(CpuTensor::new(shape, x.data[start * row..(start + len) * row].to_vec()).with_bf16(x.bf16));
        }
        Ok(owned(x.view().slice_axis(Axis(axis), (start..start + len).into())).with_bf16(x.bf16))
    }

    fn concat(&self, xs: &[&CpuTensor], axis: usize) -> Result<CpuTensor> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
        let shape = checks::concat(self.name(), &shapes, axis)?;
        let data = concat_values(&shape, &shapes, &xs.iter().map(|x| &x.data[..]).collect::<Vec<_>>(), axis);
        let bf16 = xs.iter().all(|x| x.bf16);
        Ok(CpuTensor::new(shape, data).with_bf16(bf16))
    }

    fn index_select(&self, x: &CpuTensor, idx: &CpuIndex) -> Result<CpuTensor> {
        let shape = checks::index_select(self.name(), &x.shape, &idx.shape, bounds(idx))?;
        let row: usize = x.shape[1..].iter().product();
        // Appended row by row, not copied over zeros: the zeroing of the whole output was 0.5%
        // of a decode step of the 0.75 B benchmark model (the compressor's gathers).
        let mut out = Vec::with_capacity(idx.data.len() * row);
        for &id in idx.data.iter() {
            match id {
                -1 => out.resize(out.len() + row, 0.0),
                id => {
                    let id = id as usize;
                    out.extend_from_slice(&x.data[id * row..(id + 1) * row]);
                }
            }
        }
        // -1 rows are zeros, a BF16 value.
        Ok(CpuTensor::new(shape, out).with_bf16(x.bf16))
    }

    fn gather_last(&self, x: &CpuTensor, idx: &CpuIndex) -> Result<CpuTensor> {
        let shape = checks::gather_last(self.name(), &x.shape, &idx.shape, bounds(idx))?;
        let (n, k) = (x.shape[x.shape.len() - 1], idx.shape[idx.shape.len() - 1]);
        let mut out = vec![0f32; idx.data.len()];
        for (r, (o, ids)) in out.chunks_mut(k.max(1)).zip(idx.data.chunks(k.max(1))).enumerate() {
            for (o, &id) in o.iter_mut().zip(ids) {
                *o = x.data[r * n + id as usize];
            }
        }
        Ok(CpuTensor::new(shape, out))
    }

    fn index_add(&self, dst: &CpuTensor, idx: &CpuIndex, src: &CpuTensor) -> Result<CpuTensor> {
        checks::index_add(self.name(), &dst.shape, &idx.shape, &src.shape, bounds(idx))?;
        let row: usize = dst.shape[1..].iter().product();
        let mut out = dst.data.to_vec();
        for (i, &id) in idx.data.iter().enumerate() {
            let id = id as usize;
            out[id * row..(id + 1) * row].iter_mut().zip(&src.data[i * row..(i + 1) * row]).for_each(|(o, s)| *o += s);
        }
        Ok(CpuTensor::new(dst.shape.clone(), out))
    }

    fn topk(&self, x: &CpuTensor, k: usize) -> Result<(CpuTensor, CpuIndex)> {
        let shape = checks::topk(self.name(), &x.shape, k)?;
        let n = x.shape[x.shape.len() - 1];
        let rows = x.data.len() / n.max(1);
        let picks: Vec<(Vec<f32>, Vec<i32>)> = par::map(rows, rows * n * 8, |r| {
            let row = &x.data[r * n..(r + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            // Descending by value, ties to the lower index: deterministic everywhere. A total
            // order, so selecting the first k, then sorting them, equals the full sort's prefix.
            let cmp = |i: &usize, j: &usize| row[*j].total_cmp(&row[*i]).then(i.cmp(j));
            if k > 0 && k < n {
                order.select_nth_unstable_by(k - 1, cmp);
            }
            order.truncate(k);
            order.sort_by(cmp);
            (order.iter().map(|&i| row[i]).collect(), order.iter().map(|&i| i as i32).collect())
        });
        let (vals, ids): (Vec<_>, Vec<_>) = picks.into_iter().unzip();
        Ok((CpuTensor::new(shape.clone(), vals.concat()), CpuIndex::new(shape, ids.concat())))
    }

    fn index_mask(&self, idx: &CpuIndex) -> Result<CpuTensor> {
        checks::index_mask(self.name(), &idx.shape)?;
        let data = idx.data.iter().map(|&i| if i >= 0 { 0.0 } else { f32::NEG_INFINITY }).collect();
        Ok(CpuTensor::new(idx.shape.clone(), data))
    }

    fn concat_index(&self, xs: &[&CpuIndex], axis: usize) -> Result<CpuIndex> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
        let shape = checks::concat_index(self.name(), &shapes, axis)?;
        let data = concat_rows(&shape, &shapes, &xs.iter().map(|x| &x.data[..]).collect::<Vec<_>>(), axis);
        Ok(CpuIndex::new(shape, data))
    }

    fn sparse_attention(
        &self,
        q: &CpuTensor,
        kv: &CpuPool,
        idx: &CpuIndex,
        sinks: &CpuTensor,
        scale: f32,
        _act: Precision,
    ) -> Result<CpuTensor> {
        crate::fused::sparse_attention(q, kv, idx, sinks, scale)
    }

    #[allow(clippy::too_many_arguments)]
    fn indexer_select(
        &self,
        q: &CpuTensor,
        keys: &CpuPool,
        key_rows: &CpuIndex,
        weights: &CpuTensor,
        valid: &[std::ops::Range<usize>],
        k: usize,
        offset: i32,
        _act: Precision,
    ) -> Result<CpuIndex> {
        crate::fused::indexer_select(q, keys, key_rows, weights, valid, k, offset)
    }

    /// Both passes of [`crate::moe::expert_ffns`] for one expert: identical to the composition.
    fn expert_ffn(&self, x: &CpuTensor, e: &ExpertWeights<CpuWeight>, limit: f32, act: Precision) -> Result<CpuTensor> {
        let hidden = checks::linear(self.name(), &x.shape, &e.w1.shape)?;
        checks::linear(self.name(), &x.shape, &e.w3.shape)?;
        let shape = checks::linear(self.name(), &hidden, &e.w2.shape)?;
        let m = x.numel() / e.w1.cols.max(1);
        let xq = act.linear_input(self, x, e.low_bit)?;
        let job = FfnJob { x: &xq.data, x_bf16: x.bf16, m, expert: e, row_weights: None };
        let y = expert_ffns(&[job], limit, act).pop().expect("one job");
        Ok(CpuTensor::new(shape, y).with_bf16(act.rounds_to_bf16()))
    }

    /// The composition's softmax over the L candidate rows, product and sum in one pass per
    /// window, where the composition ran a strided softmax on one thread and two more passes
    /// over `[W, L, c]` (3.7 ms a call in a 512-token prefill of the 0.75 B benchmark model).
    /// Same arithmetic (bit for bit, tested in `tests/ops.rs`): the same `softmax_lane`, each
    /// product rounded, then added in row order onto `+0`, as ndarray's `sum_axis` adds the
    /// subviews of an axis that is not the innermost.
    fn compressor_pool(&self, kv: &CpuTensor, score: &CpuTensor) -> Result<CpuTensor> {
        let &[w, l, c] = &kv.shape[..] else {
            return composed::compressor_pool(self, kv, score);
        };
        // With c = 1 ndarray may sum the L values as one lane (eight partial sums): leave
        // that, the empty cases and every shape the composition refuses to it.
        if score.shape != kv.shape || c < 2 || l == 0 || w == 0 {
            return composed::compressor_pool(self, kv, score);
        }
        let out = par::filled(w * c, c, 8 * w * l * c, |wi, o| {
            let (kv, sc) = (&kv.data[wi * l * c..(wi + 1) * l * c], &score.data[wi * l * c..(wi + 1) * l * c]);
            let mut lane = vec![0f32; l];
            for (ch, o) in o.iter_mut().enumerate() {
                lane.iter_mut().enumerate().for_each(|(r, v)| *v = sc[r * c + ch]);
                softmax_lane(&mut lane);
                *o = lane.iter().enumerate().fold(0f32, |acc, (r, &p)| acc + p * kv[r * c + ch]);
            }
        });
        Ok(CpuTensor::new(vec![w, c], out))
    }

    /// `X'_k = post_k · y + Σ_j comb[j, k] · X_j` in one pass over the streams, where the
    /// composition ran a broadcast product, a transpose, `T` batched 4×4 by 4×D GEMMs through
    /// the `gemm` crate and a sum (4.5 ms a call for a 512-token prefill of the 0.75 B benchmark
    /// model, 23 µs a decode token). Same arithmetic ([`mhc`]; bit for bit, tested in
    /// `tests/ops.rs`).
    fn hc_post(&self, x: &CpuTensor, y: &CpuTensor, post: &CpuTensor, comb: &CpuTensor) -> Result<CpuTensor> {
        let &[t, n, d] = &x.shape[..] else {
            return composed::hc_post(self, x, y, post, comb);
        };
        // Anything the composition would reject (or broadcast) goes through it, errors included;
        // so does every case where the `gemm` crate sums the composition's product otherwise
        // than one FMA chain ([`mhc::same_as_gemm`]).
        if !mhc::same_as_gemm(n, d) || y.shape != [t, d] || post.shape != [t, n] || comb.shape != [t, n, n] {
            return composed::hc_post(self, x, y, post, comb);
        }
        let isa = Isa::active();
        let out = par::filled(t * n * d, (n * d).max(1), t * n * n * d, |ti, o| {
            mhc::post_token(
                isa,
                &x.data[ti * n * d..(ti + 1) * n * d],
                &y.data[ti * d..(ti + 1) * d],
                &post.data[ti * n..(ti + 1) * n],
                &comb.data[ti * n * n..(ti + 1) * n * n],
                o,
            )
        });
        Ok(CpuTensor::new(vec![t, n, d], out))
    }

    /// The composition's operations in the same order (bit for bit the same results, tested
    /// in `tests/ops.rs`): the norm and the mixing GEMV as ops, then everything after them in
    /// one pass over the few mixing values, where the composition dispatched about 30 tiny
    /// ops (narrows, broadcasts, each allocating) per call, twice per layer and token.
    fn hc_pre(
        &self,
        x: &CpuTensor,
        fn_w: &CpuWeight,
        base: &CpuTensor,
        scale: &CpuTensor,
        sinkhorn_iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        let &[t, n, d] = &x.shape[..] else {
            return composed::hc_pre(self, x, fn_w, base, scale, sinkhorn_iters, hc_eps, norm_eps);
        };
        let w = (2 + n) * n;
        // Anything the composition would reject, or compute with other arithmetic (Sinkhorn
        // sums over 8 or more streams, which ndarray unrolls), goes through it, errors
        // included; so do empty streams.
        if n == 0 || n >= 8 || d == 0 || fn_w.rows != w || base.shape != [w] || scale.shape != [3] {
            return composed::hc_pre(self, x, fn_w, base, scale, sinkhorn_iters, hc_eps, norm_eps);
        }
        let flat = self.reshape(x, &[t, n * d])?;
        let flat = self.rms_norm(&flat, None, norm_eps)?;
        let mixes = self.linear(&flat, fn_w)?; // [T, (2+n)n]

        // Per token: pre `[n]`, post `[n]`, comb `[n, n]`, side by side.
        let per = 2 * n + n * n;
        let mix = par::filled(t * per, per, t * per * (4 * sinkhorn_iters + 8), |ti, o| {
            // `binary` Mul by the scale, then Add of the base: two roundings, no FMA.
            let part = |i: usize, si: usize| mixes.data[ti * w + i] * scale.data[si] + base.data[i];
            let (pre, rest) = o.split_at_mut(n);
            let (post, comb) = rest.split_at_mut(n);
            for j in 0..n {
                pre[j] = sigmoid(part(j, 0)) * 1.0 + hc_eps;
                post[j] = sigmoid(part(n + j, 1)) * 2.0 + 0.0;
            }
            for (i, v) in comb.iter_mut().enumerate() {
                *v = part(2 * n + i, 2);
            }
            comb.chunks_exact_mut(n).for_each(softmax_lane);
            comb.iter_mut().for_each(|v| *v = *v * 1.0 + hc_eps);
            sinkhorn_in_place(comb, n, sinkhorn_iters, hc_eps);
        });
        let pick = |from: usize, len: usize| -> Vec<f32> {
            mix.chunks_exact(per).flat_map(|o| &o[from..from + len]).copied().collect()
        };
        let (post, comb) = (pick(n, n), pick(2 * n, n * n));
        // `reduce` over the streams of `pre · x`: ndarray's `sum_axis` adds the streams in
        // order onto zeros.
        let collapsed = par::filled(t * d, d, t * n * d, |ti, out| {
            for j in 0..n {
                let p = mix[ti * per + j]; // pre
                let xs = &x.data[(ti * n + j) * d..(ti * n + j + 1) * d];
                out.iter_mut().zip(xs).for_each(|(o, &v)| *o += p * v);
            }
        });
        Ok((
            CpuTensor::new(vec![t, d], collapsed),
            CpuTensor::new(vec![t, n], post),
            CpuTensor::new(vec![t, n, n], comb),
        ))
    }

    /// In place on each `[n, n]` matrix, with the composition's arithmetic: sums from `+0.0` in
    /// index order (what `reduce` gives for the small `n` of mHC: ndarray's unrolled sum only
    /// reorders lines of 8 or more, which use `reduce` itself here), `sum · 1 + eps`, then
    /// one division per entry. About 6·iters tiny ops per call become one loop (117 ops, each
    /// allocating, at 20 iterations; twice per layer and token).
    fn sinkhorn(&self, comb: &CpuTensor, iters: usize, eps: f32) -> Result<CpuTensor> {
        let n = comb.shape.get(1).copied().unwrap_or(0);
        if comb.shape.len() != 3 || comb.shape[2] != n || n >= 8 {
            return composed::sinkhorn(self, comb, iters, eps);
        }
        let mut c = comb.data.to_vec();
        for m in c.chunks_exact_mut((n * n).max(1)) {
            sinkhorn_in_place(m, n, iters, eps);
        }
        Ok(CpuTensor::new(comb.shape.clone(), c))
    }

    /// Every chosen expert in two parallel passes ([`crate::moe`]); the weighted outputs are
    /// then added in ascending expert id, as in the composition (identical results).
    fn moe_experts(
        &self,
        x: &CpuTensor,
        expert_ids: &[i32],
        weights: &CpuTensor,
        experts: &[ExpertWeights<CpuWeight>],
        limit: f32,
        act: Precision,
    ) -> Result<CpuTensor> {
        if x.shape.len() != 2 || weights.shape.len() != 2 || weights.numel() != expert_ids.len() {
            return Err(err(format!(
                "moe_experts: x {:?}, {} expert ids and weights {:?} do not fit [T, D], [T, k], [T, k]",
                x.shape,
                expert_ids.len(),
                weights.shape
            )));
        }
        let (t, d) = (x.shape[0], x.shape[1]);
        let k = expert_ids.len() / t.max(1);
        composed::check_expert_ids(self.name(), expert_ids, experts.len())?;
        // Per expert, ascending: the token rows it takes and their slots in `weights`.
        let mut routed: Vec<(usize, Vec<usize>, Vec<usize>)> = Vec::new();
        for (e, ew) in experts.iter().enumerate() {
            let slots: Vec<usize> = (0..expert_ids.len()).filter(|&i| expert_ids[i] as usize == e).collect();
            if slots.is_empty() {
                continue;
            }
            checks::linear(self.name(), &[slots.len(), d], &ew.w1.shape)?;
            checks::linear(self.name(), &[slots.len(), d], &ew.w3.shape)?;
            checks::linear(self.name(), &[slots.len(), ew.w1.rows], &ew.w2.shape)?;
            if ew.w2.rows != d {
                return Err(err(format!("moe_experts: expert {e}'s w2 gives {} values, not {d}", ew.w2.rows)));
            }
            routed.push((e, slots.iter().map(|&s| s / k).collect(), slots));
        }
        // Under the official quantisation each row is quantised once, for every low-bit expert,
        // and the routing weights multiply the SwiGLU outputs before w2 (then not again below).
        let official = act.simulates_quant();
        let xq = act.linear_input(self, x, routed.iter().any(|(e, _, _)| experts[*e].low_bit))?;
        // Each expert's rows gathered in parallel: 12 MiB of copies for a 512-token chunk of
        // the 0.75 B benchmark model, which the calling thread made alone.
        let gathered: Vec<Vec<f32>> = par::map(routed.len(), expert_ids.len() * d, |i| {
            let (e, rows, _) = &routed[i];
            let src = if experts[*e].low_bit { &xq.data } else { &x.data };
            let mut g = Vec::with_capacity(rows.len() * d);
            rows.iter().for_each(|&r| g.extend_from_slice(&src[r * d..(r + 1) * d]));
            g
        });
        let row_weights: Vec<Vec<f32>> = routed
            .iter()
            .map(|(_, _, slots)| if official { slots.iter().map(|&s| weights.data[s]).collect() } else { vec![] })
            .collect();
        let jobs: Vec<FfnJob> = routed
            .iter()
            .zip(&gathered)
            .zip(&row_weights)
            .map(|(((e, rows, _), xs), w)| FfnJob {
                x: xs,
                x_bf16: x.bf16,
                m: rows.len(),
                expert: &experts[*e],
                row_weights: official.then_some(&w[..]),
            })
            .collect();
        let ys = expert_ffns(&jobs, limit, act);
        // Each token's (expert output row, weight) pairs in ascending expert order, the order
        // of the composition's scatter-adds; tokens are summed in parallel.
        let mut per_token: Vec<Vec<(&[f32], f32)>> = vec![Vec::new(); t];
        for ((_, rows, slots), y) in routed.iter().zip(&ys) {
            for (i, (&r, &s)) in rows.iter().zip(slots).enumerate() {
                per_token[r].push((&y[i * d..(i + 1) * d], if official { 1.0 } else { weights.data[s] }));
            }
        }
        let out = par::filled(t * d, d.max(1), t * k * d, |r, o| {
            for &(y, w) in &per_token[r] {
                o.iter_mut().zip(y).for_each(|(o, &v)| *o += v * w);
            }
        });
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn offset_index(&self, idx: &CpuIndex, offset: i32) -> Result<CpuIndex> {
        checks::offset_index(self.name(), &idx.shape, offset, bounds(idx))?;
        let data = idx.data.iter().map(|&i| if i == -1 { -1 } else { i + offset }).collect();
        Ok(CpuIndex::new(idx.shape.clone(), data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values::bits;

    /// `round_to_bf16_owned` rounds a tensor it holds alone in its own buffer and one it shares
    /// into a new one (the other holder's values unchanged), and flags both as BF16 values (the
    /// flag picks the BF16 GEMMs, which sum in another order); a tensor already flagged comes
    /// back as it is.
    #[test]
    fn round_to_bf16_owned_rounds_in_place_when_alone_and_flags_the_result() {
        let be = CpuBackend::new();
        let xs: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.618_034).sin() * 3.7).collect();
        let want: Vec<u32> = xs.iter().map(|&x| dsv4_core::precision::round_bf16(x).to_bits()).collect();
        let alone = CpuTensor::new(vec![100, 100], xs.clone());
        let buffer = alone.data.as_ptr();
        let y = be.round_to_bf16_owned(alone).unwrap();
        assert!(y.bf16, "the result holds BF16 values");
        assert_eq!(y.data.as_ptr(), buffer, "rounded in its own buffer");
        assert_eq!(bits(&y.data), want);
        let again = be.round_to_bf16_owned(y.clone()).unwrap();
        assert!(Arc::ptr_eq(&again.data, &y.data), "a flagged tensor is returned as it is");
        let kept = CpuTensor::new(vec![100, 100], xs.clone());
        let z = be.round_to_bf16_owned(kept.clone()).unwrap();
        assert!(z.bf16 && !kept.bf16);
        assert_eq!(bits(&z.data), want);
        assert_eq!(bits(&kept.data), bits(&xs), "the shared tensor is unchanged");
    }

    /// The input-row pieces of a one-task weight cover `0..m` in order, each of more than 64
    /// rows (so none leaves the GEMM path the whole takes), all 128 rows but the last.
    #[test]
    fn input_pieces_cover_the_rows_in_pieces_of_more_than_64() {
        for m in (9..2000).chain([15368, 15369, 16383, 16384]) {
            let pieces: Vec<(usize, usize)> = input_pieces(m).collect();
            let mut next = 0;
            for (i, &(first, rows)) in pieces.iter().enumerate() {
                assert_eq!(first, next, "m = {m}: {pieces:?}");
                assert!(rows > 64 || pieces.len() == 1, "m = {m}: {pieces:?}");
                assert!(rows == PREFILL_INPUT_ROWS_PER_TASK || i + 1 == pieces.len(), "m = {m}: {pieces:?}");
                next += rows;
            }
            assert_eq!(next, m, "m = {m}: {pieces:?}");
        }
    }

    /// `linear` on a weight of one task's rows (its input rows cut into pieces where the AVX-512
    /// kernel runs; uncut on the `gemm` crate, `DSV4_CPU_ISA=avx2`) gives the bits of the uncut
    /// product (`linear_block` over all the rows): row counts just past a cut, with remainders
    /// that a cut into equal pieces would have left at 8 rows or fewer (the GEMV path).
    #[test]
    fn linear_input_pieces_give_the_uncut_bits() {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let be = CpuBackend::new();
        let mut seed = 0x9e37_79b9u64;
        let mut value = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi(((seed >> 20) % 13) as i32 - 6)
        };
        for (m, k, rows) in [(129, 1100, 24), (129, 600, 64), (300, 600, 1), (385, 64, 24), (15368, 96, 24)] {
            let bytes: Vec<u8> = (0..rows * k).flat_map(|_| value().to_le_bytes()).collect();
            let t = HostTensor::from_bytes("w", DType::F32, vec![rows, k], bytes).unwrap();
            let w = CpuWeight::from_stored(&StoredWeight::float(t).unwrap()).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| value()).collect();
            assert!(prefill_rows_per_task(rows) >= rows, "one weight task");
            let got = be.linear(&CpuTensor::new(vec![m, k], x.clone()), &w).unwrap();
            let xv = ArrayView2::from_shape((m, k), &x[..]).unwrap();
            let want = linear_block(xv, false, &w, 0, rows);
            assert_eq!(bits(&got.data), bits(want.as_slice().unwrap()), "m = {m}, k = {k}, rows = {rows}");
        }
    }

    /// `linear_block` widens packed rows into a per-thread buffer that keeps what earlier calls
    /// left: after a bigger weight has filled it with other values (NaN), a smaller FP8 weight
    /// gives the bits it gives on a thread whose buffer is new, on the GEMM path (m > 8) and on
    /// `dot_many`'s (2 to 8 rows, transposed through the buffer).
    #[test]
    fn linear_block_buffer_keeps_no_stale_values() {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let fp8 = |rows: usize, k: usize, code: &dyn Fn(usize) -> u8| {
            let q = HostTensor::from_bytes("w.weight", DType::F8E4M3, vec![rows, k], (0..rows * k).map(code).collect());
            let blocks = rows.div_ceil(128) * k.div_ceil(128);
            let scale = HostTensor::from_bytes(
                "w.scale",
                DType::F8E8M0,
                vec![rows.div_ceil(128), k.div_ceil(128)],
                (0..blocks).map(|b| 120 + (b % 5) as u8).collect(),
            );
            CpuWeight::from_stored(&StoredWeight::detect(&q.unwrap(), Some(&scale.unwrap()), &[rows, k]).unwrap())
                .unwrap()
        };
        // 0x7F is e4m3's NaN: the big weight leaves NaN everywhere in the buffer.
        let big = fp8(256, 1024, &|_| 0x7F);
        let small = fp8(96, 256, &|i| ((i * 37) % 251) as u8 & 0x77);
        for m in [3, 40] {
            let x: Vec<f32> = (0..m * 1024).map(|i| ((i * 13) % 17) as f32 * 0.125 - 1.0).collect();
            // Each on a thread of its own, whose buffer starts empty.
            let run = |dirty: bool| {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        if dirty {
                            let xv = ArrayView2::from_shape((m, 1024), &x[..]).unwrap();
                            let y = linear_block(xv, false, &big, 0, 256);
                            assert!(y.iter().all(|v| v.is_nan()), "the big weight's rows are NaN");
                        }
                        let xv = ArrayView2::from_shape((m, 256), &x[..m * 256]).unwrap();
                        linear_block(xv, false, &small, 0, 96).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    })
                    .join()
                    .unwrap()
                })
            };
            let (fresh, dirty) = (run(false), run(true));
            assert!(fresh.iter().all(|&b| f32::from_bits(b).is_finite()), "m = {m}");
            assert_eq!(fresh, dirty, "m = {m}");
        }
    }

    /// `group_row_blocks` hands out every value of the `[m, groups, r]` output once: block
    /// `(g, first)` of row `i` is columns `first..` of group `g` in row `i`, the last block of
    /// a group narrower.
    #[test]
    fn group_row_blocks_cover_every_value_once() {
        for (rows, groups, r, per) in
            [(3, 2, 10, 4), (2, 1, 8, 8), (1, 3, 5, 7), (0, 2, 6, 2), (4, 2, 9, 1), (2, 0, 4, 2), (3, 2, 0, 4)]
        {
            let width = groups * r;
            let mut out = vec![0usize; rows * width];
            for ((g, first), segments) in group_row_blocks(&mut out, groups, r, per) {
                assert_eq!(segments.len(), rows, "({rows}, {groups}, {r}, {per})");
                for (i, segment) in segments.into_iter().enumerate() {
                    assert_eq!(segment.len(), per.min(r - first));
                    for (c, v) in segment.iter_mut().enumerate() {
                        *v += i * width + g * r + first + c + 1;
                    }
                }
            }
            assert_eq!(out, (1..=rows * width).collect::<Vec<_>>(), "({rows}, {groups}, {r}, {per})");
        }
    }

    /// A weight of no rows gives empty outputs, grouped or not, for one input row or several
    /// (the grouped prefill path once asked for a segment per row of a block of no columns).
    #[test]
    fn a_weight_of_no_rows_gives_empty_outputs() {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let be = CpuBackend::new();
        let t = HostTensor::from_bytes("w", DType::F32, vec![0, 4], vec![]).unwrap();
        let w = CpuWeight::from_stored(&StoredWeight::float(t).unwrap()).unwrap();
        for m in [1, 2, 9] {
            let x = be.upload(&vec![0.5; m * 2 * 4], &[m, 2, 4]).unwrap();
            let y = be.grouped_linear(&x, &w, 2).unwrap();
            assert_eq!((y.shape.clone(), y.data.len()), (vec![m, 2, 0], 0), "grouped, m = {m}");
            let x = be.upload(&vec![0.5; m * 4], &[m, 4]).unwrap();
            let y = be.linear(&x, &w).unwrap();
            assert_eq!((y.shape.clone(), y.data.len()), (vec![m, 0], 0), "m = {m}");
        }
    }

    /// `grouped_linear` gives, group by group, the bits of `linear` on that group's input and
    /// weight rows (it cuts each group's rows as `linear` cuts a matrix), for decode (one row,
    /// a few rows) and prefill (more rows than a GEMV takes), on a packed (FP8) weight.
    #[test]
    fn grouped_linear_is_linear_per_group_bit_for_bit() {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let be = CpuBackend::new();
        let mut seed = 0x5bd1_e995u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        let (groups, r, k): (usize, usize, usize) = (3, 320, 256);
        let codes: Vec<u8> = (0..groups * r * k).map(|_| (next() % 0x7f) as u8 | ((next() & 1) as u8) << 7).collect();
        let t = |name: &str, dt, shape: Vec<usize>, b: Vec<u8>| HostTensor::from_bytes(name, dt, shape, b).unwrap();
        // An FP8 weight of `rows` rows from `codes`, every 128 × 128 block scaled by 2⁻⁷ (F32).
        let fp8 = |rows: usize, codes: &[u8]| {
            let blocks = vec![rows.div_ceil(128), k.div_ceil(128)];
            let scales = (0..blocks[0] * blocks[1] * 4).map(|i| if i % 4 == 3 { 0x3c } else { 0 }).collect();
            let w = StoredWeight::detect(
                &t("w.weight", DType::F8E4M3, vec![rows, k], codes.to_vec()),
                Some(&t("w.scale", DType::F32, blocks, scales)),
                &[rows, k],
            )
            .unwrap();
            CpuWeight::from_stored(&w).unwrap()
        };
        let w = fp8(groups * r, &codes);
        for m in [1, 5, 200] {
            let x: Vec<f32> = (0..m * groups * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let got = be.grouped_linear(&CpuTensor::new(vec![m, groups, k], x.clone()), &w, groups).unwrap();
            for g in 0..groups {
                let xg: Vec<f32> =
                    (0..m).flat_map(|i| x[(i * groups + g) * k..(i * groups + g + 1) * k].to_vec()).collect();
                let wg = fp8(r, &codes[g * r * k..(g + 1) * r * k]);
                let want = be.linear(&CpuTensor::new(vec![m, k], xg), &wg).unwrap();
                for i in 0..m {
                    let a = &got.data[(i * groups + g) * r..(i * groups + g + 1) * r];
                    let b = &want.data[i * r..(i + 1) * r];
                    assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()), "m = {m}, group {g}, row {i}");
                }
            }
        }
    }

    /// `column_blocks` hands out every value of the matrix once: block `j` of row `i` is
    /// columns `j·block ..` of row `i`, the last block narrower.
    #[test]
    fn column_blocks_cover_every_value_once() {
        for (rows, width, block) in [(3, 10, 4), (2, 8, 8), (1, 5, 7), (0, 6, 2), (4, 9, 1)] {
            let mut out = vec![0usize; rows * width];
            for (j, segments) in column_blocks(&mut out, width, block).into_iter().enumerate() {
                assert_eq!(segments.len(), rows, "({rows}, {width}, {block})");
                for (i, segment) in segments.into_iter().enumerate() {
                    assert_eq!(segment.len(), block.min(width - j * block));
                    for (c, v) in segment.iter_mut().enumerate() {
                        *v += i * width + j * block + c + 1;
                    }
                }
            }
            assert_eq!(out, (1..=rows * width).collect::<Vec<_>>(), "({rows}, {width}, {block})");
        }
    }

    #[test]
    fn gemv_tasks_are_never_empty_and_cover_small_matrices_evenly() {
        for threads in [0, 1, 2, 3, 16, 64] {
            for rows in 1..2100 {
                let per = gemv_rows_per_task(rows, threads);
                assert!(per > 0, "{rows} rows, {threads} threads");
                if rows < 2 * ROW_BLOCK * threads.max(1) {
                    assert!(per.is_multiple_of(2) || per == 1, "{rows} rows, {threads} threads: {per}");
                    assert!(rows.div_ceil(per) <= threads.max(1), "{rows} rows, {threads} threads: {per}");
                } else {
                    assert!(per.is_multiple_of(ROW_BLOCK), "{rows} rows, {threads} threads: {per}");
                }
            }
        }
    }

    /// The team's pieces copy what the serial concatenation does, for pieces that start and end
    /// anywhere in the inputs' runs (empty inputs and one-value runs included).
    #[test]
    fn concat_values_is_concat_rows() {
        // (output shape, input shapes, axis)
        type Case<'a> = (&'a [usize], &'a [&'a [usize]], usize);
        let cases: [Case; 5] = [
            (&[40000, 3], &[&[25000, 3], &[15000, 3]], 0),
            (&[3, 40000], &[&[3, 1], &[3, 39998], &[3, 1]], 1),
            (&[700, 7, 30], &[&[700, 7, 12], &[700, 7, 0], &[700, 7, 18]], 2),
            (&[5, 9000], &[&[5, 0], &[5, 9000]], 1),
            (&[20000, 1], &[&[1, 1], &[19999, 1]], 0),
        ];
        for (shape, shapes, axis) in cases {
            let data: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| (0..s.iter().product::<usize>()).map(|v| (v * 10 + i) as f32).collect())
                .collect();
            let slices: Vec<&[f32]> = data.iter().map(|d| &d[..]).collect();
            let want = concat_rows(shape, shapes, &slices, axis);
            let got = concat_values(shape, shapes, &slices, axis);
            assert_eq!(bits(&got), bits(&want), "{shape:?} from {shapes:?} along {axis}");
        }
    }

    #[test]
    fn concat_rows_joins_contiguous_runs() {
        let (a, b) = ([1, 2, 3, 4, 5, 6], [7, 8]);
        // [2, 3] ++ [2, 1] along axis 1.
        assert_eq!(concat_rows(&[2, 4], &[&[2, 3], &[2, 1]], &[&a, &b], 1), vec![1, 2, 3, 7, 4, 5, 6, 8]);
        // [3, 2] ++ [1, 2] along axis 0.
        assert_eq!(concat_rows(&[4, 2], &[&[3, 2], &[1, 2]], &[&a, &b], 0), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        // Empty runs.
        let e: [i32; 0] = [];
        assert_eq!(concat_rows(&[1 << 40, 0], &[&[1 << 40, 0], &[1 << 40, 0]], &[&e, &e], 1), Vec::<i32>::new());
    }
}
