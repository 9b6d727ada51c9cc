//! Kernel sources to PTX through NVRTC, with an on-disk cache.
//!
//! A worker compiles every kernel source for its device's architecture when it starts.
//! NVRTC takes a while per source, so the PTX is kept under the kernel cache directory,
//! keyed by a SHA-256 of everything that shapes it: the source, the architecture, the
//! compiler options and NVRTC's own version. An entry carries a checksum of its PTX; one
//! that does not match (a torn write, a disk error) is compiled again and replaced.
//!
//! The cache directory is `$TESSERA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tessera/kernels`,
//! else `~/.cache/tessera/kernels`. A cache that cannot be written only costs time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::nvrtc::{self, CompileError, CompileOptions};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::probe::{self, Library};
use crate::error::{Result, RuntimeError};

/// Environment variable that names the kernel cache directory.
pub const CACHE_ENV: &str = "TESSERA_KERNEL_CACHE";

/// First line of a cache entry, followed by the hex SHA-256 of the PTX after it. A PTX
/// comment, so an entry is itself valid PTX.
const ENTRY_HEADER: &str = "// tessera kernel cache sha256:";

/// Changes whenever the key or the entry format changes, so old entries are never read.
const CACHE_FORMAT: &str = "tessera-kernel-cache-v1";

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    probe::require(Library::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is present (checked above); nvrtcVersion writes two ints through
    // the pointers given and has no other effect.
    let status = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(RuntimeError::CudaUnavailable(format!(
            "NVRTC did not report its version ({status:?})"
        )));
    }
    Ok((major, minor))
}

/// The NVRTC options of a compilation for `arch` (`sm_80`) with the source's own `extra`.
pub fn options_for(arch: &str, extra: &[&str]) -> Vec<String> {
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(extra.iter().map(|s| s.to_string()));
    options
}

/// Compiles one kernel source to PTX with NVRTC, with no cache. `file` names the source
/// in errors and in NVRTC's log.
pub fn compile_ptx(file: &str, source: &str, arch: &str, options: &[String]) -> Result<String> {
    probe::require(Library::Nvrtc)?;
    let failed = |reason: String, log: String| RuntimeError::KernelCompile {
        file: file.to_string(),
        arch: arch.to_string(),
        reason,
        log,
    };
    if source.contains('\0') {
        return Err(failed("the source holds a NUL byte".into(), String::new()));
    }
    let opts = CompileOptions {
        name: Some(file.to_string()),
        options: options.to_vec(),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            failed(format!("{nvrtc:?}"), log.to_string_lossy().into_owned())
        }
        other => failed(format!("{other:?}"), String::new()),
    })?;
    let bytes = ptx
        .as_bytes()
        .ok_or_else(|| failed("NVRTC returned no PTX image".into(), String::new()))?;
    // The image is a C string: PTX text and a closing NUL.
    let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec())
        .map_err(|_| failed("NVRTC returned PTX that is not UTF-8".into(), String::new()))
}

/// Names of the kernels (`.entry` functions) a PTX module defines, in order.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.trim_start();
            let rest = rest
                .strip_prefix(".visible .entry ")
                .or_else(|| rest.strip_prefix(".entry "))?;
            let name = rest.split(|c: char| c == '(' || c.is_whitespace()).next()?;
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Where a module's PTX came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache.
    Cached,
    /// Compiled now (and stored, where the cache could be written).
    Compiled,
}

/// PTX of one kernel source.
#[derive(Debug, Clone)]
pub struct CompiledPtx {
    /// The PTX text.
    pub ptx: String,
    /// Whether it was compiled or found in the cache.
    pub origin: Origin,
}

