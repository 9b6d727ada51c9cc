//! Distributed sampling over a vocab-parallel LM head.
//!
//! Each TP rank holds the logits of its own vocabulary rows. The full logits are never
//! gathered: every rank reduces its slice to a few numbers (max and sum of exponentials
//! for the log-sum-exp, its best or top-`c` candidates), the ranks all-gather those, and
//! every rank reaches the same decision.
//!
//! Sampling uses the Gumbel-max trick: drawing from `softmax(z)` over a candidate set is
//! `argmax_i z_i + g_i` with `g_i` standard Gumbel noise. The noise of token `i` is a pure
//! function of `(seed, position, i)`, so a seeded request draws the same token at every
//! split, in every batch, on every backend.

use std::ops::Range;

use tessera_model::splitmix64;

use crate::collective::Collective;
use crate::error::{Result, RuntimeError};
use crate::step::{SampleSpec, SamplingParams};

/// Candidates each rank offers per round for top-p without top-k; grows ×4 per round
/// until the nucleus is provably complete.
const TOP_P_FIRST_CANDIDATES: usize = 256;
/// Header of a row's record: raw max, raw sum-exp, scaled max, scaled sum-exp, count.
const HEADER: usize = 5;
/// A candidate: score, token id, raw logit.
const CANDIDATE: usize = 3;

/// One row to sample: this rank's slice of its logits and what to do with it.
#[derive(Debug, Clone, Copy)]
pub struct SampleRow<'a> {
    /// Logits of this rank's vocabulary rows.
    pub logits: &'a [f32],
    /// Sampling parameters and penalty set.
    pub spec: &'a SampleSpec,
    /// Position of the token being generated; keys the noise.
    pub position: usize,
}

/// One row to sample wherever its logits are (a device backend keeps them on the GPU):
/// what to do with it, and the position of the token it draws.
#[derive(Debug, Clone, Copy)]
pub struct RowSpec<'a> {
    /// Sampling parameters and penalty set.
    pub spec: &'a SampleSpec,
    /// Position of the token being generated; keys the noise.
    pub position: usize,
}

/// One row's record asked for in a round: the row (of the step's sampled rows, and of the
/// logits tensor) and the mode of this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAsk {
    /// The row.
    pub row: usize,
    /// What the record carries this round.
    pub mode: RecordMode,
}

/// The decision for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token_id: u32,
    /// Its log-probability under the raw logits.
    pub logprob: f32,
}

/// What a rank reports for one row in one round: the record's header is always the same,
/// the mode says which candidates follow. Device backends build the same record (the CUDA
/// `sample_stats` kernel), so the combine below serves every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordMode {
    /// Argmax of the processed logits: one candidate per rank.
    Greedy,
    /// Gumbel argmax over the whole vocabulary: one candidate per rank.
    Full,
    /// Top-k and/or top-p: the `c` best processed logits per rank.
    Filtered {
        /// Candidate slots per rank.
        c: usize,
    },
}

impl RecordMode {
    /// The mode of a row's first round.
    pub fn first_round(p: &SamplingParams) -> Self {
        if p.is_greedy() {
            RecordMode::Greedy
        } else if p.top_k == 0 && p.top_p >= 1.0 {
            RecordMode::Full
        } else if p.top_k > 0 {
            RecordMode::Filtered {
                c: p.top_k as usize,
            }
        } else {
            RecordMode::Filtered {
                c: TOP_P_FIRST_CANDIDATES,
            }
        }
    }

    /// Candidate slots of the record.
    pub fn candidates(self) -> usize {
        match self {
            RecordMode::Greedy | RecordMode::Full => 1,
            RecordMode::Filtered { c } => c,
        }
    }

    /// Floats of the record: a header of five, three per candidate slot.
    pub fn record_len(self) -> usize {
        HEADER + CANDIDATE * self.candidates()
    }

    /// Whether the record carries the processed logits' max and sum-exp (only top-p
    /// without top-k reads them); otherwise those two header fields are 0.
    pub fn scaled_stats(self, p: &SamplingParams) -> bool {
        matches!(self, RecordMode::Filtered { .. }) && p.top_k == 0
    }
}

