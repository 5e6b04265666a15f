//! Threshold calibration for budgeted batch classification (MSDNet semantics).
//!
//! For exits k = 1..K-1 (0-based 0..K-2), with `n_k = floor(f64(N) * f_k)` computed as
//! one IEEE float64 multiplication followed by `floor` (exactly numpy's
//! `np.floor(N * f)`):
//! - `n_k == 0`, or no sample left: `T_k = +inf` (the exit takes no sample);
//! - `n_k` up to the number of samples that have not exited yet: `T_k` is the
//!   `n_k`-th largest score at exit k among them;
//! - `n_k` above that number (ties at earlier exits took more than their quotas), by
//!   the [`Shortfall`] rule: [`Shortfall::Reference`] (the default) keeps `T_k = +inf`
//!   like the authors' code (MSDNet-PyTorch's `dynamic_eval_find_threshold`, whose
//!   count never reaches `n_k`): nobody exits at k, the rest go deeper;
//!   [`Shortfall::ExitAll`] takes the lowest remaining score, so every remaining
//!   sample exits at k;
//! - every remaining sample with `s >= T_k` exits at k (ties can take more than `n_k`).
//!
//! `T_K = -inf`: the last exit takes the rest. Thresholds are the `f32` scores
//! widened to `f64` exactly. (The authors write `1e8` and `-1e8`; for scores in
//! [0, 1] that is the same.)
//!
//! Fast path ([`SortedExits`]): each exit's scores are radix-sorted once
//! (descending); a calibration then walks each exit's order, skipping samples
//! already gone (a bitset), until `n_k` remaining samples are counted, plus ties.
//! Many budgets share one sort.
//!
//! Working memory (`(K-1) x N` sorted keys, sort scratch, the walks' bitsets) is
//! allocated fallibly: if it cannot be had, the error says how much was needed.

use crate::error::{thousands, Error, Result};
use crate::hugebuf::{try_zeroed_vec, HugeBuf};
use rayon::prelude::*;

/// What an exit does when fewer samples are left than its quota `n_k` (ties at
/// earlier exits took more than their quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shortfall {
    /// `T_k = +inf`: nobody exits at k, the rest go deeper (the authors' code).
    #[default]
    Reference,
    /// `T_k` = the lowest remaining score: every remaining sample exits at k.
    ExitAll,
}

impl Shortfall {
    pub fn parse(s: &str) -> Result<Shortfall> {
        match s {
            "reference" => Ok(Shortfall::Reference),
            "exit_all" => Ok(Shortfall::ExitAll),
            _ => Err(Error::new(format!(
                "shortfall must be 'reference' or 'exit_all'; received {s:?}"
            ))),
        }
    }

    /// How many remaining samples exit `k` counts towards its threshold: `n_k`, or
    /// 0 (threshold `+inf`) / all of them when fewer than `n_k` remain.
    #[inline]
    fn target(self, quota: usize, remaining: usize) -> usize {
        if quota <= remaining {
            quota
        } else {
            match self {
                Shortfall::Reference => 0,
                Shortfall::ExitAll => remaining,
            }
        }
    }
}

/// Fractions for the geometric split `f_k = q^k / sum_j q^j`, k = 1..K: the budget
/// sweep's split (MSDNet's `dynamic_evaluate`) and L2W-DEN's meta-data allocation
/// (Han et al., "Learning to Weight Samples for Dynamic Early-exiting Networks",
/// ECCV 2022, arXiv:2209.08310, Sec. 3.2). The one implementation: the calibrator
/// and training (`keras_ee.training.allocation`) both take their counts
/// `floor(f64(n) * f_k)` from these fractions.
///
/// `q` is read as the decimal it prints as (0.8, not the binary
/// 0.8000000000000000444 nearest to it), as a user and the sweep grid `p / 20` mean
/// it. When that decimal is a ratio `a / b` with few digits (every grid value, K up
/// to about 12), `f_k` is the exact rational `a^k b^(K-k) / sum_j a^j b^(K-j)`
/// rounded *up* to an `f64`: then `floor(n * f_k)` is exactly the paper's
/// `floor(n q^k / sum_j q^j)` whenever `n q^k / sum_j q^j` is an integer (a fraction
/// rounded to nearest can land one unit in the last place below it and lose a
/// sample: at q = 0.8, K = 3, n = 366 the exact count is 150, normalised powers give
/// 149). Otherwise (many digits, huge or tiny q, large K) it falls back to
/// normalised powers, which never overflow or underflow: for `q <= 1`,
/// `w_1 = 1, w_{k+1} = w_k * q`; for `q > 1`, `w_K = 1, w_{k-1} = w_k / q`; then
/// `f_k = w_k / (w_1 + ... + w_K)` (summed left to right). Both use only integer and
/// IEEE-rounded arithmetic, so every machine gets the same bits.
pub fn geometric_fractions(q: f64, num_exits: usize) -> Result<Vec<f64>> {
    check_q(q, num_exits, false)?;
    if let Some(f) = exact_geometric_fractions(q, num_exits) {
        return Ok(f);
    }
    let mut w = vec![1.0f64; num_exits];
    if q <= 1.0 {
        for k in 1..num_exits {
            w[k] = w[k - 1] * q;
        }
    } else {
        for k in (0..num_exits - 1).rev() {
            w[k] = w[k + 1] / q;
        }
    }
    let total: f64 = w.iter().fold(0.0, |a, &b| a + b);
    Ok(w.iter().map(|&x| x / total).collect())
}

