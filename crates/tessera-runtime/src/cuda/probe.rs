//! What CUDA this machine has, found without letting cudarc panic.
//!
//! cudarc opens each library the first time one of its functions is called and panics
//! when the library (or a symbol in it) is missing. Everything here opens the libraries
//! only through `is_culib_present` first, and checks the driver's CUDA version before any
//! call that the CUDA 13 bindings may resolve to a newer symbol.

use std::fmt;

use cudarc::driver::{sys as drv, CudaContext};

use crate::error::{Result, RuntimeError};

/// Oldest driver API this build's bindings (cudarc's `cuda-13000`) may call.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// A CUDA library Tessera loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// The driver (`libcuda.so.1`), installed with the NVIDIA kernel driver.
    Driver,
    /// The run-time compiler (`libnvrtc.so.13`) that turns the kernel sources into PTX.
    Nvrtc,
    /// cuBLAS (`libcublas.so.13`), for the GEMMs.
    Cublas,
}

impl Library {
    /// Whether the library can be opened here.
    pub fn is_present(self) -> bool {
        // SAFETY: each call only tries to dlopen the library under its usual names and
        // closes it again; opening a CUDA library runs no code that could break this
        // process's invariants.
        unsafe {
            match self {
                Library::Driver => drv::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    /// What is missing and how to get it.
    pub fn missing_help(self) -> &'static str {
        match self {
            Library::Driver => {
                "no CUDA driver found (libcuda.so.1 cannot be opened): this machine has no \
                 NVIDIA driver, or it is not on the loader's path; use --backend cpu"
            }
            Library::Nvrtc => {
                "NVRTC (libnvrtc.so.13) cannot be opened: it compiles Tessera's CUDA kernels. \
                 Install it with the CUDA toolkit or with `pip install nvidia-cuda-nvrtc`, and \
                 put the wheel's nvidia/cu13/lib directory on LD_LIBRARY_PATH"
            }
            Library::Cublas => {
                "cuBLAS (libcublas.so.13) cannot be opened: install it with the CUDA toolkit \
                 or with `pip install nvidia-cublas`, and put the wheel's nvidia/cu13/lib \
                 directory on LD_LIBRARY_PATH; or use --backend cpu"
            }
        }
    }
}

/// An error for `lib` missing.
pub fn missing(lib: Library) -> RuntimeError {
    RuntimeError::CudaUnavailable(lib.missing_help().to_string())
}

/// Fails with the library's help when it is missing.
pub fn require(lib: Library) -> Result<()> {
    if lib.is_present() {
        Ok(())
    } else {
        Err(missing(lib))
    }
}

/// The CUDA version the installed driver supports, as `major * 1000 + minor * 10`.
pub fn driver_version() -> Result<i32> {
    require(Library::Driver)?;
    let mut version = 0;
    // SAFETY: the driver library is present (checked above); cuDriverGetVersion exists in
    // every CUDA driver, needs no cuInit, and writes one int through the pointer given.
    let status = unsafe { drv::cuDriverGetVersion(&mut version) };
    if status != drv::CUresult::CUDA_SUCCESS {
        return Err(RuntimeError::CudaUnavailable(format!(
            "the CUDA driver did not report its version ({status:?}); use --backend cpu"
        )));
    }
    Ok(version)
}

/// `13000` as `13.0`.
fn dotted(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// A GPU this process can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Marketing name, `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Device memory in all.
    pub total_memory_bytes: u64,
    /// Device memory free when probed.
    pub free_memory_bytes: u64,
    /// CUDA version the driver supports, `major * 1000 + minor * 10`.
    pub driver_version: i32,
}

impl DeviceInfo {
    /// The NVRTC architecture of the device, `sm_90`.
    pub fn arch(&self) -> String {
        arch_of(self.compute_capability)
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} ({}, {:.1} GiB, driver CUDA {})",
            self.ordinal,
            self.name,
            self.arch(),
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            dotted(self.driver_version)
        )
    }
}

