//! The collective library under the CUDA backend's communicator: the handful of NCCL calls
//! dsv4 makes, as one trait over a [`Device`]'s buffers, so that the communicator
//! ([`crate::comm::NcclCommunicator`]) runs unchanged over libnccl on GPUs
//! ([`crate::nccl::NcclComm`]) and over dsv4's CUDA emulator (`tests/cuda-emu`), which is how
//! CI runs the multi-rank path without a GPU.
//!
//! Semantics are NCCL's (NCCL 2.x user guide, "Collective Operations" and "Point-to-point
//! communication"; `nccl.h`): every rank of a communicator makes the same calls in the same
//! order with matching counts, each call is enqueued on the rank's device stream (ordered after
//! the work queued before it, and before the work queued after it), and buffers are byte ranges
//! of the rank's own device memory. dsv4 moves f32 activations (`ncclFloat32`, `ncclSum`) and
//! raw bytes (`ncclUint8`, for the communicator's metadata exchange).

use dsv4_core::error::Result;

use crate::device::Device;

/// `bytes` bytes of `buf` from byte `offset`: what one collective reads or writes.
pub struct Span<'a, B> {
    pub buf: &'a B,
    pub offset: usize,
    pub bytes: usize,
}

impl<B> Clone for Span<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for Span<'_, B> {}

impl<'a, B> Span<'a, B> {
    pub fn new(buf: &'a B, offset: usize, bytes: usize) -> Self {
        Span { buf, offset, bytes }
    }
}

/// One point-to-point transfer of a grouped [`DeviceComm::send_recv`]: `bytes` bytes at byte
/// `offset` of the send (or receive) buffer, to (or from) rank `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub peer: usize,
    pub offset: usize,
    pub bytes: usize,
}

/// One rank's member of a communicator of a collective library (NCCL) on device `D`.
///
/// Every method is collective over the communicator (all of its ranks call it, in the same
/// order) and stream-ordered on the rank's device `dev` (the device the member was made for;
/// passing another is an error). Counts are in elements of the named type. A call that cannot
/// complete (arguments that disagree between ranks, a peer that left or never came, a buffer
/// too small or of another device) returns an error on the calling rank, and never corrupts
/// memory. The emulator also never waits past its timeout (`DSV4_COMM_TIMEOUT_S`) and fails
/// every rank when one leaves; NCCL's blocking communicators (`crate::nccl`) do neither yet.
pub trait DeviceComm<D: Device>: Send + Sync + Sized {
    /// This member's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// Ranks in the communicator.
    fn size(&self) -> usize;

    /// `ncclAllReduce(send, recv, count, ncclFloat32, ncclSum)`: `recv` = the elementwise sum of
    /// every rank's `send`, `count` f32 each (`send.bytes == recv.bytes == 4·count`); the same
    /// bits on every rank. `send` and `recv` may be the same range.
    fn all_reduce_sum_f32(&self, dev: &D, send: Span<'_, D::Buffer>, recv: Span<'_, D::Buffer>) -> Result<()>;

    /// `ncclAllGather(send, recv, send.bytes, ncclUint8)`: `recv` (`size() · send.bytes` bytes)
    /// holds every rank's `send` in rank order.
    fn all_gather_bytes(&self, dev: &D, send: Span<'_, D::Buffer>, recv: Span<'_, D::Buffer>) -> Result<()>;

    /// `ncclReduceScatter(send, recv, recv.bytes / 4, ncclFloat32, ncclSum)`: `send` is
    /// `size()` equal parts of `recv.bytes` bytes; `recv` = the sum over ranks of part
    /// `rank()`.
    fn reduce_scatter_sum_f32(&self, dev: &D, send: Span<'_, D::Buffer>, recv: Span<'_, D::Buffer>) -> Result<()>;

    /// `ncclBroadcast(send, recv, recv.bytes, ncclUint8, root)`: `recv` = rank `root`'s `send`
    /// (`send` is read on the root only; it may be `recv` itself).
    fn broadcast_bytes(&self, dev: &D, send: Span<'_, D::Buffer>, recv: Span<'_, D::Buffer>, root: usize)
        -> Result<()>;

    /// `ncclGroupStart(); ncclSend(…)/ncclRecv(…) for every transfer; ncclGroupEnd()`: the
    /// `sends` read `send`, the `recvs` write `recv`. A send from rank a to rank b must match a
    /// receive on b from a of the same size (NCCL matches them in order per pair of ranks);
    /// sends to and receives from this rank itself are allowed (a local copy).
    fn send_recv(
        &self,
        dev: &D,
        send: &D::Buffer,
        sends: &[Transfer],
        recv: &D::Buffer,
        recvs: &[Transfer],
    ) -> Result<()>;

    /// `ncclCommSplit(comm, colour, key)`: collective; the members calling with the same
    /// `colour` form a new communicator, ranked by `key` (ties by rank here).
    fn split(&self, dev: &D, colour: usize, key: usize) -> Result<Self>;
}

/// Making a member from a unique id, as ranks in several processes do (`ncclGetUniqueId` on
/// one rank, the id handed to the others out of band, then `ncclCommInitRank` on every rank):
/// how the ranks of a run over several nodes meet ([`crate::comm::run_node_ranks`]).
pub trait InitByUniqueId<D: Device>: DeviceComm<D> {
    /// `ncclGetUniqueId`: the blob (NCCL: 128 bytes) every rank passes to [`Self::init_rank`].
    fn unique_id() -> Result<Vec<u8>>;

    /// `ncclCommInitRank(id, size, rank)` on `dev`: collective, it returns once every rank of
    /// the communicator has called it, or fails (a wrong id, disagreeing sizes). A rank that
    /// never comes fails the others after `DSV4_COMM_TIMEOUT_S`: in the emulator, and on NCCL
    /// through a non-blocking communicator polled against that deadline.
    fn init_rank(dev: &D, id: &[u8], rank: usize, size: usize) -> Result<Self>;
}
