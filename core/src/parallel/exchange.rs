//! The host side of a device communicator's collectives (HCCL's and NCCL's): the metadata the
//! ranks exchange before a collective whose sizes only each caller knows, and the checks and
//! sizes every rank then computes identically from it.
//!
//! The libraries trust their callers: ranks that disagree on counts read past buffers or wait
//! for ever. So before an all-gather along a dim, an all-to-all-v or a split, every rank
//! all-gathers a fixed-size record of its call ([`Meta`], [`Meta::words`] u64 words: the
//! collective, whether this rank's own arguments are invalid and why, the dim or colour, the
//! shape, the rows to each rank) and reads everyone's back on the host. A misuse then fails on
//! every rank with the same message (the ranks' arguments side by side) instead of a hang, and
//! the sizes that the collective needs (the parts' lengths along the dim, the rows each rank
//! receives) are known everywhere. The library's own call and the device tensors' layout stay
//! with the backend; this module only does arithmetic on shapes.

use super::CollectiveKind;

/// Dims a tensor may have in the collectives that exchange shapes.
pub const MAX_DIMS: usize = 8;
/// Bytes of an invalid-argument message carried by the exchange (longer ones are cut).
pub const MSG_BYTES: usize = 256;

/// Every collective a record can name, in the order of its code.
const KINDS: [CollectiveKind; 7] = [
    CollectiveKind::AllReduce,
    CollectiveKind::AllGather,
    CollectiveKind::ReduceScatter,
    CollectiveKind::AllToAllV,
    CollectiveKind::Broadcast,
    CollectiveKind::Barrier,
    CollectiveKind::Split,
];

/// A rank's record of a collective call, as exchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub kind: CollectiveKind,
    /// This rank's reason its arguments are invalid (then the collective fails everywhere).
    pub invalid: Option<String>,
    /// The dim (all-gather) or colour (split).
    pub arg: u64,
    pub shape: Vec<usize>,
    /// All-to-all-v: rows to each rank.
    pub rows: Vec<usize>,
}

impl Meta {
    /// A record of `kind` with `arg` and nothing else (a split's colour).
    pub fn of(kind: CollectiveKind, arg: u64) -> Meta {
        Meta { kind, invalid: None, arg, shape: Vec::new(), rows: Vec::new() }
    }

    /// u64 words per rank in a communicator of `size` ranks: kind, status, arg, ndim, the
    /// shape, the rows to each rank, the message.
    pub fn words(size: usize) -> usize {
        4 + MAX_DIMS + size + MSG_BYTES / 8
    }

    /// This rank's [`Meta::words`] words. A shape of more than [`MAX_DIMS`] dims makes the
    /// record invalid (rank `rank`'s message says so).
    pub fn encode(&self, rank: usize, size: usize) -> Vec<u64> {
        let len = Meta::words(size);
        let mut words = vec![0u64; len];
        words[0] = KINDS.iter().position(|k| *k == self.kind).unwrap_or(0) as u64;
        words[2] = self.arg;
        let mut invalid = self.invalid.clone();
        if invalid.is_none() && self.shape.len() > MAX_DIMS {
            invalid = Some(invalid_args(
                rank,
                self.kind,
                format!("shape {:?} has more than {MAX_DIMS} dims, the most this communicator exchanges", self.shape),
            ));
        }
        words[3] = self.shape.len().min(MAX_DIMS) as u64;
        for (w, &d) in words[4..4 + MAX_DIMS].iter_mut().zip(&self.shape) {
            *w = d as u64;
        }
        for (w, &r) in words[4 + MAX_DIMS..4 + MAX_DIMS + size].iter_mut().zip(&self.rows) {
            *w = r as u64;
        }
        if let Some(msg) = &invalid {
            words[1] = 1;
            let mut bytes = msg.as_bytes().to_vec();
            bytes.truncate(MSG_BYTES);
            bytes.resize(MSG_BYTES, 0);
            for (w, c) in words[len - MSG_BYTES / 8..].iter_mut().zip(bytes.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            }
        }
        words
    }

