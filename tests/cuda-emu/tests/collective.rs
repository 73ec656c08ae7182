//! The emulated NCCL communicator (`EmuComm`): every call's results against a plain host
//! computation, one thread per rank, and every misuse failing on every rank, promptly.

use std::thread;
use std::time::{Duration, Instant};

use dsv4_backend_cuda::collective::{DeviceComm, Span, Transfer};
use dsv4_backend_cuda::Device;
use dsv4_core::error::{Error, Result};
use dsv4_cuda_emu::{EmuBuffer, EmuComm, EmulatedDevice};

/// A timeout no passing test comes near; it only bounds a broken one.
const SAFETY: Duration = Duration::from_secs(20);

/// Runs `f(devices, member)` for every rank of a new world over `n` new devices, on one thread
/// per rank; the results in rank order.
fn on_ranks<T: Send>(n: usize, timeout: Duration, f: impl Fn(&[EmulatedDevice], EmuComm) -> T + Sync) -> Vec<T> {
    let devs: Vec<EmulatedDevice> = (0..n).map(|_| EmulatedDevice::new()).collect();
    let refs: Vec<&EmulatedDevice> = devs.iter().collect();
    let world = EmuComm::world_with_timeout(&refs, timeout).unwrap();
    let (devs, f) = (&devs, &f);
    thread::scope(|s| {
        let handles: Vec<_> = world.into_iter().map(|c| s.spawn(move || f(devs, c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bits(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bits(bytes).into_iter().map(f32::from_bits).collect()
}

fn download(dev: &EmulatedDevice, buf: &EmuBuffer) -> Vec<u8> {
    let mut out = vec![0u8; dev.len(buf)];
    dev.download(buf, 0, &mut out).unwrap();
    out
}

/// `[pad × 0xAB] data [pad × 0xAB]` on `dev`, for spans at offset `pad` whose surroundings
/// must stay untouched.
fn padded(dev: &EmulatedDevice, pad: usize, data: &[u8]) -> EmuBuffer {
    let mut bytes = vec![0xABu8; pad];
    bytes.extend_from_slice(data);
    bytes.extend(std::iter::repeat_n(0xABu8, pad));
    dev.upload(&bytes).unwrap()
}

/// The bytes of `buf` between the padding, checking the padding is intact.
fn unpadded(dev: &EmulatedDevice, buf: &EmuBuffer, pad: usize) -> Vec<u8> {
    let all = download(dev, buf);
    let (head, rest) = all.split_at(pad);
    let (data, tail) = rest.split_at(rest.len() - pad);
    assert!(head.iter().chain(tail).all(|&b| b == 0xAB), "the padding around the span was written: {all:?}");
    data.to_vec()
}

fn comm_err(r: Result<()>) -> (usize, String) {
    match r {
        Err(Error::Comm { rank, msg, .. }) => (rank, msg),
        other => panic!("expected a communicator error, got {other:?}"),
    }
}

/// A deterministic pseudo-random value in [-1, 1).
fn noise(i: usize, seed: usize) -> f32 {
    let mut s = ((i as u64) << 32 | seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Rank `r`'s f32 values: element 0 sums to 1 in rank order and to 0 in reverse order, element 1
/// is -0.0 everywhere (a sum starting from +0.0 would give +0.0), the rest of mixed magnitudes.
fn order_sensitive(r: usize, n: usize) -> Vec<f32> {
    let mut v = vec![[1e8f32, 1.0, -1e8, 1.0][r % 4], -0.0];
    v.extend((2..n).map(|i| noise(i, r) * 10f32.powi(((i * 7 + r * 3) % 9) as i32 - 4)));
    v
}

/// Elementwise sums of `parts` folded in the given order, starting from the first part.
fn fold<'a>(parts: impl IntoIterator<Item = &'a Vec<f32>>) -> Vec<f32> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap().clone();
    for p in it {
        for (a, b) in acc.iter_mut().zip(p) {
            *a += *b;
        }
    }
    acc
}

fn to_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn all_reduce_sums_in_rank_order_with_the_same_bits_on_every_rank() {
    let (n, len) = (4, 64);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| order_sensitive(r, len)).collect();
    let expected = fold(&inputs);
    // The data tells the orders apart (else the test could not fail on a wrong order).
    assert_ne!(to_bits(&expected), to_bits(&fold(inputs.iter().rev())));
    assert_eq!((expected[0], expected[1].to_bits()), (1.0, (-0.0f32).to_bits()));
    let twice = fold(&vec![expected.clone(); n]);

    let devs: Vec<EmulatedDevice> = (0..n).map(|_| EmulatedDevice::new()).collect();
    let refs: Vec<&EmulatedDevice> = devs.iter().collect();
    // The default constructor, with the environment's (or the default) timeout.
    let world = EmuComm::world(&refs).unwrap();
    let out: Vec<(Vec<u32>, Vec<u32>)> = thread::scope(|s| {
        let handles: Vec<_> = world
            .into_iter()
            .zip(&devs)
            .zip(&inputs)
            .enumerate()
            .map(|(r, ((c, dev), input))| {
                s.spawn(move || {
                    assert_eq!((c.rank(), c.size()), (r, n));
                    let send = padded(dev, 8, &f32_bytes(input));
                    let recv = padded(dev, 4, &vec![0u8; 4 * len]);
                    c.all_reduce_sum_f32(dev, Span::new(&send, 8, 4 * len), Span::new(&recv, 4, 4 * len)).unwrap();
                    let first = bits(&unpadded(dev, &recv, 4));
                    // In place: send and recv the same range.
                    c.all_reduce_sum_f32(dev, Span::new(&recv, 4, 4 * len), Span::new(&recv, 4, 4 * len)).unwrap();
                    (first, bits(&unpadded(dev, &recv, 4)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (first, second)) in out.iter().enumerate() {
        assert_eq!(first, &to_bits(&expected), "rank {r}");
        assert_eq!(second, &to_bits(&twice), "rank {r} (in place)");
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    let n = 3;
    let part = |r: usize| -> Vec<u8> { (0..5).map(|i| (r * 16 + i + 1) as u8).collect() };
    let expected: Vec<u8> = (0..n).flat_map(part).collect();
    let out = on_ranks(n, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let send = padded(dev, 3, &part(c.rank()));
        let recv = padded(dev, 1, &[0u8; 15]);
        c.all_gather_bytes(dev, Span::new(&send, 3, 5), Span::new(&recv, 1, 15)).unwrap();
        let gathered = unpadded(dev, &recv, 1);
        // In place: send is part `rank` of recv.
        let mut own = vec![0u8; 15];
        own[c.rank() * 5..c.rank() * 5 + 5].copy_from_slice(&part(c.rank()));
        let buf = padded(dev, 2, &own);
        c.all_gather_bytes(dev, Span::new(&buf, 2 + c.rank() * 5, 5), Span::new(&buf, 2, 15)).unwrap();
        (gathered, unpadded(dev, &buf, 2))
    });
    for (r, (gathered, in_place)) in out.iter().enumerate() {
        assert_eq!(gathered, &expected, "rank {r}");
        assert_eq!(in_place, &expected, "rank {r} (in place)");
    }
}

#[test]
fn reduce_scatter_gives_each_rank_the_rank_order_sum_of_its_part() {
    let (n, count) = (4, 8);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| order_sensitive(r, n * count)).collect();
    let sums = fold(&inputs);
    assert_ne!(to_bits(&sums), to_bits(&fold(inputs.iter().rev())));
    let out = on_ranks(n, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let send = padded(dev, 4, &f32_bytes(&inputs[c.rank()]));
        let recv = padded(dev, 8, &vec![0u8; 4 * count]);
        c.reduce_scatter_sum_f32(dev, Span::new(&send, 4, 4 * n * count), Span::new(&recv, 8, 4 * count)).unwrap();
        let part = bits(&unpadded(dev, &recv, 8));
        // In place: recv is part `rank` of send.
        let buf = padded(dev, 4, &f32_bytes(&inputs[c.rank()]));
        let at = 4 + c.rank() * 4 * count;
        c.reduce_scatter_sum_f32(dev, Span::new(&buf, 4, 4 * n * count), Span::new(&buf, at, 4 * count)).unwrap();
        (part, bits(&unpadded(dev, &buf, 4)[at - 4..at - 4 + 4 * count]))
    });
    for (r, (part, in_place)) in out.iter().enumerate() {
        let want = to_bits(&sums[r * count..(r + 1) * count]);
        assert_eq!(part, &want, "rank {r}");
        assert_eq!(in_place, &want, "rank {r} (in place)");
    }
}

#[test]
fn broadcast_from_every_root() {
    let n = 4;
    let data = |root: usize| -> Vec<u8> { (0..11).map(|i| (root * 40 + i * 3 + 1) as u8).collect() };
    let out = on_ranks(n, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let mut got = Vec::new();
        for root in 0..n {
            let recv = padded(dev, 5, &[0u8; 11]);
            if c.rank() == root && root == 2 {
                // The root in place: send is recv itself.
                let buf = padded(dev, 5, &data(root));
                c.broadcast_bytes(dev, Span::new(&buf, 5, 11), Span::new(&buf, 5, 11), root).unwrap();
                got.push(unpadded(dev, &buf, 5));
            } else if c.rank() == root {
                let send = padded(dev, 7, &data(root));
                c.broadcast_bytes(dev, Span::new(&send, 7, 11), Span::new(&recv, 5, 11), root).unwrap();
                got.push(unpadded(dev, &recv, 5));
            } else {
                // A non-root's send is not read (here: an empty span of its recv buffer).
                c.broadcast_bytes(dev, Span::new(&recv, 0, 0), Span::new(&recv, 5, 11), root).unwrap();
                got.push(unpadded(dev, &recv, 5));
            }
        }
        got
    });
    for (r, got) in out.iter().enumerate() {
        for (root, bytes) in got.iter().enumerate() {
            assert_eq!(bytes, &data(root), "rank {r}, root {root}");
        }
    }
}

/// The byte `i` of the `k`-th transfer from rank `a` to rank `b`.
fn payload(a: usize, b: usize, k: usize, i: usize) -> u8 {
    ((a * 31 + b * 7 + k * 53 + i * 11) % 251) as u8 + 1
}

#[test]
fn send_recv_with_an_uneven_matrix_zero_byte_and_self_transfers() {
    let n = 3;
    // plan[a][b]: the sizes of a's transfers to b, in order (self-transfers on the diagonal,
    // zero-byte transfers, two transfers for one pair).
    let plan: Vec<Vec<Vec<usize>>> =
        vec![vec![vec![3], vec![0], vec![5, 1]], vec![vec![7], vec![2], vec![]], vec![vec![0], vec![9, 0], vec![4]]];
    let out = on_ranks(n, SAFETY, |devs, c| {
        let (me, dev) = (c.rank(), &devs[c.rank()]);
        // Sends: to peers in reverse order, laid out back to back after 2 bytes of padding.
        let (mut sends, mut send_bytes) = (Vec::new(), vec![0xABu8; 2]);
        for b in (0..n).rev() {
            for (k, &bytes) in plan[me][b].iter().enumerate() {
                sends.push(Transfer { peer: b, offset: send_bytes.len(), bytes });
                send_bytes.extend((0..bytes).map(|i| payload(me, b, k, i)));
            }
        }
        // Receives: from peers in increasing order, with a gap of 3 bytes after each.
        let (mut recvs, mut expected, mut at) = (Vec::new(), vec![0xCDu8; 1], 1);
        for (a, row) in plan.iter().enumerate() {
            for (k, &bytes) in row[me].iter().enumerate() {
                recvs.push(Transfer { peer: a, offset: at, bytes });
                expected.extend((0..bytes).map(|i| payload(a, me, k, i)));
                expected.extend([0xCDu8; 3]);
                at += bytes + 3;
            }
        }
        let send = dev.upload(&send_bytes).unwrap();
        let recv = dev.upload(&vec![0xCDu8; expected.len()]).unwrap();
        c.send_recv(dev, &send, &sends, &recv, &recvs).unwrap();
        (download(dev, &recv), expected)
    });
    for (r, (got, expected)) in out.iter().enumerate() {
        assert_eq!(got, expected, "rank {r}");
    }
}

#[test]
fn send_recv_mismatches_fail_on_every_rank() {
    // Rank 0 sends 4 then 4 bytes to rank 1, which receives 4 then 8 (sizes out of step), and
    // rank 1's zero-byte send to rank 0 has no receive.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let buf = dev.alloc_zeroed(16).unwrap();
        let recv = dev.alloc_zeroed(16).unwrap();
        let r = if c.rank() == 0 {
            let sends = [Transfer { peer: 1, offset: 0, bytes: 4 }, Transfer { peer: 1, offset: 4, bytes: 4 }];
            c.send_recv(dev, &buf, &sends, &recv, &[])
        } else {
            let sends = [Transfer { peer: 0, offset: 0, bytes: 0 }];
            let recvs = [Transfer { peer: 0, offset: 0, bytes: 4 }, Transfer { peer: 0, offset: 4, bytes: 8 }];
            c.send_recv(dev, &buf, &sends, &recv, &recvs)
        };
        (comm_err(r), download(dev, &recv))
    });
    let msg = "ncclSend/ncclRecv: sends and receives do not match (in order per pair of ranks): rank 0 sends [4, 4] \
               bytes to rank 1, which receives [4, 8] bytes from rank 0; rank 1 sends [0] bytes to rank 0, which \
               receives [] bytes from rank 1; the calls: rank 0 ncclSend/ncclRecv(sends: 4 bytes to rank 1, 4 bytes \
               to rank 1; receives: none), rank 1 ncclSend/ncclRecv(sends: 0 bytes to rank 0; receives: 4 bytes \
               from rank 0, 8 bytes from rank 0)";
    for (r, ((rank, m), recv)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
        assert_eq!(recv, &vec![0u8; 16], "rank {r}: a failed call wrote its recv buffer");
    }
}

/// Both ranks of a pair send each other two transfers of different sizes (4 bytes, then 8) in
/// one group; each receives them into `[0xCD; 1]` + a slot per receive + `[0xCD; 3]` gaps, its
/// receives of the sizes in `recv_sizes`, in that order. Per rank: the result and the receive
/// buffer afterwards.
fn exchange_two_transfers(recv_sizes: [usize; 2]) -> Vec<(Result<()>, Vec<u8>)> {
    on_ranks(2, SAFETY, |devs, c| {
        let (me, dev) = (c.rank(), &devs[c.rank()]);
        let peer = 1 - me;
        let mut send_bytes: Vec<u8> = (0..4).map(|i| payload(me, peer, 0, i)).collect();
        send_bytes.extend((0..8).map(|i| payload(me, peer, 1, i)));
        let sends = [Transfer { peer, offset: 0, bytes: 4 }, Transfer { peer, offset: 4, bytes: 8 }];
        let recvs = [
            Transfer { peer, offset: 1, bytes: recv_sizes[0] },
            Transfer { peer, offset: 1 + recv_sizes[0] + 3, bytes: recv_sizes[1] },
        ];
        let send = dev.upload(&send_bytes).unwrap();
        let recv = dev.upload(&[0xCDu8; 1 + 4 + 3 + 8 + 3]).unwrap();
        let r = c.send_recv(dev, &send, &sends, &recv, &recvs);
        (r, download(dev, &recv))
    })
}

#[test]
fn send_recv_matches_the_kth_send_of_a_pair_with_the_kth_receive() {
    // Received in the order sent: each transfer lands in its own slot.
    for (r, (res, got)) in exchange_two_transfers([4, 8]).into_iter().enumerate() {
        res.unwrap();
        let peer = 1 - r;
        let mut want = vec![0xCDu8];
        want.extend((0..4).map(|i| payload(peer, r, 0, i)));
        want.extend([0xCDu8; 3]);
        want.extend((0..8).map(|i| payload(peer, r, 1, i)));
        want.extend([0xCDu8; 3]);
        assert_eq!(got, want, "rank {r}");
    }
    // Both receives posted, but in the other order than the peer's sends: the same sizes in
    // total, yet the first send (4 bytes) meets the first receive (8 bytes). NCCL matches per
    // pair in order, so this is a mismatch on every rank, with nothing written.
    let msg = "ncclSend/ncclRecv: sends and receives do not match (in order per pair of ranks): rank 0 sends [4, 8] \
               bytes to rank 1, which receives [8, 4] bytes from rank 0; rank 1 sends [4, 8] bytes to rank 0, which \
               receives [8, 4] bytes from rank 1; the calls: rank 0 ncclSend/ncclRecv(sends: 4 bytes to rank 1, 8 \
               bytes to rank 1; receives: 8 bytes from rank 1, 4 bytes from rank 1), rank 1 \
               ncclSend/ncclRecv(sends: 4 bytes to rank 0, 8 bytes to rank 0; receives: 8 bytes from rank 0, 4 \
               bytes from rank 0)";
    for (r, (res, got)) in exchange_two_transfers([8, 4]).into_iter().enumerate() {
        assert_eq!(comm_err(res), (r, msg.to_string()), "rank {r}");
        assert_eq!(got, vec![0xCDu8; 19], "rank {r}: a failed call wrote its recv buffer");
    }
}

#[test]
fn broadcast_with_different_counts_fails_on_every_rank() {
    // A non-root with fewer bytes than the root, then the root with fewer than the others: the
    // receive spans lie in bigger buffers, so only the count check can catch it.
    for counts in [[8, 8, 4], [4, 8, 8]] {
        let out = on_ranks(3, SAFETY, |devs, c| {
            let dev = &devs[c.rank()];
            let bytes = counts[c.rank()];
            let send = dev.upload(&[7u8; 16]).unwrap();
            let recv = dev.upload(&[0xCDu8; 16]).unwrap();
            let e = comm_err(c.broadcast_bytes(dev, Span::new(&send, 0, bytes), Span::new(&recv, 0, bytes), 0));
            (e, download(dev, &recv))
        });
        let calls: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(r, b)| format!("rank {r} ncclBroadcast(count {b} bytes, root 0)"))
            .collect();
        let msg = format!("ncclBroadcast: the ranks' counts differ: {}", calls.join(", "));
        for (r, ((rank, m), recv)) in out.iter().enumerate() {
            assert_eq!((*rank, m), (r, &msg), "counts {counts:?}");
            assert_eq!(recv, &vec![0xCDu8; 16], "counts {counts:?} rank {r}: a failed call wrote its recv buffer");
        }
    }
}

#[test]
fn reduce_scatter_is_in_place_only_with_recv_at_part_rank_of_send() {
    let (n, count) = (3, 2);
    let (part, whole) = (4 * count, 4 * n * count);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| order_sensitive(r, n * count)).collect();
    let sums = fold(&inputs);
    // send is [4, 4 + whole) of a buffer padded by 4 bytes on either side; recv is 4·count bytes
    // at `recv_at(rank)`.
    let run = |recv_at: &(dyn Fn(usize) -> usize + Sync)| {
        on_ranks(n, SAFETY, |devs, c| {
            let dev = &devs[c.rank()];
            let buf = padded(dev, 4, &f32_bytes(&inputs[c.rank()]));
            let before = download(dev, &buf);
            let at = recv_at(c.rank());
            let r = c.reduce_scatter_sum_f32(dev, Span::new(&buf, 4, whole), Span::new(&buf, at, part));
            (r, before, download(dev, &buf))
        })
    };
    // NCCL's in-place layout, recv = send + rank · recvcount, on every rank.
    for (r, (res, before, after)) in run(&|r| 4 + r * part).into_iter().enumerate() {
        res.unwrap();
        let at = 4 + r * part;
        assert_eq!(bits(&after[at..at + part]), to_bits(&sums[r * count..(r + 1) * count]), "rank {r}");
        assert_eq!((&after[..4], &after[4 + whole..]), (&before[..4], &before[4 + whole..]), "rank {r}: padding");
    }
    // Rank 1's recv overlaps its send without being its part 1: another rank's part (before and
    // after its own), straddling two parts, running past the end of send, starting before it.
    // The others are in place; rank 1's refusal fails every rank, and nothing is written.
    for bad in [4, 4 + 2 * part, 4 + part + 4, 4 + whole - 4, 0] {
        let out = run(&|r| if r == 1 { bad } else { 4 + r * part });
        let msg = format!(
            "ncclReduceScatter: rank 1 called it with invalid arguments: send [4, {}) and recv [{bad}, {}) overlap \
             in one buffer, which NCCL leaves undefined unless recv is part `rank` of send (in place)",
            4 + whole,
            bad + part
        );
        for (r, (res, before, after)) in out.into_iter().enumerate() {
            assert_eq!(comm_err(res), (r, msg.clone()), "recv at {bad}, rank {r}");
            assert_eq!(after, before, "recv at {bad}, rank {r}: a failed call wrote its buffer");
        }
    }
}

#[test]
fn split_into_two_groups_running_concurrently() {
    // Colours 0 and 1; group 0 (ranks 0, 2, 4, keys 5, 5, 1) is ordered 4, 0, 2 (ties by rank);
    // group 1 (ranks 1, 3, keys 0, 0) is ordered 1, 3.
    let (colours, keys) = ([0, 1, 0, 1, 0], [5, 0, 5, 0, 1]);
    let out = on_ranks(5, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let me = c.rank();
        let sub = c.split(dev, colours[me], keys[me]).unwrap();
        // The groups make different calls, different numbers of times, at the same time.
        let mut gathered = Vec::new();
        let mut sums = Vec::new();
        let rounds = if colours[me] == 0 { 3 } else { 7 };
        for round in 0..rounds {
            let send = dev.upload(&[me as u8, round as u8]).unwrap();
            let recv = dev.alloc_zeroed(2 * sub.size()).unwrap();
            sub.all_gather_bytes(dev, Span::new(&send, 0, 2), Span::new(&recv, 0, 2 * sub.size())).unwrap();
            gathered = download(dev, &recv);
            if colours[me] == 1 {
                let x = dev.upload(&f32_bytes(&[me as f32 * 10.0 + round as f32])).unwrap();
                sub.all_reduce_sum_f32(dev, Span::new(&x, 0, 4), Span::new(&x, 0, 4)).unwrap();
                sums.push(f32s(&download(dev, &x))[0]);
            }
        }
        // The parent still works, and the children outlive it.
        let send = dev.upload(&[sub.rank() as u8]).unwrap();
        let recv = dev.alloc_zeroed(5).unwrap();
        c.all_gather_bytes(dev, Span::new(&send, 0, 1), Span::new(&recv, 0, 5)).unwrap();
        drop(c);
        let x = dev.alloc_zeroed(4).unwrap();
        sub.all_reduce_sum_f32(dev, Span::new(&x, 0, 4), Span::new(&x, 0, 4)).unwrap();
        (sub.rank(), sub.size(), gathered, sums, download(dev, &recv))
    });
    let ranks: Vec<(usize, usize)> = out.iter().map(|o| (o.0, o.1)).collect();
    assert_eq!(ranks, vec![(1, 3), (0, 2), (2, 3), (1, 2), (0, 3)]);
    for (r, o) in out.iter().enumerate() {
        if colours[r] == 0 {
            assert_eq!(o.2, vec![4, 2, 0, 2, 2, 2], "rank {r}");
            assert!(o.3.is_empty());
        } else {
            assert_eq!(o.2, vec![1, 6, 3, 6], "rank {r}");
            assert_eq!(o.3, (0..7).map(|k| 40.0 + 2.0 * k as f32).collect::<Vec<_>>(), "rank {r}");
        }
        assert_eq!(o.4, vec![1, 0, 2, 1, 0], "rank {r}");
    }
}

#[test]
fn mismatched_counts_fail_on_every_rank_with_the_same_message() {
    let out = on_ranks(3, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let bytes = if c.rank() == 1 { 12 } else { 16 };
        let x = dev.upload(&[1u8; 16]).unwrap();
        let y = dev.alloc_zeroed(16).unwrap();
        let e = comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, bytes), Span::new(&y, 0, bytes)));
        (e, download(dev, &y))
    });
    let msg = "ncclAllReduce: the ranks' counts differ: rank 0 ncclAllReduce(count 4 f32), rank 1 \
               ncclAllReduce(count 3 f32), rank 2 ncclAllReduce(count 4 f32)";
    for (r, ((rank, m), y)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
        assert_eq!(y, &vec![0u8; 16], "rank {r}: a failed call wrote its recv buffer");
    }
}

