//! The CUDA backend's index ops on dsv4's CUDA emulator, on shapes the op-level suite does not
//! reach: top-k over long rows (the radix select kept in shared memory, and with k > 4096 in a
//! global scratch: the lightning indexer at long contexts), with ties, ±0, ±inf, NaN and
//! subnormals, against the full stable sort in `f32::total_cmp` order (the CPU backend's);
//! `index_add` with many entries, bit for bit in order; and indices computed on the device
//! (no host values to check) outside their operand, which must read zeros or be skipped.

use dsv4_backend_cuda::CudaBackend;
use dsv4_core::backend::{Backend, RowFormat};
use dsv4_core::tensor::{HostTensor, StoredWeight};
use dsv4_cuda_emu::EmulatedDevice;

fn be() -> CudaBackend<EmulatedDevice> {
    CudaBackend::new(EmulatedDevice::new())
}

fn reference(row: &[f32], k: usize) -> Vec<i32> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order[..k].iter().map(|&i| i as i32).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn check_topk(be: &CudaBackend<EmulatedDevice>, rows: usize, n: usize, k: usize, levels: u64, seed: u64) {
    let mut rng = Rng(seed);
    let specials = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40];
    let xs: Vec<f32> = (0..rows * n)
        .map(|_| {
            let r = rng.next();
            if r.is_multiple_of(97) {
                specials[(r / 97 % 8) as usize]
            } else {
                ((r >> 8) % levels) as f32 - (levels / 2) as f32
            }
        })
        .collect();
    let (v, i) = be.topk(&be.upload(&xs, &[rows, n]).unwrap(), k).unwrap();
    let (v, i) = (be.download(&v).unwrap(), be.download_index(&i).unwrap());
    for r in 0..rows {
        let row = &xs[r * n..(r + 1) * n];
        let want = reference(row, k);
        assert_eq!(&i[r * k..(r + 1) * k], &want[..], "rows {rows} n {n} k {k} row {r}");
        for (j, &w) in want.iter().enumerate() {
            assert_eq!(v[r * k + j].to_bits(), row[w as usize].to_bits());
        }
    }
}

#[test]
fn topk_long_rows_select() {
    let be = be();
    // Whole-row sort, the select with shared keys, the select with global keys.
    check_topk(&be, 3, 4096, 100, 5, 1);
    check_topk(&be, 3, 5000, 1, 3, 2);
    check_topk(&be, 2, 5000, 4096, 7, 3);
    check_topk(&be, 2, 9000, 4097, 7, 4);
    check_topk(&be, 2, 9000, 9000, 1 << 20, 5);
    check_topk(&be, 2, 20_000, 300, 1 << 30, 6);
    check_topk(&be, 1, 20_000, 20_000 - 1, 2, 7);
    check_topk(&be, 2, 5000, 2500, 1, 8); // every value equal
    let counts = be.device().launch_counts();
    assert!(counts.iter().any(|&(k, n)| k == "dsv4_topk_global" && n > 0), "{counts:?}");
}

#[test]
fn index_add_many_entries() {
    let be = be();
    let mut rng = Rng(9);
    let (rows, row, n) = (7, 300, 1000);
    let dst: Vec<f32> = (0..rows * row).map(|_| (rng.next() % 1000) as f32 * 0.37).collect();
    let src: Vec<f32> = (0..n * row).map(|_| (rng.next() % 1000) as f32 * 1e-3 - 0.5).collect();
    let idx: Vec<i32> = (0..n).map(|_| (rng.next() % rows as u64) as i32).collect();
    let y = be
        .download(
            &be.index_add(
                &be.upload(&dst, &[rows, row]).unwrap(),
                &be.upload_index(&idx, &[n]).unwrap(),
                &be.upload(&src, &[n, row]).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
    let mut want = dst.clone();
    for (i, &r) in idx.iter().enumerate() {
        for c in 0..row {
            want[r as usize * row + c] += src[i * row + c];
        }
    }
    assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}

/// Device-only indices (no host values) outside their operand: zeros or skipped, never a fault
/// (the emulator reports any access outside the buffers passed).
#[test]
fn device_indices_out_of_range_never_fault() {
    let be = be();
    // Indices from topk are device-only; offsetting them keeps them so.
    let device_ids = |offset: i32| {
        let (_, ids) = be.topk(&be.upload(&[1.0, 2.0], &[2]).unwrap(), 2).unwrap();
        be.offset_index(&ids, offset).unwrap()
    };
    let x = be.upload(&[1.0; 6], &[3, 2]).unwrap();
    let table = be
        .upload_weight(&StoredWeight::float(HostTensor::from_f32("t", vec![3, 2], &[1.0; 6]).unwrap()).unwrap())
        .unwrap();
    for offset in [100, -1000] {
        let bad = device_ids(offset);
        assert_eq!(be.download(&be.index_select(&x, &bad).unwrap()).unwrap(), vec![0.0; 4]);
        let y = be.index_add(&x, &bad, &be.upload(&[5.0; 4], &[2, 2]).unwrap()).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![1.0; 6]);
        assert_eq!(be.download(&be.embedding(&table, &bad).unwrap()).unwrap(), vec![0.0; 4]);
        for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 1 }] {
            let mut pool = be.alloc_pool(3, 2, format).unwrap();
            be.pool_write(&mut pool, &bad, &be.upload(&[5.0; 4], &[2, 2]).unwrap()).unwrap();
            let all = be.upload_index(&[0, 1, 2], &[3]).unwrap();
            assert_eq!(be.download(&be.pool_read(&pool, &all).unwrap()).unwrap(), vec![0.0; 6], "{format:?}");
            assert_eq!(be.download(&be.pool_read(&pool, &bad).unwrap()).unwrap(), vec![0.0; 4], "{format:?}");
        }
    }
    // gather_last: device indices [1, 2] past a last axis of 2.
    let (_, two) = be.topk(&be.upload(&[1.0, 2.0, 3.0], &[1, 3]).unwrap(), 2).unwrap();
    let far = be.offset_index(&two, 7).unwrap();
    assert_eq!(
        be.download(&be.gather_last(&be.upload(&[1.0; 2], &[1, 2]).unwrap(), &far).unwrap()).unwrap(),
        vec![0.0; 2]
    );
}
