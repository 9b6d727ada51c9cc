//! The run of `tessera gpu-check`: each section timed and logged, and a failed check or
//! section recorded without stopping the ones after it.

use std::time::{Duration, Instant};

use cudarc::driver::CudaSlice;
use tracing::{info, warn};

use super::data::{not_run, random_bf16};
use super::floors::Ceilings;
use super::model::{check_gpt2, load_large, time_steps};
use super::ops::{check_ops, time_kernels};
use super::plan::{large_shard, step_timings, CheckOptions, Dims};
use super::report::{Check, Report, Section};
use super::timer::time_runs;
use crate::backend::Backend;
use crate::collective::{new_unique_id, NcclComm, NcclGroupSpec};
use crate::cpu::CpuBackend;
use crate::cuda::compile::KernelCache;
use crate::cuda::probe;
use crate::cuda::{CudaBackend, CudaOptions};
use crate::dtype::WeightDtype;
use crate::error::{Result, RuntimeError};

/// Runs one section: logs its start and its time, and records it in the report.
fn section<T>(
    report: &mut Report,
    name: &str,
    f: impl FnOnce(&mut Report) -> Result<T>,
) -> Option<T> {
    info!("== {name}");
    let started = Instant::now();
    let result = f(report);
    let elapsed_s = started.elapsed().as_secs_f64();
    let error = result.as_ref().err().map(|e| e.to_string());
    match &error {
        None => info!("== {name}: done in {elapsed_s:.1} s"),
        Some(e) => warn!("== {name}: stopped after {elapsed_s:.1} s: {e}"),
    }
    report.sections.push(Section {
        name: name.to_string(),
        elapsed_s,
        error,
    });
    result.ok()
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> RuntimeError {
    move |e| RuntimeError::Backend(format!("{what}: {}", probe::describe(&e)))
}

/// Every section on device `opts.device`. Never panics on a device problem: whatever
/// fails is in the report, and the sections that need it say why they did not run.
pub fn run(opts: &CheckOptions) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    let gpu = section(&mut report, "device", |r| {
        let gpu = CudaBackend::new(&CudaOptions {
            ordinal: opts.device,
            dtype: WeightDtype::Bf16,
            kernel_cache: KernelCache::from_env(),
        })?;
        let info = gpu.device();
        r.device = Some(format!("{info}{}", device_facts(&gpu)));
        info!(
            "{info}: {:.1} GiB free",
            info.free_memory_bytes as f64 / (1u64 << 30) as f64
        );
        Ok(gpu)
    });
    let Some(gpu) = gpu else {
        report.total_s = started.elapsed().as_secs_f64();
        return report;
    };
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let cpu = match CpuBackend::new(threads) {
        Ok(c) => c,
        Err(e) => {
            report
                .checks
                .push(not_run("cpu", "the CPU backend".into(), e));
            report.total_s = started.elapsed().as_secs_f64();
            return report;
        }
    };

    let ceilings = section(&mut report, "ceilings", |r| {
        let c = measure_ceilings(&gpu, opts, r)?;
        Ok(c)
    });

    section(&mut report, "ops", |r| {
        r.checks.extend(check_ops(&gpu, &cpu, 0x5eed));
        Ok(())
    });

    section(&mut report, "forward", |r| {
        r.checks.extend(check_gpt2(&gpu, &cpu, opts));
        Ok(())
    });

    section(&mut report, "nccl", |r| {
        r.checks.push(check_nccl(&gpu));
        Ok(())
    });

    let large = large_shard(opts);
    section(&mut report, "kernels", |r| {
        let (config, spec) = large
            .as_ref()
            .map_err(|e| RuntimeError::Backend(e.to_string()))?;
        let dims = Dims::of(config, spec);
        r.timings.extend(time_kernels(
            &gpu,
            &dims,
            opts.prefill_tokens,
            ceilings.as_ref(),
            opts.warmup,
            opts.repeats,
        ));
        Ok(())
    });

    if opts.skip_large {
        report
            .notes
            .push("the large shard's decode and prefill were skipped (--skip-large)".into());
    } else {
        section(&mut report, "steps", |r| {
            let (config, spec) = large
                .as_ref()
                .map_err(|e| RuntimeError::Backend(e.to_string()))?;
            r.notes.push(format!(
                "{} tp{} rank {} runs alone: its two all-reduces per layer are world-1 \
                 no-ops, so the steps time compute and memory only, no communication",
                config.name, opts.large_tp, spec.tp_rank
            ));
            match load_large(&gpu, config, spec, opts) {
                Ok(mut shard) => {
                    r.notes.push(format!(
                        "the shard's synthetic bf16 weights were generated on the host and \
                         uploaded in {:.1} s",
                        shard.load_s
                    ));
                    r.timings
                        .extend(time_steps(&gpu, &mut shard, opts, ceilings.as_ref()));
                    Ok(())
                }
                Err(e) => {
                    // Keep the rows, so the table shows what was not measured and why.
                    for mut t in step_timings(opts, config, spec, ceilings.as_ref()) {
                        t.detail = format!("could not load the shard: {e}");
                        r.timings.push(t);
                    }
                    Err(e)
                }
            }
        });
    }
    report.total_s = started.elapsed().as_secs_f64();
    report
}