#[test]
fn different_operations_at_the_same_step_fail_on_every_rank() {
    let out = on_ranks(3, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(8).unwrap();
        let r = if c.rank() == 1 {
            c.broadcast_bytes(dev, Span::new(&x, 0, 8), Span::new(&x, 0, 8), 0)
        } else {
            c.all_reduce_sum_f32(dev, Span::new(&x, 0, 8), Span::new(&x, 0, 8))
        };
        comm_err(r)
    });
    let msg = "the ranks made different NCCL calls at the same step: rank 0 ncclAllReduce(count 2 f32), rank 1 \
               ncclBroadcast(count 8 bytes, root 0), rank 2 ncclAllReduce(count 2 f32)";
    for (r, (rank, m)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
    }
}

#[test]
fn a_root_out_of_range_or_disagreeing_fails_every_rank() {
    // Rank 2 names root 3 of 3 ranks: it fails at once, and the others fail at that step.
    let out = on_ranks(3, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(8).unwrap();
        let root = if c.rank() == 2 { 3 } else { 0 };
        comm_err(c.broadcast_bytes(dev, Span::new(&x, 0, 8), Span::new(&x, 0, 8), root))
    });
    let msg = "ncclBroadcast: rank 2 called it with invalid arguments: root 3 is not a rank of this communicator of 3";
    for (r, (rank, m)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
    }
    // Roots in range that differ between ranks.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(8).unwrap();
        comm_err(c.broadcast_bytes(dev, Span::new(&x, 0, 8), Span::new(&x, 0, 8), c.rank()))
    });
    let msg = "ncclBroadcast: the ranks disagree on the root: rank 0 ncclBroadcast(count 8 bytes, root 0), rank 1 \
               ncclBroadcast(count 8 bytes, root 1)";
    for (r, (rank, m)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
    }
}

