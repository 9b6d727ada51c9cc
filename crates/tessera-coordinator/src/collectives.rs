//! How the workers' collectives are set up: which transport carries them, and for NCCL,
//! which worker makes which group's unique id and which ids each worker is given.
//!
//! Workers are in plan order, `stage · tp + tp_rank`. NCCL groups and their founders:
//! - the TP group of stage `s`: founded by `(s, 0)`; every `(s, r)` joins;
//! - the link `(s, r) → (s + 1, r)`: founded by its sending side `(s, r)`, rank 0 of the
//!   link; `(s + 1, r)` is rank 1.
//!
//! A founder's `NcclIds` answer lists its TP group's id first (when it is TP rank 0), then
//! its link's (when it is not on the last stage).

use tessera_proto::worker::v1 as pb;

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// What carries the collectives of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP between the workers' collective listeners: works on every backend.
    Tcp,
    /// NCCL between the workers' GPUs: only when every worker runs the cuda backend.
    Nccl,
}

impl Transport {
    /// The protocol's value.
    pub fn proto(self) -> pb::CollectiveTransport {
        match self {
            Transport::Tcp => pb::CollectiveTransport::Tcp,
            Transport::Nccl => pb::CollectiveTransport::Nccl,
        }
    }
}

/// NCCL when every worker registered with backend `cuda`, TCP otherwise (and for no
/// workers at all). One CPU worker makes the whole cluster TCP: a GPU worker then moves
/// its activations through host memory.
pub fn choose_transport<'a>(backends: impl IntoIterator<Item = &'a str>) -> Transport {
    let mut any = false;
    for backend in backends {
        if backend != "cuda" {
            return Transport::Tcp;
        }
        any = true;
    }
    if any {
        Transport::Nccl
    } else {
        Transport::Tcp
    }
}

/// How many NCCL ids each worker (in plan order) makes: one for its TP group when it is
/// TP rank 0, one for its link to the next stage unless it is on the last stage.
pub fn nccl_id_counts(tp: usize, pp: usize) -> Vec<u32> {
    (0..pp)
        .flat_map(|stage| {
            (0..tp).map(move |tp_rank| u32::from(tp_rank == 0) + u32::from(stage + 1 < pp))
        })
        .collect()
}