/// Multiprocessors, L2 and NVRTC's version, as `, 132 SMs, 60 MiB L2, NVRTC 13.0`; a
/// fact the driver does not give is left out.
fn device_facts(gpu: &CudaBackend) -> String {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = gpu.stream().context();
    let mut facts = String::new();
    if let Ok(n) = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) {
        facts.push_str(&format!(", {n} SMs"));
    }
    if let Ok(b) = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE) {
        facts.push_str(&format!(", {} MiB L2", b >> 20));
    }
    if let Ok((major, minor)) = crate::cuda::compile::nvrtc_version() {
        facts.push_str(&format!(", NVRTC {major}.{minor}"));
    }
    facts
}

/// Device-to-device copy bandwidth and the bf16 GEMM rate, each the median of timed
/// repeats after warm-up.
fn measure_ceilings(gpu: &CudaBackend, opts: &CheckOptions, r: &mut Report) -> Result<Ceilings> {
    let stream = gpu.stream();
    let n = opts.copy_bytes;
    let src: CudaSlice<u8> = stream.alloc_zeros(n).map_err(driver("copy buffer"))?;
    let mut dst: CudaSlice<u8> = stream.alloc_zeros(n).map_err(driver("copy buffer"))?;
    let copy = time_runs(gpu, opts.warmup, opts.repeats, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(driver("device-to-device copy"))
    })?;
    drop((src, dst));
    let copy_s = copy.median_ms() / 1e3;
    let memory = 2.0 * n as f64 / copy_s;
    r.copy_read_bytes_per_s = Some(n as f64 / copy_s);
    info!(
        "copy of {:.2} GB: {:.3} ms, {:.0} GB/s read+write ({:.0} GB/s read)",
        n as f64 / 1e9,
        copy.median_ms(),
        memory / 1e9,
        n as f64 / copy_s / 1e9
    );

    let s = opts.gemm_size;
    let x = gpu.upload(&random_bf16(s * s, 1, -1.0, 1.0), s, s)?;
    let w = gpu.upload_matrix(s, s, random_bf16(s * s, 2, -1.0, 1.0), WeightDtype::Bf16)?;
    let mut out = gpu.zeros(s, s)?;
    let gemm = time_runs(gpu, opts.warmup, opts.repeats, || {
        gpu.linear(&x, &w, None, &mut out)
    })?;
    let flops = 2.0 * (s as f64).powi(3);
    let rate = flops / (gemm.median_ms() / 1e3);
    info!(
        "bf16 GEMM {s}x{s}x{s} on random data: {:.3} ms, {:.0} TFLOP/s",
        gemm.median_ms(),
        rate / 1e12
    );
    let c = Ceilings {
        memory_bytes_per_s: memory,
        matrix_flops_per_s: rate,
    };
    r.ceilings = Some(c);
    Ok(c)
}

/// A one-rank NCCL communicator on the backend's device: formed from a fresh unique id,
/// an in-place all-reduce of a device buffer on the backend's stream, a wait through the
/// communicator's own thread, and the values read back.
fn check_nccl(gpu: &CudaBackend) -> Check {
    let name = "world-1 communicator, all-reduce of 1000003 f32";
    match nccl_world1(gpu) {
        Ok((version, ok, detail)) => Check {
            section: "nccl".into(),
            name: name.into(),
            passed: ok,
            error: None,
            tolerance: None,
            detail: format!("NCCL {version}: {detail}"),
        },
        Err(e) => not_run("nccl", name.into(), e),
    }
}

fn nccl_world1(gpu: &CudaBackend) -> Result<(String, bool, String)> {
    let version = crate::collective::require_nccl_library()?;
    let stream = gpu.stream();
    let spec = NcclGroupSpec {
        rank: 0,
        world_size: 1,
        id: new_unique_id()?,
        timeout: Duration::from_secs(60),
        io_timeout: Duration::from_secs(60),
    };
    let mut comm = NcclComm::connect(stream.context().clone(), &spec)?;
    let values = random_bf16(1_000_003, 3, -1.0, 1.0);
    let mut buf: CudaSlice<f32> = stream.clone_htod(&values).map_err(driver("upload"))?;
    comm.all_reduce_sum_in_place(&mut buf, stream)?;
    comm.synchronize(stream)?;
    let back = stream.clone_dtoh(&buf).map_err(driver("download"))?;
    let same = back == values;
    Ok((
        version,
        same,
        if same {
            "formed; the sum over one rank left every value as it was (NcclComm enqueues \
             no kernel for one rank)"
                .into()
        } else {
            "formed, but the sum over one rank changed the values".into()
        },
    ))
}