/// Standard Gumbel noise for token `id` at `position` under `seed`.
///
/// Only integer hashing and correctly rounded f64 operations ([`noise_ln`] instead of the
/// platform's `ln`, whose last bit differs between libms and from CUDA's `log`), so every
/// backend computes the same bits.
pub fn gumbel(seed: u64, position: usize, id: u32) -> f64 {
    let key = splitmix64(seed ^ splitmix64(position as u64 ^ 0x5EED_0000_0000_0000));
    let bits = splitmix64(key ^ (id as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let u = ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -noise_ln(-noise_ln(u))
}

/// Natural logarithm of a positive normal `x`, within a few ulps, from IEEE add, multiply
/// and divide only (Rust never fuses them), so its bits are the same everywhere; the CUDA
/// kernels' `noise_ln` in `common.cuh` performs the same operations in the same order.
///
/// `x = 2^e · m` with `m` in (√½, √2], and `ln m = 2·atanh(s)`, `s = (m − 1)/(m + 1)`,
/// summed to `s^21` (|s| ≤ 0.172, so the next term is below 2^-54 relative).
fn noise_ln(x: f64) -> f64 {
    // Coefficients 1/3 … 1/21, innermost last; ln 2 split so that `e · LN2_HI` is exact.
    const INV_ODD: [f64; 10] = [
        0.333_333_333_333_333_3,
        0.2,
        0.142_857_142_857_142_85,
        0.111_111_111_111_111_1,
        0.090_909_090_909_090_91,
        0.076_923_076_923_076_93,
        0.066_666_666_666_666_67,
        0.058_823_529_411_764_705,
        0.052_631_578_947_368_42,
        0.047_619_047_619_047_616,
    ];
    const LN2_HI: f64 = 0.693_146_705_627_441_4;
    const LN2_LO: f64 = 4.749_325_039_031_672_6e-7;
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut t = INV_ODD[9];
    for &c in INV_ODD[..9].iter().rev() {
        t = c + z * t;
    }
    t *= z;
    let two_s = s + s;
    let k = e as f64;
    let hi = k * LN2_HI;
    let lo = k * LN2_LO;
    hi + (two_s + (two_s * t + lo))
}

/// The rank-local processing: repetition penalty, then temperature. Borrows the raw
/// logits when there is nothing to do (greedy without a penalty).
fn processed<'a>(row: &SampleRow<'a>, first_id: usize) -> std::borrow::Cow<'a, [f32]> {
    let p = &row.spec.params;
    if p.repetition_penalty == 1.0 && p.is_greedy() {
        return std::borrow::Cow::Borrowed(row.logits);
    }
    let mut z = row.logits.to_vec();
    if p.repetition_penalty != 1.0 {
        for &id in &row.spec.penalty_ids {
            let id = id as usize;
            if id >= first_id && id < first_id + z.len() {
                let v = &mut z[id - first_id];
                *v = if *v < 0.0 {
                    *v * p.repetition_penalty
                } else {
                    *v / p.repetition_penalty
                };
            }
        }
    }
    if !p.is_greedy() {
        let t = p.temperature;
        z.iter_mut().for_each(|v| *v /= t);
    }
    std::borrow::Cow::Owned(z)
}

/// Largest value, in sixteen independent lanes so the compiler vectorises it. NaNs are
/// skipped; an empty or all-NaN slice gives -inf.
fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for i in 0..16 {
            if c[i] > lanes[i] {
                lanes[i] = c[i];
            }
        }
    }
    for l in lanes {
        if l > m {
            m = l;
        }
    }
    m
}

/// Index and value of the first maximum.
fn argmax(v: &[f32]) -> (usize, f32) {
    let m = max_of(v);
    (v.iter().position(|&x| x == m).unwrap_or(0), m)
}

/// Max and sum of `exp(v - max)`, split over the current pool for a vocabulary slice.
fn max_sumexp(v: &[f32]) -> (f32, f32) {
    use rayon::prelude::*;
    let m = v
        .par_chunks(8192)
        .map(max_of)
        .reduce(|| f32::NEG_INFINITY, f32::max);
    let s = v
        .par_chunks(8192)
        .map(|c| c.iter().map(|x| (x - m).exp()).sum::<f32>())
        .sum();
    (m, s)
}