    /// Every rank's record from the gathered words (`size` records of [`Meta::words`]), with
    /// the checks every rank makes identically: the same collective everywhere (`kind`, this
    /// rank's), and no rank with invalid arguments (the first one's message).
    ///
    /// # Errors
    /// The message every rank reports.
    pub fn decode_all(words: &[u64], size: usize, kind: CollectiveKind) -> Result<Vec<Meta>, String> {
        let len = Meta::words(size);
        let metas: Vec<Meta> = words
            .chunks_exact(len)
            .map(|w| {
                let ndim = (w[3] as usize).min(MAX_DIMS);
                let invalid = (w[1] != 0).then(|| {
                    let bytes: Vec<u8> = w[len - MSG_BYTES / 8..].iter().flat_map(|x| x.to_le_bytes()).collect();
                    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                    String::from_utf8_lossy(&bytes[..end]).into_owned()
                });
                Meta {
                    kind: KINDS.get(w[0] as usize).copied().unwrap_or(CollectiveKind::Barrier),
                    invalid,
                    arg: w[2],
                    shape: w[4..4 + ndim].iter().map(|&d| d as usize).collect(),
                    rows: w[4 + MAX_DIMS..4 + MAX_DIMS + size].iter().map(|&r| r as usize).collect(),
                }
            })
            .collect();
        if metas.len() != size {
            return Err(format!("the metadata exchange returned {} records for {size} ranks", metas.len()));
        }
        if metas.iter().any(|m| m.kind != kind) {
            return Err(format!(
                "ranks called different collectives at the same step: {}",
                per_rank(&metas, |m| m.kind.name())
            ));
        }
        if let Some(msg) = metas.iter().find_map(|m| m.invalid.clone()) {
            return Err(msg);
        }
        Ok(metas)
    }
}

/// "rank R called KIND with invalid arguments: WHAT".
pub fn invalid_args(rank: usize, kind: CollectiveKind, what: impl std::fmt::Display) -> String {
    format!("rank {rank} called {} with invalid arguments: {what}", kind.name())
}

/// "rank 0 X, rank 1 Y, …".
pub fn per_rank<T: std::fmt::Display>(metas: &[Meta], f: impl Fn(&Meta) -> T) -> String {
    metas.iter().enumerate().map(|(r, m)| format!("rank {r} {}", f(m))).collect::<Vec<_>>().join(", ")
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn describe_shape(shape: &[usize]) -> String {
    format!("{shape:?} ({} values)", numel(shape))
}

/// `(outer, len, inner)` of `shape` around `dim`.
pub fn around(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (numel(&shape[..dim]), shape[dim], numel(&shape[dim + 1..]))
}

/// An all-gather along a dim whose length may differ between ranks, done as one equal-count
/// all-gather: each rank sends its part zero-padded to `max` along the dim, so the gathered
/// buffer is `[size, outer, max, inner]`, and the result `[outer, Σ lens, inner]` is read back
/// from it (`lens[r]` of rank r's `max`).
#[derive(Clone, Debug, PartialEq)]
pub struct GatherPlan {
    /// Every rank's length along the dim.
    pub lens: Vec<usize>,
    /// Values before the dim, along it (this rank), after it.
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    /// The longest part.
    pub max: usize,
    /// Values each rank sends (`outer · max · inner`; 0: nothing moves anywhere).
    pub chunk: usize,
    pub out_shape: Vec<usize>,
}

impl GatherPlan {
    /// This rank's record for an all-gather of a tensor of `shape` along `dim`.
    pub fn meta(rank: usize, shape: &[usize], dim: usize) -> Meta {
        let kind = CollectiveKind::AllGather;
        let invalid = (dim >= shape.len())
            .then(|| invalid_args(rank, kind, format!("dim {dim} is out of range for shape {shape:?}")));
        Meta { kind, invalid, arg: dim as u64, shape: shape.to_vec(), rows: Vec::new() }
    }

    /// The plan from every rank's record ([`GatherPlan::meta`], exchanged).
    ///
    /// # Errors
    /// Ranks that disagree on the dim or whose shapes differ outside it.
    pub fn new(metas: &[Meta], shape: &[usize], dim: usize) -> Result<GatherPlan, String> {
        if metas.iter().any(|m| m.arg != dim as u64) {
            return Err(format!("all_gather: the ranks disagree on dim: {}", per_rank(metas, |m| m.arg)));
        }
        let others = |s: &[usize]| {
            let mut s = s.to_vec();
            s[dim] = 0;
            s
        };
        if metas.iter().any(|m| m.shape.len() != shape.len() || others(&m.shape) != others(shape)) {
            return Err(format!(
                "all_gather: the ranks' shapes differ outside dim {dim}: {}",
                per_rank(metas, |m| describe_shape(&m.shape))
            ));
        }
        let lens: Vec<usize> = metas.iter().map(|m| m.shape[dim]).collect();
        let (outer, len, inner) = around(shape, dim);
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut out_shape = shape.to_vec();
        out_shape[dim] = lens.iter().sum();
        Ok(GatherPlan { outer, len, inner, max, chunk: outer * max * inner, out_shape, lens })
    }

    /// Whether every rank's part has the same length (the gathered buffer needs no unpadding).
    pub fn equal_parts(&self) -> bool {
        self.lens.iter().all(|&l| l == self.max)
    }
}

/// A reduce-scatter along a dim, done as one reduce-scatter of contiguous parts: rank r gets
/// the sum of every rank's `r`-th slice of `len / size` along the dim. With `outer > 1` the
/// input is first arranged as `[size, outer, part · inner]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatterPlan {
    pub outer: usize,
    /// Length along the dim of each rank's result.
    pub part: usize,
    pub inner: usize,
    pub out_shape: Vec<usize>,
}

