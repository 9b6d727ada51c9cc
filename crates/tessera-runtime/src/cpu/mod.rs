//! The CPU backend: f32 compute, f32 or bf16 weights, SIMD kernels chosen at run time,
//! parallel over the current rayon pool (sized by `--threads`).
pub mod huge;
pub mod matmul;
pub mod membw;
mod ops;

use std::sync::Arc;

use crate::backend::{check_len, check_same, Backend, KvSpec, SeqSpan};
use crate::collective::Collective;
use crate::dtype::WeightDtype;
use crate::error::{Result, RuntimeError};
use crate::sampling::{self, RecordAsk, RowSpec};
pub use matmul::Matrix;

/// A row-major f32 tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuTensor {
    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// One row.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Paged K and V for every layer of one worker: `[layer][block][slot][heads · head_dim]`.
#[derive(Debug)]
pub struct CpuKvCache {
    spec: KvSpec,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    /// K and V storage of one layer, `[block][slot][heads · head_dim]`: what device
    /// backends' cache writes are checked against.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}

/// The CPU backend: kernels split their work over the backend's own thread pool.
///
/// Each shard gets its own pool, so shards of one process never wait on each other's
/// threads (a shard blocked in a collective holds only its own pool).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
}

impl CpuBackend {
    /// A backend with a pool of `threads` threads.
    pub fn new(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("cpu-kernel-{i}"))
            .build()
            .map_err(|e| {
                RuntimeError::Backend(format!("cannot start {threads} kernel threads: {e}"))
            })?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
        })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = Matrix;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        check_len("upload", data.len(), rows, cols)?;
        Ok(CpuTensor {
            rows,
            cols,
            data: data.to_vec(),
        })
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn upload_matrix(
        &self,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        dtype: WeightDtype,
    ) -> Result<Matrix> {
        check_len("matrix", data.len(), rows, cols)?;
        if dtype == WeightDtype::F16 {
            return Err(RuntimeError::Backend(
                "the cpu backend stores weights as f32 or bf16; f16 needs --backend cuda".into(),
            ));
        }
        Ok(Matrix::new(rows, cols, data, dtype))
    }

    fn matrix_bytes(&self, m: &Matrix) -> usize {
        m.size_bytes()
    }

    fn alloc_kv(&self, spec: KvSpec) -> Result<CpuKvCache> {
        let per_layer = spec.num_blocks * spec.block_size * spec.heads * spec.head_dim;
        let mut k = Vec::with_capacity(spec.layers);
        let mut v = Vec::with_capacity(spec.layers);
        for _ in 0..spec.layers {
            k.push(vec![0.0; per_layer]);
            v.push(vec![0.0; per_layer]);
        }
        Ok(CpuKvCache { spec, k, v })
    }

    fn embed(
        &self,
        table: &Matrix,
        first_id: usize,
        ids: &[u32],
        out: &mut CpuTensor,
    ) -> Result<()> {
        check_same("embed", (out.rows, out.cols), (ids.len(), table.cols()))?;
        for (row, &id) in out.data.chunks_exact_mut(table.cols()).zip(ids) {
            let id = id as usize;
            if id >= first_id && id < first_id + table.rows() {
                table.row_to_f32(id - first_id, row);
            } else {
                row.fill(0.0);
            }
        }
        Ok(())
    }

    fn add_positions(&self, table: &CpuTensor, positions: &[u32], x: &mut CpuTensor) -> Result<()> {
        check_same(
            "add_positions",
            (x.rows, x.cols),
            (positions.len(), table.cols),
        )?;
        for (row, &p) in x.data.chunks_exact_mut(table.cols).zip(positions) {
            let p = p as usize;
            if p >= table.rows {
                return Err(RuntimeError::invalid(
                    "position",
                    format!("{p} is past the context of {}", table.rows),
                ));
            }
            for (a, b) in row.iter_mut().zip(table.row(p)) {
                *a += *b;
            }
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        check_same("layer_norm", (x.rows, x.cols), (out.rows, out.cols))?;
        ops::layer_norm(
            &x.data,
            &weight.data,
            &bias.data,
            eps,
            x.cols,
            &mut out.data,
        );
        Ok(())
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &Matrix,
        bias: Option<&CpuTensor>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        check_same("linear input", (x.rows, x.cols), (x.rows, w.cols()))?;
        check_same("linear output", (out.rows, out.cols), (x.rows, w.rows()))?;
        matmul::linear(
            &x.data,
            x.rows,
            w,
            bias.map(|b| b.data.as_slice()),
            &mut out.data,
        );
        Ok(())
    }

    fn gelu(&self, x: &mut CpuTensor) -> Result<()> {
        ops::gelu_new(&mut x.data);
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        check_same("add", (x.rows, x.cols), (y.rows, y.cols))?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += *b;
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &CpuTensor) -> Result<()> {
        check_same("bias", (1, x.cols), (bias.rows, bias.cols))?;
        for row in x.data.chunks_exact_mut(x.cols) {
            for (a, b) in row.iter_mut().zip(&bias.data) {
                *a += *b;
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        seqs: &[SeqSpan],
        out: &mut CpuTensor,
    ) -> Result<()> {
        let spec = cache.spec;
        let width = spec.heads * spec.head_dim;
        check_same("attention qkv", (qkv.rows, qkv.cols), (qkv.rows, 3 * width))?;
        check_same("attention out", (out.rows, out.cols), (qkv.rows, width))?;
        let (k, v) = (&mut cache.k[layer], &mut cache.v[layer]);
        ops::write_kv(&qkv.data, seqs, spec, k, v)?;
        ops::paged_attention(&qkv.data, seqs, spec, k, v, &mut out.data);
        Ok(())
    }

    /// Reads the logits where they are: no copy.
    fn sample_records(
        &self,
        logits: &CpuTensor,
        rows: &[RowSpec],
        asks: &[RecordAsk],
        first_id: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let shape = (logits.rows, logits.cols);
        sampling::host_records(&logits.data, shape, rows, asks, first_id, out)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r >= x.rows {
                return Err(RuntimeError::Backend(format!(
                    "gather row {r} of {}",
                    x.rows
                )));
            }
            data.extend_from_slice(x.row(r));
        }
        Ok(CpuTensor {
            rows: rows.len(),
            cols: x.cols,
            data,
        })
    }

    fn all_reduce_sum(&self, comm: &mut dyn Collective, x: &mut CpuTensor) -> Result<()> {
        comm.all_reduce_sum(&mut x.data)
    }

    fn send(&self, comm: &mut dyn Collective, peer: usize, x: &CpuTensor) -> Result<()> {
        comm.send(peer, &x.data)
    }

    fn recv(&self, comm: &mut dyn Collective, peer: usize, x: &mut CpuTensor) -> Result<()> {
        comm.recv(peer, &mut x.data)
    }
}
