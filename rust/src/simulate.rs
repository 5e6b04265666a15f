//! Scoring thresholds: each sample exits at the first exit k with `s[k, i] >= T_k`
//! (the last exit takes whatever is left), then accuracy, exit counts and mean cost.
//!
//! Many threshold sets are scored in one pass over the data: samples are cut into
//! blocks that stay in cache while every budget is applied to them.

use crate::calibrate::MAX_EXITS;
use crate::error::{thousands, Error, Result};
use crate::hugebuf::try_zeroed_vec;
use crate::simd::{Avx2Popcnt, Portable};
use rayon::prelude::*;

/// Outcome of one threshold set on one data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Fraction of samples whose exit's prediction is right.
    pub accuracy: f64,
    /// `sum_k count_k * cost_k / N` (summed over k in order, then one division).
    pub mean_cost: f64,
    /// Samples leaving at each exit, `(K,)`.
    pub exit_counts: Vec<u64>,
}

/// Checks cumulative costs `(K,)`: finite, `>= 0`, non-decreasing.
pub fn validate_costs(costs: &[f64], num_exits: usize) -> Result<()> {
    if costs.len() != num_exits {
        return Err(Error::new(format!(
            "costs must have K={num_exits} entries (the cumulative cost of each exit); received {}",
            costs.len()
        )));
    }
    for (k, &c) in costs.iter().enumerate() {
        if !(c.is_finite() && c >= 0.0) {
            return Err(Error::new(format!(
                "costs must be finite and >= 0; received {c} at exit {k}"
            )));
        }
        if k > 0 && c < costs[k - 1] {
            return Err(Error::new(format!(
                "costs must be cumulative (non-decreasing); costs[{k}] = {c} < costs[{}] = {}",
                k - 1,
                costs[k - 1]
            )));
        }
    }
    Ok(())
}

/// Checks thresholds `(K,)`: no NaN, and `-inf` at the last exit (it takes every sample left).
pub fn validate_thresholds(thresholds: &[f64], num_exits: usize) -> Result<()> {
    if thresholds.len() != num_exits {
        return Err(Error::new(format!(
            "thresholds must have K={num_exits} entries (one per exit); received {}",
            thresholds.len()
        )));
    }
    if let Some(k) = thresholds.iter().position(|t| t.is_nan()) {
        return Err(Error::new(format!(
            "thresholds must not be NaN; found NaN at exit {k}"
        )));
    }
    if thresholds[num_exits - 1] != f64::NEG_INFINITY {
        return Err(Error::new(format!(
            "thresholds[-1] must be -inf (the last exit takes every remaining sample); received {}",
            thresholds[num_exits - 1]
        )));
    }
    Ok(())
}

/// The smallest `f32` `t` with `t >= T`, so that for every finite `f32` score
/// `s >= t` exactly when `f64(s) >= T`.
#[inline]
fn f32_ceil(t: f64) -> f32 {
    let c = t as f32;
    if (c as f64) < t {
        c.next_up()
    } else {
        c
    }
}

/// Samples per block: a block's pass masks (`cuts x BLOCK / 8` bytes per exit) stay in L2.
const BLOCK: usize = 4096;
/// 64-sample words per block.
const WORDS: usize = BLOCK / 64;

/// Threshold sets scored together: their distinct thresholds per exit index
/// `u8` levels.
const SET_GROUP: usize = 64;

/// Per exit, the distinct finite thresholds of a group of budgets (as exact `f32`
/// ceilings, ascending) and, per budget, the level a score needs to pass: a score's
/// level is the number of those thresholds it reaches, so `s >= T` iff
/// `level >= need`. `need` is 0 for `-inf` (all pass) and 255 for `+inf` (none).
struct Levels {
    cuts: Vec<Vec<f32>>,
    need: Vec<u8>, // budget-major, (budgets, K)
}