/// Orders candidates best first: higher score, then lower id.
fn better(a: (f32, u32), b: (f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// This rank's record for one row.
///
/// The record: raw max, raw sum-exp, processed max, processed sum-exp (0, 0 unless
/// [`RecordMode::scaled_stats`]), candidate count, then [`RecordMode::candidates`] slots of
/// (score, token id, raw logit), best first (higher score, then lower id), unused slots
/// (-inf, -1, 0). `first_id` is the id of the slice's first logit.
pub fn local_record(row: &SampleRow, m: RecordMode, first_id: usize, out: &mut Vec<f32>) {
    let z = processed(row, first_id);
    let (raw_max, raw_sum) = max_sumexp(row.logits);
    // The scaled normaliser is only read by top-p without top-k.
    let (z_max, z_sum) = if m.scaled_stats(&row.spec.params) {
        max_sumexp(&z)
    } else {
        (0.0, 0.0)
    };
    let ids = (first_id as u32)..(first_id + z.len()) as u32;
    let mut cands: Vec<(f32, u32)> = match m {
        RecordMode::Greedy => {
            let (i, v) = argmax(&z);
            vec![(v, first_id as u32 + i as u32)]
        }
        RecordMode::Full => {
            let p = &row.spec.params;
            let best = z
                .iter()
                .zip(ids)
                .map(|(&v, id)| (v as f64 + gumbel(p.seed, row.position, id), id))
                .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
            best.map(|(s, id)| (s as f32, id)).into_iter().collect()
        }
        RecordMode::Filtered { c } => {
            let mut all: Vec<(f32, u32)> = z.iter().cloned().zip(ids).collect();
            let c = c.min(all.len());
            if c < all.len() {
                all.select_nth_unstable_by(c - 1, |a, b| better(*a, *b));
                all.truncate(c);
            }
            all.sort_unstable_by(|a, b| better(*a, *b));
            all
        }
    };
    let capacity = m.candidates();
    cands.truncate(capacity);
    out.extend_from_slice(&[raw_max, raw_sum, z_max, z_sum, cands.len() as f32]);
    for i in 0..capacity {
        match cands.get(i) {
            Some(&(score, id)) => {
                out.extend_from_slice(&[score, id as f32, row.logits[id as usize - first_id]])
            }
            None => out.extend_from_slice(&[f32::NEG_INFINITY, -1.0, 0.0]),
        }
    }
}

/// Checks the arguments of a [`crate::backend::Backend::sample_records`] call: logits of
/// `shape` hold one row per sampled row, and every ask names one of those rows.
pub fn check_record_asks(
    shape: (usize, usize),
    rows: &[RowSpec],
    asks: &[RecordAsk],
) -> Result<()> {
    crate::backend::check_same("sample_records", shape, (rows.len(), shape.1))?;
    match asks.iter().find(|a| a.row >= rows.len()) {
        Some(ask) => Err(RuntimeError::Backend(format!(
            "sample_records: row {} of {}",
            ask.row,
            rows.len()
        ))),
        None => Ok(()),
    }
}

/// This rank's records of the asked rows of a host logits buffer of `shape`, appended to
/// `out` in the order asked: what a backend whose logits are in host memory answers to
/// [`crate::backend::Backend::sample_records`].
pub fn host_records(
    logits: &[f32],
    shape: (usize, usize),
    rows: &[RowSpec],
    asks: &[RecordAsk],
    first_id: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    crate::backend::check_len("sample_records", logits.len(), shape.0, shape.1)?;
    check_record_asks(shape, rows, asks)?;
    let cols = shape.1;
    for ask in asks {
        let r = &rows[ask.row];
        let row = SampleRow {
            logits: &logits[ask.row * cols..(ask.row + 1) * cols],
            spec: r.spec,
            position: r.position,
        };
        local_record(&row, ask.mode, first_id, out);
    }
    Ok(())
}

/// Combines `(max, sumexp)` pairs of the ranks into a log-sum-exp.
fn combine_lse(parts: impl Iterator<Item = (f32, f32)> + Clone) -> f64 {
    let m = parts.clone().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = parts
        .map(|(pm, ps)| ps as f64 * (pm as f64 - m).exp())
        .sum();
    m + s.ln()
}

/// The global decision for one row from every rank's record, or `None` when the
/// candidates offered cannot prove the top-p nucleus complete.
fn decide(row: &RowSpec, m: RecordMode, records: &[&[f32]]) -> Option<Sampled> {
    let p = &row.spec.params;
    let raw_lse = combine_lse(records.iter().map(|r| (r[0], r[1])));
    let mut cands: Vec<(f32, u32, f32)> = Vec::new();
    for r in records {
        let n = r[4] as usize;
        for i in 0..n {
            let c = &r[HEADER + i * CANDIDATE..HEADER + (i + 1) * CANDIDATE];
            cands.push((c[0], c[1] as u32, c[2]));
        }
    }
    cands.sort_by(|a, b| better((a.0, a.1), (b.0, b.1)));
    let chosen = match m {
        RecordMode::Greedy | RecordMode::Full => cands[0],
        RecordMode::Filtered { c } => {
            let mut kept: &[(f32, u32, f32)] = &cands;
            if p.top_k > 0 {
                kept = &kept[..(p.top_k as usize).min(kept.len())];
            }
            if p.top_p < 1.0 {
                // Normaliser: over the top-k set if there is one, else over the whole vocabulary.
                let lse = if p.top_k > 0 {
                    combine_lse(std::iter::once(max_sumexp(
                        &kept.iter().map(|c| c.0).collect::<Vec<_>>(),
                    )))
                } else {
                    combine_lse(records.iter().map(|r| (r[2], r[3])))
                };
                // Every token scoring above `bound` was offered by its rank.
                let bound = if p.top_k > 0 {
                    f32::NEG_INFINITY
                } else {
                    records
                        .iter()
                        .filter(|r| r[4] as usize == c)
                        .map(|r| r[HEADER + (c - 1) * CANDIDATE])
                        .fold(f32::NEG_INFINITY, f32::max)
                };
                let mut mass = 0.0f64;
                let mut n = 0;
                for cand in kept {
                    if cand.0 <= bound && bound > f32::NEG_INFINITY {
                        return None;
                    }
                    mass += (cand.0 as f64 - lse).exp();
                    n += 1;
                    if mass >= p.top_p as f64 {
                        break;
                    }
                }
                kept = &kept[..n.max(1)];
            }
            *kept
                .iter()
                .max_by(|a, b| {
                    let ga = a.0 as f64 + gumbel(p.seed, row.position, a.1);
                    let gb = b.0 as f64 + gumbel(p.seed, row.position, b.1);
                    ga.total_cmp(&gb).then(b.1.cmp(&a.1))
                })
                .expect("every rank offers at least one candidate")
        }
    };
    Some(Sampled {
        token_id: chosen.1,
        logprob: (chosen.2 as f64 - raw_lse) as f32,
    })
}

/// Samples one token per row. Every rank of the TP group calls this with its own slice
/// (`vocab` is the rank's range of ids) and gets the same answer.
pub fn sample_distributed(
    rows: &[SampleRow],
    vocab: Range<usize>,
    comm: &mut dyn Collective,
) -> Result<Vec<Sampled>> {
    let specs: Vec<RowSpec> = rows
        .iter()
        .map(|r| RowSpec {
            spec: r.spec,
            position: r.position,
        })
        .collect();
    let first_id = vocab.start;
    sample_distributed_with(&specs, vocab, comm, |asks, out| {
        for ask in asks {
            local_record(&rows[ask.row], ask.mode, first_id, out);
        }
        Ok(())
    })
}

/// [`sample_distributed`] over logits held anywhere: `records` appends this rank's record
/// of each asked row, in the order asked, as [`local_record`] writes it (a device backend
/// builds them on the GPU and copies back only the records). Rows are asked for once in
/// the first round, and again only where top-p needs more candidates.
pub fn sample_distributed_with(
    rows: &[RowSpec],
    vocab: Range<usize>,
    comm: &mut dyn Collective,
    mut records: impl FnMut(&[RecordAsk], &mut Vec<f32>) -> Result<()>,
) -> Result<Vec<Sampled>> {
    if vocab.end >= 1 << 24 {
        return Err(RuntimeError::invalid(
            "vocab_size",
            "token ids must be exact in f32 (below 2^24)",
        ));
    }
    let mut modes: Vec<RecordMode> = rows
        .iter()
        .map(|r| RecordMode::first_round(&r.spec.params))
        .collect();
    let mut results: Vec<Option<Sampled>> = vec![None; rows.len()];
    loop {
        let asks: Vec<RecordAsk> = (0..rows.len())
            .filter(|&i| results[i].is_none())
            .map(|row| RecordAsk {
                row,
                mode: modes[row],
            })
            .collect();
        if asks.is_empty() {
            break;
        }
        let mut local = Vec::new();
        records(&asks, &mut local)?;
        let per_rank: usize = asks.iter().map(|a| a.mode.record_len()).sum();
        if local.len() != per_rank {
            return Err(RuntimeError::Backend(format!(
                "sample_records gave {} values for records of {per_rank}",
                local.len()
            )));
        }
        let gathered = comm.all_gather(&local)?;
        let mut offset = 0;
        for ask in &asks {
            let (i, len) = (ask.row, ask.mode.record_len());
            let records: Vec<&[f32]> = (0..comm.world_size())
                .map(|r| &gathered[r * per_rank + offset..r * per_rank + offset + len])
                .collect();
            offset += len;
            match decide(&rows[i], modes[i], &records) {
                Some(s) => results[i] = Some(s),
                None => {
                    if let RecordMode::Filtered { c } = modes[i] {
                        modes[i] = RecordMode::Filtered { c: c * 4 };
                    }
                }
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("loop ends when all rows are decided"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::local_group;
    use tessera_model::even_ranges;

    fn spec(params: SamplingParams) -> SampleSpec {
        SampleSpec {
            params,
            penalty_ids: vec![],
            return_logits: false,
        }
    }

    /// Samples `logits` split over `tp` threads.
    fn sample_split(logits: &[f32], s: &SampleSpec, position: usize, tp: usize) -> Sampled {
        let ranges = even_ranges(logits.len(), tp);
        let handles: Vec<_> = local_group(tp)
            .into_iter()
            .zip(ranges)
            .map(|(mut comm, range)| {
                let slice = logits[range.clone()].to_vec();
                let s = s.clone();
                std::thread::spawn(move || {
                    let row = SampleRow {
                        logits: &slice,
                        spec: &s,
                        position,
                    };
                    sample_distributed(&[row], range, &mut comm).unwrap()[0]
                })
            })
            .collect();
        let all: Vec<Sampled> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(all.windows(2).all(|w| w[0] == w[1]), "ranks disagree");
        all[0]
    }

    /// Same token; logprobs equal up to the order the ranks' sums were combined in.
    fn assert_same(a: Sampled, b: Sampled, what: &str) {
        assert_eq!(a.token_id, b.token_id, "{what}");
        assert!(
            (a.logprob - b.logprob).abs() < 1e-5,
            "{what}: {} vs {}",
            a.logprob,
            b.logprob
        );
    }

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (gumbel(seed, 0, i as u32) * 1.5) as f32)
            .collect()
    }

    #[test]
    fn noise_ln_is_within_a_few_ulps_of_ln() {
        let mut worst = 0f64;
        for i in 0..200_000u64 {
            let x = f64::from_bits(splitmix64(i) >> 2 | 0x0010_0000_0000_0000)
                .clamp(f64::MIN_POSITIVE, 1e300);
            for v in [
                x,
                1.0 / (1.0 + i as f64),
                1.0 + i as f64 * 1e-7,
                i as f64 + 0.5,
            ] {
                let (got, want) = (noise_ln(v), v.ln());
                let ulp = f64::EPSILON * want.abs().max(f64::MIN_POSITIVE);
                worst = worst.max((got - want).abs() / ulp);
            }
        }
        assert!(worst <= 4.0, "noise_ln is {worst} ulps off");
        assert_eq!(noise_ln(1.0), 0.0);
    }

    #[test]
    fn gumbel_noise_has_the_standard_moments() {
        let n = 200_000;
        let g: Vec<f64> = (0..n).map(|i| gumbel(11, 3, i)).collect();
        let mean = g.iter().sum::<f64>() / n as f64;
        let var = g.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        // Mean: the Euler–Mascheroni constant; variance: π²/6.
        assert!((mean - 0.577_215_7).abs() < 0.01, "{mean}");
        assert!(
            (var - std::f64::consts::PI.powi(2) / 6.0).abs() < 0.02,
            "{var}"
        );
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nans() {
        let mut v: Vec<f32> = (0..100).map(|i| (i % 13) as f32).collect();
        assert_eq!(argmax(&v), (12, 12.0));
        v[3] = f32::NAN;
        v[77] = 50.0;
        assert_eq!(argmax(&v), (77, 50.0));
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_and_logprob_match_a_single_rank() {
        let l = logits(1001, 1);
        let s = spec(SamplingParams::default());
        let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
        let lse = l.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        for tp in [1, 2, 3, 4, 6] {
            let r = sample_split(&l, &s, 9, tp);
            assert_eq!(r.token_id as usize, best);
            assert!((r.logprob as f64 - (l[best] as f64 - lse)).abs() < 1e-5);
        }
    }

    #[test]
    fn seeded_sampling_is_the_same_at_every_split() {
        let l = logits(1001, 2);
        let cases = [
            SamplingParams {
                temperature: 0.8,
                seed: 42,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 40,
                seed: 7,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.2,
                top_p: 0.9,
                seed: 3,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.5,
                seed: 9,
                ..Default::default()
            },
        ];
        for params in cases {
            let s = spec(params);
            for position in 0..20 {
                let one = sample_split(&l, &s, position, 1);
                for tp in [2, 3, 4, 6] {
                    let what = format!("{params:?} tp={tp}");
                    assert_same(sample_split(&l, &s, position, tp), one, &what);
                }
            }
        }
    }

    #[test]
    fn top_p_needing_many_candidates_is_exact() {
        // A flat distribution: the 0.95 nucleus holds ~950 tokens, far beyond the first
        // round's candidates, so the rounds must grow until the nucleus is complete.
        let l: Vec<f32> = (0..1000).map(|i| (i % 7) as f32 * 1e-3).collect();
        let s = spec(SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: 5,
            ..Default::default()
        });
        let one = sample_split(&l, &s, 3, 1);
        assert_same(sample_split(&l, &s, 3, 4), one, "top_p 0.95 over 4 ranks");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Three tokens with probabilities 0.6, 0.3, 0.1 (temperature 1).
        let l = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let s = |seed| {
            spec(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            })
        };
        let mut counts = [0usize; 3];
        let mut comm = local_group(1).pop().unwrap();
        for seed in 0..4000 {
            let sp = s(seed);
            let row = SampleRow {
                logits: &l,
                spec: &sp,
                position: 0,
            };
            counts[sample_distributed(&[row], 0..3, &mut comm).unwrap()[0].token_id as usize] += 1;
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 4000.0).collect();
        assert!(
            (freq[0] - 0.6).abs() < 0.03 && (freq[1] - 0.3).abs() < 0.03,
            "{freq:?}"
        );
        // top_k = 2 removes the third token; top_p = 0.5 keeps only the first.
        let mut comm = local_group(1).pop().unwrap();
        for seed in 0..200 {
            let k2 = spec(SamplingParams {
                temperature: 1.0,
                top_k: 2,
                seed,
                ..Default::default()
            });
            let p5 = spec(SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                seed,
                ..Default::default()
            });
            let rows = [
                SampleRow {
                    logits: &l,
                    spec: &k2,
                    position: 1,
                },
                SampleRow {
                    logits: &l,
                    spec: &p5,
                    position: 1,
                },
            ];
            let r = sample_distributed(&rows, 0..3, &mut comm).unwrap();
            assert!(r[0].token_id < 2);
            assert_eq!(r[1].token_id, 0);
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Token 0 leads; penalising it by 2 (2.0 → 1.0) lets token 1 (1.5) win;
        // a negative logit is multiplied, never helped.
        let l = [2.0f32, 1.5, -1.0];
        let sp = SampleSpec {
            params: SamplingParams {
                repetition_penalty: 2.0,
                ..Default::default()
            },
            penalty_ids: vec![0, 2],
            return_logits: false,
        };
        let mut comm = local_group(1).pop().unwrap();
        let row = SampleRow {
            logits: &l,
            spec: &sp,
            position: 0,
        };
        let r = sample_distributed(&[row], 0..3, &mut comm).unwrap()[0];
        assert_eq!(r.token_id, 1);
        assert_eq!(processed(&row, 0).to_vec(), vec![1.0, 1.5, -2.0]);
    }
}
