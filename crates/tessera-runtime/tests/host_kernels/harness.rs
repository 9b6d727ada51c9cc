//! Builds and drives the host emulation of the CUDA kernels.
//!
//! The kernels are compiled by the system C++ compiler from exactly the text NVRTC gets
//! ([`sources::program_source`]), with `cuda_emu.h` force-included. A generated glue file
//! per kernel file checks every exported kernel's parameter types against
//! [`sources`] with `static_assert` and registers a launcher for it; `driver.cpp` runs
//! launches on buffers read from files. The executable is built once per set of inputs
//! (keyed by a hash of every source, the flags and the compiler's version) under the
//! test's target tmp dir.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tessera_runtime::cuda::sources::{self, KernelFile, KernelSpec, LaunchConfig, ParamType};

const EMU_HEADER: &str = include_str!("cuda_emu.h");
const DRIVER: &str = include_str!("driver.cpp");
const SELFTEST: &str = include_str!("selftest.cu");
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-pthread",
    "-Wall",
    "-Wno-unknown-pragmas",
];

/// The compiled emulator and the kernels launched through it so far.
pub struct Emulator {
    exe: PathBuf,
    work: PathBuf,
    jobs: AtomicUsize,
    launched: Mutex<BTreeSet<String>>,
}

/// The process-wide emulator, built on first use.
pub fn emulator() -> &'static Emulator {
    static EMU: OnceLock<Result<Emulator, String>> = OnceLock::new();
    let built = EMU.get_or_init(|| {
        build().map(|(exe, work)| Emulator {
            exe,
            work,
            jobs: AtomicUsize::new(0),
            launched: Mutex::new(BTreeSet::new()),
        })
    });
    match built {
        Ok(emu) => emu,
        Err(e) => panic!("{e}"),
    }
}

impl Emulator {
    /// Exported names of every kernel a successful job has launched.
    pub fn launched(&self) -> BTreeSet<String> {
        self.launched.lock().unwrap().clone()
    }
}

fn compiler() -> Result<(String, String), String> {
    let mut tried = Vec::new();
    let candidates = std::env::var("CXX").ok().into_iter().chain([
        "c++".to_string(),
        "g++".to_string(),
        "clang++".to_string(),
    ]);
    for cxx in candidates {
        match Command::new(&cxx).arg("--version").output() {
            Ok(out) if out.status.success() => {
                return Ok((cxx, String::from_utf8_lossy(&out.stdout).into_owned()));
            }
            _ => tried.push(cxx),
        }
    }
    Err(format!(
        "the CUDA kernel emulation test needs a C++17 compiler and found none (tried {}); \
         install g++ (apt-get install g++) or set CXX",
        tried.join(", ")
    ))
}

fn stem(file: &KernelFile) -> &'static str {
    file.name.trim_end_matches(".cu")
}

