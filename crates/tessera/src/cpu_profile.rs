//! The `cpu` hardware profile, measured on this machine: each "device" is one CPU worker
//! with its share of the cores, measured while the other workers of the node run the same
//! test, since they share the memory bus.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result};
use tessera_model::{Efficiency, Hardware, Link};
use tessera_runtime::cpu::{matmul, membw, Matrix};
use tessera_runtime::{Backend, CpuBackend, WeightDtype};

/// Memory, read bandwidth and matrix FLOP/s of one of `workers` CPU workers with
/// `threads` threads each, and the loopback TCP link between workers.
pub fn measure(workers: usize, threads: usize, dtype: WeightDtype) -> Result<Hardware> {
    let workers = workers.max(1);
    let results: Vec<Result<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| scope.spawn(move || one_worker(threads, dtype)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| anyhow::bail!("a measurement panicked"))
            })
            .collect()
    });
    let mut bandwidth = f64::INFINITY;
    let mut flops = f64::INFINITY;
    for r in results {
        let (b, f) = r?;
        bandwidth = bandwidth.min(b);
        flops = flops.min(f);
    }
    let link = loopback_link().context("cannot measure the loopback link")?;
    let memory = tessera_worker::available_memory_bytes().unwrap_or(8 << 30) / workers as u64;
    Ok(Hardware {
        name: "cpu".into(),
        memory_bytes: memory,
        memory_bandwidth: bandwidth,
        matrix_flops: flops,
        intra_node: link,
        inter_node: link,
        weight_bytes: dtype.size_bytes() as u32,
        activation_bytes: 4,
        kv_bytes: 4,
        memory_fraction: tessera_coordinator::config::defaults::KV_MEMORY_FRACTION,
        // One instruction stream issues both the loads and the FMAs.
        overlap: 0.0,
        efficiency: Efficiency {
            bandwidth: 1.0,
            compute: 1.0,
            layer_overhead: 20e-6,
            step_overhead: 0.5e-3,
            seq_overhead: 10e-6,
        },
    })
}

/// (read bandwidth in bytes/s, matrix FLOP/s) of one worker's thread pool.
fn one_worker(threads: usize, dtype: WeightDtype) -> Result<(f64, f64)> {
    let backend = CpuBackend::new(threads)?;
    Ok(backend.run(|| {
        let bandwidth = membw::read_bandwidth_gb_s(64 << 20, 5) * 1e9;
        // A GPT-2-sized fc1 at a batch of 96 rows: the kernel at full speed.
        let (m, k, n) = (96, 768, 3072);
        let w = Matrix::new(
            n,
            k,
            (0..n * k)
                .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
                .collect(),
            dtype,
        );
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 1e-2).collect();
        let mut out = vec![0f32; m * n];
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            matmul::linear(&x, m, &w, None, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&out);
        }
        (bandwidth, 2.0 * (m * k * n) as f64 / best)
    }))
}

/// Latency (half a small round trip) and bandwidth (one 16 MiB message) over loopback TCP.
fn loopback_link() -> std::io::Result<Link> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut small = [0u8; 8];
        for _ in 0..200 {
            s.read_exact(&mut small)?;
            s.write_all(&small)?;
        }
        let mut big = vec![0u8; 16 << 20];
        s.read_exact(&mut big)?;
        s.write_all(&small)?;
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut small = [7u8; 8];
    let t = Instant::now();
    for _ in 0..200 {
        s.write_all(&small)?;
        s.read_exact(&mut small)?;
    }
    let latency = t.elapsed().as_secs_f64() / 400.0;
    let big = vec![1u8; 16 << 20];
    let t = Instant::now();
    s.write_all(&big)?;
    s.read_exact(&mut small)?;
    let bandwidth = big.len() as f64 / (t.elapsed().as_secs_f64() - latency).max(1e-6);
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    Ok(Link { bandwidth, latency })
}
