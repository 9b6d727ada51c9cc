//! The `local` collective: ranks are threads of one process.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use super::{ring_order_sum, Collective};
use crate::error::{Result, RuntimeError};

/// A reusable barrier that fails, instead of waiting forever, once any rank has gone
/// (its thread returned or panicked and dropped its `LocalComm`).
struct Barrier {
    n: usize,
    state: Mutex<BarrierState>,
    wake: Condvar,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl Barrier {
    fn wait(&self) -> Result<()> {
        let gone = || RuntimeError::Collective("a peer of the group has gone".into());
        let mut st = self.state.lock().map_err(poisoned)?;
        if st.broken {
            return Err(gone());
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.n {
            st.arrived = 0;
            st.generation += 1;
            self.wake.notify_all();
            return Ok(());
        }
        while st.generation == generation && !st.broken {
            st = self.wake.wait(st).map_err(poisoned)?;
        }
        if st.generation == generation {
            Err(gone())
        } else {
            Ok(())
        }
    }

    fn break_it(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.broken = true;
        }
        self.wake.notify_all();
    }
}

struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
}

/// One rank of an in-process group.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// `to[peer]` sends to `peer`; `from[peer]` receives from it.
    to: Vec<Sender<Vec<f32>>>,
    from: Vec<Receiver<Vec<f32>>>,
}

/// Makes the `n` ranks of one in-process group; hand one to each thread.
pub fn local_group(n: usize) -> Vec<LocalComm> {
    assert!(n > 0, "a group has at least one rank");
    let shared = Arc::new(Shared {
        barrier: Barrier {
            n,
            state: Mutex::new(BarrierState::default()),
            wake: Condvar::new(),
        },
        slots: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
    });
    // channel[src][dst]
    let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for src in 0..n {
        for dst in 0..n {
            let (tx, rx) = channel();
            senders[src][dst] = Some(tx);
            receivers[dst][src] = Some(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| LocalComm {
            rank,
            shared: shared.clone(),
            to: to.into_iter().map(Option::unwrap).collect(),
            from: from.into_iter().map(Option::unwrap).collect(),
        })
        .collect()
}

fn poisoned<T>(_: T) -> RuntimeError {
    RuntimeError::Collective("a peer thread panicked".into())
}

impl LocalComm {
    fn publish(&self, data: &[f32]) -> Result<()> {
        let mut slot = self.shared.slots[self.rank].lock().map_err(poisoned)?;
        slot.clear();
        slot.extend_from_slice(data);
        Ok(())
    }
}

impl Drop for LocalComm {
    /// A rank that goes away breaks the barrier, so its peers fail instead of hanging.
    fn drop(&mut self) {
        self.shared.barrier.break_it();
    }
}

impl Collective for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.slots.len()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.publish(buf)?;
        self.shared.barrier.wait()?;
        {
            let guards = self
                .shared
                .slots
                .iter()
                .map(|s| s.lock().map_err(poisoned))
                .collect::<Result<Vec<_>>>()?;
            if guards.iter().any(|g| g.len() != buf.len()) {
                return Err(RuntimeError::Collective(
                    "all_reduce_sum called with different lengths".into(),
                ));
            }
            let parts: Vec<&[f32]> = guards.iter().map(|g| g.as_slice()).collect();
            ring_order_sum(&parts, buf);
        }
        // Nobody may overwrite a slot before every rank has read all of them.
        self.shared.barrier.wait()?;
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        if self.world_size() == 1 {
            return Ok(local.to_vec());
        }
        self.publish(local)?;
        self.shared.barrier.wait()?;
        let mut out = Vec::with_capacity(local.len() * self.world_size());
        for slot in &self.shared.slots {
            let g = slot.lock().map_err(poisoned)?;
            if g.len() != local.len() {
                return Err(RuntimeError::Collective(
                    "all_gather called with different lengths".into(),
                ));
            }
            out.extend_from_slice(&g);
        }
        self.shared.barrier.wait()?;
        Ok(out)
    }

    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        let tx = self
            .to
            .get(peer)
            .ok_or_else(|| RuntimeError::Collective(format!("no peer {peer}")))?;
        tx.send(data.to_vec())
            .map_err(|_| RuntimeError::Collective(format!("peer {peer} is gone")))
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        let rx = self
            .from
            .get(peer)
            .ok_or_else(|| RuntimeError::Collective(format!("no peer {peer}")))?;
        let data = rx
            .recv()
            .map_err(|_| RuntimeError::Collective(format!("peer {peer} is gone")))?;
        if data.len() != out.len() {
            return Err(RuntimeError::Collective(format!(
                "expected {} values from peer {peer}, got {}",
                out.len(),
                data.len()
            )));
        }
        out.copy_from_slice(&data);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.shared.barrier.wait()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group<T: Send + 'static>(
        n: usize,
        f: impl Fn(LocalComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = local_group(n)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_is_the_ring_order_sum_on_every_rank() {
        for n in [1, 2, 3, 4, 6] {
            let input = |rank: usize| -> Vec<f32> {
                (0..37)
                    .map(|i| ((i * 7 + rank * 13) as f32).sin() * 1e3)
                    .collect()
            };
            let results = run_group(n, move |mut c| {
                let mut buf = input(c.rank());
                c.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let parts: Vec<Vec<f32>> = (0..n).map(input).collect();
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let mut expected = vec![0f32; 37];
            ring_order_sum(&refs, &mut expected);
            for r in &results {
                assert_eq!(r, &expected, "n={n}");
            }
            let naive: Vec<f32> = (0..37)
                .map(|i| parts.iter().map(|p| p[i] as f64).sum::<f64>() as f32)
                .collect();
            for (a, b) in expected.iter().zip(&naive) {
                assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0));
            }
        }
    }

    #[test]
    fn a_rank_that_goes_away_fails_its_peers_instead_of_hanging() {
        let mut comms = local_group(3);
        let gone = comms.pop().unwrap();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let mut buf = [1.0f32; 4];
                    c.all_reduce_sum(&mut buf)
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(gone);
        for h in handles {
            let e = h.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("gone"), "{e}");
        }
    }

    #[test]
    fn gather_and_point_to_point() {
        let results = run_group(3, |mut c| {
            let r = c.rank();
            let all = c.all_gather(&[r as f32, 10.0 + r as f32]).unwrap();
            let next = (r + 1) % 3;
            let prev = (r + 2) % 3;
            c.send(next, &[r as f32; 4]).unwrap();
            let mut got = [0f32; 4];
            c.recv(prev, &mut got).unwrap();
            c.barrier().unwrap();
            (all, got[0])
        });
        for (r, (all, got)) in results.into_iter().enumerate() {
            assert_eq!(all, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
            assert_eq!(got, ((r + 2) % 3) as f32);
        }
    }
}