/// [`geometric_fractions`] from the exact rational, rounded up; `None` when `q`'s
/// decimal or the sum of the powers does not fit (the denominator must fit in 64 bits).
fn exact_geometric_fractions(q: f64, num_exits: usize) -> Option<Vec<f64>> {
    let (a, b) = decimal_ratio(q)?;
    let k = u32::try_from(num_exits).ok()?;
    // w_j = q^j b^K = a^j b^(K-j): integers with the ratios of the powers of q.
    let w = (1..=k)
        .map(|j| a.checked_pow(j)?.checked_mul(b.checked_pow(k - j)?))
        .collect::<Option<Vec<u128>>>()?;
    let total = w.iter().try_fold(0u128, |s, &x| s.checked_add(x))?;
    if total >> 64 != 0 {
        return None;
    }
    Some(w.iter().map(|&x| ratio_rounded_up(x, total)).collect())
}

/// `q` as the reduced ratio `a / b` of the shortest decimal that reads back as `q`
/// (what `{:e}` prints), or `None` when `a` or `b` would not fit.
fn decimal_ratio(q: f64) -> Option<(u128, u128)> {
    let text = format!("{q:e}"); // "8e-1", "1.95e0", "1e-300"
    let (mantissa, exponent) = text.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    let digits: u128 = mantissa.replace('.', "").parse().ok()?;
    // q = digits * 10^power
    let power = exponent - decimals;
    let ten = |p: i32| 10u128.checked_pow(p.unsigned_abs());
    let (a, b) = if power >= 0 {
        (digits.checked_mul(ten(power)?)?, 1)
    } else {
        (digits, ten(power)?)
    };
    let g = gcd(a, b);
    Some((a / g, b / g))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `num / den` rounded up to an `f64`, for `0 < num <= den < 2^64`.
fn ratio_rounded_up(num: u128, den: u128) -> f64 {
    debug_assert!(0 < num && num <= den && den >> 64 == 0);
    // Shifted into [2^126, 2^127): the quotient has at least 63 significant bits.
    let shift = num.leading_zeros() - 1;
    let (quotient, rest) = ((num << shift) / den, (num << shift) % den);
    let drop = (128 - quotient.leading_zeros()) - 53;
    let mut mantissa = quotient >> drop;
    if rest != 0 || quotient & ((1 << drop) - 1) != 0 {
        mantissa += 1;
    }
    // mantissa <= 2^53 is exact, and so is the scaling by a power of two in the normal
    // range (the exponent lies between -128 and 0).
    let exponent = drop as i32 - shift as i32;
    mantissa as f64 * f64::from_bits(((1023 + exponent) as u64) << 52)
}

/// Fractions for the per-stage split: a fraction `q` of the samples expected to reach
/// exit k leave there, `f_k = q (1-q)^(k-1)` for k < K, `f_K = (1-q)^(K-1)`.
///
/// `r` runs as `r_1 = 1, r_{k+1} = r_k * (1 - q)`; `f_k = r_k * q`, `f_K = r_K`.
pub fn per_stage_fractions(q: f64, num_exits: usize) -> Result<Vec<f64>> {
    check_q(q, num_exits, true)?;
    let mut f = Vec::with_capacity(num_exits);
    let mut r = 1.0f64;
    for _ in 0..num_exits - 1 {
        f.push(r * q);
        r *= 1.0 - q;
    }
    f.push(r);
    Ok(f)
}

fn check_q(q: f64, num_exits: usize, per_stage: bool) -> Result<()> {
    if num_exits == 0 {
        return Err(Error::new("num_exits must be >= 1; received 0"));
    }
    if num_exits > MAX_EXITS {
        return Err(Error::new(format!(
            "num_exits must be <= {MAX_EXITS}; received {num_exits}"
        )));
    }
    if per_stage {
        if !(q > 0.0 && q <= 1.0) {
            return Err(Error::new(format!(
                "q must be in (0, 1] for the per-stage split; received {q}"
            )));
        }
    } else if !(q > 0.0 && q.is_finite()) {
        return Err(Error::new(format!(
            "q must be positive and finite; received {q}"
        )));
    }
    Ok(())
}

/// Exit indices are stored as `u8`.
pub const MAX_EXITS: usize = 255;

/// Checks `fractions` (K,): finite, >= 0, summing to 1 within 1e-9.
pub fn validate_fractions(fractions: &[f64], num_exits: usize) -> Result<()> {
    if fractions.len() != num_exits {
        return Err(Error::new(format!(
            "fractions must have K={num_exits} entries (one per exit, as scores.shape[0]); received {}",
            fractions.len()
        )));
    }
    if let Some((k, f)) = fractions
        .iter()
        .enumerate()
        .find(|(_, f)| !(f.is_finite() && **f >= 0.0))
    {
        return Err(Error::new(format!(
            "fractions must be finite and >= 0; received {f} at exit {k}"
        )));
    }
    let total: f64 = fractions.iter().sum();
    if (total - 1.0).abs() > 1e-9 {
        return Err(Error::new(format!(
            "fractions must sum to 1 (tolerance 1e-9); they sum to {total}"
        )));
    }
    Ok(())
}

/// `n_k = floor(f64(N) * f_k)` for each exit.
pub fn quotas(n: usize, fractions: &[f64]) -> Vec<usize> {
    fractions
        .iter()
        .map(|&f| (n as f64 * f).floor() as usize)
        .collect()
}

/// Checks a `(K, N)` row-major score array: shape consistent, non-empty, all finite.
pub fn validate_scores(name: &str, scores: &[f32], k: usize, n: usize) -> Result<()> {
    if k == 0 || n == 0 {
        return Err(Error::new(format!(
            "{name} must be a non-empty (K, N) array; received shape ({k}, {n})"
        )));
    }
    if k > MAX_EXITS {
        return Err(Error::new(format!(
            "{name} has K={k} exits; at most {MAX_EXITS} are supported"
        )));
    }
    if scores.len() != k * n {
        return Err(Error::new(format!(
            "{name} has {} values; expected K*N = {}",
            scores.len(),
            k * n
        )));
    }
    let bad = scores
        .par_chunks(1 << 16)
        .enumerate()
        .filter_map(|(c, ch)| {
            // A cheap vectorised test first: with the sign cleared, a finite `f32`'s bits
            // are below those of +inf. (An integer max vectorises; a float sum would
            // run as one serial chain of additions.)
            let top = ch
                .iter()
                .fold(0u32, |a, &x| a.max(x.to_bits() & 0x7fff_ffff));
            if top < f32::INFINITY.to_bits() {
                None
            } else {
                ch.iter()
                    .position(|x| !x.is_finite())
                    .map(|p| (c << 16) + p)
            }
        })
        .min();
    if let Some(p) = bad {
        return Err(Error::new(format!(
            "{name} must be finite; found {} at exit k={}, sample i={}",
            scores[p],
            p / n,
            p % n
        )));
    }
    Ok(())
}

/// Order-preserving map of finite `f32` to `u32` keys, reversed (descending scores first).
/// `-0.0` is folded into `+0.0` so equal scores get equal keys.
#[inline(always)]
fn desc_key(s: f32) -> u32 {
    let b = (s + 0.0).to_bits();
    let asc = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    !asc
}

#[inline(always)]
fn key_to_score(key: u32) -> f32 {
    let asc = !key;
    f32::from_bits(if asc >> 31 == 1 {
        asc & 0x7fff_ffff
    } else {
        !asc
    })
}

/// Widest radix digit. A scatter pass is bound by the distinct cache lines it
/// writes to at once: 1024 buckets ran about twice as fast per pass as 2048 here
/// (with 2048, three passes of 11/11/10 bits were slower than four of 8).
const MAX_BITS: u32 = 10;

/// Sorts `(desc_key(row[i]) << 32) | id(i)` for all `i` into `out`, by key (LSD
/// radix, stable). Only the span of key bits that differ between samples is sorted
/// on, in as few digits of at most [`MAX_BITS`] as cover it: scores in (0, 1) vary
/// in the low 30 bits (three passes), scores of both signs in all 32 (four). A
/// digit that is the same for every key is skipped. The first pass packs while it
/// scatters, starting in whichever buffer makes the last pass land in `out` (no
/// copy back). `tmp` is scratch of the same length.
fn sort_exit(row: &[f32], id: impl Fn(usize) -> u32, out: &mut [u64], tmp: &mut [u64]) {
    let n = row.len();
    let pack = |(i, &s): (usize, &f32)| ((desc_key(s) as u64) << 32) | id(i) as u64;
    let k0 = row.first().map_or(0, |&s| desc_key(s));
    let varying = row.iter().fold(0u32, |a, &s| a | (desc_key(s) ^ k0));
    if varying == 0 {
        for (o, x) in out.iter_mut().zip(row.iter().enumerate().map(pack)) {
            *o = x;
        }
        return;
    }
    let lo = varying.trailing_zeros();
    let span = 32 - varying.leading_zeros() - lo;
    let passes = span.div_ceil(MAX_BITS) as usize;
    let width = span.div_ceil(passes as u32);
    let mut hist = [[0u32; 1 << MAX_BITS]; 4];
    match passes {
        1 => histograms::<1>(row, lo, width, &mut hist),
        2 => histograms::<2>(row, lo, width, &mut hist),
        3 => histograms::<3>(row, lo, width, &mut hist),
        _ => histograms::<4>(row, lo, width, &mut hist),
    }
    let live: Vec<usize> = (0..passes)
        .filter(|&d| !hist[d].iter().any(|&c| c as usize == n))
        .collect();
    // The first pass writes to `out` iff the number of passes is odd.
    let mut in_tmp = live.len().is_multiple_of(2);
    for (j, &d) in live.iter().enumerate() {
        let h = &mut hist[d][..1 << width];
        let mut sum = 0u32;
        for c in h.iter_mut() {
            let t = *c;
            *c = sum;
            sum += t;
        }
        let (shift, mask) = (32 + lo + d as u32 * width, (1u64 << width) - 1);
        if j == 0 {
            let dst: &mut [u64] = if in_tmp { &mut *tmp } else { &mut *out };
            scatter(row.iter().enumerate().map(pack), h, shift, mask, dst);
        } else {
            let (src, dst): (&[u64], &mut [u64]) = if in_tmp {
                (&*tmp, &mut *out)
            } else {
                (&*out, &mut *tmp)
            };
            scatter(src.iter().copied(), h, shift, mask, dst);
            in_tmp = !in_tmp;
        }
    }
    debug_assert!(!in_tmp);
}

/// Counts of the `P` digits of `width` bits above bit `lo` of every key (one pass).
fn histograms<const P: usize>(
    row: &[f32],
    lo: u32,
    width: u32,
    hist: &mut [[u32; 1 << MAX_BITS]; 4],
) {
    let mask = (1u32 << width) - 1;
    for &s in row {
        let key = desc_key(s) >> lo;
        for (d, h) in hist.iter_mut().enumerate().take(P) {
            h[((key >> (d as u32 * width)) & mask) as usize] += 1;
        }
    }
}

/// One counting-sort pass: `h` holds each digit's next free slot in `dst`.
#[inline(always)]
fn scatter(src: impl Iterator<Item = u64>, h: &mut [u32], shift: u32, mask: u64, dst: &mut [u64]) {
    for x in src {
        let b = ((x >> shift) & mask) as usize;
        dst[h[b] as usize] = x;
        h[b] += 1;
    }
}

/// `SPREAD[x]` has byte i equal to bit i of x: adds 8 per-budget counters at once.
static SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut x = 0;
    while x < 256 {
        let mut i = 0;
        while i < 8 {
            if x & (1 << i) != 0 {
                t[x] |= 1u64 << (8 * i);
            }
            i += 1;
        }
        x += 1;
    }
    t
};

