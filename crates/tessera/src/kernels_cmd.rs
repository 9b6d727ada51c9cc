//! `tessera kernels`: compiles every CUDA kernel source through NVRTC for a GPU
//! architecture, with no GPU and no driver: what CI runs so that a kernel that does not
//! compile fails the build, and a quick check of an NVRTC install.

use anyhow::Result;
use clap::Args;

/// Flags of `tessera kernels`.
#[derive(Debug, Args)]
pub struct KernelsArgs {
    /// GPU architecture to compile for: sm_80 (A100), sm_90 (H100, H200), …
    #[arg(long, value_name = "ARCH", default_value = "sm_90")]
    pub arch: String,
}

#[cfg(feature = "cuda")]
pub fn kernels(args: KernelsArgs) -> Result<()> {
    use anyhow::bail;
    use tessera_runtime::cuda::kernels::{check_arch, compile_file};
    use tessera_runtime::cuda::probe::Library;
    use tessera_runtime::cuda::sources;

    check_arch(&args.arch)?;
    if !Library::Nvrtc.is_present() {
        bail!("{}", Library::Nvrtc.missing_help());
    }
    let (major, minor) = tessera_runtime::cuda::compile::nvrtc_version()?;
    println!("NVRTC {major}.{minor}, {}", args.arch);
    let mut kernels = 0;
    for file in sources::FILES {
        // Always compiled, never read from the kernel cache: this is the compile check.
        let compiled = compile_file(file, &args.arch, None)?;
        println!(
            "{}: {} kernels ({}), {} bytes of PTX",
            compiled.file,
            compiled.kernels.len(),
            compiled.kernels.join(", "),
            compiled.ptx_bytes
        );
        kernels += compiled.kernels.len();
    }
    println!("{kernels} kernels compiled");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn kernels(args: KernelsArgs) -> Result<()> {
    anyhow::bail!(
        "`tessera kernels --arch {}` compiles the CUDA kernels through NVRTC, and this tessera \
         was built without CUDA support; rebuild it with `cargo build --release -p tessera \
         --features cuda` (no CUDA toolkit needed to build)",
        args.arch
    )
}
