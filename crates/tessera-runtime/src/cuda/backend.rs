//! `CudaBackend`: one GPU per worker process.
//!
//! Storage: every tensor — activations, LayerNorm weights and biases, linear biases,
//! position embeddings — and every weight matrix and the KV cache is in the shard's 16-bit
//! dtype (`--dtype bf16` or `f16`); the kernels and cuBLAS widen to f32 for arithmetic
//! and round once on store. Norms and biases share the activations' dtype because the
//! kernels take one element type throughout (`sources.rs`), as checkpoints saved in
//! bf16/f16 store them too. f32 weights are refused: a GPU deployment halves its memory
//! and its decode time by storing 16 bits.
//!
//! Every operation is enqueued on the backend's one stream, in program order, so no
//! operation needs an event; host copies at the edges (`download`, the collectives) wait
//! for the stream.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PushKernelArg,
};
use half::{bf16, f16};
use rayon::prelude::*;
use tracing::info;

use super::compile::KernelCache;
use super::kernels::{launch_config, Kernels};
use super::probe::{self, DeviceInfo, Library};
use super::sources::{self, KernelDtype, SampleRowParams};
use crate::backend::{check_len, check_same, Backend, KvSpec, SeqSpan};
use crate::collective::{Collective, NcclDtype};
use crate::dtype::WeightDtype;
use crate::error::{Result, RuntimeError};
use crate::sampling::{check_record_asks, RecordAsk, RowSpec};

/// Cache positions one split of decode attention covers (rounded to whole KV blocks): long
/// contexts get more splits, so a decode step of few sequences still fills the GPU.
pub const DECODE_POSITIONS_PER_SPLIT: usize = 256;

/// How a CUDA backend is opened.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// CUDA device ordinal (`--device`).
    pub ordinal: usize,
    /// Storage dtype of weights, activations and KV cache: bf16 or f16.
    pub dtype: WeightDtype,
    /// Where compiled kernels are cached; `None` compiles every start.
    pub kernel_cache: Option<KernelCache>,
}

/// A 2-D tensor `[rows, cols]` in device memory, in the backend's 16-bit dtype.
#[derive(Debug)]
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    data: CudaSlice<u16>,
}

/// A weight matrix `[out_features, in_features]`, row-major, in the backend's dtype.
#[derive(Debug)]
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: CudaSlice<u16>,
}

/// Paged K and V of every layer: per layer `[num_blocks · block_size, heads · head_dim]`,
/// slot `block · block_size + position % block_size`, the layout `write_kv` and the
/// attention kernels read.
#[derive(Debug)]
pub struct CudaKvCache {
    spec: KvSpec,
    k: Vec<CudaSlice<u16>>,
    v: Vec<CudaSlice<u16>>,
}

struct Device {
    info: DeviceInfo,
    dtype: KernelDtype,
    // Declared before the stream and context they use, so they are dropped first.
    kernels: Kernels,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// The CUDA backend: a context on one GPU, one stream, cuBLAS and the loaded kernels.
/// Clones share them.
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.info)
            .field("dtype", &self.dev.dtype)
            .finish()
    }
}

/// The kernels' dtype of a storage dtype; the CUDA backend has no f32 storage.
pub fn kernel_dtype(dtype: WeightDtype) -> Result<KernelDtype> {
    match dtype {
        WeightDtype::Bf16 => Ok(KernelDtype::Bf16),
        WeightDtype::F16 => Ok(KernelDtype::F16),
        WeightDtype::F32 => Err(RuntimeError::invalid(
            "dtype",
            "the cuda backend stores weights, activations and KV cache as bf16 or f16; \
             serve the model with --dtype bf16 (or f16)",
        )),
    }
}

fn driver(what: &str) -> impl Fn(DriverError) -> RuntimeError + '_ {
    move |e| RuntimeError::Backend(format!("{what}: {}", probe::describe(&e)))
}

fn cublas_error(e: cublas::result::CublasError) -> RuntimeError {
    RuntimeError::Backend(format!("cuBLAS: {:?}", e.0))
}

/// `n` as a kernel's `unsigned int`.
fn u32_of(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| RuntimeError::invalid(what, format!("{n} does not fit the kernels' 32 bits")))
}

/// `n` as a cuBLAS `int`.
fn i32_of(what: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| RuntimeError::invalid(what, format!("{n} is past cuBLAS's 32-bit sizes")))
}

/// Host f32 values as 16-bit storage, rounded to nearest even.
fn to_bits(dtype: KernelDtype, data: &[f32]) -> Vec<u16> {
    match dtype {
        KernelDtype::Bf16 => data
            .par_iter()
            .map(|&v| bf16::from_f32(v).to_bits())
            .collect(),
        KernelDtype::F16 => data
            .par_iter()
            .map(|&v| f16::from_f32(v).to_bits())
            .collect(),
    }
}

