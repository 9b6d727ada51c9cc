//! Collectives between the workers of one tensor-parallel group, and between stages.
//!
//! Every implementation reduces in the same fixed order — the order of a ring
//! reduce-scatter — so a sum is bit-identical whichever transport carries it:
//! for chunk `c` of `n` equal chunks, the sum starts at rank `(c + 1) % n` and adds the
//! ranks in ring order, ending with rank `c`. The `nccl` collective (feature `cuda`) is
//! the exception: NCCL picks its own order, so its sums match the others only to rounding.

mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod nccl_id;
mod tcp;

pub use local::{local_group, LocalComm};
#[cfg(feature = "cuda")]
pub use nccl::{
    library_present as nccl_library_present, require_library as require_nccl_library, NcclAbort,
    NcclComm, NcclDtype, NcclElement, NcclGroupSpec, MIN_NCCL_VERSION,
};
pub use nccl_id::{new_unique_id, require_nccl, NcclId, NCCL_ID_BYTES, NCCL_MISSING};
pub use tcp::{TcpAbort, TcpComm, TcpGroupSpec, TcpListenerHandle};

use crate::error::Result;

/// A group of workers that exchange f32 buffers.
pub trait Collective: Send {
    /// This worker's rank in the group.
    fn rank(&self) -> usize;
    /// Number of workers in the group.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Concatenates every rank's `local` (all the same length) in rank order.
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>>;
    /// Sends `data` to `peer`; pairs with the peer's [`Collective::recv`].
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()>;
    /// Receives exactly `out.len()` values from `peer`.
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// The NCCL communicator behind this group, when it is one; `None` for every other
    /// collective.
    ///
    /// This is the seam between the generic forward pass, which holds its groups as
    /// `&mut dyn Collective`, and the CUDA backend: where it is `Some`, the backend
    /// reduces, sends and receives its device tensors in place through
    /// [`NcclComm::all_reduce_sum_in_place`], [`NcclComm::send_device`] and
    /// [`NcclComm::recv_device`], on its compute stream, with no host copy, and waits for
    /// that stream on the host with [`NcclComm::synchronize`] (which fails once the group
    /// is aborted, where a plain stream synchronize would return over cut-short kernels);
    /// where it is `None` (a TCP group, in a cluster that also has CPU workers) it
    /// downloads, calls the host methods above, and uploads.
    #[cfg(feature = "cuda")]
    fn nccl(&mut self) -> Option<&mut NcclComm> {
        None
    }
}

/// The chunk of a buffer of `len` elements that ring step `c` of `n` owns.
pub fn ring_chunk(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    let r = tessera_model::even_ranges(len, n);
    r[c].clone()
}

/// Sums `parts` (one buffer per rank, equal lengths) into `out` in the ring order.
pub fn ring_order_sum(parts: &[&[f32]], out: &mut [f32]) {
    let n = parts.len();
    for c in 0..n {
        let chunk = ring_chunk(out.len(), n, c);
        let first = (c + 1) % n;
        out[chunk.clone()].copy_from_slice(&parts[first][chunk.clone()]);
        for step in 2..=n {
            let rank = (c + step) % n;
            for (o, v) in out[chunk.clone()]
                .iter_mut()
                .zip(&parts[rank][chunk.clone()])
            {
                *o += *v;
            }
        }
    }
}
