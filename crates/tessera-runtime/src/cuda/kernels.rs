//! Tessera's kernels on a device: every source of [`super::sources`] compiled by NVRTC
//! (through the PTX cache), loaded into the context, and each kernel of the backend's
//! dtype looked up once, so a launch is a table read.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::compile::{self, KernelCache, Origin};
use super::probe;
use super::sources::{self, KernelDtype, KernelFile, LaunchConfig};
use crate::error::{Result, RuntimeError};

/// One kernel source compiled: what `tessera kernels` prints per file.
#[derive(Debug, Clone)]
pub struct CompiledFile {
    /// The source file.
    pub file: &'static str,
    /// Exported kernel names, in the order `sources.rs` lists them.
    pub kernels: Vec<String>,
    /// Bytes of PTX.
    pub ptx_bytes: usize,
    /// The PTX.
    pub ptx: String,
    /// Whether it came from the cache.
    pub origin: Origin,
}

/// NVRTC options of every kernel program for `arch`.
pub fn program_options(arch: &str) -> Vec<String> {
    compile::options_for(arch, sources::NVRTC_OPTIONS)
}

/// Compiles one kernel file for `arch` and checks that its PTX defines every kernel
/// `sources.rs` lists for it (a kernel missing there would only fail at load on a GPU).
pub fn compile_file(
    file: &'static KernelFile,
    arch: &str,
    cache: Option<&KernelCache>,
) -> Result<CompiledFile> {
    let source = sources::program_source(file);
    let compiled =
        compile::compile_cached(cache, file.name, &source, arch, &program_options(arch))?;
    let defined = compile::ptx_entries(&compiled.ptx);
    let kernels: Vec<String> = file
        .kernels
        .iter()
        .flat_map(|k| k.exported_names().into_iter().map(|(name, _)| name))
        .collect();
    if let Some(missing) = kernels.iter().find(|k| !defined.contains(&k.as_str())) {
        return Err(RuntimeError::KernelCompile {
            file: file.name.to_string(),
            arch: arch.to_string(),
            reason: format!(
                "the PTX defines no kernel `{missing}` (sources.rs lists it; is it \
                 extern \"C\" __global__?)"
            ),
            log: format!("kernels in the PTX: {}", defined.join(", ")),
        });
    }
    Ok(CompiledFile {
        file: file.name,
        kernels,
        ptx_bytes: compiled.ptx.len(),
        ptx: compiled.ptx,
        origin: compiled.origin,
    })
}

/// Compiles every kernel file for `arch`, stopping at the first failure.
pub fn compile_all(arch: &str, cache: Option<&KernelCache>) -> Result<Vec<CompiledFile>> {
    sources::FILES
        .iter()
        .map(|f| compile_file(f, arch, cache))
        .collect()
}

/// Checks that `arch` is an NVRTC real architecture name, `sm_` and digits (`sm_90a` too).
pub fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .map(|v| v.trim_end_matches(['a', 'f']))
        .is_some_and(|v| v.len() >= 2 && v.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::invalid(
            "arch",
            format!("`{arch}` is not a GPU architecture such as sm_80 or sm_90"),
        ))
    }
}

/// The kernels of one dtype, loaded into one context.
#[derive(Debug)]
pub struct Kernels {
    dtype: KernelDtype,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Compiles (or reads from `cache`) every source for `arch`, loads it into `ctx` and
    /// looks up the kernels of `dtype` (and those without a dtype).
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: &str,
        dtype: KernelDtype,
        cache: Option<&KernelCache>,
    ) -> Result<Self> {
        let mut functions = HashMap::new();
        for file in sources::FILES {
            let compiled = compile_file(file, arch, cache)?;
            let module = ctx
                .load_module(Ptx::from_src(compiled.ptx))
                .map_err(|e| load_error(file.name, &e))?;
            for k in file.kernels {
                for (name, d) in k.exported_names() {
                    if d.is_some_and(|d| d != dtype) {
                        continue;
                    }
                    let f = module.load_function(&name).map_err(|e| {
                        RuntimeError::Backend(format!(
                            "kernel {name} of {}: {}",
                            file.name,
                            probe::describe(&e)
                        ))
                    })?;
                    functions.insert(k.name, f);
                }
            }
        }
        Ok(Kernels { dtype, functions })
    }

    /// The dtype of the loaded kernels.
    pub fn dtype(&self) -> KernelDtype {
        self.dtype
    }

    /// The kernel `name` (its base name in `sources.rs`).
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| RuntimeError::Backend(format!("no kernel `{name}` is loaded")))
    }
}

/// Why a module did not load, with the likely fix for the common case of NVRTC being
/// newer than the driver.
fn load_error(file: &str, e: &cudarc::driver::DriverError) -> RuntimeError {
    use cudarc::driver::sys::CUresult;
    let mut msg = format!("cannot load the PTX of {file}: {}", probe::describe(e));
    if matches!(
        e.0,
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION | CUresult::CUDA_ERROR_INVALID_PTX
    ) {
        let nvrtc = compile::nvrtc_version()
            .map(|(a, b)| format!("{a}.{b}"))
            .unwrap_or_else(|_| "?".into());
        let driver = probe::driver_version()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_else(|_| "?".into());
        msg.push_str(&format!(
            "; NVRTC {nvrtc} may write PTX newer than the driver (CUDA {driver}) reads: \
             install an NVRTC no newer than the driver (pip install \
             'nvidia-cuda-nvrtc=={driver}.*') or update the driver"
        ));
    }
    RuntimeError::Backend(msg)
}

/// cudarc's launch configuration of one of `sources.rs`'s.
pub fn launch_config(c: LaunchConfig) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: c.grid,
        block_dim: c.block,
        shared_mem_bytes: c.shared_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_checked() {
        for ok in ["sm_80", "sm_90", "sm_86", "sm_90a", "sm_100", "sm_120f"] {
            check_arch(ok).unwrap();
        }
        for bad in ["", "80", "sm_", "sm_8", "compute_80", "sm_80;rm", "sm_x0"] {
            assert!(check_arch(bad).is_err(), "{bad} was accepted");
        }
    }

    /// Every kernel file compiles for both CI architectures and defines each kernel
    /// `sources.rs` lists (where NVRTC is installed; CI requires it).
    #[test]
    fn every_kernel_source_compiles_for_sm80_and_sm90() {
        if !crate::cuda::probe::nvrtc_for_tests() {
            return;
        }
        let expected: usize = sources::all_kernels()
            .map(|(_, k)| k.exported_names().len())
            .sum();
        for arch in ["sm_80", "sm_90"] {
            let files = compile_all(arch, None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(files.len(), sources::FILES.len());
            assert_eq!(
                files.iter().map(|f| f.kernels.len()).sum::<usize>(),
                expected
            );
            for f in &files {
                assert!(f.ptx.contains(&format!(".target {arch}")), "{}", f.file);
                assert_eq!(f.origin, Origin::Compiled);
            }
        }
    }
}