#[test]
fn a_buffer_or_device_of_another_rank_is_refused() {
    // Rank 1 passes a send buffer of rank 0's device.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let other = &devs[1 - c.rank()];
        let mine = dev.alloc_zeroed(8).unwrap();
        let theirs = other.alloc_zeroed(8).unwrap();
        let send = if c.rank() == 1 { &theirs } else { &mine };
        let e = comm_err(c.all_reduce_sum_f32(dev, Span::new(send, 0, 8), Span::new(&mine, 0, 8)));
        (e, download(dev, &mine))
    });
    for (r, ((rank, m), mine)) in out.iter().enumerate() {
        assert_eq!(*rank, r);
        assert!(
            m.starts_with(
                "ncclAllReduce: rank 1 called it with invalid arguments: the send buffer (8 bytes) belongs to \
                 emulated device "
            ) && m.contains(", not to this member's device "),
            "{m}"
        );
        // The same message on both ranks.
        assert_eq!(m, &out[0].0 .1);
        assert_eq!(mine, &vec![0u8; 8]);
    }
    // Rank 0 passes the other rank's device (and a buffer of it).
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[1]; // rank 1's own device; not rank 0's
        let (x, y) = (dev.alloc_zeroed(4).unwrap(), dev.alloc_zeroed(8).unwrap());
        comm_err(c.all_gather_bytes(dev, Span::new(&x, 0, 4), Span::new(&y, 0, 8)))
    });
    for (r, (rank, m)) in out.iter().enumerate() {
        assert_eq!(*rank, r);
        assert!(
            m.starts_with("ncclAllGather: rank 0 called it with invalid arguments: it was given emulated device ")
                && m.contains(", but this member belongs to emulated device "),
            "{m}"
        );
    }
}