/// 16-bit storage widened to f32 (exact).
fn from_bits(dtype: KernelDtype, bits: &[u16]) -> Vec<f32> {
    match dtype {
        KernelDtype::Bf16 => bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
        KernelDtype::F16 => bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
    }
}

/// What `attention` uploads for one call: slots of the new K/V rows and the padded block
/// tables, plus the per-row (decode) or per-sequence (prefill) indices.
#[derive(Debug, PartialEq)]
struct AttentionPlan {
    slots: Vec<u32>,
    block_tables: Vec<u32>,
    table_stride: u32,
    kind: AttentionKind,
}

#[derive(Debug, PartialEq)]
enum AttentionKind {
    /// Every sequence adds exactly one token: split-K decode attention.
    Decode {
        row_seq: Vec<u32>,
        row_pos: Vec<u32>,
        max_kv_len: u32,
    },
    /// Some sequence adds several tokens: causal prefill attention over all of them.
    Prefill {
        seq_rows: Vec<u32>,
        seq_start_pos: Vec<u32>,
        max_new_rows: u32,
    },
}

/// Plans one attention call over `seqs`, whose rows must tile `0..rows` in order; checks
/// every position against the block tables and the cache.
fn plan_attention(seqs: &[SeqSpan], rows: usize, spec: &KvSpec) -> Result<AttentionPlan> {
    let bs = spec.block_size;
    let mut next_row = 0;
    let mut slots = Vec::with_capacity(rows);
    for s in seqs {
        if s.rows.start != next_row {
            return Err(RuntimeError::Backend(format!(
                "attention: sequence rows {:?} do not follow row {next_row}",
                s.rows
            )));
        }
        next_row = s.rows.end;
        for pos in s.start_pos..s.start_pos + s.rows.len() {
            let block = *s.block_table.get(pos / bs).ok_or_else(|| {
                RuntimeError::invalid(
                    "block_table",
                    format!(
                        "position {pos} has no block (table of {})",
                        s.block_table.len()
                    ),
                )
            })? as usize;
            if block >= spec.num_blocks {
                return Err(RuntimeError::invalid(
                    "block_table",
                    format!("block {block} is past the cache's {}", spec.num_blocks),
                ));
            }
            slots.push(u32_of("KV slot", block * bs + pos % bs)?);
        }
    }
    if next_row != rows {
        return Err(RuntimeError::Backend(format!(
            "attention: the sequences cover {next_row} of {rows} rows"
        )));
    }
    let stride = seqs
        .iter()
        .map(|s| s.block_table.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut block_tables = vec![0u32; seqs.len() * stride];
    for (s, seq) in seqs.iter().enumerate() {
        block_tables[s * stride..s * stride + seq.block_table.len()]
            .copy_from_slice(&seq.block_table);
    }
    let kind = if seqs.iter().all(|s| s.rows.len() == 1) {
        AttentionKind::Decode {
            row_seq: (0..seqs.len())
                .map(|s| u32_of("sequences", s))
                .collect::<Result<_>>()?,
            row_pos: seqs
                .iter()
                .map(|s| u32_of("position", s.start_pos))
                .collect::<Result<_>>()?,
            max_kv_len: u32_of(
                "position",
                seqs.iter().map(|s| s.start_pos + 1).max().unwrap_or(1),
            )?,
        }
    } else {
        let mut seq_rows = Vec::with_capacity(seqs.len() + 1);
        seq_rows.push(0);
        for s in seqs {
            seq_rows.push(u32_of("rows", s.rows.end)?);
        }
        AttentionKind::Prefill {
            seq_rows,
            seq_start_pos: seqs
                .iter()
                .map(|s| u32_of("position", s.start_pos))
                .collect::<Result<_>>()?,
            max_new_rows: u32_of("rows", seqs.iter().map(|s| s.rows.len()).max().unwrap_or(0))?,
        }
    };
    Ok(AttentionPlan {
        slots,
        block_tables,
        table_stride: u32_of("block table", stride)?,
        kind,
    })
}

impl CudaBackend {
    /// Opens GPU `opts.ordinal`: probes the driver and libraries (an error, never a panic,
    /// where CUDA is missing), starts a stream and cuBLAS on it, and compiles (or reads
    /// from the cache) and loads every kernel for the device's architecture.
    pub fn new(opts: &CudaOptions) -> Result<Self> {
        let dtype = kernel_dtype(opts.dtype)?;
        let (ctx, info) = probe::open_device(opts.ordinal)?;
        probe::require(Library::Nvrtc)?;
        probe::require(Library::Cublas)?;
        // SAFETY: no slice of this context exists yet, and every operation of the backend
        // runs on its one stream in program order, so the per-slice events cudarc would
        // record to order work across streams are never needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("cannot create a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(cublas_error)?;
        let arch = info.arch();
        let started = std::time::Instant::now();
        let kernels = Kernels::load(&ctx, &arch, dtype, opts.kernel_cache.as_ref())?;
        info!(
            "CUDA backend on {info}: {} storage, kernels for {arch} ready in {:.1} s{}",
            dtype.suffix(),
            started.elapsed().as_secs_f64(),
            match &opts.kernel_cache {
                Some(c) => format!(" (cache {})", c.dir().display()),
                None => String::new(),
            }
        );
        Ok(CudaBackend {
            dev: Arc::new(Device {
                info,
                dtype,
                kernels,
                blas,
                stream,
                ctx,
            }),
        })
    }

    /// The GPU.
    pub fn device(&self) -> &DeviceInfo {
        &self.dev.info
    }

    /// The storage dtype.
    pub fn dtype(&self) -> KernelDtype {
        self.dev.dtype
    }

    /// Waits for every operation enqueued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize().map_err(driver("synchronize"))
    }

    /// The one stream every operation is enqueued on (for events around them).
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    /// `len` zeros; an empty tensor still gets one element, so that it has a valid address
    /// (the driver refuses zero-byte allocations); `rows · cols` stays its length.
    fn alloc_zeros(&self, what: &str, len: usize) -> Result<CudaSlice<u16>> {
        self.stream().alloc_zeros::<u16>(len.max(1)).map_err(|e| {
            RuntimeError::Backend(format!(
                "cannot allocate {what} ({:.2} MiB) on cuda:{}: {}",
                (2 * len) as f64 / (1 << 20) as f64,
                self.dev.info.ordinal,
                probe::describe(&e)
            ))
        })
    }

    fn upload_bits(&self, what: &str, bits: &[u16]) -> Result<CudaSlice<u16>> {
        if bits.is_empty() {
            return self.alloc_zeros(what, 0);
        }
        self.stream()
            .clone_htod(bits)
            .map_err(driver(&format!("upload of {what}")))
    }

    /// Callers upload at least one value (each launch that takes indices has rows).
    fn upload_u32(&self, what: &str, values: &[u32]) -> Result<CudaSlice<u32>> {
        self.stream()
            .clone_htod(values)
            .map_err(driver(&format!("upload of {what}")))
    }

    /// `out = x · wᵀ` through cuBLAS, 16-bit in and out, f32 accumulation.
    fn gemm(&self, x: &CudaTensor, w: &CudaMatrix, out: &mut CudaTensor) -> Result<()> {
        // Row-major out [n, m] is column-major outᵀ [m, n] = w · xᵀ, where row-major w
        // [m, k] is column-major wᵀ (so transposed) and row-major x [n, k] is xᵀ.
        let (m, n, k) = (w.rows, x.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self
                .stream()
                .memset_zeros(&mut out.data)
                .map_err(driver("linear"));
        }
        let (mi, ni, ki) = (i32_of("rows", m)?, i32_of("rows", n)?, i32_of("cols", k)?);
        // cuBLAS works in the calling thread's current context; the shard's thread may not
        // have made any other call that set it yet.
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(driver("bind the CUDA context"))?;
        let ty = match self.dev.dtype {
            KernelDtype::Bf16 => cublas::sys::cudaDataType_t::CUDA_R_16BF,
            KernelDtype::F16 => cublas::sys::cudaDataType_t::CUDA_R_16F,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = self.stream();
        let (a, _a) = w.data.device_ptr(stream);
        let (b, _b) = x.data.device_ptr(stream);
        let (c, _c) = out.data.device_ptr_mut(stream);
        // SAFETY: a holds m·k elements (lda = k), b holds n·k (ldb = k), c holds m·n
        // (ldc = m), all of the type `ty` on the handle's stream; the shapes were checked
        // by the caller, and alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            cublas::result::gemm_ex(
                *self.dev.blas.handle(),
                cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                mi,
                ni,
                ki,
                (&alpha) as *const f32 as *const c_void,
                a as *const c_void,
                ty,
                ki,
                b as *const c_void,
                ty,
                ki,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                ty,
                mi,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_error)
    }

    /// The NCCL element type of the storage dtype.
    fn nccl_dtype(&self) -> NcclDtype {
        match self.dtype() {
            KernelDtype::Bf16 => NcclDtype::Bf16,
            KernelDtype::F16 => NcclDtype::F16,
        }
    }

    /// Copies `x` to the host as f32, for a collective that moves host buffers.
    fn stage_out(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        self.download(x)
    }

    /// Copies host values back into `x` (same shape), rounding to the storage dtype.
    fn stage_in(&self, host: &[f32], x: &mut CudaTensor) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let bits = to_bits(self.dev.dtype, host);
        self.stream()
            .memcpy_htod(&bits, &mut x.data)
            .map_err(driver("collective result"))
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type KvCache = CudaKvCache;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        check_len("upload", data.len(), rows, cols)?;
        let bits = to_bits(self.dev.dtype, data);
        Ok(CudaTensor {
            rows,
            cols,
            data: self.upload_bits("a tensor", &bits)?,
        })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let n = t.rows * t.cols;
        if n == 0 {
            return Ok(Vec::new());
        }
        let bits = self
            .stream()
            .clone_dtoh(&t.data.slice(..n))
            .map_err(driver("download"))?;
        Ok(from_bits(self.dev.dtype, &bits))
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.alloc_zeros("a tensor", rows * cols)?,
        })
    }

    fn upload_matrix(
        &self,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
        dtype: WeightDtype,
    ) -> Result<CudaMatrix> {
        check_len("matrix", data.len(), rows, cols)?;
        if kernel_dtype(dtype)? != self.dev.dtype {
            return Err(RuntimeError::invalid(
                "dtype",
                format!(
                    "{dtype} weights on a backend opened for {}",
                    self.dev.dtype.suffix()
                ),
            ));
        }
        let bits = to_bits(self.dev.dtype, &data);
        drop(data);
        Ok(CudaMatrix {
            rows,
            cols,
            data: self.upload_bits("a weight matrix", &bits)?,
        })
    }

    fn matrix_bytes(&self, m: &CudaMatrix) -> usize {
        m.rows * m.cols * self.dev.dtype.size_bytes()
    }

    fn alloc_kv(&self, spec: KvSpec) -> Result<CudaKvCache> {
        let per_layer = spec.num_blocks * spec.block_size * spec.heads * spec.head_dim;
        let mut k = Vec::with_capacity(spec.layers);
        let mut v = Vec::with_capacity(spec.layers);
        for _ in 0..spec.layers {
            k.push(self.alloc_zeros("the KV cache", per_layer)?);
            v.push(self.alloc_zeros("the KV cache", per_layer)?);
        }
        Ok(CudaKvCache { spec, k, v })
    }

    fn embed(
        &self,
        table: &CudaMatrix,
        first_id: usize,
        ids: &[u32],
        out: &mut CudaTensor,
    ) -> Result<()> {
        check_same("embed", (out.rows, out.cols), (ids.len(), table.cols))?;
        if ids.is_empty() {
            return Ok(());
        }
        let ids_dev = self.upload_u32("token ids", ids)?;
        let (rows, cols) = (u32_of("rows", out.rows)?, u32_of("cols", out.cols)?);
        let first = u32_of("first_id", first_id)?;
        let table_rows = u32_of("vocabulary rows", table.rows)?;
        let f = self.dev.kernels.get("embed")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut out.data)
            .arg(&table.data)
            .arg(&ids_dev)
            .arg(&rows)
            .arg(&cols)
            .arg(&first)
            .arg(&table_rows);
        // SAFETY: the arguments follow `embed`'s signature in sources.rs; out holds
        // rows·cols elements, table table_rows·cols, ids rows.
        unsafe { launch.launch(launch_config(sources::row_launch(rows))) }
            .map_err(driver("embed"))?;
        Ok(())
    }

    fn add_positions(
        &self,
        table: &CudaTensor,
        positions: &[u32],
        x: &mut CudaTensor,
    ) -> Result<()> {
        check_same(
            "add_positions",
            (x.rows, x.cols),
            (positions.len(), table.cols),
        )?;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= table.rows) {
            return Err(RuntimeError::invalid(
                "position",
                format!("{p} is past the context of {}", table.rows),
            ));
        }
        if positions.is_empty() {
            return Ok(());
        }
        let pos_dev = self.upload_u32("positions", positions)?;
        let (rows, cols) = (u32_of("rows", x.rows)?, u32_of("cols", x.cols)?);
        let f = self.dev.kernels.get("add_positions")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut x.data)
            .arg(&table.data)
            .arg(&pos_dev)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: `add_positions`'s signature; x holds rows·cols elements, every position
        // indexes a row of table (checked above).
        unsafe { launch.launch(launch_config(sources::row_launch(rows))) }
            .map_err(driver("add_positions"))?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check_same("layer_norm", (x.rows, x.cols), (out.rows, out.cols))?;
        check_same("layer_norm weight", (1, x.cols), (weight.rows, weight.cols))?;
        check_same("layer_norm bias", (1, x.cols), (bias.rows, bias.cols))?;
        if x.rows == 0 {
            return Ok(());
        }
        let (rows, cols) = (u32_of("rows", x.rows)?, u32_of("cols", x.cols)?);
        let f = self.dev.kernels.get("layer_norm")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut out.data)
            .arg(&x.data)
            .arg(&weight.data)
            .arg(&bias.data)
            .arg(&rows)
            .arg(&cols)
            .arg(&eps);
        // SAFETY: `layer_norm`'s signature; out and x are distinct [rows, cols] tensors
        // (the borrow checker keeps them apart), weight and bias hold cols elements.
        unsafe { launch.launch(launch_config(sources::row_launch(rows))) }
            .map_err(driver("layer_norm"))?;
        Ok(())
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaMatrix,
        bias: Option<&CudaTensor>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check_same("linear input", (x.rows, x.cols), (x.rows, w.cols))?;
        check_same("linear output", (out.rows, out.cols), (x.rows, w.rows))?;
        self.gemm(x, w, out)?;
        if let Some(b) = bias {
            self.add_bias(out, b)?;
        }
        Ok(())
    }

    fn gelu(&self, x: &mut CudaTensor) -> Result<()> {
        if x.rows * x.cols == 0 {
            return Ok(());
        }
        let (rows, cols) = (u32_of("rows", x.rows)?, u32_of("cols", x.cols)?);
        let no_bias: u64 = 0;
        let f = self.dev.kernels.get("bias_gelu")?;
        let mut launch = self.stream().launch_builder(f);
        launch.arg(&mut x.data).arg(&no_bias).arg(&rows).arg(&cols);
        // SAFETY: `bias_gelu`'s signature with a null bias, which the kernel skips; x
        // holds rows·cols elements.
        unsafe {
            launch.launch(launch_config(sources::elementwise_launch(
                x.rows as u64 * x.cols as u64,
            )))
        }
        .map_err(driver("gelu"))?;
        Ok(())
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        check_same("add", (x.rows, x.cols), (y.rows, y.cols))?;
        let n = x.rows as u64 * x.cols as u64;
        if n == 0 {
            return Ok(());
        }
        let f = self.dev.kernels.get("add_assign")?;
        let mut launch = self.stream().launch_builder(f);
        launch.arg(&mut x.data).arg(&y.data).arg(&n);
        // SAFETY: `add_assign`'s signature; x and y are distinct tensors of n elements.
        unsafe { launch.launch(launch_config(sources::elementwise_launch(n))) }
            .map_err(driver("add_assign"))?;
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaTensor) -> Result<()> {
        check_same("bias", (1, x.cols), (bias.rows, bias.cols))?;
        if x.rows * x.cols == 0 {
            return Ok(());
        }
        let (rows, cols) = (u32_of("rows", x.rows)?, u32_of("cols", x.cols)?);
        let f = self.dev.kernels.get("add_bias")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut x.data)
            .arg(&bias.data)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: `add_bias`'s signature; x holds rows·cols elements, bias cols.
        unsafe {
            launch.launch(launch_config(sources::elementwise_launch(
                x.rows as u64 * x.cols as u64,
            )))
        }
        .map_err(driver("add_bias"))?;
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        seqs: &[SeqSpan],
        out: &mut CudaTensor,
    ) -> Result<()> {
        let spec = cache.spec;
        let width = spec.heads * spec.head_dim;
        check_same("attention qkv", (qkv.rows, qkv.cols), (qkv.rows, 3 * width))?;
        check_same("attention out", (out.rows, out.cols), (qkv.rows, width))?;
        if layer >= spec.layers {
            return Err(RuntimeError::Backend(format!(
                "attention: layer {layer} of a cache of {}",
                spec.layers
            )));
        }
        if spec.head_dim > sources::MAX_HEAD_DIM as usize {
            return Err(RuntimeError::invalid(
                "head_dim",
                format!(
                    "{} is past the attention kernels' {}",
                    spec.head_dim,
                    sources::MAX_HEAD_DIM
                ),
            ));
        }
        if qkv.rows == 0 {
            return Ok(());
        }
        let plan = plan_attention(seqs, qkv.rows, &spec)?;
        let rows = u32_of("rows", qkv.rows)?;
        let heads = u32_of("heads", spec.heads)?;
        let head_dim = u32_of("head_dim", spec.head_dim)?;
        let block_size = u32_of("block_size", spec.block_size)?;
        let scale = 1.0 / (spec.head_dim as f32).sqrt();
        let grid_limit = |what: &'static str, n: u32| {
            if n > 65_535 {
                Err(RuntimeError::invalid(
                    what,
                    format!("{n} is past the attention grid's 65535"),
                ))
            } else {
                Ok(())
            }
        };
        grid_limit("heads", heads)?;
        let (k_cache, v_cache) = (&mut cache.k[layer], &mut cache.v[layer]);

        // The new K and V rows go into the cache first; attention then reads them there.
        let slots = self.upload_u32("KV slots", &plan.slots)?;
        let f = self.dev.kernels.get("write_kv")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut *k_cache)
            .arg(&mut *v_cache)
            .arg(&qkv.data)
            .arg(&slots)
            .arg(&rows)
            .arg(&heads)
            .arg(&head_dim);
        // SAFETY: `write_kv`'s signature; qkv holds rows·3·heads·head_dim elements, every
        // slot is below num_blocks·block_size (plan_attention checked each block id), and
        // the caches hold num_blocks·block_size·heads·head_dim elements.
        unsafe { launch.launch(launch_config(sources::row_launch(rows))) }
            .map_err(driver("write_kv"))?;

        let tables = self.upload_u32("block tables", &plan.block_tables)?;
        let stride = plan.table_stride;
        match &plan.kind {
            AttentionKind::Decode {
                row_seq,
                row_pos,
                max_kv_len,
            } => {
                grid_limit("rows", rows)?;
                let blocks_per_split = u32_of(
                    "blocks",
                    (DECODE_POSITIONS_PER_SPLIT / spec.block_size).max(1),
                )?;
                let splits = sources::decode_splits(*max_kv_len, block_size, blocks_per_split);
                let parts = qkv.rows * spec.heads * splits as usize;
                let alloc_f32 = |n: usize| {
                    self.stream()
                        .alloc_zeros::<f32>(n)
                        .map_err(driver("decode attention scratch"))
                };
                let mut part_max = alloc_f32(parts)?;
                let mut part_sum = alloc_f32(parts)?;
                let mut part_acc = alloc_f32(parts * spec.head_dim)?;
                let row_seq = self.upload_u32("row sequences", row_seq)?;
                let row_pos = self.upload_u32("row positions", row_pos)?;
                let f = self.dev.kernels.get("attention_decode")?;
                let mut launch = self.stream().launch_builder(f);
                launch
                    .arg(&mut part_max)
                    .arg(&mut part_sum)
                    .arg(&mut part_acc)
                    .arg(&qkv.data)
                    .arg(&*k_cache)
                    .arg(&*v_cache)
                    .arg(&tables)
                    .arg(&row_seq)
                    .arg(&row_pos)
                    .arg(&rows)
                    .arg(&heads)
                    .arg(&head_dim)
                    .arg(&block_size)
                    .arg(&stride)
                    .arg(&blocks_per_split)
                    .arg(&splits)
                    .arg(&scale);
                // SAFETY: `attention_decode`'s signature; the part buffers hold
                // rows·heads·splits (·head_dim) f32, every row's sequence indexes the
                // [sequences, stride] tables, and the tables' blocks were checked against
                // the cache.
                unsafe {
                    launch.launch(launch_config(sources::attention_decode_launch(
                        rows, heads, splits, head_dim,
                    )))
                }
                .map_err(driver("attention_decode"))?;
                let f = self.dev.kernels.get("attention_combine")?;
                let mut launch = self.stream().launch_builder(f);
                launch
                    .arg(&mut out.data)
                    .arg(&part_max)
                    .arg(&part_sum)
                    .arg(&part_acc)
                    .arg(&rows)
                    .arg(&heads)
                    .arg(&head_dim)
                    .arg(&splits);
                // SAFETY: `attention_combine`'s signature over the buffers just written;
                // out holds rows·heads·head_dim elements.
                unsafe {
                    launch.launch(launch_config(sources::attention_combine_launch(
                        rows, heads,
                    )))
                }
                .map_err(driver("attention_combine"))?;
            }
            AttentionKind::Prefill {
                seq_rows,
                seq_start_pos,
                max_new_rows,
            } => {
                let num_seqs = u32_of("sequences", seqs.len())?;
                grid_limit("sequences", num_seqs)?;
                let seq_rows = self.upload_u32("sequence rows", seq_rows)?;
                let seq_start = self.upload_u32("sequence positions", seq_start_pos)?;
                let f = self.dev.kernels.get("attention_prefill")?;
                let mut launch = self.stream().launch_builder(f);
                launch
                    .arg(&mut out.data)
                    .arg(&qkv.data)
                    .arg(&*k_cache)
                    .arg(&*v_cache)
                    .arg(&tables)
                    .arg(&seq_rows)
                    .arg(&seq_start)
                    .arg(&num_seqs)
                    .arg(&heads)
                    .arg(&head_dim)
                    .arg(&block_size)
                    .arg(&stride)
                    .arg(&scale);
                // SAFETY: `attention_prefill`'s signature; seq_rows holds num_seqs + 1
                // ascending row bounds ending at rows, each sequence's positions map
                // through its table to checked blocks, out and qkv have rows rows.
                unsafe {
                    launch.launch(launch_config(sources::attention_prefill_launch(
                        *max_new_rows,
                        heads,
                        num_seqs,
                        head_dim,
                        self.dev.dtype,
                    )))
                }
                .map_err(driver("attention_prefill"))?;
            }
        }
        Ok(())
    }

    /// The `sample_stats` kernel, one block per asked row, over the logits on the device;
    /// only the records come back to the host.
    fn sample_records(
        &self,
        logits: &CudaTensor,
        rows: &[RowSpec],
        asks: &[RecordAsk],
        first_id: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check_record_asks((logits.rows, logits.cols), rows, asks)?;
        if asks.is_empty() {
            return Ok(());
        }
        let vocab = u32_of("vocabulary slice", logits.cols)?;
        if vocab == 0 {
            return Err(RuntimeError::Backend(
                "sample_records: an empty vocabulary slice".into(),
            ));
        }
        let first = u32_of("first token id", first_id)?;
        let n = u32_of("rows", asks.len())?;
        // Block r reads row r of its logits: later rounds ask for some rows only.
        let in_order =
            asks.len() == logits.rows && asks.iter().enumerate().all(|(k, a)| a.row == k);
        let picked;
        let src = if in_order {
            logits
        } else {
            picked = self.gather_rows(logits, &asks.iter().map(|a| a.row).collect::<Vec<_>>())?;
            &picked
        };
        let mut words = Vec::with_capacity(asks.len() * SampleRowParams::SIZE_BYTES / 4);
        let mut penalty: Vec<u32> = Vec::new();
        let mut len = 0;
        for ask in asks {
            let row = &rows[ask.row];
            let params = SampleRowParams::for_row(row, ask.mode, penalty.len(), len)?;
            words.extend(params.to_words());
            penalty.extend(SampleRowParams::penalty_ids(row));
            len += ask.mode.record_len();
        }
        // A valid address even when no row has a penalty (none reads it then).
        if penalty.is_empty() {
            penalty.push(0);
        }
        let params = self.upload_u32("sampling parameters", &words)?;
        let penalty = self.upload_u32("penalty ids", &penalty)?;
        let alloc_f32 = |what: &str, n: usize| {
            self.stream()
                .alloc_zeros::<f32>(n)
                .map_err(driver(&format!("sample_stats {what}")))
        };
        let mut records = alloc_f32("records", len)?;
        let mut scratch = alloc_f32("scratch", asks.len() * logits.cols)?;
        let f = self.dev.kernels.get("sample_stats")?;
        let mut launch = self.stream().launch_builder(f);
        launch
            .arg(&mut records)
            .arg(&mut scratch)
            .arg(&src.data)
            .arg(&params)
            .arg(&penalty)
            .arg(&n)
            .arg(&vocab)
            .arg(&first);
        // SAFETY: `sample_stats`'s signature; src holds n rows of vocab elements, params
        // n structs whose record offsets and lengths lie within records (len floats),
        // whose penalty ranges lie within penalty, and scratch holds n·vocab floats.
        unsafe { launch.launch(launch_config(sources::sample_stats_launch(n))) }
            .map_err(driver("sample_stats"))?;
        let got = self
            .stream()
            .clone_dtoh(&records)
            .map_err(driver("sampling records"))?;
        out.extend_from_slice(&got);
        Ok(())
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let mut out = self.zeros(rows.len(), x.cols)?;
        let c = x.cols;
        for (i, &r) in rows.iter().enumerate() {
            if r >= x.rows {
                return Err(RuntimeError::Backend(format!(
                    "gather row {r} of {}",
                    x.rows
                )));
            }
            let src = x.data.slice(r * c..(r + 1) * c);
            let mut dst = out.data.slice_mut(i * c..(i + 1) * c);
            self.stream()
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("gather_rows"))?;
        }
        Ok(out)
    }

    /// On an NCCL group, summed on the device, enqueued on this backend's stream after the
    /// work that wrote `x`; on any other collective, host-staged: the tensor goes to the
    /// host as f32, through the collective, and back.
    fn all_reduce_sum(&self, comm: &mut dyn Collective, x: &mut CudaTensor) -> Result<()> {
        // The sum over one rank is the tensor itself: no copy, no wait for the stream.
        if comm.world_size() == 1 {
            return Ok(());
        }
        if let Some(nccl) = comm.nccl() {
            let count = x.rows * x.cols;
            let stream = self.stream();
            let (ptr, _written) = x.data.device_ptr_mut(stream);
            // SAFETY: `x.data` holds at least `count` elements of the backend's 16-bit
            // dtype on this device; cudarc made `stream` wait for earlier work on it, and
            // `_written` records the all-reduce as a write of `x.data` when dropped after
            // the call, so the buffer is neither freed nor touched by unordered work
            // before the sum has run.
            return unsafe { nccl.all_reduce_sum_raw(ptr, count, self.nccl_dtype(), stream) };
        }
        let mut host = self.stage_out(x)?;
        comm.all_reduce_sum(&mut host)?;
        self.stage_in(&host, x)
    }

    /// On the device through NCCL when `comm` is an NCCL group (the activations never
    /// leave the GPU); host-staged otherwise, as [`CudaBackend::all_reduce_sum`].
    fn send(&self, comm: &mut dyn Collective, peer: usize, x: &CudaTensor) -> Result<()> {
        if let Some(nccl) = comm.nccl() {
            let count = x.rows * x.cols;
            let stream = self.stream();
            let (ptr, _read) = x.data.device_ptr(stream);
            // SAFETY: as in `all_reduce_sum`; `_read` records the send as a read of
            // `x.data`, so the buffer outlives it and nothing unordered overwrites it
            // first. NCCL only reads it.
            return unsafe { nccl.send_raw(peer, ptr, count, self.nccl_dtype(), stream) };
        }
        let host = self.stage_out(x)?;
        comm.send(peer, &host)
    }

    /// As [`CudaBackend::send`]: NCCL on the device, or host-staged.
    fn recv(&self, comm: &mut dyn Collective, peer: usize, x: &mut CudaTensor) -> Result<()> {
        if let Some(nccl) = comm.nccl() {
            let count = x.rows * x.cols;
            let stream = self.stream();
            let (ptr, _written) = x.data.device_ptr_mut(stream);
            // SAFETY: as in `all_reduce_sum`.
            return unsafe { nccl.recv_raw(peer, ptr, count, self.nccl_dtype(), stream) };
        }
        let mut host = vec![0f32; x.rows * x.cols];
        comm.recv(peer, &mut host)?;
        self.stage_in(&host, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(num_blocks: usize, block_size: usize) -> KvSpec {
        KvSpec {
            layers: 1,
            num_blocks,
            block_size,
            heads: 2,
            head_dim: 4,
        }
    }

    fn span(rows: std::ops::Range<usize>, start_pos: usize, table: &[u32]) -> SeqSpan {
        SeqSpan {
            rows,
            start_pos,
            block_table: table.to_vec(),
        }
    }

    #[test]
    fn one_token_per_sequence_is_decode() {
        let seqs = [span(0..1, 5, &[3, 1]), span(1..2, 0, &[2])];
        let plan = plan_attention(&seqs, 2, &spec(4, 4)).unwrap();
        // Position 5 is slot 1 of its second block (1); position 0 slot 0 of block 2.
        assert_eq!(plan.slots, [4 + 1, 2 * 4]);
        assert_eq!(plan.table_stride, 2);
        assert_eq!(plan.block_tables, [3, 1, 2, 0]);
        assert_eq!(
            plan.kind,
            AttentionKind::Decode {
                row_seq: vec![0, 1],
                row_pos: vec![5, 0],
                max_kv_len: 6,
            }
        );
    }

    #[test]
    fn several_tokens_in_any_sequence_is_prefill() {
        let seqs = [span(0..3, 0, &[0]), span(3..4, 7, &[1, 2])];
        let plan = plan_attention(&seqs, 4, &spec(4, 4)).unwrap();
        assert_eq!(plan.slots, [0, 1, 2, 2 * 4 + 3]);
        assert_eq!(
            plan.kind,
            AttentionKind::Prefill {
                seq_rows: vec![0, 3, 4],
                seq_start_pos: vec![0, 7],
                max_new_rows: 3,
            }
        );
    }

    #[test]
    fn bad_tables_and_rows_are_refused() {
        let s = spec(4, 4);
        // Position 4 needs a second block.
        assert!(plan_attention(&[span(0..2, 3, &[0])], 2, &s).is_err());
        // Block 4 is past the cache.
        assert!(plan_attention(&[span(0..1, 0, &[4])], 1, &s).is_err());
        // Rows must tile 0..rows in order.
        assert!(plan_attention(&[span(1..2, 0, &[0])], 2, &s).is_err());
        assert!(plan_attention(&[span(0..1, 0, &[0])], 2, &s).is_err());
    }

    #[test]
    fn storage_rounds_to_the_dtype_and_widens_exactly() {
        let values = [1.0f32, -2.5, 1.0e-3, 65504.0, 3.140625];
        for dtype in KernelDtype::ALL {
            let back = from_bits(dtype, &to_bits(dtype, &values));
            for (v, b) in values.iter().zip(&back) {
                let expected = match dtype {
                    KernelDtype::Bf16 => bf16::from_f32(*v).to_f32(),
                    KernelDtype::F16 => f16::from_f32(*v).to_f32(),
                };
                assert_eq!(*b, expected);
                assert!((b - v).abs() <= v.abs() * 1e-2, "{dtype:?}: {v} -> {b}");
            }
        }
    }

    #[test]
    fn f32_storage_is_refused_with_the_fix() {
        let e = kernel_dtype(WeightDtype::F32).unwrap_err().to_string();
        assert!(e.contains("--dtype bf16"), "{e}");
        assert_eq!(kernel_dtype(WeightDtype::F16).unwrap(), KernelDtype::F16);
    }

    #[test]
    fn opening_without_cuda_says_so() {
        let opts = CudaOptions {
            ordinal: 0,
            dtype: WeightDtype::Bf16,
            kernel_cache: None,
        };
        if Library::Driver.is_present() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        let e = CudaBackend::new(&opts).unwrap_err().to_string();
        assert!(e.contains("CUDA"), "{e}");
        assert!(e.contains("--backend cpu"), "{e}");
    }
}
