//! Expert FFNs (`w2 · swiglu(w1·x, w3·x)`, spec §B.5) for the CPU, several experts at once.
//!
//! The trait's composition runs each expert as three `linear` calls and four elementwise ops,
//! one expert after another: for a decode token with six routed experts and the shared one,
//! that is 21 parallel hand-offs of a few tens of microseconds each. Here every chosen expert's
//! `w1` and `w3` rows are one parallel pass (with the SwiGLU applied per block of rows as it is
//! produced), and every expert's `w2` rows a second one. Each output value is computed exactly
//! as the composition computes it (the same `linear` blocks, the same elementwise formulas, the
//! same ascending-expert summation), so the results are identical, bit for bit.

use std::mem::MaybeUninit;

use dsv4_core::act_quant::{fake_quant_rows, FakeQuant};
use dsv4_core::backend::ExpertWeights;
use dsv4_core::precision::Precision;
use ndarray::ArrayView2;

use crate::kernels::act::swiglu_slice;
use crate::kernels::round::round_bf16_slice;
use crate::kernels::Isa;
use crate::ops::{column_blocks, gate_up_block, linear_block, prefill_rows_per_task, write_rows, ROW_BLOCK};
use crate::par;
use crate::storage::CpuWeight;

/// One expert applied to `m` rows of `x` (`[m, k]`, row-major).
pub(crate) struct FfnJob<'a> {
    /// Already e4m3-quantised where the official quantisation applies (the caller's job: the
    /// quantisation of a row does not depend on the expert).
    pub x: &'a [f32],
    /// Every value of `x` is a BF16 value (`CpuTensor::bf16`).
    pub x_bf16: bool,
    pub m: usize,
    pub expert: &'a ExpertWeights<CpuWeight>,
    /// Under the official quantisation, each row's routing weight, applied to the SwiGLU output
    /// before w2 (`composed::expert_ffn_weighted`); None otherwise.
    pub row_weights: Option<&'a [f32]>,
}

/// The weight-row blocks of matrix `rows` for every job: (job, first row, rows).
///
/// Jobs of one token (decode) get equal blocks of [`DECODE_MIN_BLOCK_ROWS`] to
/// [`DECODE_BLOCK_ROWS`] rows (unless a matrix has fewer), about four per thread over all
/// jobs: a 64-row block of a small FP4 expert matrix (16-32 KB in the 0.75 B benchmark model)
/// is too little to hide a task's start (the first rows' memory latency, the input's permuted
/// layout) behind; on 2 threads, 64-row blocks made the routed experts of a decode token 40%
/// slower than 512-row ones; every row is computed the same way whatever block it is in.
/// Prefill jobs (more rows) are cut as `linear` cuts a matrix ([`prefill_rows_per_task`]):
/// each block is a GEMM, whose bits depend on its shape, and the result must be the
/// composition's (`linear` per matrix).
fn blocks(jobs: &[FfnJob], rows: impl Fn(&FfnJob) -> usize) -> Vec<(usize, usize, usize)> {
    let threads = crate::threads::size().max(1);
    let decode_rows: usize = jobs.iter().filter(|j| j.m == 1).map(&rows).sum();
    let decode_block =
        (decode_rows / (4 * threads)).clamp(DECODE_MIN_BLOCK_ROWS, DECODE_BLOCK_ROWS).next_multiple_of(ROW_BLOCK);
    let mut out = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let n = rows(job);
        if n == 0 {
            continue;
        }
        // Equal blocks (a 512-row matrix in 384-row blocks would leave a 128-row one).
        let block = if job.m == 1 {
            n.div_ceil(n.div_ceil(decode_block)).next_multiple_of(ROW_BLOCK)
        } else {
            prefill_rows_per_task(n)
        };
        out.extend((0..n.div_ceil(block)).map(|b| (j, b * block, block.min(n - b * block))));
    }
    out
}