fn levels(tf: &[f32], k: usize) -> Levels {
    let b = tf.len() / k;
    let mut cuts = Vec::with_capacity(k);
    let mut need = vec![0u8; b * k];
    for e in 0..k {
        let mut u: Vec<f32> = (0..b)
            .map(|j| tf[j * k + e])
            .filter(|t| t.is_finite())
            .collect();
        u.sort_by(|x, y| x.partial_cmp(y).unwrap());
        u.dedup();
        for j in 0..b {
            let t = tf[j * k + e];
            need[j * k + e] = if t == f32::NEG_INFINITY {
                0
            } else if t == f32::INFINITY {
                255
            } else {
                // At most SET_GROUP (< 255) distinct values, so this fits.
                (u.partition_point(|&c| c < t) + 1) as u8
            };
        }
        cuts.push(u);
    }
    Levels { cuts, need }
}

/// Scores `B` threshold sets (`thresholds` is `B*K` row-major) on `scores`/`correct`
/// (`K*N`). Inputs must be validated. Returns one [`Outcome`] per threshold set, or
/// an out-of-memory error if a worker's block buffers cannot be allocated.
///
/// Samples are cut into cache-sized blocks. Per block, each exit's distinct
/// thresholds become bit masks over the block's samples (bit i: sample i reaches
/// that threshold), and so do the correct flags; then every threshold set is
/// applied word by word (64 samples) with a few integer operations and popcounts.
/// Thresholds are compared as the smallest `f32` at or above them, which is exact
/// for `f32` scores. Builds the masks with AVX2 where the CPU has it.
pub fn score_many(
    scores: &[f32],
    correct: &[bool],
    k: usize,
    n: usize,
    thresholds: &[f64],
    costs: &[f64],
) -> Result<Vec<Outcome>> {
    score_many_on(
        Avx2Popcnt::detect(),
        scores,
        correct,
        k,
        n,
        thresholds,
        costs,
    )
}

/// [`score_many`] with the AVX2 mask kernels when `simd` is given, else the portable
/// ones (a test passes `None` to check the portable path on an AVX2 machine).
pub fn score_many_on(
    simd: Option<Avx2Popcnt>,
    scores: &[f32],
    correct: &[bool],
    k: usize,
    n: usize,
    thresholds: &[f64],
    costs: &[f64],
) -> Result<Vec<Outcome>> {
    assert!((1..=MAX_EXITS).contains(&k) && scores.len() == k * n && correct.len() == k * n);
    let tf: Vec<f32> = thresholds.iter().map(|&t| f32_ceil(t)).collect();
    let mut out = Vec::with_capacity(tf.len() / k);
    for group in tf.chunks(SET_GROUP * k) {
        out.extend(score_group(simd, scores, correct, k, n, group, costs)?);
    }
    Ok(out)
}