/// The ids every worker (in plan order) is given, from what each worker made (`made[i]`,
/// empty for a worker that founds nothing). Checks every id that came back: the right
/// number from each worker, 128 bytes each; the error names the worker by its index.
pub fn relay_nccl_ids(
    tp: usize,
    pp: usize,
    made: &[Vec<Vec<u8>>],
) -> Result<Vec<pb::NcclGroupIds>, String> {
    let counts = nccl_id_counts(tp, pp);
    if made.len() != counts.len() {
        return Err(format!(
            "NCCL ids from {} workers for a plan of {}",
            made.len(),
            counts.len()
        ));
    }
    for (i, (ids, &count)) in made.iter().zip(&counts).enumerate() {
        if ids.len() != count as usize {
            return Err(format!(
                "worker {i} answered NcclIds with {} ids; it was asked for {count}",
                ids.len()
            ));
        }
        if let Some((k, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| id.len() != NCCL_ID_BYTES)
        {
            return Err(format!(
                "worker {i} answered NcclIds with an id of {} bytes (ids[{k}]); an NCCL id \
                 is {NCCL_ID_BYTES}",
                id.len()
            ));
        }
    }
    let at = |stage: usize, tp_rank: usize| stage * tp + tp_rank;
    // The link id a worker made is its last one.
    let link_of = |i: usize| made[i].last().cloned().unwrap_or_default();
    Ok((0..pp)
        .flat_map(|stage| (0..tp).map(move |tp_rank| (stage, tp_rank)))
        .map(|(stage, tp_rank)| pb::NcclGroupIds {
            tp_id: made[at(stage, 0)][0].clone(),
            prev_id: if stage > 0 {
                link_of(at(stage - 1, tp_rank))
            } else {
                Vec::new()
            },
            next_id: if stage + 1 < pp {
                link_of(at(stage, tp_rank))
            } else {
                Vec::new()
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_only_when_every_worker_runs_cuda() {
        assert_eq!(choose_transport(["cuda", "cuda"]), Transport::Nccl);
        assert_eq!(choose_transport(["cuda"]), Transport::Nccl);
        assert_eq!(choose_transport(["cuda", "cpu"]), Transport::Tcp);
        assert_eq!(choose_transport(["cpu", "cuda"]), Transport::Tcp);
        assert_eq!(choose_transport(["cuda", "sim"]), Transport::Tcp);
        assert_eq!(choose_transport(["CUDA"]), Transport::Tcp);
        assert_eq!(choose_transport(["cpu"]), Transport::Tcp);
        assert_eq!(choose_transport([]), Transport::Tcp);
    }

    #[test]
    fn founders_make_one_id_per_group() {
        assert_eq!(nccl_id_counts(1, 1), [1]);
        assert_eq!(nccl_id_counts(2, 1), [1, 0]);
        assert_eq!(nccl_id_counts(1, 3), [2, 2, 1]);
        // Stage 0: rank 0 founds the TP group and its link, rank 1 its link; the last
        // stage: rank 0 its TP group only.
        assert_eq!(nccl_id_counts(2, 2), [2, 1, 1, 0]);
        let (tp, pp) = (4, 3);
        let groups = pp + (pp - 1) * tp;
        assert_eq!(nccl_id_counts(tp, pp).iter().sum::<u32>() as usize, groups);
    }

    /// An id that says who made it and which of its ids it is.
    fn id(worker: usize, k: usize) -> Vec<u8> {
        let mut id = vec![0u8; NCCL_ID_BYTES];
        id[0] = worker as u8;
        id[1] = k as u8;
        id
    }

    fn made(tp: usize, pp: usize) -> Vec<Vec<Vec<u8>>> {
        nccl_id_counts(tp, pp)
            .into_iter()
            .enumerate()
            .map(|(w, n)| (0..n as usize).map(|k| id(w, k)).collect())
            .collect()
    }

    #[test]
    fn each_worker_gets_its_groups_ids() {
        // tp 2 × pp 3: workers 0,1 | 2,3 | 4,5.
        let relayed = relay_nccl_ids(2, 3, &made(2, 3)).unwrap();
        let none = Vec::<u8>::new();
        let expect = [
            // stage 0: TP group from worker 0 (its first id), next links made by itself.
            (id(0, 0), none.clone(), id(0, 1)),
            (id(0, 0), none.clone(), id(1, 0)),
            // stage 1: TP group from worker 2, prev links from stage 0.
            (id(2, 0), id(0, 1), id(2, 1)),
            (id(2, 0), id(1, 0), id(3, 0)),
            // stage 2 (last): no next link.
            (id(4, 0), id(2, 1), none.clone()),
            (id(4, 0), id(3, 0), none.clone()),
        ];
        assert_eq!(relayed.len(), expect.len());
        for (w, (got, (tp_id, prev_id, next_id))) in relayed.iter().zip(expect).enumerate() {
            assert_eq!(got.tp_id, tp_id, "worker {w} tp_id");
            assert_eq!(got.prev_id, prev_id, "worker {w} prev_id");
            assert_eq!(got.next_id, next_id, "worker {w} next_id");
        }
        // Both ends of every link hold the same id.
        for s in 0..2 {
            for r in 0..2 {
                assert_eq!(relayed[s * 2 + r].next_id, relayed[(s + 1) * 2 + r].prev_id);
            }
        }
    }

    #[test]
    fn a_wrong_answer_is_an_error_naming_the_worker() {
        let mut short = made(2, 2);
        short[1][0].pop();
        let e = relay_nccl_ids(2, 2, &short).unwrap_err();
        assert!(e.contains("worker 1") && e.contains("127 bytes"), "{e}");
        let mut missing = made(2, 2);
        missing[0].pop();
        let e = relay_nccl_ids(2, 2, &missing).unwrap_err();
        assert!(
            e.contains("worker 0") && e.contains("1 ids") && e.contains("asked for 2"),
            "{e}"
        );
        let mut extra = made(2, 2);
        extra[3].push(id(3, 0));
        let e = relay_nccl_ids(2, 2, &extra).unwrap_err();
        assert!(e.contains("worker 3"), "{e}");
        assert!(relay_nccl_ids(2, 2, &made(2, 1)).is_err());
    }
}