/// The on-disk PTX cache.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// A cache in `dir` (created on first store).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// The cache the environment names: `$TESSERA_KERNEL_CACHE`, else
    /// `$XDG_CACHE_HOME/tessera/kernels`, else `$HOME/.cache/tessera/kernels`; `None` when
    /// none of them is set.
    pub fn from_env() -> Option<Self> {
        Self::resolve(|k| std::env::var_os(k))
    }

    fn resolve(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<Self> {
        let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(dir) = set(CACHE_ENV) {
            return Some(Self::at(dir));
        }
        if let Some(xdg) = set("XDG_CACHE_HOME") {
            return Some(Self::at(xdg.join("tessera").join("kernels")));
        }
        set("HOME").map(|home| Self::at(home.join(".cache").join("tessera").join("kernels")))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache key (hex SHA-256) of `source` compiled for `arch` with `options` by NVRTC
    /// `nvrtc_version`. Each part is length-prefixed, so no two inputs share a key.
    pub fn key(source: &str, arch: &str, options: &[String], nvrtc_version: (i32, i32)) -> String {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(CACHE_FORMAT.as_bytes());
        part(format!("{}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
        part(arch.as_bytes());
        part(&(options.len() as u64).to_le_bytes());
        for o in options {
            part(o.as_bytes());
        }
        part(source.as_bytes());
        hex(&h.finalize())
    }

    /// The entry file of `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.ptx"))
    }

    /// The PTX stored under `key`; `None` when there is none or it fails its checksum
    /// (a corrupt entry is removed).
    pub fn load(&self, key: &str) -> Option<String> {
        let path = self.path(key);
        let text = std::fs::read_to_string(&path).ok()?;
        match verify_entry(&text) {
            Some(ptx) => Some(ptx.to_string()),
            None => {
                warn!(
                    "kernel cache entry {} is corrupt; compiling it again",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `ptx` under `key`, atomically: readers see the old entry or the whole new one.
    pub fn store(&self, key: &str, ptx: &str) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".{key}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let entry = format!("{ENTRY_HEADER}{}\n{ptx}", hex(&Sha256::digest(ptx)));
        let written =
            std::fs::write(&tmp, entry).and_then(|()| std::fs::rename(&tmp, self.path(key)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// The PTX of a cache entry whose checksum matches.
fn verify_entry(text: &str) -> Option<&str> {
    let (header, ptx) = text.split_once('\n')?;
    let sum = header.strip_prefix(ENTRY_HEADER)?;
    (hex(&Sha256::digest(ptx)) == sum).then_some(ptx)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The PTX of `key` from `cache`, or from `compile` (then stored). A cache that cannot be
/// written is logged and otherwise ignored.
pub fn cached_or(
    cache: Option<&KernelCache>,
    key: &str,
    compile: impl FnOnce() -> Result<String>,
) -> Result<CompiledPtx> {
    if let Some(ptx) = cache.and_then(|c| c.load(key)) {
        return Ok(CompiledPtx {
            ptx,
            origin: Origin::Cached,
        });
    }
    let ptx = compile()?;
    if let Some(c) = cache {
        match c.store(key, &ptx) {
            Ok(()) => debug!("cached kernel PTX at {}", c.path(key).display()),
            Err(e) => warn!(
                "cannot write the kernel cache in {}: {e}; kernels will be compiled again \
                 next time",
                c.dir().display()
            ),
        }
    }
    Ok(CompiledPtx {
        ptx,
        origin: Origin::Compiled,
    })
}

/// Compiles `source` for `arch` with `options`, through `cache` when given.
pub fn compile_cached(
    cache: Option<&KernelCache>,
    file: &str,
    source: &str,
    arch: &str,
    options: &[String],
) -> Result<CompiledPtx> {
    let key = KernelCache::key(source, arch, options, nvrtc_version()?);
    cached_or(cache, &key, || compile_ptx(file, source, arch, options))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const VERSION: (i32, i32) = (13, 0);

    fn opts(arch: &str) -> Vec<String> {
        options_for(arch, &["--std=c++17"])
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tessera-kernel-cache-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let base = KernelCache::key("src", "sm_80", &opts("sm_80"), VERSION);
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            KernelCache::key("src", "sm_80", &opts("sm_80"), VERSION)
        );
        let others = [
            KernelCache::key("src ", "sm_80", &opts("sm_80"), VERSION),
            KernelCache::key("src", "sm_90", &opts("sm_80"), VERSION),
            KernelCache::key("src", "sm_80", &opts("sm_90"), VERSION),
            KernelCache::key("src", "sm_80", &options_for("sm_80", &[]), VERSION),
            KernelCache::key("src", "sm_80", &opts("sm_80"), (13, 1)),
        ];
        for k in &others {
            assert_ne!(&base, k);
        }
        // Parts are length-prefixed: moving a byte from one option to the next is another key.
        let a = KernelCache::key("s", "sm_80", &["ab".into(), "c".into()], VERSION);
        let b = KernelCache::key("s", "sm_80", &["a".into(), "bc".into()], VERSION);
        assert_ne!(a, b);
    }

    #[test]
    fn the_directory_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let dir = |c: Option<KernelCache>| c.map(|c| c.dir().to_path_buf());
        assert_eq!(
            dir(KernelCache::resolve(env(&[
                (CACHE_ENV, "/k"),
                ("XDG_CACHE_HOME", "/x"),
                ("HOME", "/h")
            ]))),
            Some(PathBuf::from("/k"))
        );
        assert_eq!(
            dir(KernelCache::resolve(env(&[
                (CACHE_ENV, ""),
                ("XDG_CACHE_HOME", "/x"),
                ("HOME", "/h")
            ]))),
            Some(PathBuf::from("/x/tessera/kernels"))
        );
        assert_eq!(
            dir(KernelCache::resolve(env(&[("HOME", "/h")]))),
            Some(PathBuf::from("/h/.cache/tessera/kernels"))
        );
        assert_eq!(dir(KernelCache::resolve(env(&[]))), None);
    }

    #[test]
    fn a_miss_compiles_and_a_hit_does_not() {
        let cache = KernelCache::at(temp_dir("hit"));
        let compiles = Cell::new(0);
        let compile = || {
            compiles.set(compiles.get() + 1);
            Ok(".version 8.0\n.target sm_80\n.visible .entry k()\n{\n}\n".to_string())
        };
        let key = KernelCache::key("k", "sm_80", &opts("sm_80"), VERSION);
        let first = cached_or(Some(&cache), &key, compile).unwrap();
        assert_eq!(first.origin, Origin::Compiled);
        let second = cached_or(Some(&cache), &key, compile).unwrap();
        assert_eq!(second.origin, Origin::Cached);
        assert_eq!(second.ptx, first.ptx);
        assert_eq!(compiles.get(), 1);
        // Another architecture is another entry.
        let other = KernelCache::key("k", "sm_90", &opts("sm_90"), VERSION);
        assert_eq!(
            cached_or(Some(&cache), &other, compile).unwrap().origin,
            Origin::Compiled
        );
        assert_eq!(compiles.get(), 2);
        // Without a cache everything compiles.
        assert_eq!(
            cached_or(None, &key, compile).unwrap().origin,
            Origin::Compiled
        );
        assert_eq!(compiles.get(), 3);
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn a_corrupt_entry_is_compiled_again_and_replaced() {
        let cache = KernelCache::at(temp_dir("corrupt"));
        let good = ".version 8.0\n.target sm_90\n".to_string();
        let key = KernelCache::key("k", "sm_90", &opts("sm_90"), VERSION);
        cache.store(&key, &good).unwrap();
        assert_eq!(cache.load(&key).as_deref(), Some(good.as_str()));

        // One flipped byte in the PTX, a lost header, a cut-short file: each is a miss.
        let entry = std::fs::read_to_string(cache.path(&key)).unwrap();
        let damaged = [
            entry.replace("sm_90", "sm_91"),
            entry.lines().skip(1).collect::<Vec<_>>().join("\n"),
            entry[..entry.len() - 3].to_string(),
        ];
        for bad in damaged {
            std::fs::write(cache.path(&key), &bad).unwrap();
            let compiles = Cell::new(0);
            let got = cached_or(Some(&cache), &key, || {
                compiles.set(compiles.get() + 1);
                Ok(good.clone())
            })
            .unwrap();
            assert_eq!(got.origin, Origin::Compiled, "{bad:?} was taken as valid");
            assert_eq!(compiles.get(), 1);
            assert_eq!(got.ptx, good);
            // The entry was rewritten whole.
            assert_eq!(cache.load(&key).as_deref(), Some(good.as_str()));
        }
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn an_unwritable_cache_only_costs_a_compile() {
        let file = temp_dir("unwritable");
        std::fs::write(&file, "not a directory").unwrap();
        let cache = KernelCache::at(file.join("kernels"));
        let got = cached_or(Some(&cache), "k", || Ok("ptx".into())).unwrap();
        assert_eq!(got.origin, Origin::Compiled);
        assert_eq!(got.ptx, "ptx");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn entries_are_read_from_ptx() {
        let ptx = "//\n.version 8.0\n.target sm_80\n\n\t// .globl\tlayer_norm_bf16\n\
                   .visible .entry layer_norm_bf16(\n\t.param .u64 a\n)\n{\n}\n\
                   .visible .entry gelu_bf16()\n{\n}\n.func helper()\n";
        assert_eq!(ptx_entries(ptx), ["layer_norm_bf16", "gelu_bf16"]);
    }

    /// NVRTC, where it is installed (CI installs it and sets `TESSERA_REQUIRE_NVRTC`):
    /// a good source compiles to PTX that defines its kernel for the asked architecture,
    /// through the cache the second time; a bad one fails with NVRTC's log.
    #[test]
    fn nvrtc_compiles_and_reports_errors() {
        if !crate::cuda::probe::nvrtc_for_tests() {
            return;
        }
        let source = r#"extern "C" __global__ void scale_rows(float* x, float s, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) x[i] *= s;
        }"#;
        let cache = KernelCache::at(temp_dir("nvrtc"));
        let options = options_for("sm_80", &[]);
        let first = compile_cached(Some(&cache), "scale.cu", source, "sm_80", &options).unwrap();
        assert_eq!(first.origin, Origin::Compiled);
        assert!(first.ptx.contains(".target sm_80"), "{}", first.ptx);
        assert_eq!(ptx_entries(&first.ptx), ["scale_rows"]);
        let again = compile_cached(Some(&cache), "scale.cu", source, "sm_80", &options).unwrap();
        assert_eq!(again.origin, Origin::Cached);
        assert_eq!(again.ptx, first.ptx);

        let broken = "extern \"C\" __global__ void k(float* x) { x[0] = undeclared; }";
        let e = compile_ptx("broken.cu", broken, "sm_90", &options_for("sm_90", &[])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("broken.cu"), "{text}");
        assert!(text.contains("sm_90"), "{text}");
        assert!(text.contains("undeclared"), "the log is missing: {text}");
        let _ = std::fs::remove_dir_all(cache.dir());
    }
}
