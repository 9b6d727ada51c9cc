//! Timing on the device: CUDA events recorded on the backend's stream around each run,
//! after untimed warm-up runs; the median of the timed runs is what is reported.

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;

use crate::cuda::probe;
use crate::cuda::CudaBackend;
use crate::error::{Result, RuntimeError};

/// Times of the timed runs of one thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// Device time of each run between its two events, in milliseconds.
    pub device_ms: Vec<f64>,
    /// Host wall-clock time of each run, in milliseconds (the run's own calls only; the
    /// device may still be busy when the host is done).
    pub host_ms: Vec<f64>,
}

impl Samples {
    /// Median device time.
    pub fn median_ms(&self) -> f64 {
        median(&self.device_ms)
    }

    /// Fastest device time.
    pub fn min_ms(&self) -> f64 {
        self.device_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// Median host time.
    pub fn host_median_ms(&self) -> f64 {
        median(&self.host_ms)
    }
}

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> RuntimeError {
    move |e| RuntimeError::Backend(format!("{what}: {}", probe::describe(&e)))
}

/// Runs `f` `warmup` times untimed, then `repeats` times between two events each, on
/// the backend's stream; waits for the device before returning.
pub fn time_runs(
    gpu: &CudaBackend,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Samples> {
    let stream = gpu.stream();
    for _ in 0..warmup {
        f()?;
    }
    gpu.synchronize()?;
    let ctx = stream.context();
    let mut events = Vec::with_capacity(repeats);
    let mut host_ms = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("event"))?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("event"))?;
        start.record(stream).map_err(driver("event record"))?;
        let t = Instant::now();
        f()?;
        host_ms.push(t.elapsed().as_secs_f64() * 1e3);
        end.record(stream).map_err(driver("event record"))?;
        events.push((start, end));
    }
    gpu.synchronize()?;
    let device_ms = events
        .iter()
        .map(|(s, e)| s.elapsed_ms(e).map(f64::from))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(driver("event elapsed time"))?;
    Ok(Samples { device_ms, host_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