fn score_group(
    simd: Option<Avx2Popcnt>,
    scores: &[f32],
    correct: &[bool],
    k: usize,
    n: usize,
    tf: &[f32],
    costs: &[f64],
) -> Result<Vec<Outcome>> {
    let b = tf.len() / k;
    let lv = levels(tf, k);
    // Where each exit's masks start in a block's mask buffer (one run of WORDS per cut).
    let mut first = vec![0usize; k];
    for e in 1..k {
        first[e] = first[e - 1] + lv.cuts[e - 1].len() * WORDS;
    }
    let mask_words = first[k - 1];
    // No SIMD kernels on other architectures: always the portable path.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    // Per budget: K exit counts then the number of right answers.
    let width = k + 1;
    // Each worker's block buffers (at most a few MB: they grow with K and the number
    // of threshold sets, not with N).
    let worker_bytes = 8 * (b * width + mask_words + k * WORDS) as u128;
    let oom = |_| {
        Error::out_of_memory(
            "scoring",
            worker_bytes * rayon::current_num_threads().max(1) as u128,
            &format!(
                "of working memory for {b} threshold sets on {} scores",
                thousands((k * n) as u128)
            ),
        )
    };
    let totals = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .fold(
            || -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
                Ok((
                    try_zeroed_vec(b * width).map_err(oom)?,
                    try_zeroed_vec(mask_words).map_err(oom)?,
                    try_zeroed_vec(k * WORDS).map_err(oom)?,
                ))
            },
            |state, blk| {
                let (mut acc, mut masks, mut right) = state?;
                let d = Data {
                    scores,
                    correct,
                    k,
                    n,
                    start: blk * BLOCK,
                };
                let mut buf = Buffers {
                    first: &first,
                    masks: &mut masks,
                    right: &mut right,
                };
                #[cfg(target_arch = "x86_64")]
                if let Some(simd) = simd {
                    // SAFETY: `simd` proves the CPU supports AVX2 and POPCNT.
                    unsafe { score_block_avx2(simd, &d, &lv, &mut acc, &mut buf) };
                    return Ok((acc, masks, right));
                }
                score_block(Portable, &d, &lv, &mut acc, &mut buf);
                Ok((acc, masks, right))
            },
        )
        .map(|state| state.map(|(acc, _, _)| acc))
        .try_reduce(
            || vec![0u64; b * width],
            |mut x, y| {
                for (a, b) in x.iter_mut().zip(y) {
                    *a += b;
                }
                Ok(x)
            },
        )?;
    Ok((0..b)
        .map(|bi| {
            let a = &totals[bi * width..(bi + 1) * width];
            let exit_counts = a[..k].to_vec();
            let cost: f64 = exit_counts
                .iter()
                .zip(costs)
                .fold(0.0, |s, (&c, &w)| s + c as f64 * w);
            Outcome {
                accuracy: a[k] as f64 / n as f64,
                mean_cost: cost / n as f64,
                exit_counts,
            }
        })
        .collect())
}

struct Data<'a> {
    scores: &'a [f32],
    correct: &'a [bool],
    k: usize,
    n: usize,
    start: usize,
}

/// A worker's per-block scratch: pass masks (exit `e`, cut `c` at
/// `first[e] + c * WORDS`) and correct masks (exit `e` at `e * WORDS`).
struct Buffers<'a> {
    first: &'a [usize],
    masks: &'a mut [u64],
    right: &'a mut [u64],
}

/// [`score_block`] with the AVX2 mask kernels, compiled for AVX2 and POPCNT: the
/// block's loops live here so that the `#[target_feature]` kernels inline into them
/// and the popcounts are single instructions.
///
/// # Safety
/// The CPU must support AVX2 and POPCNT (`simd` proves it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn score_block_avx2(
    simd: Avx2Popcnt,
    d: &Data,
    lv: &Levels,
    acc: &mut [u64],
    buf: &mut Buffers,
) {
    score_block(simd, d, lv, acc, buf)
}

/// The mask kernels of [`score_block`]: each handles a prefix of its input and says
/// how much; the scalar loops there do the rest ([`Portable`] leaves them all of it).
trait MaskKernels: Copy {
    /// Pass masks of a prefix of `s` (see [`pass_masks_avx2`]); returns its length.
    fn pass_masks(self, s: &[f32], cuts: &[f32], out: &mut [u64]) -> usize;
    /// Correct masks of a prefix of `c` (see [`flag_masks_avx2`]); returns its length.
    fn flag_masks(self, c: &[u8], out: &mut [u64]) -> usize;
}

impl MaskKernels for Portable {
    #[inline(always)]
    fn pass_masks(self, _s: &[f32], _cuts: &[f32], _out: &mut [u64]) -> usize {
        0
    }

    #[inline(always)]
    fn flag_masks(self, _c: &[u8], _out: &mut [u64]) -> usize {
        0
    }
}

#[cfg(target_arch = "x86_64")]
impl MaskKernels for Avx2Popcnt {
    #[inline(always)]
    fn pass_masks(self, s: &[f32], cuts: &[f32], out: &mut [u64]) -> usize {
        // SAFETY: an `Avx2Popcnt` exists only where AVX2 and POPCNT were detected.
        unsafe { pass_masks_avx2(s, cuts, out) }
    }