#[test]
fn a_span_past_the_end_of_its_buffer_is_refused() {
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(20).unwrap();
        let y = dev.alloc_zeroed(20).unwrap();
        let offset = if c.rank() == 1 { 8 } else { 0 };
        let first = comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, 16), Span::new(&y, offset, 16)));
        (first, download(dev, &y))
    });
    let msg = "ncclAllReduce: rank 1 called it with invalid arguments: recv: 16 bytes at offset 8 run past the end of \
               its buffer of 20 bytes";
    for (r, ((rank, m), y)) in out.iter().enumerate() {
        assert_eq!((*rank, m.as_str()), (r, msg));
        assert_eq!(y, &vec![0u8; 20]);
    }
    // A transfer of a send/receive group, with an offset whose end overflows.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(4).unwrap();
        let bad = [Transfer { peer: 1, offset: usize::MAX, bytes: 2 }];
        let ok = [Transfer { peer: 0, offset: 0, bytes: 2 }];
        let (sends, recvs): (&[Transfer], &[Transfer]) = if c.rank() == 0 { (&bad, &[]) } else { (&[], &ok) };
        comm_err(c.send_recv(dev, &x, sends, &x, recvs))
    });
    let msg = format!(
        "ncclSend/ncclRecv: rank 0 called it with invalid arguments: send 0 (peer 1): 2 bytes at offset {} run past \
         the end of its buffer of 4 bytes",
        usize::MAX
    );
    for (r, (rank, m)) in out.iter().enumerate() {
        assert_eq!((*rank, m), (r, &msg));
    }
}

