//! `tessera`: the one binary. It parses arguments and wires the libraries together.

mod bench;
mod model_cmd;
mod run;
mod source;

use clap::{Parser, Subcommand};

/// Tessera: tensor- and pipeline-parallel serving of GPT-2 / GPT-3 models.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every shard of a TP × PP split in this process and generate from a prompt.
    Run(run::RunArgs),
    /// Inspect a model (sizes, memory per worker) or write a synthetic checkpoint.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Benchmarks: batch-1 decode throughput against the memory-bandwidth floor.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    // A CLI whose output is piped into `head` should end quietly when the pipe closes,
    // as other Unix tools do, rather than panic on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts; no
    // handler runs, so there is nothing to be async-signal-safe about.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Model(cmd) => model_cmd::model(cmd),
        Command::Bench(cmd) => bench::bench(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