/// `sm_XY` of compute capability `(X, Y)`.
pub fn arch_of((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// Checks the driver and the libraries the backend needs, then opens device `ordinal`.
/// Every failure is a [`RuntimeError::CudaUnavailable`] that says what is missing and
/// suggests `--backend cpu`; nothing here panics on a machine without CUDA.
pub fn open_device(ordinal: usize) -> Result<(std::sync::Arc<CudaContext>, DeviceInfo)> {
    let driver_version = driver_version()?;
    if driver_version < MIN_DRIVER_VERSION {
        return Err(RuntimeError::CudaUnavailable(format!(
            "the NVIDIA driver supports CUDA {}, this build needs CUDA {} or newer \
             (driver 580 or later); update the driver or use --backend cpu",
            dotted(driver_version),
            dotted(MIN_DRIVER_VERSION)
        )));
    }
    let unavailable = |what: &str, e: cudarc::driver::DriverError| {
        RuntimeError::CudaUnavailable(format!("{what}: {}; use --backend cpu", describe(&e)))
    };
    let count = CudaContext::device_count()
        .map_err(|e| unavailable("the CUDA driver found no usable GPU", e))?;
    if count <= 0 {
        return Err(RuntimeError::CudaUnavailable(
            "the CUDA driver sees no GPU on this machine; use --backend cpu".into(),
        ));
    }
    if ordinal >= count as usize {
        return Err(RuntimeError::CudaUnavailable(format!(
            "--device {ordinal}: this machine has {count} GPU(s), numbered from 0"
        )));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| unavailable(&format!("cannot open GPU {ordinal}"), e))?;
    let name = ctx.name().map_err(|e| unavailable("device name", e))?;
    let compute_capability = ctx
        .compute_capability()
        .map_err(|e| unavailable("compute capability", e))?;
    let (free, total) = ctx
        .mem_get_info()
        .map_err(|e| unavailable("device memory", e))?;
    Ok((
        ctx,
        DeviceInfo {
            ordinal,
            name,
            compute_capability,
            total_memory_bytes: total as u64,
            free_memory_bytes: free as u64,
            driver_version,
        },
    ))
}

/// Probes device `ordinal` and the libraries the backend loads (driver, NVRTC, cuBLAS);
/// the context opened for the probe is released again.
pub fn probe_backend(ordinal: usize) -> Result<DeviceInfo> {
    let (_ctx, info) = open_device(ordinal)?;
    require(Library::Nvrtc)?;
    require(Library::Cublas)?;
    Ok(info)
}

/// A driver error as `CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)`.
pub fn describe(e: &cudarc::driver::DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// For tests that need NVRTC: whether libnvrtc can be opened. Where it cannot, the test
/// is skipped with a printed reason, unless `TESSERA_REQUIRE_NVRTC` is set (CI sets it),
/// which makes the absence a failure.
#[cfg(test)]
pub(crate) fn nvrtc_for_tests() -> bool {
    if Library::Nvrtc.is_present() {
        return true;
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_NVRTC").is_none(),
        "TESSERA_REQUIRE_NVRTC is set but libnvrtc cannot be opened; {}",
        Library::Nvrtc.missing_help()
    );
    eprintln!("skipped: libnvrtc is not on the loader's path");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_follows_the_compute_capability() {
        assert_eq!(arch_of((8, 0)), "sm_80");
        assert_eq!(arch_of((9, 0)), "sm_90");
        assert_eq!(arch_of((8, 6)), "sm_86");
        assert_eq!(dotted(13000), "13.0");
        assert_eq!(dotted(12080), "12.8");
    }

    /// On a machine without a driver the backend's probe fails with a message that names
    /// CUDA and suggests the CPU backend; where a GPU is present it succeeds.
    #[test]
    fn probing_without_a_driver_is_an_error_not_a_panic() {
        let driver = Library::Driver.is_present();
        match probe_backend(0) {
            Ok(info) => {
                assert!(driver, "a device was opened without a driver library");
                assert!(info.total_memory_bytes > 0, "{info}");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("CUDA"), "{text}");
                if !driver {
                    assert!(text.contains("--backend cpu"), "{text}");
                    assert!(text.contains("libcuda"), "{text}");
                }
            }
        }
    }
}