impl ScatterPlan {
    /// # Errors
    /// A dim out of range, or a length along it that is not a multiple of the ranks (rank
    /// `rank`'s invalid-argument message).
    pub fn new(rank: usize, size: usize, shape: &[usize], dim: usize) -> Result<ScatterPlan, String> {
        let kind = CollectiveKind::ReduceScatter;
        if dim >= shape.len() {
            return Err(invalid_args(rank, kind, format!("dim {dim} is out of range for shape {shape:?}")));
        }
        if !shape[dim].is_multiple_of(size) {
            return Err(invalid_args(
                rank,
                kind,
                format!("dim {dim} of shape {shape:?} has size {}, not a multiple of the {size} ranks", shape[dim]),
            ));
        }
        let (outer, len, inner) = around(shape, dim);
        let mut out_shape = shape.to_vec();
        out_shape[dim] = len / size;
        Ok(ScatterPlan { outer, part: len / size, inner, out_shape })
    }
}

/// An all-to-all-v of the rows of a `[rows, ..]` tensor: `send_rows[j]` consecutive rows go to
/// rank j; rank i's rows arrive in rank order.
#[derive(Clone, Debug, PartialEq)]
pub struct AllToAllPlan {
    /// Values per row.
    pub width: usize,
    /// Rows received from each rank.
    pub counts: Vec<usize>,
    pub out_shape: Vec<usize>,
    /// Rows every rank sends, together (0: nothing moves anywhere).
    pub moved: usize,
}

impl AllToAllPlan {
    /// This rank's record for sending `send_rows` of a tensor of `shape`.
    pub fn meta(rank: usize, size: usize, shape: &[usize], send_rows: &[usize]) -> Meta {
        let kind = CollectiveKind::AllToAllV;
        let invalid = match shape.first() {
            None => Some(invalid_args(rank, kind, "x is a scalar; it needs a row dim")),
            Some(_) if send_rows.len() != size => {
                Some(invalid_args(rank, kind, format!("{} send_rows for {size} ranks", send_rows.len())))
            }
            Some(&rows) if send_rows.iter().try_fold(0usize, |a, &b| a.checked_add(b)) != Some(rows) => Some(
                invalid_args(rank, kind, format!("send_rows {send_rows:?} do not sum to the {rows} rows of {shape:?}")),
            ),
            Some(_) => None,
        };
        Meta { kind, invalid, arg: 0, shape: shape.to_vec(), rows: send_rows.to_vec() }
    }

    /// The plan for rank `rank` from every rank's record ([`AllToAllPlan::meta`], exchanged).
    ///
    /// # Errors
    /// Ranks whose rows differ (the shape after the row dim).
    pub fn new(metas: &[Meta], rank: usize, shape: &[usize]) -> Result<AllToAllPlan, String> {
        let rest = |s: &[usize]| s.get(1..).map(<[usize]>::to_vec);
        if metas.iter().any(|m| rest(&m.shape) != rest(shape)) {
            return Err(format!(
                "all_to_all_v: the ranks' rows differ (shape after the row dim, and values per row): {}",
                per_rank(metas, |m| {
                    let r = m.shape.get(1..).unwrap_or(&[]);
                    format!("{r:?} ({})", numel(r))
                })
            ));
        }
        let counts: Vec<usize> = metas.iter().map(|m| m.rows[rank]).collect();
        let mut out_shape = shape.to_vec();
        out_shape[0] = counts.iter().sum();
        let moved = metas.iter().flat_map(|m| m.rows.iter()).sum();
        Ok(AllToAllPlan { width: numel(&shape[1..]), counts, out_shape, moved })
    }
}