/// The largest block of weight rows a one-token job's task takes ([`blocks`]).
const DECODE_BLOCK_ROWS: usize = 512;

/// The smallest block of weight rows a one-token job's task takes, unless the matrix is
/// smaller: the shared expert alone (one job) was cut into 64-row blocks, which each paid a
/// task's start (9 G values/s a thread for its FP8 rows, 11 in 256-row blocks).
const DECODE_MIN_BLOCK_ROWS: usize = 256;

/// A block of [`blocks`] (job, first row, rows) with its row segments of the job's output.
type BlockTask<'a> = ((usize, usize, usize), Vec<&'a mut [MaybeUninit<f32>]>);

/// The tasks that fill `outs` (one `[m, cols(j)]` matrix per job): every block of `items` with
/// that block's row segments of its job's matrix, as [`column_blocks`] cuts it ([`blocks`] cuts
/// every job's rows into equal blocks but the last, in ascending order). Each task writes its
/// own block (a serial copy of every block into place after the parallel pass, which this
/// replaced, ran on the calling thread with the other threads idle).
///
/// Panics unless every value of every job's matrix is in exactly one task's segments, each
/// segment `n` values (the [`par::Unwritten::assume_written`] of the callers rests on it).
fn block_tasks<'a>(
    outs: &'a mut [par::Unwritten],
    items: &[(usize, usize, usize)],
    cols: impl Fn(usize) -> usize,
) -> Vec<BlockTask<'a>> {
    let mut segments: Vec<std::vec::IntoIter<Vec<&mut [MaybeUninit<f32>]>>> = outs
        .iter_mut()
        .enumerate()
        .map(|(j, out)| {
            // The block width of job j: its first item's (every block but the last has it).
            let block = items.iter().find(|it| it.0 == j).map_or(1, |it| it.2);
            let out = out.values();
            assert!(out.len() % cols(j).max(1) == 0, "job {j}: {} values in rows of {}", out.len(), cols(j));
            column_blocks(out, cols(j), block).into_iter()
        })
        .collect();
    let tasks = items
        .iter()
        .map(|&(j, start, n)| {
            let segments = segments[j].next().expect("a block per item");
            assert!(segments.iter().all(|s| s.len() == n), "block ({j}, {start}, {n}) and its segments");
            ((j, start, n), segments)
        })
        .collect();
    assert!(segments.iter_mut().all(|s| s.next().is_none()), "a block without an item");
    tasks
}

/// The tasks in decreasing order of their multiply-adds (input rows times weight rows; every
/// block of a pass has the same width), ties in their order: the team hands tasks out in
/// order, so the last ones to start are the shortest and the threads finish together. In
/// expert order, a 512-token chunk's experts take from about 10 to 380 tokens (score-routed
/// layers of the 0.75 B benchmark model), and a block of the busiest one, handed out last, kept
/// one thread at work for up to a millisecond and a half while the others waited. Each task
/// writes its own block, so the order changes no result.
fn longest_first<'a>(mut tasks: Vec<BlockTask<'a>>, jobs: &[FfnJob]) -> Vec<BlockTask<'a>> {
    tasks.sort_by_key(|&((j, _, n), _)| std::cmp::Reverse(jobs[j].m * n));
    tasks
}

fn view(x: &[f32], m: usize, k: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((m, k), x).expect("expert input shape")
}

