//! Capacity benchmarking: how much a deployment sustains, measured and predicted.

pub mod plan;
pub mod replay;