/// Budgets walked together share one `u32` of "gone" bits per sample (4 bytes per
/// sample keeps the randomly accessed array small).
const GROUP: usize = 32;
type Mask = u32;

/// Scores of exits 0..K-1 sorted once, descending, shared by many calibrations.
pub struct SortedExits {
    k: usize,
    n: usize,
    /// How many quota vectors the caller means to walk (sizes the out-of-memory message).
    budgets: usize,
    /// `(K-1) * N` packed `(descending key << 32) | sample id`, exit-major, sorted.
    packed: HugeBuf<u64>,
}

/// How far ahead the walk prefetches the gone word of a sample.
const PREFETCH: usize = 16;

#[inline(always)]
fn prefetch(v: &[Mask], i: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if i < v.len() {
            // SAFETY: in bounds; a prefetch has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch(
                    v.as_ptr().add(i) as *const i8,
                    std::arch::x86_64::_MM_HINT_T0,
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, i);
}

/// One chunk (<= 255 steps) of a walk: marks its samples gone for the `active`
/// budgets and returns how many each newly took, one byte per budget (eight per
/// u64; bytes cannot overflow). With `SAVE`, the replaced gone words go to `old`.
#[inline(always)]
fn count_chunk<const SAVE: bool>(
    chunk: &[u64],
    ahead: &[u64],
    gone: &mut [Mask],
    active: Mask,
    words: usize,
    old: &mut [Mask; 255],
) -> [u64; GROUP / 8] {
    let mut acc = [0u64; GROUP / 8];
    for (j, &x) in chunk.iter().enumerate() {
        if let Some(&y) = ahead.get(j) {
            prefetch(gone, (y & 0xffff_ffff) as usize);
        }
        let id = (x & 0xffff_ffff) as usize;
        let w = gone[id];
        if SAVE {
            old[j] = w;
        }
        let newly = active & !w;
        gone[id] = w | active;
        for (j, a) in acc.iter_mut().enumerate().take(words) {
            *a += SPREAD[((newly >> (8 * j)) & 255) as usize];
        }
    }
    acc
}