/// The glue of one kernel file: signature checks and a registered launcher per kernel.
fn glue(file: &KernelFile, program: &Path) -> String {
    let mut s = format!("#include \"{}\"\n\n", program.display());
    for k in file.kernels {
        for (name, dtype) in k.exported_names() {
            let types: Vec<String> = k.params.iter().map(|p| p.ty.c_type(dtype)).collect();
            s.push_str(&format!(
                "static_assert(std::is_same<decltype(&{name}), void (*)({})>::value,\n    \
                 \"{name}: the parameters in the .cu file differ from sources.rs\");\n",
                types.join(", ")
            ));
            let args: Vec<String> = types
                .iter()
                .enumerate()
                .map(|(i, t)| format!("    const auto a{i} = *static_cast<{t}*>(params[{i}]);\n"))
                .collect();
            let names: Vec<String> = (0..types.len()).map(|i| format!("a{i}")).collect();
            s.push_str(&format!(
                "static void launch_{name}(const cuda_emu::LaunchConfig& cfg, void** params) {{\n{}    \
                 cuda_emu::launch(\"{name}\", cfg, [=] {{ {name}({}); }});\n}}\n\
                 static cuda_emu::Registration register_{name}(\"{name}\", &launch_{name});\n\n",
                args.concat(),
                names.join(", ")
            ));
        }
    }
    s
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn build() -> Result<(PathBuf, PathBuf), String> {
    let (cxx, version) = compiler()?;
    let programs: Vec<(String, String)> = sources::FILES
        .iter()
        .map(|f| (stem(f).to_string(), sources::program_source(f)))
        .collect();

    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        &cxx,
        &version,
        CXX_FLAGS,
        EMU_HEADER,
        DRIVER,
        SELFTEST,
        &programs,
        env!("CARGO_PKG_VERSION"),
    )
        .hash(&mut hasher);
    for (_, k) in sources::all_kernels() {
        format!("{k:?}").hash(&mut hasher);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("host_kernels-{:016x}", hasher.finish()));
    let exe = dir.join("driver");
    let work = dir.join("jobs");
    if exe.exists() {
        return Ok((exe, work));
    }

    let tmp = dir.with_extension(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let write = |name: &str, text: &str| -> Result<PathBuf, String> {
        let path = tmp.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    let header = write("cuda_emu.h", EMU_HEADER)?;
    let selftest = format!("{}\n{SELFTEST}", sources::COMMON_HEADER.1);
    let mut units = vec![
        write("driver.cpp", DRIVER)?,
        write("selftest.cpp", &selftest)?,
    ];
    for (file, (stem, program)) in sources::FILES.iter().zip(&programs) {
        let program = write(&format!("{stem}.cu"), program)?;
        units.push(write(&format!("{stem}_glue.cpp"), &glue(file, &program))?);
    }

    // Compile the units in parallel, then link.
    let objects: Vec<PathBuf> = units.iter().map(|u| u.with_extension("o")).collect();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = units
            .iter()
            .zip(&objects)
            .map(|(unit, object)| {
                let (cxx, header) = (&cxx, &header);
                scope.spawn(move || {
                    run_checked(
                        Command::new(cxx)
                            .args(CXX_FLAGS)
                            .arg("-include")
                            .arg(header)
                            .arg("-c")
                            .arg(unit)
                            .arg("-o")
                            .arg(object),
                        &format!("compiling {} with {cxx}", unit.display()),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        r?;
    }
    let linked = tmp.join("driver");
    run_checked(
        Command::new(&cxx)
            .args(CXX_FLAGS)
            .args(&objects)
            .arg("-o")
            .arg(&linked),
        "linking the kernel emulator",
    )?;
    // Publish the finished build in one step; a concurrent builder of the same key wins
    // or loses the rename harmlessly.
    if std::fs::rename(&tmp, &dir).is_err() && !exe.exists() {
        return Err(format!(
            "cannot move {} to {}",
            tmp.display(),
            dir.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok((exe, work))
}

/// A buffer of a job.
#[derive(Debug, Clone, Copy)]
pub struct Buf(usize);

impl Buf {
    /// Its index in [`Job::run`]'s result.
    pub fn index(self) -> usize {
        self.0
    }
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A buffer's device address.
    Buf(Buf),
    /// A null pointer.
    Null,
    /// `unsigned int`.
    U32(u32),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

/// Buffers and launches run by one driver process, in order.
pub struct Job {
    buffers: Vec<Vec<u8>>,
    lines: Vec<String>,
    kernels: Vec<String>,
}

fn spec_of(kernel: &str) -> &'static KernelSpec {
    sources::all_kernels()
        .map(|(_, k)| k)
        .find(|k| k.exported_names().iter().any(|(n, _)| n == kernel))
        .unwrap_or_else(|| panic!("{kernel} is not listed in sources.rs"))
}

impl Job {
    /// An empty job.
    pub fn new() -> Self {
        Job {
            buffers: Vec::new(),
            lines: Vec::new(),
            kernels: Vec::new(),
        }
    }

    /// Adds a buffer with these initial bytes.
    pub fn buffer(&mut self, bytes: Vec<u8>) -> Buf {
        self.buffers.push(bytes);
        Buf(self.buffers.len() - 1)
    }

    /// Queues a launch; the arguments must match the kernel's parameters in sources.rs
    /// and the block size its launch contract.
    pub fn launch(&mut self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) {
        let spec = spec_of(kernel);
        assert_eq!(
            cfg.block,
            (spec.block_threads, 1, 1),
            "{kernel}: block size differs from sources.rs"
        );
        assert_eq!(args.len(), spec.params.len(), "{kernel}: argument count");
        let mut line = format!(
            "launch {kernel} {} {} {} {} {} {} {} {}",
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_bytes,
            args.len()
        );
        for (arg, param) in args.iter().zip(spec.params) {
            let text = match (arg, param.ty) {
                (Arg::Buf(b), t) if t.is_pointer() => format!("b{}", b.0),
                (Arg::Null, t) if t.is_pointer() => "null".to_string(),
                (Arg::U32(v), ParamType::U32) => format!("u32:{v}"),
                (Arg::U64(v), ParamType::U64) => format!("u64:{v}"),
                (Arg::F32(v), ParamType::F32) => format!("f32:{:08x}", v.to_bits()),
                (a, t) => panic!(
                    "{kernel}: argument {a:?} for parameter {} ({t:?})",
                    param.name
                ),
            };
            line.push(' ');
            line.push_str(&text);
        }
        self.lines.push(line);
        self.kernels.push(kernel.to_string());
    }

    /// Queues a launch of a kernel that sources.rs does not list (the emulator's
    /// self-test); it does not count as a tested kernel.
    pub fn launch_unlisted(&mut self, kernel: &str, cfg: LaunchConfig, buffer: Buf) {
        self.lines.push(format!(
            "launch {kernel} {} {} {} {} {} {} {} 1 b{}",
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared_bytes,
            buffer.0
        ));
    }

    /// Runs the job; returns every buffer's final bytes.
    pub fn run(self) -> Vec<Vec<u8>> {
        match self.execute() {
            Ok(buffers) => buffers,
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs the job, which must fail; returns what the emulator reported.
    pub fn run_expecting_failure(self) -> String {
        match self.execute() {
            Ok(_) => panic!("the job was expected to fail"),
            Err(e) => e,
        }
    }

    fn execute(self) -> Result<Vec<Vec<u8>>, String> {
        let emu = emulator();
        let id = emu.jobs.fetch_add(1, Ordering::Relaxed);
        let dir = emu.work.join(format!("{}-{id}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut job = String::new();
        for (i, bytes) in self.buffers.iter().enumerate() {
            let path = dir.join(format!("in{i}.bin"));
            std::fs::write(&path, bytes).unwrap();
            job.push_str(&format!("buffer {i} {}\n", path.display()));
        }
        for line in &self.lines {
            job.push_str(line);
            job.push('\n');
        }
        for i in 0..self.buffers.len() {
            job.push_str(&format!(
                "save {i} {}\n",
                dir.join(format!("out{i}.bin")).display()
            ));
        }
        let job_path = dir.join("job.txt");
        std::fs::write(&job_path, &job).unwrap();
        let out = Command::new(&emu.exe).arg(&job_path).output().unwrap();
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "emulated kernels {:?} failed ({}):\n{}{}",
                self.kernels,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let result = (0..self.buffers.len())
            .map(|i| std::fs::read(dir.join(format!("out{i}.bin"))).unwrap())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        emu.launched.lock().unwrap().extend(self.kernels);
        Ok(result)
    }
}
