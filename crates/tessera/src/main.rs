//! `tessera`: the one binary. It parses arguments and wires the libraries together.

mod api_key_arg;
mod bench;
mod bench_cluster;
mod bench_serve;
mod bench_throughput;
mod certs_cmd;
mod cluster_args;
mod coordinator_cmd;
mod cpu_profile;
mod generate_cmd;
mod gpu_check_cmd;
mod kernels_cmd;
mod model_cmd;
mod plan_cmd;
mod run;
mod serve;
mod signals;
mod source;
mod tls_args;
mod worker_cmd;

use clap::{Parser, Subcommand};

/// Tessera: tensor- and pipeline-parallel serving of GPT-2 / GPT-3 models.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a whole cluster on this machine: a coordinator and one worker process per
    /// shard (TP=2 over a small synthetic GPT-2 by default), serving gRPC and the
    /// OpenAI-compatible HTTP API until Ctrl-C.
    Serve(serve::ServeArgs),
    /// Run the coordinator of a multi-node cluster: the public API and the scheduler.
    Coordinator(coordinator_cmd::CoordinatorArgs),
    /// Run one worker process: it registers with the coordinator and serves one shard.
    Worker(worker_cmd::WorkerArgs),
    /// Generate text from a running cluster over gRPC.
    Generate(generate_cmd::GenerateArgs),
    /// Run every shard of a TP × PP split in this process and generate from a prompt.
    Run(run::RunArgs),
    /// Inspect a model (sizes, memory per worker) or write a synthetic checkpoint.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Benchmarks. Without a subcommand: load a server (Tessera gRPC or OpenAI-compatible)
    /// with a workload and report vLLM's serving metrics (TTFT, TPOT, ITL, throughput,
    /// goodput). Subcommands: batch-1 decode, and decode and throughput through a cluster.
    Bench(bench::BenchArgs),
    /// Capacity planning: for every TP × PP split of a model on given devices, the memory,
    /// the predicted latencies and throughput, and the recommended split.
    Plan(plan_cmd::PlanArgs),
    /// Make a development CA and certificates for TLS: one per cluster node (mutual TLS
    /// between the coordinator and its workers) and one for the public API.
    Certs(certs_cmd::CertsArgs),
    /// Compile every CUDA kernel through NVRTC for a GPU architecture (no GPU or driver
    /// needed, only libnvrtc) and list the kernels of each source. Needs a build with
    /// `--features cuda`.
    Kernels(kernels_cmd::KernelsArgs),
    /// On a machine with an NVIDIA GPU: check every CUDA kernel and a whole GPT-2 forward
    /// pass against the CPU backend, form a one-rank NCCL communicator, and time the
    /// kernels and a gpt3-175b TP=8 shard's decode and prefill against floors measured on
    /// the GPU. Prints a short table last. Needs a build with `--features cuda`.
    GpuCheck(gpu_check_cmd::GpuCheckArgs),
}

/// Asks glibc's allocator to keep the memory a step frees for the next step. By default
/// it maps every buffer above a threshold afresh and trims the heap's free top, so each
/// prefill step of thousands of rows took tens of thousands of page faults (the kernel
/// zeroing every page again) for activations the step before had just freed: about 75,000
/// per 2048-token step of a gpt2 TP=2 worker. Buffers up to 32 MiB (glibc's largest
/// threshold) now come from the heap, and the heap is trimmed only past 1 GiB free. Weights,
/// the KV cache and other large, long-lived buffers are still mapped on their own.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Whether a command talks over the network: its processes must outlive any peer.
fn uses_network(command: &Command) -> bool {
    match command {
        Command::Serve(_)
        | Command::Coordinator(_)
        | Command::Worker(_)
        | Command::Generate(_)
        | Command::Bench(_) => true,
        Command::Run(_)
        | Command::Model(_)
        | Command::Plan(_)
        | Command::Certs(_)
        | Command::Kernels(_)
        | Command::GpuCheck(_) => false,
    }
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    // A local tool whose output is piped into `head` should end quietly when the pipe
    // closes, as other Unix tools do, rather than panic on the failed write: SIGPIPE gets
    // its default action back. Never for a command that talks over the network: the HTTP/2
    // stack writes sockets with `writev`, which raises SIGPIPE when the peer is gone, and a
    // coordinator sending a step to a worker that was just killed would die with it instead
    // of starting recovery (Rust ignores SIGPIPE, so the write fails with EPIPE instead).
    #[cfg(unix)]
    if !uses_network(&cli.command) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts; no
        // handler runs, so there is nothing to be async-signal-safe about.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Servers say what they are doing; one-shot tools speak only when something is wrong.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Coordinator(_) | Command::Worker(_) => "info",
        // A long run that a person watches: every step says what it did and how long.
        Command::GpuCheck(ref a) if !a.dry_run => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Coordinator(args) => coordinator_cmd::coordinator(args),
        Command::Worker(args) => worker_cmd::worker(args),
        Command::Generate(args) => generate_cmd::generate(args),
        Command::Run(args) => run::run(args),
        Command::Model(cmd) => model_cmd::model(cmd),
        Command::Bench(args) => bench::bench(args),
        Command::Plan(args) => plan_cmd::plan_cmd(args),
        Command::Certs(args) => certs_cmd::certs(args),
        Command::Kernels(args) => kernels_cmd::kernels(args),
        Command::GpuCheck(args) => gpu_check_cmd::gpu_check(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