/// How many budgets [`SortedExits::calibrate_many`] walks together (at most 32): as
/// many groups as workers, or more when there are more than 32 budgets per worker.
pub fn group_size(budgets: usize) -> usize {
    let groups = budgets
        .div_ceil(GROUP)
        .max(rayon::current_num_threads())
        .min(budgets)
        .max(1);
    budgets.div_ceil(groups).max(1)
}

/// Exits sorted per scratch buffer, and how many scratch buffers, when sorting `k` exits.
fn sort_runs(k: usize) -> (usize, usize) {
    let per = k
        .saturating_sub(2)
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1);
    (per, k.saturating_sub(2).div_ceil(per).max(1))
}

/// How many walks [`SortedExits::calibrate_many`] runs at once for `budgets` quota vectors.
pub fn concurrent_walks(budgets: usize) -> usize {
    budgets
        .div_ceil(group_size(budgets))
        .min(rayon::current_num_threads().max(1))
        .max(1)
}

/// Peak working memory in bytes of calibrating `(K, N)` scores with `walks` walks at
/// once: the sorted keys, plus the larger of the sort's scratch (one buffer per
/// sorting worker and the exit-0 ranks) and the walks' bitsets (freed in between).
pub fn working_bytes(k: usize, n: usize, walks: usize) -> u128 {
    if k < 2 {
        return 0;
    }
    let (n, words) = (n as u128, std::mem::size_of::<u64>() as u128);
    let mask = std::mem::size_of::<Mask>() as u128;
    let sort = words * n * sort_runs(k).1 as u128 + 4 * n;
    words * n * (k as u128 - 1) + sort.max(mask * n * walks as u128)
}

/// The error for working memory that could not be allocated.
fn out_of_memory(k: usize, n: usize, walks: usize) -> Error {
    Error::out_of_memory(
        "calibration",
        working_bytes(k, n, walks),
        &format!(
            "of working memory for {} scores",
            thousands(k as u128 * n as u128)
        ),
    )
}

impl SortedExits {
    /// Sorts every exit but the last (whose threshold is always `-inf`); parallel over exits.
    /// `scores` must already be validated (finite, `K*N` values, `N < 2^32`). `budgets`
    /// (how many quota vectors will be walked) only sizes the out-of-memory message.
    pub fn new(scores: &[f32], k: usize, n: usize, budgets: usize) -> Result<SortedExits> {
        let oom = |_| out_of_memory(k, n, concurrent_walks(budgets));
        let mut packed = HugeBuf::try_zeroed((k - 1) * n).map_err(oom)?;
        if k == 1 {
            return Ok(SortedExits {
                k,
                n,
                budgets,
                packed,
            });
        }
        let (first, rest) = packed.split_at_mut(n);
        // Exits 1.. are sorted in one run per worker with one scratch buffer each, the
        // first reusing exit 0's (fresh pages cost faults). Mapping is lazy: unused
        // buffers cost nothing (but address space).
        let (per, runs) = sort_runs(k);
        let mut tmps: Vec<HugeBuf<u64>> = (0..runs)
            .map(|_| HugeBuf::try_zeroed(n))
            .collect::<std::result::Result<_, _>>()
            .map_err(oom)?;
        let mut rank: Vec<u32> = try_zeroed_vec(n).map_err(oom)?;
        sort_exit(&scores[..n], |i| i as u32, first, &mut tmps[0]);
        // Samples are renumbered by their rank at exit 0 (ids need not be the
        // original ones, only consistent across exits). Exits are correlated, so in
        // later walks the "gone" words they touch are close together in memory.
        // The rank of each sample at exit 0, indexed by its original id, so that later
        // exits are built in the original order (sequential reads, no gather). Their
        // order among equal scores then differs, which does not matter: a walk takes
        // every sample tied with the threshold.
        for (p, x) in first.iter_mut().enumerate() {
            rank[(*x & 0xffff_ffff) as usize] = p as u32;
            *x = (*x & !0xffff_ffff) | p as u64;
        }
        rest.par_chunks_mut(per * n)
            .zip(tmps.par_iter_mut())
            .enumerate()
            .for_each(|(r, (run, tmp))| {
                for (j, out) in run.chunks_mut(n).enumerate() {
                    let e = 1 + r * per + j;
                    sort_exit(&scores[e * n..(e + 1) * n], |i| rank[i], out, tmp);
                }
            });
        Ok(SortedExits {
            k,
            n,
            budgets,
            packed,
        })
    }

