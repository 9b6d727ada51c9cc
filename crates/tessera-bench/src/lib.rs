//! Capacity benchmarking: how much a deployment sustains, measured and predicted.
//!
//! The load generator (`tessera bench`) draws a workload ([`dataset`]), sends it on an
//! arrival schedule ([`arrival`]) to a Tessera cluster or any OpenAI-compatible server
//! ([`target`]), keeps what each request saw ([`record`]), reduces it to the serving
//! metrics of vLLM's `bench serve` ([`metrics`]) and reports them ([`report`], [`plot`]).
//!
//! The planner (`tessera plan`, [`plan`]) predicts the same figures for every split of a
//! model on named hardware by replaying the scheduler's policy over the cost model of
//! `tessera_model::cost` ([`replay`]), and checks itself against a measured run.

pub mod arrival;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod record;
pub mod replay;
pub mod report;
pub mod run;
pub mod target;

pub use error::BenchError;