#[test]
fn undefined_overlaps_are_refused() {
    // All-reduce send and recv overlapping without being the same range.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(32).unwrap();
        comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, 16), Span::new(&x, 8, 16)))
    });
    // Both ranks' arguments are invalid: the first to check them reports, so either rank's
    // message may reach rank 0 (a fixed "rank 0" made this test fail about once in CI).
    let msg = |r: usize| {
        format!(
            "ncclAllReduce: rank {r} called it with invalid arguments: send [0, 16) and recv [8, 24) overlap in one \
             buffer, which NCCL leaves undefined unless they are the same range"
        )
    };
    assert!(out[0].1 == msg(0) || out[0].1 == msg(1), "{}", out[0].1);
    // All-gather whose send is in recv, but not at part `rank`.
    let out = on_ranks(2, SAFETY, |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(8).unwrap();
        comm_err(c.all_gather_bytes(dev, Span::new(&x, 4 - 4 * c.rank(), 4), Span::new(&x, 0, 8)))
    });
    assert!(out[0].1.contains("overlap in one buffer, which NCCL leaves undefined unless send is part `rank`"));
    // Two receives writing the same bytes.
    let out = on_ranks(1, SAFETY, |devs, c| {
        let dev = &devs[0];
        let (s, r) = (dev.alloc_zeroed(8).unwrap(), dev.alloc_zeroed(8).unwrap());
        let sends = [Transfer { peer: 0, offset: 0, bytes: 4 }, Transfer { peer: 0, offset: 4, bytes: 4 }];
        let recvs = [Transfer { peer: 0, offset: 0, bytes: 4 }, Transfer { peer: 0, offset: 2, bytes: 4 }];
        comm_err(c.send_recv(dev, &s, &sends, &r, &recvs))
    });
    assert_eq!(
        out[0].1,
        "ncclSend/ncclRecv: rank 0 called it with invalid arguments: recv 0 [0, 4) and recv 1 [2, 6) overlap (both \
         would write the same bytes)"
    );
}