    /// Thresholds `(K,)` for the per-exit quotas `n_k` (see the module docs).
    pub fn calibrate(&self, quota: &[usize], shortfall: Shortfall) -> Result<Vec<f64>> {
        Ok(self.calibrate_many(&[quota.to_vec()], shortfall)?.remove(0))
    }

    /// Thresholds for many quota vectors: budgets are walked in groups of up to 32
    /// (one pass over each exit's order serves a whole group), groups in parallel.
    pub fn calibrate_many(
        &self,
        quotas: &[Vec<usize>],
        shortfall: Shortfall,
    ) -> Result<Vec<Vec<f64>>> {
        let groups: Vec<Vec<Vec<f64>>> = quotas
            .par_chunks(group_size(quotas.len()))
            .map(|g| self.calibrate_group(g, shortfall))
            .collect::<Result<_>>()?;
        Ok(groups.concat())
    }

    /// Thresholds for at most 32 quota vectors, walked together on this thread.
    pub fn calibrate_group(
        &self,
        quotas: &[Vec<usize>],
        shortfall: Shortfall,
    ) -> Result<Vec<Vec<f64>>> {
        let (k, n, g) = (self.k, self.n, quotas.len());
        debug_assert!(g <= GROUP);
        let mut thr = vec![vec![f64::INFINITY; k]; g];
        let mut gone: Vec<Mask> = try_zeroed_vec(if k > 1 { n } else { 0 })
            .map_err(|_| out_of_memory(k, n, concurrent_walks(self.budgets)))?;
        let mut remaining = vec![n; g];
        let words = g.div_ceil(8);
        for e in 0..k - 1 {
            let walk = &self.packed[e * n..(e + 1) * n];
            let mut target = vec![0usize; g];
            let mut cnt = vec![0usize; g];
            let mut counting: Mask = 0; // budgets still counting towards n_k
            for b in 0..g {
                target[b] = shortfall.target(quotas[b][e], remaining[b]);
                if target[b] > 0 {
                    counting |= 1 << b;
                }
            }
            let mut tie: Mask = 0; // budgets past n_k, taking samples tied with T_k
            let mut tie_score = [0f32; GROUP];
            let mut p = 0usize;
            let mut careful_until = 0usize; // step by step before this position
            while counting | tie != 0 && p < n {
                if tie != 0 {
                    let s = key_to_score((walk[p] >> 32) as u32);
                    let mut t = tie;
                    while t != 0 {
                        let b = t.trailing_zeros() as usize;
                        t &= t - 1;
                        if s != tie_score[b] {
                            tie &= !(1 << b);
                        }
                    }
                    if counting | tie == 0 {
                        break;
                    }
                }
                let active = counting | tie;
                if tie == 0 && p >= careful_until {
                    // Count a chunk of steps at once. If some budget may reach n_k inside
                    // it, keep the gone words it replaces: should that happen, undo the
                    // chunk and walk it step by step (at most once per budget and exit).
                    // Bounding chunks by the smallest `n_k - count` instead made them tiny
                    // whenever few samples remain for a budget.
                    let len = 255.min(n - p);
                    let mut slack = usize::MAX;
                    let mut c = counting;
                    while c != 0 {
                        let b = c.trailing_zeros() as usize;
                        c &= c - 1;
                        slack = slack.min(target[b] - cnt[b]);
                    }
                    let chunk = &walk[p..p + len];
                    let ahead = &walk[(p + PREFETCH).min(n)..(p + len + PREFETCH).min(n)];
                    let mut old = [0 as Mask; 255];
                    let acc = if slack > len {
                        count_chunk::<false>(chunk, ahead, &mut gone, active, words, &mut old)
                    } else {
                        count_chunk::<true>(chunk, ahead, &mut gone, active, words, &mut old)
                    };
                    let added = |b: usize| ((acc[b / 8] >> (8 * (b % 8))) & 255) as usize;
                    if slack <= len
                        && (0..g)
                            .any(|b| counting & (1 << b) != 0 && cnt[b] + added(b) >= target[b])
                    {
                        // Samples are distinct within an exit's order, so the order of undoing is free.
                        for (&x, &w) in chunk.iter().zip(&old) {
                            gone[(x & 0xffff_ffff) as usize] = w;
                        }
                        careful_until = p + len;
                        continue;
                    }
                    for (b, c) in cnt.iter_mut().enumerate() {
                        *c += added(b);
                    }
                    p += len;
                } else {
                    let x = walk[p];
                    let id = (x & 0xffff_ffff) as usize;
                    let w = gone[id];
                    let mut newly = active & !w;
                    gone[id] = w | active;
                    while newly != 0 {
                        let b = newly.trailing_zeros() as usize;
                        newly &= newly - 1;
                        cnt[b] += 1;
                        if cnt[b] == target[b] && counting & (1 << b) != 0 {
                            let s = key_to_score((x >> 32) as u32);
                            counting &= !(1 << b);
                            tie |= 1 << b;
                            tie_score[b] = s;
                            thr[b][e] = s as f64;
                        }
                    }
                    p += 1;
                }
            }
            for b in 0..g {
                remaining[b] -= cnt[b];
            }
        }
        for t in thr.iter_mut() {
            t[k - 1] = f64::NEG_INFINITY;
        }
        Ok(thr)
    }
}

