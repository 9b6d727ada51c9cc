//! The `Backend` trait: device memory and the operations of the forward pass.
//!
//! The forward pass ([`crate::shard`]) is written once against this trait. A backend owns
//! its tensors; host copies happen only at the edges (token ids in, the rank's logits
//! slice out, activations crossing a host transport).

use std::ops::Range;

use crate::collective::Collective;
use crate::dtype::WeightDtype;
use crate::error::Result;
use crate::sampling::{self, RecordAsk, RowSpec};

/// Shape of one worker's paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSpec {
    /// Transformer blocks on this worker.
    pub layers: usize,
    /// Cache blocks per layer.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Attention heads on this worker.
    pub heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

impl KvSpec {
    /// Bytes of K and V storage this spec allocates at `bytes_per_element`.
    pub fn size_bytes(&self, bytes_per_element: usize) -> usize {
        2 * self.layers
            * self.num_blocks
            * self.block_size
            * self.heads
            * self.head_dim
            * bytes_per_element
    }
}

/// One sequence's part of a step, as attention sees it.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    /// Rows of the step's activations that are this sequence's new tokens.
    pub rows: Range<usize>,
    /// Tokens of this sequence already in the KV cache; the new ones follow.
    pub start_pos: usize,
    /// Cache block of each `block_size` positions of the sequence.
    pub block_table: Vec<u32>,
}

/// Device tensors, weights and operations of one worker.
pub trait Backend: Send + Sync + 'static {
    /// A 2-D f32 tensor `[rows, cols]` in device memory (activations, norms, biases).
    type Tensor: Send + Sync;
    /// A weight matrix `[out_features, in_features]` in the backend's storage dtype.
    type Matrix: Send + Sync;
    /// The paged K/V storage of every layer of the worker.
    type KvCache: Send;

    /// Short name for logs: `cpu`, `cuda`.
    fn name(&self) -> &'static str;

    /// Runs `f` on the backend's own threads. The CPU backend's kernels split work over the
    /// pool `f` runs in, so a whole step runs inside it and pays no cross-pool hand-off per
    /// kernel; device backends just call `f`.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Copies a row-major host buffer to the device.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Copies a tensor back to the host, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// `(rows, cols)` of a tensor.
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// A zero tensor.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Stores a row-major `[rows, cols]` weight matrix in `dtype`.
    fn upload_matrix(
        &self,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        dtype: WeightDtype,
    ) -> Result<Self::Matrix>;
    /// Device bytes a weight matrix occupies.
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize;
    /// Allocates the KV cache.
    fn alloc_kv(&self, spec: KvSpec) -> Result<Self::KvCache>;

    /// Vocab-parallel embedding: row `i` of `out` is row `ids[i] - first_id` of `table`
    /// when that id falls in the table's rows, zero otherwise.
    fn embed(
        &self,
        table: &Self::Matrix,
        first_id: usize,
        ids: &[u32],
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Adds row `positions[i]` of `table` to row `i` of `x`.
    fn add_positions(
        &self,
        table: &Self::Tensor,
        positions: &[u32],
        x: &mut Self::Tensor,
    ) -> Result<()>;
    /// Row-wise LayerNorm of `x` into `out`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `out = x · wᵀ (+ bias)`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Matrix,
        bias: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// In-place tanh GELU (`gelu_new`).
    fn gelu(&self, x: &mut Self::Tensor) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// Adds a `[1, cols]` bias to every row of `x`.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Tensor) -> Result<()>;
    /// Causal attention over the paged cache. `qkv` rows are `[q | k | v]` of this worker's
    /// heads; the new K/V rows are written into the cache first, then each new token attends
    /// to every position up to its own. Writes `[rows, heads · head_dim]` into `out`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        seqs: &[SeqSpan],
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// A new tensor made of the given rows of `x`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Appends this rank's sampling record of each asked row, in the order asked, exactly
    /// as [`sampling::local_record`] writes it: row `ask.row` of `logits` (this rank's
    /// vocabulary slice, whose first column is token `first_id`) sampled as
    /// `rows[ask.row]` says. The default downloads the logits and builds the records on
    /// the host; a device backend builds them where the logits are and copies back only
    /// the records (a few floats per row instead of the slice).
    fn sample_records(
        &self,
        logits: &Self::Tensor,
        rows: &[RowSpec],
        asks: &[RecordAsk],
        first_id: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let shape = self.shape(logits);
        sampling::host_records(&self.download(logits)?, shape, rows, asks, first_id, out)
    }

    /// Sums `x` over the group, in place.
    fn all_reduce_sum(&self, comm: &mut dyn Collective, x: &mut Self::Tensor) -> Result<()>;
    /// Sends `x` to `peer` of `comm`.
    fn send(&self, comm: &mut dyn Collective, peer: usize, x: &Self::Tensor) -> Result<()>;
    /// Receives `x` (already shaped) from `peer` of `comm`.
    fn recv(&self, comm: &mut dyn Collective, peer: usize, x: &mut Self::Tensor) -> Result<()>;
}

/// Fails unless two tensor shapes are equal; `what` names the operation.
pub(crate) fn check_same(what: &'static str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(crate::error::RuntimeError::Backend(format!(
            "{what}: shape {a:?} does not match {b:?}"
        )))
    }
}

/// Fails unless `len` values fill a `[rows, cols]` tensor; `what` names the operation
/// (`upload`, `matrix`).
pub(crate) fn check_len(what: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if len == rows * cols {
        Ok(())
    } else {
        Err(crate::error::RuntimeError::Backend(format!(
            "{what} of {len} values as [{rows}, {cols}]"
        )))
    }
}