    #[inline(always)]
    fn flag_masks(self, c: &[u8], out: &mut [u64]) -> usize {
        // SAFETY: an `Avx2Popcnt` exists only where AVX2 and POPCNT were detected.
        unsafe { flag_masks_avx2(c, out) }
    }
}

/// Pass masks of the first `64 * floor(len / 64)` scores of `s` (returns how many):
/// for each 64 scores (eight registers, loaded once) and each cut, compare, pack the
/// lane masks to bytes and take their sign bits. `out[c * WORDS + w]` gets word `w`
/// of cut `c`.
///
/// # Safety
/// The CPU must support AVX2 and POPCNT (see [`Avx2Popcnt`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[inline]
unsafe fn pass_masks_avx2(s: &[f32], cuts: &[f32], out: &mut [u64]) -> usize {
    use std::arch::x86_64::*;
    let whole = s.len() / 64;
    let p = s.as_ptr();
    // Undoes the 128-bit lane interleaving of the packs.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for w in 0..whole {
        let q = p.add(64 * w);
        let x: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(q.add(8 * j)));
        for (c, &t) in cuts.iter().enumerate() {
            let t = _mm256_set1_ps(t);
            let ge = |j: usize| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x[j], t));
            let half = |j: usize| {
                let b = _mm256_packs_epi16(
                    _mm256_packs_epi32(ge(j), ge(j + 1)),
                    _mm256_packs_epi32(ge(j + 2), ge(j + 3)),
                );
                _mm256_movemask_epi8(_mm256_permutevar8x32_epi32(b, order)) as u32 as u64
            };
            out[c * WORDS + w] = half(0) | (half(4) << 32);
        }
    }
    64 * whole
}

/// Correct masks of the first `32 * floor(len / 32)` flags of `c` into `out`
/// (32 bits at a time; returns how many flags).
///
/// # Safety
/// The CPU must support AVX2 and POPCNT (see [`Avx2Popcnt`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[inline]
unsafe fn flag_masks_avx2(c: &[u8], out: &mut [u64]) -> usize {
    use std::arch::x86_64::*;
    let whole = c.len() / 32;
    for h in 0..whole {
        // Flags are 0 or 1: shifted to the top bit of each byte.
        let v =
            _mm256_slli_epi16::<7>(_mm256_loadu_si256(c.as_ptr().add(32 * h) as *const __m256i));
        let bits = _mm256_movemask_epi8(v) as u32 as u64;
        if h % 2 == 0 {
            out[h / 2] = bits;
        } else {
            out[h / 2] |= bits << 32;
        }
    }
    32 * whole
}