/// Thresholds `(K,)` for `scores` (K*N row-major) and target `fractions` (K,).
pub fn calibrate(
    scores: &[f32],
    k: usize,
    n: usize,
    fractions: &[f64],
    shortfall: Shortfall,
) -> Result<Vec<f64>> {
    validate_scores("scores", scores, k, n)?;
    check_n(n)?;
    validate_fractions(fractions, k)?;
    SortedExits::new(scores, k, n, 1)?.calibrate(&quotas(n, fractions), shortfall)
}

/// Sample ids are stored as `u32`.
pub fn check_n(n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(Error::new(format!(
            "at most 2^32 - 1 samples are supported; received N={n}"
        )));
    }
    Ok(())
}

/// Straightforward O(K N log N) calibration used as an independent check in tests.
#[cfg(test)]
pub fn calibrate_naive(
    scores: &[f32],
    k: usize,
    n: usize,
    fractions: &[f64],
    shortfall: Shortfall,
) -> Vec<f64> {
    let mut alive = vec![true; n];
    let mut thr = vec![f64::INFINITY; k];
    for e in 0..k - 1 {
        let nk = (n as f64 * fractions[e]).floor() as usize;
        let row = &scores[e * n..(e + 1) * n];
        let mut rem: Vec<f32> = (0..n).filter(|&i| alive[i]).map(|i| row[i]).collect();
        if nk == 0 || rem.is_empty() || (nk > rem.len() && shortfall == Shortfall::Reference) {
            continue;
        }
        rem.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let t = rem[nk.min(rem.len()) - 1];
        for i in 0..n {
            if alive[i] && row[i] >= t {
                alive[i] = false;
            }
        }
        thr[e] = t as f64;
    }
    thr[k - 1] = f64::NEG_INFINITY;
    thr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn keys_roundtrip_and_order() {
        let vals = [-3.5f32, -1e-30, -0.0, 0.0, 1e-40, 0.25, 1.0, 7e20];
        for w in vals.windows(2) {
            assert!(desc_key(w[0]) >= desc_key(w[1]));
        }
        for &v in &vals {
            assert_eq!(key_to_score(desc_key(v)), v + 0.0);
        }
        assert_eq!(desc_key(-0.0), desc_key(0.0));
    }

    #[test]
    fn radix_sort_sorts() {
        let mut st = 99u64;
        // Keys varying in all 32 bits (both signs: four digits), in fewer (three, two,
        // one), in none, and in high bits only (integer scores: low bits all equal);
        // this covers the skips and the odd/even choice of the first buffer.
        for spread in [1e6f32, 1.0, 1e-3, 1e-6, 0.0, -1.0] {
            let row: Vec<f32> = (0..5000)
                .map(|_| {
                    let r = (rng(&mut st) % 1000) as f32;
                    if spread < 0.0 {
                        r * 64.0
                    } else {
                        0.7 + spread * (r - 500.0) / 1000.0
                    }
                })
                .collect();
            let mut out = vec![0u64; 5000];
            sort_exit(&row, |i| i as u32 ^ 7, &mut out, &mut vec![0u64; 5000]);
            let mut want: Vec<(u32, usize)> = row
                .iter()
                .enumerate()
                .map(|(i, &s)| (desc_key(s), i))
                .collect();
            want.sort(); // by key, then by original position (stability)
            let got: Vec<(u32, usize)> = out
                .iter()
                .map(|&x| ((x >> 32) as u32, (x as u32 ^ 7) as usize))
                .collect();
            assert_eq!(got, want, "spread {spread}");
        }
    }

    #[test]
    fn grouped_calibration_equals_naive_for_many_budgets() {
        let mut st = 4242u64;
        for trial in 0..30 {
            let k = 1 + (rng(&mut st) % 6) as usize;
            let n = 1 + (rng(&mut st) % 3000) as usize;
            let levels = 1 + rng(&mut st) % 50;
            let scores: Vec<f32> = (0..k * n)
                .map(|_| (rng(&mut st) % levels) as f32 / levels as f32)
                .collect();
            let qs: Vec<f64> = (1..(2 + trial * 3)).map(|p| p as f64 / 20.0).collect();
            let quotas: Vec<Vec<usize>> = qs
                .iter()
                .map(|&q| quotas(n, &geometric_fractions(q, k).unwrap()))
                .collect();
            let sorted = SortedExits::new(&scores, k, n, quotas.len()).unwrap();
            for sf in [Shortfall::Reference, Shortfall::ExitAll] {
                let got = sorted.calibrate_many(&quotas, sf).unwrap();
                for (j, &q) in qs.iter().enumerate() {
                    let want =
                        calibrate_naive(&scores, k, n, &geometric_fractions(q, k).unwrap(), sf);
                    assert_eq!(got[j], want, "trial {trial} q {q} {sf:?}");
                }
            }
        }
    }

    #[test]
    fn fractions_sum_to_one_and_match_formulas() {
        for &q in &[0.05, 0.5, 1.0, 1.5, 1.95, 1e-300, 1e300] {
            for k in 1..9 {
                let f = geometric_fractions(q, k).unwrap();
                assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                if (0.01..100.0).contains(&q) {
                    let s: f64 = (1..=k).map(|j| q.powi(j as i32)).sum();
                    for (j, fj) in f.iter().enumerate() {
                        let want = q.powi(j as i32 + 1) / s;
                        assert!((fj - want).abs() <= 1e-14 * want.max(1e-300));
                    }
                }
            }
        }
        assert_eq!(per_stage_fractions(0.5, 3).unwrap(), vec![0.5, 0.25, 0.25]);
        assert_eq!(per_stage_fractions(1.0, 3).unwrap(), vec![1.0, 0.0, 0.0]);
        assert!(per_stage_fractions(1.5, 3).is_err());
        assert!(geometric_fractions(0.0, 3).is_err());
        assert!(geometric_fractions(-1.0, 3).is_err());
        assert!(geometric_fractions(f64::NAN, 3).is_err());
        assert!(geometric_fractions(1.0, 0).is_err());
        assert!(validate_fractions(&[0.5, 0.5], 2).is_ok());
        assert!(validate_fractions(&[0.5, 0.6], 2).is_err());
        assert!(validate_fractions(&[1.5, -0.5], 2).is_err());
        assert!(validate_fractions(&[1.0], 2).is_err());
    }

    /// `floor(n f_k)` is the exact `floor(n q^k / sum_j q^j)` (q read as its decimal,
    /// computed in integers) on the sweep grid q = p / 20, K = 2..8, n = 0..5000.
    #[test]
    fn geometric_quotas_are_exact_on_the_grid() {
        assert_eq!(quotas(366, &geometric_fractions(0.8, 3).unwrap())[0], 150);
        for p in 1..40u32 {
            let q = p as f64 / 20.0;
            let (a, b) = decimal_ratio(q).unwrap();
            assert_eq!(a * 20, b * p as u128, "q = {q}");
            for k in 2..9u32 {
                let f = geometric_fractions(q, k as usize).unwrap();
                let w: Vec<u128> = (1..=k).map(|j| a.pow(j) * b.pow(k - j)).collect();
                let total: u128 = w.iter().sum();
                for n in 0..=5000usize {
                    let got = quotas(n, &f);
                    for j in 0..k as usize {
                        assert_eq!(
                            got[j] as u128,
                            n as u128 * w[j] / total,
                            "q {q} K {k} n {n}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn exact_fractions_round_up_and_fall_back() {
        assert_eq!(decimal_ratio(0.8), Some((4, 5)));
        assert_eq!(decimal_ratio(1.95), Some((39, 20)));
        assert_eq!(decimal_ratio(3e5), Some((300_000, 1)));
        assert_eq!(decimal_ratio(1e-300), None);
        assert_eq!(ratio_rounded_up(1, 2), 0.5);
        assert_eq!(ratio_rounded_up(7, 7), 1.0);
        assert_eq!(ratio_rounded_up(1, 3), (1.0f64 / 3.0).next_up());
        assert_eq!(ratio_rounded_up(1, 10), 0.1); // the nearest f64 is above 1/10 already
        assert_eq!(ratio_rounded_up(1, 1 << 63), 2f64.powi(-63));
        // Many digits or huge K: normalised powers, still summing to 1.
        for (q, k) in [(0.123_456_789_123, 8), (0.8, 200), (1e-300, 3)] {
            assert!(exact_geometric_fractions(q, k).is_none());
            let f = geometric_fractions(q, k).unwrap();
            assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn fast_calibration_equals_naive_on_random_inputs_with_ties() {
        let mut st = 12345u64;
        for trial in 0..400 {
            let k = 1 + (rng(&mut st) % 6) as usize;
            let n = 1 + (rng(&mut st) % 60) as usize;
            let levels = 1 + rng(&mut st) % 8; // few distinct values: many ties
            let scores: Vec<f32> = (0..k * n)
                .map(|_| (rng(&mut st) % levels) as f32 / levels as f32)
                .collect();
            let q = [0.01, 0.3, 1.0, 1.7, 20.0][trial % 5];
            let f = if trial % 2 == 0 {
                geometric_fractions(q, k).unwrap()
            } else {
                per_stage_fractions(q.min(1.0), k).unwrap()
            };
            for sf in [Shortfall::Reference, Shortfall::ExitAll] {
                let fast = calibrate(&scores, k, n, &f, sf).unwrap();
                let slow = calibrate_naive(&scores, k, n, &f, sf);
                assert_eq!(fast, slow, "trial {trial} k={k} n={n} {sf:?}");
            }
        }
    }

    /// MSDNet-PyTorch's `dynamic_eval_find_threshold` line by line: walk exit k's
    /// descending order counting samples not yet exited; the threshold is the score of
    /// the `n_k`-th, and stays `+inf` (the authors' `1e8`) if the count never gets there.
    fn authors_loop(scores: &[f32], k: usize, n: usize, fractions: &[f64]) -> Vec<f64> {
        let mut filtered = vec![false; n];
        let mut t = vec![f64::INFINITY; k];
        for e in 0..k - 1 {
            let row = &scores[e * n..(e + 1) * n];
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
            let out_n = (n as f64 * fractions[e]).floor() as usize;
            let mut count = 0;
            for &i in &order {
                if !filtered[i] {
                    count += 1;
                    if count == out_n {
                        t[e] = row[i] as f64;
                        break;
                    }
                }
            }
            for i in 0..n {
                filtered[i] |= row[i] as f64 >= t[e];
            }
        }
        t[k - 1] = f64::NEG_INFINITY;
        t
    }

    #[test]
    fn tie_heavy_scores_follow_the_authors_loop() {
        // Exit 0 has n_0 = 1, but three samples tie at 0.9 and all leave; exit 1 then
        // finds one sample for its quota of 2: nobody exits there.
        let s = [
            0.9f32, 0.9, 0.9, 0.1, /* exit 1 */ 0.2, 0.3, 0.4, 0.7, /* last */ 0.0, 0.0,
            0.0, 0.0,
        ];
        let f = [0.25, 0.5, 0.25];
        let want = vec![0.9f32 as f64, f64::INFINITY, f64::NEG_INFINITY];
        assert_eq!(authors_loop(&s, 3, 4, &f), want);
        assert_eq!(calibrate(&s, 3, 4, &f, Shortfall::Reference).unwrap(), want);
        assert_eq!(Shortfall::parse("reference").unwrap(), Shortfall::default());
        // The other rule: the lowest remaining score, everybody left exits.
        let exit_all = calibrate(&s, 3, 4, &f, Shortfall::ExitAll).unwrap();
        assert_eq!(
            exit_all,
            vec![0.9f32 as f64, 0.7f32 as f64, f64::NEG_INFINITY]
        );
        // Saturated max softmax: a third to two thirds of every exit's scores are 1.0.
        let mut st = 2024u64;
        let mut shortfalls = 0;
        for trial in 0..40 {
            let (k, n) = (2 + trial % 5, 50 + 37 * trial);
            let scores: Vec<f32> = (0..k * n)
                .map(|r| {
                    let x = (rng(&mut st) % 1000) as f32 / 1000.0;
                    if x < 0.33 + 0.33 * (r / n) as f32 / k as f32 {
                        1.0
                    } else {
                        x
                    }
                })
                .collect();
            let qs: Vec<Vec<usize>> = (1..40)
                .map(|p| quotas(n, &geometric_fractions(p as f64 / 20.0, k).unwrap()))
                .collect();
            let sorted = SortedExits::new(&scores, k, n, qs.len()).unwrap();
            let got = sorted.calibrate_many(&qs, Shortfall::Reference).unwrap();
            let got_all = sorted.calibrate_many(&qs, Shortfall::ExitAll).unwrap();
            for p in 1..40 {
                let f = geometric_fractions(p as f64 / 20.0, k).unwrap();
                let want = authors_loop(&scores, k, n, &f);
                shortfalls += want
                    .iter()
                    .zip(&quotas(n, &f))
                    .filter(|(t, &q)| **t == f64::INFINITY && q > 0)
                    .count();
                assert_eq!(got[p - 1], want, "trial {trial} p {p}");
                assert_eq!(
                    got_all[p - 1],
                    calibrate_naive(&scores, k, n, &f, Shortfall::ExitAll),
                    "trial {trial} p {p}"
                );
            }
        }
        assert!(
            shortfalls > 100,
            "the shortfall branch arose only {shortfalls} times"
        );
    }

    #[test]
    fn edge_cases() {
        let r = Shortfall::Reference;
        // K = 1: only -inf.
        assert_eq!(
            calibrate(&[0.3, 0.1], 1, 2, &[1.0], r).unwrap(),
            vec![f64::NEG_INFINITY]
        );
        // N = 1, tiny q: first exit takes nothing.
        assert_eq!(
            calibrate(&[0.3, 0.1], 2, 1, &[0.5, 0.5], r).unwrap(),
            vec![f64::INFINITY, f64::NEG_INFINITY]
        );
        // All equal scores: the first non-empty quota takes everybody, under both rules
        // (a later exit with nobody left gets +inf).
        let s = vec![0.5f32; 3 * 10];
        for sf in [Shortfall::Reference, Shortfall::ExitAll] {
            let t = calibrate(&s, 3, 10, &[0.2, 0.3, 0.5], sf).unwrap();
            assert_eq!(t, vec![0.5, f64::INFINITY, f64::NEG_INFINITY]);
        }
        // Quota exactly what is left: the lowest remaining score, under both rules.
        let s = [
            0.9f32, 0.9, 0.1, 0.1, /* exit 1 */ 0.2, 0.3, 0.4, 0.7, /* last */ 0.0, 0.0,
            0.0, 0.0,
        ];
        for sf in [Shortfall::Reference, Shortfall::ExitAll] {
            assert_eq!(
                calibrate(&s, 3, 4, &[0.5, 0.5, 0.0], sf).unwrap(),
                vec![0.9f32 as f64, 0.4f32 as f64, f64::NEG_INFINITY]
            );
        }
        assert!(calibrate(&[f32::NAN, 0.0], 2, 1, &[0.5, 0.5], r)
            .unwrap_err()
            .message
            .contains("exit k=0, sample i=0"));
        assert!(calibrate(&[0.0, f32::INFINITY], 1, 2, &[1.0], r)
            .unwrap_err()
            .message
            .contains("sample i=1"));
        assert!(Shortfall::parse("all")
            .unwrap_err()
            .message
            .contains("'reference' or 'exit_all'"));
    }

    #[test]
    fn out_of_memory_message_names_the_need() {
        let (per, runs) = sort_runs(8);
        assert!(per * runs >= 6 && runs >= 1);
        let n = 200_000_000usize;
        let sort = 8 * n as u128 * runs as u128 + 4 * n as u128;
        assert_eq!(working_bytes(8, n, 1), 8 * 7 * n as u128 + sort);
        assert_eq!(
            working_bytes(8, n, 1000),
            8 * 7 * n as u128 + 4000 * n as u128
        );
        assert_eq!(working_bytes(1, n, 4), 0);
        let e = out_of_memory(8, n, 1);
        assert_eq!(e.kind, crate::error::ErrorKind::OutOfMemory);
        assert!(e.message.starts_with("calibration needs "), "{e}");
        assert!(
            e.message.ends_with(
                " GB of working memory for 1,600,000,000 scores; it could not be allocated"
            ),
            "{e}"
        );
        assert_eq!(concurrent_walks(1), 1);
        assert!(concurrent_walks(39) <= rayon::current_num_threads().max(1));
    }
}
