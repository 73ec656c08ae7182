//! Collectives for the CUDA backend: [`NcclCommunicator`] implements dsv4's
//! [`Communicator`](dsv4_core::parallel::Communicator) on device tensors over a collective
//! library's [`DeviceComm`] (NCCL on GPUs, [`crate::nccl::NcclComm`]; the emulator's in CI), and
//! [`run_ranks`] runs one rank per device as threads of this process, as the Ascend backend
//! does over HCCL (`dsv4_backend_ascend::run_ranks`).
//!
//! # How each collective maps onto NCCL (f32 activations)
//!
//! * `all_reduce_sum`: `ncclAllReduce` (sum) into a new tensor; stream ordered.
//! * `reduce_scatter_sum` along `dim`: a transpose makes every rank's part of `dim` contiguous
//!   (`[size, outer, part·inner]`; none when `dim`'s outer extent is 1), then
//!   `ncclReduceScatter`.
//! * `broadcast`: `ncclBroadcast` from the root's own tensor (returned as it is there) into a
//!   new tensor elsewhere.
//! * `all_gather` along `dim`: the ranks first exchange their shapes (a small metadata
//!   all-gather, read on the host), because the trait lets `dim` differ between ranks; then
//!   `ncclAllGather` into `[size · n]` (each part zero-padded to the largest when the sizes
//!   differ), rearranged with the backend's transpose, narrow and concat when `dim` is not the
//!   outermost.
//! * `all_to_all_v`: the metadata exchange carries every rank's `send_rows`, so every rank
//!   knows the whole count matrix; then one group of `ncclSend` / `ncclRecv` (NCCL has no
//!   all-to-all-v; its documentation builds one this way), zero-row transfers left out on both
//!   sides.
//! * `barrier`: a one-value `ncclAllReduce`, then the stream is synchronised.
//! * `split`: `ncclCommSplit` with the rank as key.
//!
//! The metadata exchange also gives the strict checks of the in-process communicator where it
//! runs (all-gather, all-to-all-v): invalid arguments on one rank, disagreeing dims or shapes
//! and different collectives at the same step fail on *every* rank with one message.
//! All-reduce, reduce-scatter and broadcast stay purely stream-ordered: their arguments are
//! checked on the calling rank only; ranks that disagree are the library's to report (the
//! emulator does, at once; NCCL does not check, see below). Traffic follows [`Traffic`]'s rules exactly as
//! [`dsv4_core::parallel::LocalComm`] counts it (the metadata exchanges are not counted).
//!
//! Emulator-verified (`tests/cuda-emu`'s NCCL); on a GPU only in worlds of one rank (one H200,
//! `tests/cuda_nccl.rs`'s `gpu::` tests), not yet across GPUs. On GPUs, a rank that fails
//! while its peers are inside a collective leaves them waiting: NCCL's blocking communicators
//! have no timeout, and destroying one member does not wake the others (the emulator's do
//! fail). The `dsv4` binary therefore ends the process when a CUDA rank fails; a bounded
//! wait needs non-blocking communicators and `ncclCommAbort` past a deadline (not done).

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dsv4_core::backend::Backend;
use dsv4_core::error::{Error, Result};
use dsv4_core::parallel::exchange::{invalid_args, starts, AllToAllPlan, GatherPlan, Meta, ScatterPlan};
use dsv4_core::parallel::{run_threads, CollectiveKind, Communicator, NodeGroup, ParallelLayout, RankContext, Traffic};

use crate::collective::{DeviceComm, InitByUniqueId, Span, Transfer};
use crate::device::Device;
use crate::tensor::CudaTensor;
use crate::CudaBackend;