/// One block of samples, every threshold set of the group.
#[inline(always)]
fn score_block<M: MaskKernels>(
    kernels: M,
    d: &Data,
    lv: &Levels,
    acc: &mut [u64],
    buf: &mut Buffers,
) {
    let (k, n, start) = (d.k, d.n, d.start);
    let len = BLOCK.min(n - start);
    let words = len.div_ceil(64);
    let b = lv.need.len() / k;
    let width = k + 1;
    for e in 0..k - 1 {
        let s = &d.scores[e * n + start..][..len];
        let cuts = &lv.cuts[e];
        let out = &mut buf.masks[buf.first[e]..][..cuts.len() * WORDS];
        let done = kernels.pass_masks(s, cuts, out);
        // The rest, bit by bit (bits past `len` stay 0).
        for (c, &t) in cuts.iter().enumerate() {
            for w in done / 64..words {
                let lo = 64 * w;
                out[c * WORDS + w] = s[lo..len.min(lo + 64)]
                    .iter()
                    .enumerate()
                    .fold(0u64, |m, (i, &x)| m | ((x >= t) as u64) << i);
            }
        }
    }
    for e in 0..k {
        let c = bytes(&d.correct[e * n + start..][..len]);
        let out = &mut buf.right[e * WORDS..][..WORDS];
        let done = kernels.flag_masks(c, out);
        for i in done..len {
            if i % 64 == 0 {
                out[i / 64] = 0;
            }
            out[i / 64] |= (c[i] as u64) << (i % 64);
        }
    }
    // Bits of the samples in the block (all but the tail of the last word).
    let valid = |w: usize| {
        if 64 * (w + 1) <= len {
            !0u64
        } else {
            (1u64 << (len % 64)) - 1
        }
    };
    for bi in 0..b {
        let need = &lv.need[bi * k..(bi + 1) * k];
        let a = &mut acc[bi * width..(bi + 1) * width];
        // Samples that left at an earlier exit.
        let mut taken = [0u64; WORDS];
        let mut right = 0u64;
        for e in 0..k {
            let ne = if e == k - 1 { 0 } else { need[e] };
            if ne == 255 {
                continue;
            }
            let r = &buf.right[e * WORDS..][..words];
            let mut count = 0u64;
            if ne == 0 {
                for (w, t) in taken[..words].iter_mut().enumerate() {
                    let newly = valid(w) & !*t;
                    *t |= newly;
                    count += newly.count_ones() as u64;
                    right += (newly & r[w]).count_ones() as u64;
                }
            } else {
                let m = &buf.masks[buf.first[e] + (ne as usize - 1) * WORDS..][..words];
                for ((t, &m), &r) in taken[..words].iter_mut().zip(m).zip(r) {
                    let newly = m & !*t;
                    *t |= m;
                    count += newly.count_ones() as u64;
                    right += (newly & r).count_ones() as u64;
                }
            }
            a[e] += count;
        }
        a[k] += right;
    }
}

#[inline(always)]
fn bytes(x: &[bool]) -> &[u8] {
    // SAFETY: bool has the size and alignment of u8 and is always 0 or 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, x.len()) }
}

/// Validates shapes and values, then scores one threshold set.
pub fn simulate(
    scores: &[f32],
    correct: &[bool],
    k: usize,
    n: usize,
    thresholds: &[f64],
    costs: &[f64],
) -> Result<Outcome> {
    crate::calibrate::validate_scores("scores", scores, k, n)?;
    check_correct("correct", correct, k, n)?;
    validate_thresholds(thresholds, k)?;
    validate_costs(costs, k)?;
    Ok(score_many(scores, correct, k, n, thresholds, costs)?.remove(0))
}

pub fn check_correct(name: &str, correct: &[bool], k: usize, n: usize) -> Result<()> {
    if correct.len() != k * n {
        return Err(Error::new(format!(
            "{name} must have shape ({k}, {n}) like the scores; received {} values",
            correct.len()
        )));
    }
    Ok(())
}