#[test]
fn a_member_dropped_while_others_wait_fails_them_promptly() {
    let start = Instant::now();
    // A long timeout: the waiting ranks must fail because rank 2 left, not by timing out.
    let out = on_ranks(3, Duration::from_secs(30), |devs, c| {
        let dev = &devs[c.rank()];
        if c.rank() == 2 {
            // Let the others start waiting, then leave (the thread ends, dropping its member).
            thread::sleep(Duration::from_millis(200));
            return None;
        }
        let x = dev.alloc_zeroed(8).unwrap();
        let first = comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, 8), Span::new(&x, 0, 8))).1;
        Some(first)
    });
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    for m in &out[..2] {
        assert_eq!(m.as_deref(), Some("ncclAllReduce: rank 2 left the communicator (its EmuComm was dropped)"));
    }
}

#[test]
fn a_wait_past_the_timeout_fails_naming_the_missing_ranks() {
    let timeout = Duration::from_millis(200);
    let out = on_ranks(4, timeout, |devs, c| {
        let dev = &devs[c.rank()];
        let (x, y) = (dev.alloc_zeroed(2).unwrap(), dev.alloc_zeroed(8).unwrap());
        if c.rank() == 1 {
            // Alive, but arrives only after the others gave up.
            // (Long after it: a loaded CI machine may start the other threads late.)
            thread::sleep(Duration::from_secs(3));
        }
        let t = Instant::now();
        let m = comm_err(c.all_gather_bytes(dev, Span::new(&x, 0, 2), Span::new(&y, 0, 8))).1;
        (m, t.elapsed())
    });
    let msg = "ncclAllGather: timed out after 200ms waiting for the other ranks: rank 1 did not arrive at this step \
               (ranks 0, 2 and 3 did)";
    for (r, (m, waited)) in out.iter().enumerate() {
        assert_eq!(m, msg, "rank {r}");
        if r == 1 {
            // It arrives at the step that failed: the same message, at once.
            assert!(*waited < Duration::from_secs(1), "rank 1 waited {waited:?}");
        } else {
            assert!(
                *waited >= Duration::from_millis(190) && *waited < Duration::from_millis(2500),
                "waited {waited:?}"
            );
        }
    }
}