/// One rank of a communicator on one CUDA device: the collective library's member `C` and the
/// rank's device, shared with the rank's backend (`CudaBackend<Arc<D>>`), on whose stream
/// every collective is enqueued.
pub struct NcclCommunicator<D: Device, C: DeviceComm<D>> {
    /// A backend on the rank's device, for the communicator's own buffers (barrier, metadata).
    be: CudaBackend<Arc<D>>,
    comm: C,
    traffic: Mutex<Traffic>,
    /// Collectives on one communicator run one at a time.
    busy: Mutex<()>,
    _device: PhantomData<fn() -> D>,
}

impl<D: Device, C: DeviceComm<D>> std::fmt::Debug for NcclCommunicator<D, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator").field("rank", &self.comm.rank()).field("size", &self.comm.size()).finish()
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<D: Device, C: DeviceComm<D>> NcclCommunicator<D, C> {
    /// The communicator of member `comm` on `dev` (the device `comm` was made for); the rank's
    /// backend is `CudaBackend::new(dev.clone())`.
    pub fn new(dev: Arc<D>, comm: C) -> Self {
        NcclCommunicator {
            be: CudaBackend::new(dev),
            comm,
            traffic: Mutex::new(Traffic::default()),
            busy: Mutex::new(()),
            _device: PhantomData,
        }
    }

    /// The device this communicator runs on.
    pub fn device(&self) -> &Arc<D> {
        &self.be.dev
    }

    fn error(&self, msg: String) -> Error {
        Error::Comm { rank: self.comm.rank(), size: self.comm.size(), msg }
    }

    /// Locks the communicator for one collective, after checking that `be` is its backend.
    fn enter(&self, be: Option<&CudaBackend<Arc<D>>>, kind: CollectiveKind) -> Result<MutexGuard<'_, ()>> {
        if let Some(be) = be {
            if !Arc::ptr_eq(&be.dev, &self.be.dev) {
                return Err(self.error(format!(
                    "{} was given a backend on another device than the communicator's ({} here, {} there)",
                    kind.name(),
                    self.be.dev.describe(),
                    be.dev.describe()
                )));
            }
        }
        Ok(self.busy.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn record(&self, kind: CollectiveKind, values: usize) {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).record(kind, values as u64 * 4);
    }

    /// A backend or library error during `kind`, as a communicator error.
    fn wrap(&self, kind: CollectiveKind) -> impl Fn(Error) -> Error + '_ {
        move |e| match e {
            e @ Error::Comm { .. } => e,
            e => self.error(format!("{}: {e}", kind.name())),
        }
    }

    /// The whole of tensor `t` as a byte range of its buffer.
    fn span(t: &CudaTensor<Arc<D>>) -> Span<'_, D::Buffer> {
        Span::new(&*t.buf, t.offset, numel(&t.shape) * 4)
    }

    fn dev(&self) -> &D {
        &self.be.dev
    }

    /// Every rank's [`Meta`] (a small all-gather of u64 words, read on the host), checked as
    /// [`Meta::decode_all`] does on every rank.
    fn exchange(&self, me: Meta) -> Result<Vec<Meta>> {
        let (size, wrap) = (self.comm.size(), self.wrap(me.kind));
        let bytes: Vec<u8> = me.encode(self.comm.rank(), size).iter().flat_map(|w| w.to_le_bytes()).collect();
        let (dev, len) = (self.dev(), bytes.len());
        let send = dev.upload(&bytes).map_err(&wrap)?;
        let recv = dev.alloc_zeroed(len * size).map_err(&wrap)?;
        self.comm.all_gather_bytes(dev, Span::new(&send, 0, len), Span::new(&recv, 0, len * size)).map_err(&wrap)?;
        let mut out = vec![0u8; len * size];
        dev.download(&recv, 0, &mut out).map_err(&wrap)?;
        let words: Vec<u64> =
            out.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        Meta::decode_all(&words, size, me.kind).map_err(|m| self.error(m))
    }
}

