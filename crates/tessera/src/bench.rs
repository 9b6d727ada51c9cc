//! `tessera bench decode`: batch-1 decode throughput against the memory-bandwidth floor.

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

pub fn bench(cmd: BenchCommand) -> Result<()> {
    match cmd {}
}