#[test]
fn every_call_after_a_failure_fails_at_once() {
    let out = on_ranks(3, Duration::from_secs(30), |devs, c| {
        let dev = &devs[c.rank()];
        let x = dev.alloc_zeroed(16).unwrap();
        let bytes = if c.rank() == 0 { 8 } else { 16 };
        let first = comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, bytes), Span::new(&x, 0, bytes))).1;
        // Only rank 1 calls again: it must not wait for the others.
        let later = (c.rank() == 1).then(|| {
            let t = Instant::now();
            let m = comm_err(c.broadcast_bytes(dev, Span::new(&x, 0, 4), Span::new(&x, 0, 4), 0)).1;
            let split = c.split(dev, 0, 0).map(drop);
            // Invalid arguments too: the communicator's failure is what is reported.
            let bad = comm_err(c.all_reduce_sum_f32(dev, Span::new(&x, 0, 64), Span::new(&x, 0, 64))).1;
            (m, comm_err(split).1, bad, t.elapsed())
        });
        (first, later)
    });
    let first = "ncclAllReduce: the ranks' counts differ: rank 0 ncclAllReduce(count 2 f32), rank 1 \
                 ncclAllReduce(count 4 f32), rank 2 ncclAllReduce(count 4 f32)";
    for (m, _) in &out {
        assert_eq!(m, first);
    }
    let (broadcast, split, bad, took) = out[1].1.clone().unwrap();
    assert_eq!(broadcast, format!("ncclBroadcast refused: the communicator failed earlier: {first}"));
    assert_eq!(split, format!("ncclCommSplit refused: the communicator failed earlier: {first}"));
    assert_eq!(bad, format!("ncclAllReduce refused: the communicator failed earlier: {first}"));
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_world_needs_distinct_devices() {
    let (a, b) = (EmulatedDevice::new(), EmulatedDevice::new());
    let e = EmuComm::world(&[&a, &b, &a]).unwrap_err();
    let Error::Comm { rank, size, msg } = e else { panic!("{e:?}") };
    assert_eq!((rank, size), (2, 3));
    assert!(msg.starts_with("ncclCommInitAll: devices[0] and devices[2] are the same device"), "{msg}");
    assert!(EmuComm::world(&[]).is_err());
    assert_eq!(EmuComm::world(&[&a, &b]).unwrap().len(), 2);
}