/// Accuracy of every exit on the whole set, `(K,)`: `count_k / N`.
pub fn anytime_accuracy(correct: &[bool], k: usize, n: usize) -> Result<Vec<f64>> {
    if k == 0 || n == 0 || correct.len() != k * n {
        return Err(Error::new(format!(
            "correct must be a non-empty (K, N) array; received shape ({k}, {n})"
        )));
    }
    Ok(correct
        .par_chunks(n)
        .map(|row| row.iter().map(|&c| c as u64).sum::<u64>() as f64 / n as f64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        scores: &[f32],
        correct: &[bool],
        k: usize,
        n: usize,
        t: &[f64],
        costs: &[f64],
    ) -> Outcome {
        let mut counts = vec![0u64; k];
        let mut right = 0u64;
        for i in 0..n {
            let e = (0..k)
                .find(|&e| e == k - 1 || scores[e * n + i] as f64 >= t[e])
                .unwrap();
            counts[e] += 1;
            right += correct[e * n + i] as u64;
        }
        let cost: f64 = counts
            .iter()
            .zip(costs)
            .fold(0.0, |s, (&c, &w)| s + c as f64 * w);
        Outcome {
            accuracy: right as f64 / n as f64,
            mean_cost: cost / n as f64,
            exit_counts: counts,
        }
    }

    #[test]
    fn matches_naive_including_thresholds_between_f32_values() {
        let mut st = 5u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        for trial in 0..200 {
            let k = 1 + (next() % 5) as usize;
            let n = 1 + (next() % 5000) as usize;
            let scores: Vec<f32> = (0..k * n).map(|_| (next() % 100) as f32 / 99.0).collect();
            let correct: Vec<bool> = (0..k * n).map(|_| next() % 3 != 0).collect();
            let mut t: Vec<f64> = (0..k).map(|_| (next() % 100) as f64 / 99.0).collect();
            if trial % 3 == 0 {
                // Just above an f32 value in f64: must not let that value pass.
                t[0] = (50.0f32 / 99.0) as f64 + 1e-12;
            }
            if trial % 7 == 0 {
                t[0] = f64::INFINITY;
            }
            if trial % 5 == 1 {
                // -inf before the last exit: every sample left passes.
                t[k / 2] = f64::NEG_INFINITY;
            }
            t[k - 1] = f64::NEG_INFINITY;
            let costs: Vec<f64> = (0..k).map(|e| (e * e) as f64 + 0.5).collect();
            let got = simulate(&scores, &correct, k, n, &t, &costs).unwrap();
            assert_eq!(
                got,
                naive(&scores, &correct, k, n, &t, &costs),
                "trial {trial}"
            );
            assert_eq!(got.exit_counts.iter().sum::<u64>(), n as u64);
        }
    }

    /// The portable mask kernels (forced on this machine) against the AVX2 ones: pure
    /// comparisons and integer counts, so the outcomes are identical bit for bit. Sizes
    /// reach the AVX2 prefixes and the scalar tails (n not a multiple of 32, 64 or the
    /// block), several groups of threshold sets, ties and thresholds at +-inf.
    #[test]
    fn portable_path_matches_avx2_path() {
        let Some(simd) = Avx2Popcnt::detect() else {
            eprintln!("no AVX2+POPCNT on this CPU: only the portable path exists");
            return;
        };
        let mut st = 9u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        for (k, n, sets) in [
            (2, 31, 3),
            (3, 64, 5),
            (5, 4097, 70),
            (8, 10_000, 150),
            (1, 100, 2),
        ] {
            let scores: Vec<f32> = (0..k * n).map(|_| (next() % 1000) as f32 / 999.0).collect();
            let correct: Vec<bool> = (0..k * n).map(|_| next() % 3 != 0).collect();
            let mut t: Vec<f64> = (0..sets * k)
                .map(|_| (next() % 1000) as f64 / 999.0 + (next() % 2) as f64 * 1e-9)
                .collect();
            for j in 0..sets {
                if j % 4 == 1 {
                    t[j * k] = f64::INFINITY;
                }
                if j % 5 == 2 && k > 1 {
                    t[j * k] = f64::NEG_INFINITY;
                }
                t[j * k + k - 1] = f64::NEG_INFINITY;
            }
            let costs: Vec<f64> = (0..k).map(|e| (e + 1) as f64).collect();
            let portable = score_many_on(None, &scores, &correct, k, n, &t, &costs).unwrap();
            let avx2 = score_many_on(Some(simd), &scores, &correct, k, n, &t, &costs).unwrap();
            assert_eq!(portable, avx2, "k={k} n={n}");
        }
    }

    #[test]
    fn validation() {
        assert!(validate_costs(&[1.0, 0.5], 2)
            .unwrap_err()
            .message
            .contains("non-decreasing"));
        assert!(validate_costs(&[-1.0, 0.5], 2).is_err());
        assert!(validate_costs(&[1.0], 2).is_err());
        assert!(validate_thresholds(&[0.5, 0.1], 2).is_err());
        assert!(validate_thresholds(&[f64::NAN, f64::NEG_INFINITY], 2).is_err());
        assert!(validate_thresholds(&[0.5, f64::NEG_INFINITY], 2).is_ok());
        assert_eq!(
            anytime_accuracy(&[true, false, true, true], 2, 2).unwrap(),
            vec![0.5, 1.0]
        );
    }
}
