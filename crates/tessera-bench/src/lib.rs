//! Capacity benchmarking: how much a deployment sustains, measured and predicted.
//!
//! The load generator (`tessera bench`) draws a workload ([`dataset`]), sends it on an
//! arrival schedule ([`arrival`]) to a Tessera cluster or any OpenAI-compatible server
//! ([`target`]), keeps what each request saw ([`record`]), reduces it to the serving
//! metrics of vLLM's `bench serve` ([`metrics`]) and reports them ([`report`], [`plot`]).

pub mod arrival;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod plot;
pub mod record;
pub mod report;
pub mod run;
pub mod target;

pub use error::BenchError;