/// Exclusive prefix sums (the displacements of consecutive parts).
pub fn starts(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0usize, |acc, &c| {
            let s = *acc;
            *acc += c;
            Some(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every rank would read back after the all-gather of the records.
    fn exchanged(metas: &[Meta]) -> Vec<u64> {
        metas.iter().enumerate().flat_map(|(r, m)| m.encode(r, metas.len())).collect()
    }

    #[test]
    fn records_round_trip() {
        let m = AllToAllPlan::meta(1, 3, &[5, 2, 7], &[1, 0, 4]);
        let words = exchanged(&[m.clone(), m.clone(), m.clone()]);
        assert_eq!(Meta::decode_all(&words, 3, CollectiveKind::AllToAllV).unwrap(), vec![m.clone(), m.clone(), m]);
        let split = Meta::of(CollectiveKind::Split, 17);
        let got = Meta::decode_all(&exchanged(&[split.clone(), split.clone()]), 2, CollectiveKind::Split).unwrap();
        assert_eq!(got[1].arg, 17);
    }

    #[test]
    fn every_rank_reads_the_same_failure() {
        let ok = GatherPlan::meta(0, &[2, 3], 1);
        let bad = GatherPlan::meta(1, &[2, 3], 2);
        let e = Meta::decode_all(&exchanged(&[ok.clone(), bad]), 2, CollectiveKind::AllGather).unwrap_err();
        assert_eq!(e, "rank 1 called all_gather with invalid arguments: dim 2 is out of range for shape [2, 3]");
        let other = Meta::of(CollectiveKind::Barrier, 0);
        let e = Meta::decode_all(&exchanged(&[ok, other]), 2, CollectiveKind::AllGather).unwrap_err();
        assert!(e.contains("different collectives") && e.contains("rank 1 barrier"), "{e}");
        // A message longer than the record holds is cut, not lost.
        let long = Meta { invalid: Some("x".repeat(1000)), ..Meta::of(CollectiveKind::Barrier, 0) };
        let e = Meta::decode_all(&exchanged(&[long.clone(), long]), 2, CollectiveKind::Barrier).unwrap_err();
        assert_eq!(e.len(), MSG_BYTES);
        let deep = GatherPlan::meta(0, &[1; MAX_DIMS + 1], 0);
        let e = Meta::decode_all(&exchanged(&[deep.clone(), deep]), 2, CollectiveKind::AllGather).unwrap_err();
        assert!(e.contains("more than 8 dims"), "{e}");
    }

    #[test]
    fn gather_plan_pads_to_the_longest_part() {
        let metas = [GatherPlan::meta(0, &[2, 3, 4], 1), GatherPlan::meta(1, &[2, 1, 4], 1)];
        let p = GatherPlan::new(&metas, &[2, 1, 4], 1).unwrap();
        assert_eq!((p.outer, p.len, p.inner, p.max, p.chunk), (2, 1, 4, 3, 24));
        assert_eq!((p.out_shape.clone(), p.equal_parts()), (vec![2, 4, 4], false));
        let skew = [GatherPlan::meta(0, &[2, 3, 4], 1), GatherPlan::meta(1, &[2, 3, 5], 1)];
        assert!(GatherPlan::new(&skew, &[2, 3, 4], 1).unwrap_err().contains("differ outside dim 1"));
        let dims = [GatherPlan::meta(0, &[2, 3], 1), GatherPlan::meta(1, &[2, 3], 0)];
        assert!(GatherPlan::new(&dims, &[2, 3], 1).unwrap_err().contains("disagree on dim: rank 0 1, rank 1 0"));
    }

    #[test]
    fn scatter_and_all_to_all_plans() {
        let p = ScatterPlan::new(0, 2, &[3, 4, 5], 1).unwrap();
        assert_eq!((p.outer, p.part, p.inner, p.out_shape), (3, 2, 5, vec![3, 2, 5]));
        assert!(ScatterPlan::new(1, 2, &[3, 3], 1).unwrap_err().starts_with("rank 1 called reduce_scatter"));
        assert!(ScatterPlan::new(0, 2, &[4], 1).unwrap_err().contains("out of range"));
        let metas = [AllToAllPlan::meta(0, 2, &[3, 2], &[1, 2]), AllToAllPlan::meta(1, 2, &[1, 2], &[0, 1])];
        assert!(metas.iter().all(|m| m.invalid.is_none()));
        let p = AllToAllPlan::new(&metas, 1, &[1, 2]).unwrap();
        assert_eq!((p.width, p.counts, p.out_shape, p.moved), (2, vec![2, 1], vec![3, 2], 4));
        assert!(AllToAllPlan::meta(0, 2, &[3, 2], &[1, 1]).invalid.unwrap().contains("do not sum to the 3 rows"));
        assert!(AllToAllPlan::meta(0, 2, &[], &[]).invalid.unwrap().contains("scalar"));
        let wide = [AllToAllPlan::meta(0, 2, &[1, 2], &[1, 0]), AllToAllPlan::meta(1, 2, &[1, 3], &[1, 0])];
        assert!(AllToAllPlan::new(&wide, 0, &[1, 2]).unwrap_err().contains("rows differ"));
        assert_eq!(starts(&[2, 0, 3]), vec![0, 2, 2]);
    }
}