impl<D: Device, C: DeviceComm<D> + 'static> Communicator<CudaBackend<Arc<D>>> for NcclCommunicator<D, C> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn all_reduce_sum(&self, be: &CudaBackend<Arc<D>>, x: &CudaTensor<Arc<D>>) -> Result<CudaTensor<Arc<D>>> {
        let kind = CollectiveKind::AllReduce;
        let _busy = self.enter(Some(be), kind)?;
        let n = numel(&x.shape);
        let out = be.new_tensor(&x.shape).map_err(self.wrap(kind))?;
        if n > 0 {
            self.comm.all_reduce_sum_f32(self.dev(), Self::span(x), Self::span(&out)).map_err(self.wrap(kind))?;
        }
        self.record(kind, n);
        Ok(out)
    }

    fn all_gather(&self, be: &CudaBackend<Arc<D>>, x: &CudaTensor<Arc<D>>, dim: usize) -> Result<CudaTensor<Arc<D>>> {
        let kind = CollectiveKind::AllGather;
        let _busy = self.enter(Some(be), kind)?;
        let wrap = self.wrap(kind);
        let (size, shape) = (self.comm.size(), x.shape.clone());
        let metas = self.exchange(GatherPlan::meta(self.comm.rank(), &shape, dim))?;
        let plan = GatherPlan::new(&metas, &shape, dim).map_err(|m| self.error(m))?;
        let GatherPlan { outer, len, inner, max, chunk, .. } = plan;
        if chunk == 0 {
            // Nothing to move on any rank (every rank computed the same sizes).
            let out = be.full(&plan.out_shape, 0.0).map_err(&wrap)?;
            self.record(kind, numel(&shape));
            return Ok(out);
        }
        // This rank's part, zero-padded along `dim` to the largest part.
        let padded;
        let send = if len == max {
            x
        } else {
            let mut pad_shape = shape.clone();
            pad_shape[dim] = max - len;
            let zeros = be.full(&pad_shape, 0.0).map_err(&wrap)?;
            padded = be.concat(&[x, &zeros], dim).map_err(&wrap)?;
            &padded
        };
        let gathered = be.new_tensor(&[size * chunk]).map_err(&wrap)?;
        self.comm.all_gather_bytes(self.dev(), Self::span(send), Self::span(&gathered)).map_err(&wrap)?;
        // `gathered` is `[size, outer, max, inner]`; the result is `[outer, total, inner]`.
        let out = if plan.equal_parts() {
            if outer == 1 {
                gathered
            } else {
                let g = be.reshape(&gathered, &[size, outer, max * inner]).map_err(&wrap)?;
                be.transpose(&g, 0, 1).map_err(&wrap)?
            }
        } else {
            let g = be.reshape(&gathered, &[size, outer, max, inner]).map_err(&wrap)?;
            let parts: Vec<CudaTensor<Arc<D>>> = plan
                .lens
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > 0)
                .map(|(r, &l)| {
                    let part = be.narrow(&g, 0, r, 1)?;
                    let part = be.reshape(&part, &[outer, max, inner])?;
                    be.narrow(&part, 1, 0, l)
                })
                .collect::<Result<_>>()
                .map_err(&wrap)?;
            let refs: Vec<&CudaTensor<Arc<D>>> = parts.iter().collect();
            be.concat(&refs, 1).map_err(&wrap)?
        };
        let out = be.reshape(&out, &plan.out_shape).map_err(&wrap)?;
        self.record(kind, numel(&shape));
        Ok(out)
    }

    fn reduce_scatter_sum(
        &self,
        be: &CudaBackend<Arc<D>>,
        x: &CudaTensor<Arc<D>>,
        dim: usize,
    ) -> Result<CudaTensor<Arc<D>>> {
        let kind = CollectiveKind::ReduceScatter;
        let _busy = self.enter(Some(be), kind)?;
        let wrap = self.wrap(kind);
        let (size, shape) = (self.comm.size(), x.shape.clone());
        let plan = ScatterPlan::new(self.comm.rank(), size, &shape, dim).map_err(|m| self.error(m))?;
        let (n, outer, part, inner) = (numel(&shape), plan.outer, plan.part, plan.inner);
        let out = be.new_tensor(&plan.out_shape).map_err(&wrap)?;
        if n > 0 {
            // Rank r's part of every outer row, made contiguous: `[size, outer, part · inner]`.
            let arranged;
            let send = if outer == 1 {
                x
            } else {
                let v = be.reshape(x, &[outer, size, part * inner]).map_err(&wrap)?;
                arranged = be.transpose(&v, 0, 1).map_err(&wrap)?;
                &arranged
            };
            self.comm.reduce_scatter_sum_f32(self.dev(), Self::span(send), Self::span(&out)).map_err(&wrap)?;
        }
        self.record(kind, n);
        Ok(out)
    }

    /// Receiving no rows gives a `[0, ..]` tensor.
    fn all_to_all_v(
        &self,
        be: &CudaBackend<Arc<D>>,
        x: &CudaTensor<Arc<D>>,
        send_rows: &[usize],
    ) -> Result<(CudaTensor<Arc<D>>, Vec<usize>)> {
        let kind = CollectiveKind::AllToAllV;
        let _busy = self.enter(Some(be), kind)?;
        let wrap = self.wrap(kind);
        let (size, rank, shape) = (self.comm.size(), self.comm.rank(), x.shape.clone());
        let metas = self.exchange(AllToAllPlan::meta(rank, size, &shape, send_rows))?;
        let AllToAllPlan { width, counts, out_shape, .. } =
            AllToAllPlan::new(&metas, rank, &shape).map_err(|m| self.error(m))?;
        let rows = shape[0];
        let out = be.new_tensor(&out_shape).map_err(&wrap)?;
        if width > 0 {
            let transfers = |rows: &[usize], base: usize| -> Vec<Transfer> {
                rows.iter()
                    .zip(starts(rows))
                    .enumerate()
                    .filter(|(_, (&n, _))| n > 0)
                    .map(|(peer, (&n, start))| Transfer {
                        peer,
                        offset: base + start * width * 4,
                        bytes: n * width * 4,
                    })
                    .collect()
            };
            let (sends, recvs) = (transfers(send_rows, x.offset), transfers(&counts, out.offset));
            // Called with nothing to move too: NCCL then enqueues nothing, and the emulator
            // (which treats a group as a step of every rank) sees every rank's call.
            self.comm.send_recv(self.dev(), &x.buf, &sends, &out.buf, &recvs).map_err(&wrap)?;
        }
        self.record(kind, (rows - send_rows[rank]) * width);
        Ok((out, counts))
    }

    fn broadcast(&self, be: &CudaBackend<Arc<D>>, x: &CudaTensor<Arc<D>>, root: usize) -> Result<CudaTensor<Arc<D>>> {
        let kind = CollectiveKind::Broadcast;
        let _busy = self.enter(Some(be), kind)?;
        let size = self.comm.size();
        if root >= size {
            return Err(self.error(invalid_args(
                self.comm.rank(),
                kind,
                format!("root {root} is not a rank of {size}"),
            )));
        }
        let n = numel(&x.shape);
        let is_root = self.comm.rank() == root;
        // The root sends from its own tensor, which the library only reads there.
        let out = if is_root { x.clone() } else { be.new_tensor(&x.shape).map_err(self.wrap(kind))? };
        if n > 0 {
            self.comm.broadcast_bytes(self.dev(), Self::span(x), Self::span(&out), root).map_err(self.wrap(kind))?;
        }
        self.record(kind, if is_root { n } else { 0 });
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        let kind = CollectiveKind::Barrier;
        let _busy = self.enter(None, kind)?;
        let wrap = self.wrap(kind);
        let one = self.be.full(&[1], 1.0).map_err(&wrap)?;
        self.comm.all_reduce_sum_f32(self.dev(), Self::span(&one), Self::span(&one)).map_err(&wrap)?;
        self.dev().synchronize().map_err(&wrap)?;
        self.record(kind, 0);
        Ok(())
    }

    fn split(&self, colour: usize) -> Result<Box<dyn Communicator<CudaBackend<Arc<D>>>>> {
        let kind = CollectiveKind::Split;
        let _busy = self.enter(None, kind)?;
        let sub = self.comm.split(self.dev(), colour, self.comm.rank()).map_err(self.wrap(kind))?;
        self.record(kind, 0);
        Ok(Box::new(NcclCommunicator::new(self.be.dev.clone(), sub)))
    }

    fn traffic(&self) -> Traffic {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Runs `f(backend, context)` for every rank of `layout`, each on its own thread, rank `r` on
/// `devices[r]` with the collective library's member `members[r]` (made for that device:
/// [`crate::nccl::NcclComm::init_all`] on GPUs, the emulator's world in tests).
/// Returns the results in rank order; a rank that fails or panics ends the run with its own
/// error ([`run_threads`]) once the others have returned: its communicator is dropped, which
/// fails the others' waits on the emulator but not on NCCL (see the module docs: a caller that
/// must not hang ends the process on a rank's error, as `dsv4` does, with [`run_ranks_with`]).
pub fn run_ranks<D, C, T, E, F>(
    devices: Vec<Arc<D>>,
    members: Vec<C>,
    layout: ParallelLayout,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    D: Device,
    C: DeviceComm<D> + 'static,
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&CudaBackend<Arc<D>>, RankContext<CudaBackend<Arc<D>>>) -> std::result::Result<T, E> + Sync,
{
    run_ranks_with(devices, members, layout, &|_, _| {}, f)
}

/// [`run_ranks`], calling `on_join_failure(rank, error)` on the rank's thread when the rank
/// fails before `f` runs (splitting its TP / EP groups, `ncclCommSplit`): its peers may then
/// be waiting inside NCCL, which on GPUs has no timeout, so a caller that must not hang ends
/// the process there (`f`'s own errors are `f`'s to handle).
pub fn run_ranks_with<D, C, T, E, F>(
    devices: Vec<Arc<D>>,
    members: Vec<C>,
    layout: ParallelLayout,
    on_join_failure: &(dyn Fn(usize, &Error) + Sync),
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    D: Device,
    C: DeviceComm<D> + 'static,
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&CudaBackend<Arc<D>>, RankContext<CudaBackend<Arc<D>>>) -> std::result::Result<T, E> + Sync,
{
    if devices.len() != layout.world || members.len() != layout.world {
        return Err(E::from(Error::config(
            "devices",
            format!(
                "{} devices and {} communicator members for a layout of {} ranks",
                devices.len(),
                members.len(),
                layout.world
            ),
        )));
    }
    if let Some((r, m)) = members.iter().enumerate().find(|(r, m)| m.rank() != *r || m.size() != layout.world) {
        return Err(E::from(Error::Comm {
            rank: r,
            size: layout.world,
            msg: format!("member {r} of the communicator is rank {} of {}", m.rank(), m.size()),
        }));
    }
    // Each rank's device and member, taken by its thread.
    type Slot<D, C> = Mutex<Option<(Arc<D>, C)>>;
    let slots: Vec<Slot<D, C>> = devices.into_iter().zip(members).map(|p| Mutex::new(Some(p))).collect();
    run_threads(layout.world, |rank| {
        let taken = slots[rank].lock().unwrap_or_else(PoisonError::into_inner).take();
        let (dev, member) = taken.ok_or_else(|| {
            E::from(Error::Comm { rank, size: layout.world, msg: "its device was taken by another thread".into() })
        })?;
        let be = CudaBackend::new(dev.clone());
        let world = NcclCommunicator::new(dev, member);
        let ctx = RankContext::new(layout.rank(rank), &world as &dyn Communicator<CudaBackend<Arc<D>>>)
            .inspect_err(|e| on_join_failure(rank, e))
            .map_err(E::from)?;
        // The world communicator stays alive until this rank is done, so a finished rank is not
        // mistaken for a dead one by slower peers.
        let out = f(&be, ctx);
        drop(world);
        out
    })
}

/// [`run_ranks`] for this process's part of a run over several processes (nodes): `devices`
/// are this node's (local rank r on `devices[r]`, global rank `node.base() + r`), or why they
/// could not be opened (then every node fails with it, naming this node, before anyone joins
/// the communicator); `layout` is the whole world's (`node.world()` ranks). Node 0 makes the
/// library's unique id
/// ([`InitByUniqueId::unique_id`], NCCL's `ncclGetUniqueId`) and `node` hands it to the other
/// nodes over their TCP connections (or every node fails with the first failure, before anyone
/// joins); then every rank joins with its global rank (`ncclCommInitRank`). A rank that fails to
/// join calls `on_join_failure(global rank, error)` on its thread (as in [`run_ranks_with`]: on
/// GPUs the other ranks, on every node, may be waiting for it inside NCCL with no timeout).
/// Returns this process's ranks' results, in local rank order.
pub fn run_node_ranks<D, C, T, E, F>(
    devices: Result<Vec<Arc<D>>>,
    layout: ParallelLayout,
    node: Arc<NodeGroup>,
    on_join_failure: &(dyn Fn(usize, &Error) + Sync),
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    D: Device,
    C: InitByUniqueId<D> + 'static,
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(&CudaBackend<Arc<D>>, RankContext<CudaBackend<Arc<D>>>) -> std::result::Result<T, E> + Sync,
{
    let world = node.world();
    let devices = devices.and_then(|d| match layout.world == world && d.len() == node.local_ranks() {
        true => Ok(d),
        false => Err(Error::config(
            "devices",
            format!(
                "a layout of {} ranks and {} devices here, over nodes of {} ranks each ({world} in all)",
                layout.world,
                d.len(),
                node.local_ranks()
            ),
        )),
    });
    let id = node_unique_id::<D, C>(&node, devices.as_ref().map(drop).map_err(|e| e.to_string()));
    let (devices, id) = match (devices, id) {
        (Ok(d), Ok(id)) => (d, id),
        (Err(e), _) | (_, Err(e)) => return Err(E::from(e)),
    };
    run_threads(devices.len(), |local| {
        let rank = node.base() + local;
        let dev = devices[local].clone();
        // Joining (`ncclCommInitRank`, then the TP / EP splits) is collective over every node:
        // a rank that fails here leaves the others waiting, so the caller hears of it at once.
        let joined = C::init_rank(&dev, &id, rank, world).and_then(|member| {
            let comm = NcclCommunicator::new(dev.clone(), member);
            let ctx = RankContext::new(layout.rank(rank), &comm as &dyn Communicator<CudaBackend<Arc<D>>>)?;
            Ok((comm, ctx))
        });
        let (comm, ctx) = joined.inspect_err(|e| on_join_failure(rank, e)).map_err(E::from)?;
        let be = CudaBackend::new(dev);
        // As in `run_ranks`: the world stays alive until this rank is done.
        let out = f(&be, ctx);
        drop(comm);
        out
    })
}

/// Collective over the nodes of `node` (each process calls it once, after opening its devices;
/// `ready` is `Err(why)` when that failed): node 0's [`InitByUniqueId::unique_id`], handed to
/// every node over the nodes' TCP connections; or, on every node, the first failure, naming its
/// node. Every rank then joins with [`InitByUniqueId::init_rank`] and its global rank.
pub fn node_unique_id<D: Device, C: InitByUniqueId<D>>(
    node: &NodeGroup,
    ready: std::result::Result<(), String>,
) -> Result<Vec<u8>> {
    let mine = match (ready, node.node_rank()) {
        (Err(why), _) => Err(why),
        (Ok(()), 0) => {
            C::unique_id().map(Some).map_err(|e| format!("node 0 could not make the communicator's id: {e}"))
        }
        (Ok(()), _) => Ok(None),
    };
    node.share(mine)
}