/// `w2 · swiglu(w1·x, w3·x)` for every job, `[m, d]` each (d = rows of `w2`). Where `act`
/// rounds to BF16 the outputs of w1, w3, the SwiGLU (times the row weight, if any) and w2 are
/// rounded, and where it simulates the official quantisation w2's input is e4m3-quantised on
/// low-bit experts, as the composition (`composed::expert_ffn_weighted`) does.
pub(crate) fn expert_ffns(jobs: &[FfnJob], limit: f32, act: Precision) -> Vec<Vec<f32>> {
    let bf16 = act.rounds_to_bf16();
    let isa = Isa::active();
    // Pass 1: the hidden activations, one block of w1/w3 rows per item.
    let items = blocks(jobs, |j| j.expert.w1.rows);
    let work: usize = jobs.iter().map(|j| 2 * j.m * j.expert.w1.cols * j.expert.w1.rows).sum();
    let mut hidden: Vec<par::Unwritten> = jobs.iter().map(|j| par::Unwritten::new(j.m * j.expert.w1.rows)).collect();
    let tasks = longest_first(block_tasks(&mut hidden, &items, |j| jobs[j].expert.w1.rows), jobs);
    par::for_each_owned(tasks, work, |((j, start, n), out)| {
        let job = &jobs[j];
        let x = view(job.x, job.m, job.expert.w1.cols);
        let gate_up = gate_up_block(x, job.x_bf16, &job.expert.w1, &job.expert.w3, start, n);
        // Row by row over plain slices: an iterator over the `[m, n]` arrays with the row's
        // routing weight found by `i / n` (a division per value) took about 4% of a 512-token
        // prefill of the 0.75 B benchmark model.
        // In bf16 the gate and up values are rounded first (into `rounded`), the SwiGLU (times
        // the row weight) rounded after: the composition's rounding points around the same
        // vectorised SwiGLU.
        let mut rounded = if bf16 { vec![0f32; 2 * n] } else { Vec::new() };
        for (r, h) in out.into_iter().enumerate() {
            let h = par::zero(h);
            let (g, u) = gate_up.row(r, n);
            let weight = job.row_weights.map(|w| w[r]);
            if !bf16 {
                swiglu_slice(isa, g, u, limit, weight, h);
                continue;
            }
            let (gr, ur) = rounded.split_at_mut(n);
            gr.copy_from_slice(g);
            ur.copy_from_slice(u);
            round_bf16_slice(isa, gr);
            round_bf16_slice(isa, ur);
            swiglu_slice(isa, gr, ur, limit, weight, h);
            round_bf16_slice(isa, h);
        }
    });
    // SAFETY: `block_tasks` put every value of every job's matrix in one task's segments (it
    // checks), `for_each_owned` ran every task (it panics, never reaching this line, if one
    // did), and each task zeroed every row segment it was given (`par::zero`) before the SwiGLU.
    let mut hidden: Vec<Vec<f32>> = hidden.into_iter().map(|h| unsafe { h.assume_written() }).collect();
    for (job, h) in jobs.iter().zip(hidden.iter_mut()) {
        if act.simulates_quant() && job.expert.low_bit {
            fake_quant_rows(h, job.expert.w1.rows, FakeQuant::LINEAR_INPUT);
        }
    }
    // Pass 2: the outputs, one block of w2 rows per item.
    let items = blocks(jobs, |j| j.expert.w2.rows);
    let work: usize = jobs.iter().map(|j| j.m * j.expert.w2.cols * j.expert.w2.rows).sum();
    let mut outs: Vec<par::Unwritten> = jobs.iter().map(|j| par::Unwritten::new(j.m * j.expert.w2.rows)).collect();
    let tasks = longest_first(block_tasks(&mut outs, &items, |j| jobs[j].expert.w2.rows), jobs);
    par::for_each_owned(tasks, work, |((j, start, n), out)| {
        let job = &jobs[j];
        let h = view(&hidden[j], job.m, job.expert.w2.cols);
        let mut y = linear_block(h, bf16, &job.expert.w2, start, n);
        if bf16 {
            round_bf16_slice(isa, y.as_slice_mut().expect("standard layout"));
        }
        write_rows(out, &y);
    });
    // SAFETY: as for `hidden`; each task wrote every row segment (`write_rows` writes one whole
    // segment per output row, and checks that there is one per row).
    outs.into_iter().map(|o| unsafe { o.assume_written() }).collect()
}
