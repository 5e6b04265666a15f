//! Per-exit confidence scores and predictions from logits, `(K, N, C)` -> `(K, N)`.
//!
//! One pass per row (exit k, sample i) over the `C` logits: max / argmax / finiteness,
//! then a fused `exp` sum. Rows are processed in parallel; the logits are only read
//! (no copy), whatever their strides: a row that is not contiguous is gathered into
//! a `C`-sized buffer.

use crate::error::{thousands, Error, Result};
use crate::fastmath::{exp_nonpos, f16_bits_to_f32, EXP_LOWEST};
use crate::hugebuf::try_zeroed_vec;
use crate::simd::{Avx2Fma, Portable};
use ndarray::{ArrayView3, Axis};
use rayon::prelude::*;

/// The confidence measure computed from each exit's softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Largest softmax probability.
    MaxSoftmax,
    /// Largest minus second-largest softmax probability.
    Margin,
    /// `1 + sum_c p_c ln p_c / ln C` (1 = one-hot, 0 = uniform).
    Entropy,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "max_softmax" => Ok(Kind::MaxSoftmax),
            "margin" => Ok(Kind::Margin),
            "entropy" => Ok(Kind::Entropy),
            _ => Err(Error::new(format!(
                "kind must be one of 'max_softmax', 'margin', 'entropy'; received {s:?}"
            ))),
        }
    }
}

/// Logit element types: `f32`, `f64`, and IEEE half precision given as its `u16` bits.
pub trait Logit: Copy + Send + Sync + 'static {
    /// Prepares one row for the `f32` kernel. Returns the `f32` values to score (either
    /// `row` itself for `f32` or `buf`), and for `f64` the already known (max, argmax).
    /// `Err(j)` when element `j` is not finite.
    fn prepare<'a>(row: &'a [Self], buf: &'a mut Vec<f32>) -> PreparedRow<'a>;
}

pub enum PreparedRow<'a> {
    /// Values to score; max/argmax still to be found.
    Raw(&'a [f32]),
    /// Values already shifted by the row max (so max is 0 at `argmax`).
    Shifted(&'a [f32], usize),
    /// Element `j` is NaN or infinite.
    NonFinite(usize),
}

impl Logit for f32 {
    #[inline(always)]
    fn prepare<'a>(row: &'a [f32], _buf: &'a mut Vec<f32>) -> PreparedRow<'a> {
        PreparedRow::Raw(row)
    }
}

impl Logit for u16 {
    #[inline(always)]
    fn prepare<'a>(row: &'a [u16], buf: &'a mut Vec<f32>) -> PreparedRow<'a> {
        buf.clear();
        buf.extend(row.iter().map(|&h| f16_bits_to_f32(h)));
        PreparedRow::Raw(buf)
    }
}

impl Logit for f64 {
    #[inline(always)]
    fn prepare<'a>(row: &'a [f64], buf: &'a mut Vec<f32>) -> PreparedRow<'a> {
        // Shift by the max in f64 so that huge f64 logits (beyond f32 range) stay safe;
        // the differences only matter down to about -104 after scaling.
        let mut m = f64::NEG_INFINITY;
        let mut z = 0.0f64;
        for &x in row {
            m = if x > m { x } else { m };
            z += x * 0.0; // NaN iff some x is NaN or infinite
        }
        if z.is_nan() {
            return PreparedRow::NonFinite(row.iter().position(|x| !x.is_finite()).unwrap_or(0));
        }
        let a = row.iter().position(|&x| x == m).unwrap_or(0);
        buf.clear();
        buf.extend(row.iter().map(|&x| {
            let d = x - m;
            (if d < -1e30 { -1e30 } else { d }) as f32
        }));
        PreparedRow::Shifted(buf, a)
    }
}

const LANES: usize = 16;

/// Lane-parallel max and min. With the exp sum this finds every non-finite value:
/// NaN or +inf make the sum NaN, -inf shows as the min.
#[inline(always)]
fn max_min(row: &[f32]) -> (f32, f32) {
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut lo = [f32::INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
            lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
        }
    }
    let (mut h, mut m) = (f32::NEG_INFINITY, f32::INFINITY);
    for &x in chunks.remainder() {
        h = if x > h { x } else { h };
        m = if x < m { x } else { m };
    }
    for l in 0..LANES {
        h = if hi[l] > h { hi[l] } else { h };
        m = if lo[l] < m { lo[l] } else { m };
    }
    (h, m)
}

/// [`max_min`] with explicit AVX intrinsics (LLVM turns the portable loop into
/// blends). NaN may come out as the max, which is fine: the row is then reported.
///
/// # Safety
/// The CPU must support AVX2 and FMA (see [`Avx2Fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn max_min_avx2(row: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let mut hi0 = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut hi1 = hi0;
    let mut lo0 = _mm256_set1_ps(f32::INFINITY);
    let mut lo1 = lo0;
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        let a = _mm256_loadu_ps(c.as_ptr());
        let b = _mm256_loadu_ps(c.as_ptr().add(8));
        hi0 = _mm256_max_ps(hi0, a);
        hi1 = _mm256_max_ps(hi1, b);
        lo0 = _mm256_min_ps(lo0, a);
        lo1 = _mm256_min_ps(lo1, b);
    }
    let mut h = [0f32; 8];
    let mut l = [0f32; 8];
    _mm256_storeu_ps(h.as_mut_ptr(), _mm256_max_ps(hi0, hi1));
    _mm256_storeu_ps(l.as_mut_ptr(), _mm256_min_ps(lo0, lo1));
    let (mut mh, mut ml) = (f32::NEG_INFINITY, f32::INFINITY);
    for &x in chunks.remainder().iter().chain(h.iter()) {
        mh = if x > mh || x.is_nan() { x } else { mh };
    }
    for &x in chunks.remainder().iter().chain(l.iter()) {
        ml = if x < ml { x } else { ml };
    }
    (mh, ml)
}

/// First index of `m` in `row` (numpy's argmax convention); vectorised chunk test.
#[inline(always)]
fn first_index_of(row: &[f32], m: f32) -> usize {
    let mut chunks = row.chunks_exact(LANES);
    let mut base = 0;
    for c in &mut chunks {
        let mut hit = false;
        for &x in c {
            hit |= x == m;
        }
        if hit {
            return base + c.iter().position(|&x| x == m).unwrap_or(0);
        }
        base += LANES;
    }
    base + chunks.remainder().iter().position(|&x| x == m).unwrap_or(0)
}

/// [`first_index_of`] with AVX compares, 32 values per step.
///
/// # Safety
/// The CPU must support AVX2 and FMA (see [`Avx2Fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn first_index_of_avx2(row: &[f32], m: f32) -> usize {
    use std::arch::x86_64::*;
    let vm = _mm256_set1_ps(m);
    let p = row.as_ptr();
    let mut i = 0;
    while i + 32 <= row.len() {
        let a = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(i)), vm);
        let b = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(i + 8)), vm);
        let c = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(i + 16)), vm);
        let d = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(i + 24)), vm);
        let any = _mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c, d));
        if _mm256_movemask_ps(any) != 0 {
            let bits = (_mm256_movemask_ps(a) as u32)
                | (_mm256_movemask_ps(b) as u32) << 8
                | (_mm256_movemask_ps(c) as u32) << 16
                | (_mm256_movemask_ps(d) as u32) << 24;
            return i + bits.trailing_zeros() as usize;
        }
        i += 32;
    }
    i + first_index_of(&row[i..], m)
}

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut mm = f32::NEG_INFINITY;
    for &x in chunks.remainder().iter().chain(m.iter()) {
        mm = if x > mm { x } else { mm };
    }
    mm
}

/// Clamped scaled difference: below `EXP_LOWEST` the softmax terms are negligible
/// (see [`EXP_LOWEST`]); the clamp also keeps `e * d` finite for the entropy.
/// NaN passes through (so it reaches the sum and is reported).
#[inline(always)]
fn scaled(x: f32, m: f32, inv_t: f32) -> f32 {
    let d = (x - m) * inv_t;
    if d < EXP_LOWEST {
        EXP_LOWEST
    } else {
        d
    }
}

/// `(sum_c e_c, sum_c e_c d_c)` with `e_c = exp(d_c)`, `d_c` the scaled difference.
///
/// float32 lane accumulators (vectorised) are flushed into float64 every
/// `LANES * FLUSH` elements, so the rounding error stays ~1e-7 relative even for
/// 1000s of classes of similar size. The `e*d` sum is only formed when `ENT`.
/// Unfused multiply-adds: without FMA hardware `mul_add` is a slow libm call.
#[inline(always)]
fn sum_exp<const ENT: bool>(row: &[f32], m: f32, inv_t: f32) -> (f64, f64) {
    const FLUSH: usize = 8;
    let mut s64 = [0.0f64; LANES];
    let mut w64 = [0.0f64; LANES];
    let mut chunks = row.chunks_exact(LANES);
    // Whole blocks of FLUSH chunks, then the leftover chunks (also vectorised).
    let n_chunks = row.len() / LANES;
    let mut done = 0;
    while done < n_chunks {
        let take = FLUSH.min(n_chunks - done);
        let mut s = [0.0f32; LANES];
        let mut w = [0.0f32; LANES];
        for c in chunks.by_ref().take(take) {
            for l in 0..LANES {
                let d = scaled(c[l], m, inv_t);
                let e = exp_nonpos::<false>(d);
                s[l] += e;
                if ENT {
                    w[l] += e * d;
                }
            }
        }
        for l in 0..LANES {
            s64[l] += s[l] as f64;
            if ENT {
                w64[l] += w[l] as f64;
            }
        }
        done += take;
    }
    let blocks = chunks;
    let (mut sum, mut wsum) = (0.0f64, 0.0f64);
    for &x in blocks.remainder() {
        let d = scaled(x, m, inv_t);
        let e = exp_nonpos::<false>(d);
        sum += e as f64;
        if ENT {
            wsum += (e * d) as f64;
        }
    }
    sum += s64.iter().sum::<f64>();
    wsum += w64.iter().sum::<f64>();
    (sum, wsum)
}

/// The per-row kernels of [`score_rows`]: [`Portable`], or AVX2+FMA intrinsics
/// behind an [`Avx2Fma`] token (so they run only where the CPU has them).
trait RowKernels: Copy {
    /// `exp(d)` for `d <= 0` (see [`exp_nonpos`]): multiply-adds fused with FMA
    /// hardware, unfused without it (where `mul_add` would be a slow libm call).
    fn exp_nonpos(self, d: f32) -> f32;
    /// Row max and min (see [`max_min`]).
    fn max_min(self, row: &[f32]) -> (f32, f32);
    /// First index of `m` in `row` (see [`first_index_of`]).
    fn first_index_of(self, row: &[f32], m: f32) -> usize;
    /// `(sum_c e_c, sum_c e_c d_c)` (see [`sum_exp`]).
    fn sum_exp<const ENT: bool>(self, row: &[f32], m: f32, inv_t: f32) -> (f64, f64);
}

impl RowKernels for Portable {
    #[inline(always)]
    fn exp_nonpos(self, d: f32) -> f32 {
        exp_nonpos::<false>(d)
    }

    #[inline(always)]
    fn max_min(self, row: &[f32]) -> (f32, f32) {
        max_min(row)
    }

    #[inline(always)]
    fn first_index_of(self, row: &[f32], m: f32) -> usize {
        first_index_of(row, m)
    }

    #[inline(always)]
    fn sum_exp<const ENT: bool>(self, row: &[f32], m: f32, inv_t: f32) -> (f64, f64) {
        sum_exp::<ENT>(row, m, inv_t)
    }
}

#[cfg(target_arch = "x86_64")]
impl RowKernels for Avx2Fma {
    #[inline(always)]
    fn exp_nonpos(self, d: f32) -> f32 {
        exp_nonpos::<true>(d)
    }

    #[inline(always)]
    fn max_min(self, row: &[f32]) -> (f32, f32) {
        // SAFETY: an `Avx2Fma` exists only where AVX2 and FMA were detected.
        unsafe { max_min_avx2(row) }
    }

    #[inline(always)]
    fn first_index_of(self, row: &[f32], m: f32) -> usize {
        // SAFETY: an `Avx2Fma` exists only where AVX2 and FMA were detected.
        unsafe { first_index_of_avx2(row, m) }
    }

    #[inline(always)]
    fn sum_exp<const ENT: bool>(self, row: &[f32], m: f32, inv_t: f32) -> (f64, f64) {
        // SAFETY: an `Avx2Fma` exists only where AVX2 and FMA were detected.
        unsafe {
            if inv_t == 1.0 {
                sum_exp_avx2::<ENT, false>(row, m, inv_t)
            } else {
                sum_exp_avx2::<ENT, true>(row, m, inv_t)
            }
        }
    }
}

/// How many rows ahead [`sum_exp_avx2`] prefetches.
#[cfg(target_arch = "x86_64")]
const PF_ROWS: usize = 2;

/// [`sum_exp`] with explicit AVX2+FMA intrinsics: 32 values per step in four
/// independent accumulators (LLVM spilled the portable 16-lane version), the
/// constants hoisted, `2^n` applied by an integer add to the exponent field
/// instead of a multiply, and no multiply at all when `SCALE` is false
/// (temperature 1, `d = x - m` exactly as the scaled form). Same polynomial and
/// the same flush into float64 every 8 terms per lane as [`sum_exp`].
///
/// # Safety
/// The CPU must support AVX2 and FMA (see [`Avx2Fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2<const ENT: bool, const SCALE: bool>(
    row: &[f32],
    m: f32,
    inv_t: f32,
) -> (f64, f64) {
    use std::arch::x86_64::*;
    let vm = _mm256_set1_ps(m);
    let vt = _mm256_set1_ps(inv_t);
    let lowest = _mm256_set1_ps(EXP_LOWEST);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let magic = _mm256_set1_ps(12_582_912.0);
    let ln2_hi = _mm256_set1_ps(-355.0 / 512.0);
    let ln2_lo = _mm256_set1_ps(2.121_944_4e-4);
    let c5 = _mm256_set1_ps(8.290_315e-3);
    let c4 = _mm256_set1_ps(4.189_793e-2);
    let c3 = _mm256_set1_ps(1.666_763_6e-1);
    let c2 = _mm256_set1_ps(4.999_915e-1);
    let c1 = _mm256_set1_ps(9.999_997e-1);
    let one = _mm256_set1_ps(1.0);
    // (exp(d), d) for 8 values; NaN in d passes the clamp (max_ps returns its
    // second operand when either is NaN) and reaches the sum.
    let exp8 = |x: __m256| -> (__m256, __m256) {
        let mut d = _mm256_sub_ps(x, vm);
        if SCALE {
            d = _mm256_mul_ps(d, vt);
        }
        let d = _mm256_max_ps(lowest, d);
        let t = _mm256_fmadd_ps(d, log2e, magic);
        let nf = _mm256_sub_ps(t, magic);
        let r = _mm256_fmadd_ps(nf, ln2_hi, d);
        let r = _mm256_fmadd_ps(nf, ln2_lo, r);
        let mut p = _mm256_fmadd_ps(c5, r, c4);
        p = _mm256_fmadd_ps(p, r, c3);
        p = _mm256_fmadd_ps(p, r, c2);
        p = _mm256_fmadd_ps(p, r, c1);
        p = _mm256_fmadd_ps(p, r, one);
        // Low bits of t hold n in [-126, 0]: add n to p's exponent. A result below
        // f32::MIN_POSITIVE (only at the clamp) is off, but < 1.2e-38 next to a sum >= 1.
        let e = _mm256_castsi256_ps(_mm256_add_epi32(
            _mm256_castps_si256(p),
            _mm256_slli_epi32(_mm256_castps_si256(t), 23),
        ));
        (e, d)
    };
    let zero = _mm256_setzero_ps();
    let (mut s64a, mut s64b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let (mut w64a, mut w64b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let flush = |acc: __m256, a: &mut __m256d, b: &mut __m256d| {
        *a = _mm256_add_pd(*a, _mm256_cvtps_pd(_mm256_castps256_ps128(acc)));
        *b = _mm256_add_pd(*b, _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1)));
    };
    let ptr = row.as_ptr();
    let len = row.len();
    let mut i = 0;
    while i + 32 <= len {
        // Up to 8 steps (8 terms per lane) in float32, then into float64.
        let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
        let (mut w0, mut w1, mut w2, mut w3) = (zero, zero, zero, zero);
        let mut steps = 0;
        while steps < 8 && i + 32 <= len {
            // Rows of a C-contiguous dump follow each other: fetch the same part of
            // the next row, so its max pass reads from cache rather than DRAM.
            // (A hint: never faults; wrapping_add keeps the pointer arithmetic defined.)
            _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(len * PF_ROWS + i) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(len * PF_ROWS + i + 16) as *const i8);
            let (e0, d0) = exp8(_mm256_loadu_ps(ptr.add(i)));
            let (e1, d1) = exp8(_mm256_loadu_ps(ptr.add(i + 8)));
            let (e2, d2) = exp8(_mm256_loadu_ps(ptr.add(i + 16)));
            let (e3, d3) = exp8(_mm256_loadu_ps(ptr.add(i + 24)));
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
            s2 = _mm256_add_ps(s2, e2);
            s3 = _mm256_add_ps(s3, e3);
            if ENT {
                w0 = _mm256_fmadd_ps(e0, d0, w0);
                w1 = _mm256_fmadd_ps(e1, d1, w1);
                w2 = _mm256_fmadd_ps(e2, d2, w2);
                w3 = _mm256_fmadd_ps(e3, d3, w3);
            }
            i += 32;
            steps += 1;
        }
        flush(_mm256_add_ps(s0, s1), &mut s64a, &mut s64b);
        flush(_mm256_add_ps(s2, s3), &mut s64a, &mut s64b);
        if ENT {
            flush(_mm256_add_ps(w0, w1), &mut w64a, &mut w64b);
            flush(_mm256_add_ps(w2, w3), &mut w64a, &mut w64b);
        }
    }
    while i + 8 <= len {
        let (e, d) = exp8(_mm256_loadu_ps(ptr.add(i)));
        flush(e, &mut s64a, &mut s64b);
        if ENT {
            flush(_mm256_mul_ps(e, d), &mut w64a, &mut w64b);
        }
        i += 8;
    }
    let mut s = [0f64; 4];
    let mut w = [0f64; 4];
    _mm256_storeu_pd(s.as_mut_ptr(), _mm256_add_pd(s64a, s64b));
    _mm256_storeu_pd(w.as_mut_ptr(), _mm256_add_pd(w64a, w64b));
    let (mut sum, mut wsum) = (s.iter().sum::<f64>(), w.iter().sum::<f64>());
    for &x in &row[i..] {
        let d = scaled(x, m, inv_t);
        let e = exp_nonpos::<true>(d);
        sum += e as f64;
        if ENT {
            wsum += (e * d) as f64;
        }
    }
    (sum, wsum)
}

/// Scores one row of finite values with known max `m` at `a`.
#[inline(always)]
fn finish_row<K: RowKernels>(
    kernels: K,
    row: &[f32],
    m: f32,
    a: usize,
    inv_t: f32,
    kind: Kind,
) -> f32 {
    match kind {
        Kind::MaxSoftmax => {
            let (sum, _) = kernels.sum_exp::<false>(row, m, inv_t);
            (1.0 / sum) as f32
        }
        Kind::Margin => {
            let (sum, _) = kernels.sum_exp::<false>(row, m, inv_t);
            let m2 = max_of(&row[..a]).max(max_of(&row[a + 1..]));
            let e2 = kernels.exp_nonpos(scaled(m2, m, inv_t)) as f64;
            ((1.0 - e2) / sum) as f32
        }
        Kind::Entropy => {
            let (sum, wsum) = kernels.sum_exp::<true>(row, m, inv_t);
            // sum_c p ln p = (sum_c e_c d_c) / S - ln S, with p_c = e_c / S, ln p_c = d_c - ln S.
            let plogp = wsum / sum - sum.ln();
            let v = 1.0 + plogp / (row.len() as f64).ln();
            // Rounding can leave it a hair outside [0, 1].
            v.clamp(0.0, 1.0) as f32
        }
    }
}

/// Where a non-finite logit was found: (exit, sample, class).
type BadAt = (usize, usize, usize);

/// Scores the rows `first_row..` (flat over (exit, sample)) into `scores`/`preds` with
/// the given kernels; the first row with a non-finite logit stops it.
#[inline(always)]
fn score_rows<T: Logit, K: RowKernels>(
    kernels: K,
    logits: &ArrayView3<T>,
    first_row: usize,
    scores: &mut [f32],
    preds: &mut [i32],
    inv_t: &[f32],
    kind: Kind,
) -> Option<BadAt> {
    let n = logits.shape()[1];
    let c = logits.shape()[2];
    let mut gather: Vec<T> = Vec::new();
    let mut buf: Vec<f32> = Vec::with_capacity(c);
    for (j, (sc, pr)) in scores.iter_mut().zip(preds.iter_mut()).enumerate() {
        let r = first_row + j;
        let (k, i) = (r / n, r % n);
        let lane = logits.index_axis(Axis(0), k).index_axis_move(Axis(0), i);
        let row: &[T] = match lane.to_slice() {
            Some(s) => s,
            None => {
                gather.clear();
                gather.extend(lane.iter().copied());
                &gather
            }
        };
        let (vals, m, a, lowest) = match T::prepare(row, &mut buf) {
            PreparedRow::NonFinite(j) => return Some((k, i, j)),
            PreparedRow::Shifted(v, a) => (v, 0.0f32, a, 0.0f32),
            PreparedRow::Raw(v) => {
                let (m, lowest) = kernels.max_min(v);
                // `min` keeps an all-NaN row in range; such a row is reported below.
                let a = kernels.first_index_of(v, m).min(v.len() - 1);
                (v, m, a, lowest)
            }
        };
        let score = finish_row(kernels, vals, m, a, inv_t[k], kind);
        if !score.is_finite() || lowest == f32::NEG_INFINITY {
            let j = vals.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Some((k, i, j));
        }
        *sc = score;
        *pr = a as i32;
    }
    None
}

/// [`score_rows`] with the AVX2+FMA kernels, compiled for those features: the row
/// loop lives here so that the `#[target_feature]` kernels inline into it.
///
/// # Safety
/// The CPU must support AVX2 and FMA (`simd` proves it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_rows_avx2<T: Logit>(
    simd: Avx2Fma,
    logits: &ArrayView3<T>,
    first_row: usize,
    scores: &mut [f32],
    preds: &mut [i32],
    inv_t: &[f32],
    kind: Kind,
) -> Option<BadAt> {
    score_rows(simd, logits, first_row, scores, preds, inv_t, kind)
}

/// Which kernel [`exit_scores`] runs on this CPU: `"avx2+fma"` (explicit intrinsics,
/// chosen at run time) or `"portable"` (auto-vectorised for the compile-time target).
pub fn simd_path() -> &'static str {
    match Avx2Fma::detect() {
        Some(_) => "avx2+fma",
        None => "portable",
    }
}

/// [`score_rows`] on the AVX2+FMA kernels when `simd` is given, else the portable ones.
fn score_rows_dispatch<T: Logit>(
    simd: Option<Avx2Fma>,
    logits: &ArrayView3<T>,
    first_row: usize,
    scores: &mut [f32],
    preds: &mut [i32],
    inv_t: &[f32],
    kind: Kind,
) -> Option<BadAt> {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = simd {
        // SAFETY: `simd` proves the CPU supports AVX2 and FMA.
        return unsafe { score_rows_avx2(simd, logits, first_row, scores, preds, inv_t, kind) };
    }
    // No SIMD kernels on other architectures: always the portable path.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    score_rows(Portable, logits, first_row, scores, preds, inv_t, kind)
}

/// Validates per-exit temperatures and returns their reciprocals as `f32`.
pub fn inverse_temperatures(temperatures: &[f64], num_exits: usize) -> Result<Vec<f32>> {
    let t: Vec<f64> = match temperatures.len() {
        1 => vec![temperatures[0]; num_exits],
        len if len == num_exits => temperatures.to_vec(),
        len => {
            return Err(Error::new(format!(
                "temperature must be a scalar or a sequence of K={num_exits} values (one per exit); received {len} values"
            )))
        }
    };
    t.iter()
        .enumerate()
        .map(|(k, &tk)| {
            let inv = (1.0 / tk) as f32;
            if tk.is_nan() || tk <= 0.0 || !tk.is_finite() || !inv.is_finite() || inv == 0.0 {
                Err(Error::new(format!(
                    "temperature must be positive and finite (between about 3e-39 and 3e38); received {tk} for exit {k}"
                )))
            } else {
                Ok(inv)
            }
        })
        .collect()
}

/// Confidence scores `(K*N,)` and argmax predictions `(K*N,)`, row-major over (exit, sample).
///
/// `inv_t` holds one reciprocal temperature per exit (see [`inverse_temperatures`]).
/// Errors on empty input, fewer than 2 classes, or a NaN/inf logit (reporting where),
/// and if the outputs cannot be allocated (an out-of-memory error, not an abort).
/// Runs the AVX2+FMA kernels where the CPU has them (see [`simd_path`]).
pub fn exit_scores<T: Logit>(
    logits: ArrayView3<T>,
    kind: Kind,
    inv_t: &[f32],
) -> Result<(Vec<f32>, Vec<i32>)> {
    exit_scores_on(Avx2Fma::detect(), logits, kind, inv_t)
}

/// [`exit_scores`] on the AVX2+FMA kernels when `simd` is given, else on the portable
/// ones (a test passes `None` to check the portable path on an AVX2 machine).
pub fn exit_scores_on<T: Logit>(
    simd: Option<Avx2Fma>,
    logits: ArrayView3<T>,
    kind: Kind,
    inv_t: &[f32],
) -> Result<(Vec<f32>, Vec<i32>)> {
    let (k, n, c) = logits.dim();
    if k == 0 || n == 0 {
        return Err(Error::new(format!(
            "logits must have at least one exit and one sample; received shape ({k}, {n}, {c})"
        )));
    }
    if c < 2 {
        return Err(Error::new(format!(
            "logits must have at least 2 classes (axis 2); received shape ({k}, {n}, {c})"
        )));
    }
    if c > i32::MAX as usize {
        return Err(Error::new(format!(
            "logits has too many classes for int32 predictions: {c}"
        )));
    }
    if inv_t.len() != k {
        return Err(Error::new(format!(
            "expected {k} inverse temperatures, one per exit; received {}",
            inv_t.len()
        )));
    }
    let rows = k * n;
    let oom = |_| {
        let bytes =
            rows as u128 * (std::mem::size_of::<f32>() + std::mem::size_of::<i32>()) as u128;
        Error::out_of_memory(
            "exit_scores",
            bytes,
            &format!("for {} scores and predictions", thousands(rows as u128)),
        )
    };
    let mut scores: Vec<f32> = try_zeroed_vec(rows).map_err(oom)?;
    let mut preds: Vec<i32> = try_zeroed_vec(rows).map_err(oom)?;
    // About 1 MiB of logits per task: amortises scheduling, still thousands of tasks
    // for the big dumps this is meant for.
    let chunk = ((1 << 20) / (c * std::mem::size_of::<T>())).clamp(1, 4096);
    let bad = scores
        .par_chunks_mut(chunk)
        .zip(preds.par_chunks_mut(chunk))
        .enumerate()
        .filter_map(|(ci, (sc, pr))| {
            score_rows_dispatch(simd, &logits, ci * chunk, sc, pr, inv_t, kind)
        })
        .min();
    if let Some((bk, bi, bc)) = bad {
        return Err(Error::new(format!(
            "logits must be finite; found NaN or inf at exit k={bk}, sample i={bi}, class c={bc}"
        )));
    }
    Ok((scores, preds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, ShapeBuilder};

    fn reference(row: &[f64], inv_t: f64, kind: Kind) -> (f64, usize) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let a = row.iter().position(|&x| x == m).unwrap();
        let e: Vec<f64> = row.iter().map(|&x| ((x - m) * inv_t).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let v = match kind {
            Kind::MaxSoftmax => p[a],
            Kind::Margin => {
                let mut q = p.clone();
                q.sort_by(|x, y| y.partial_cmp(x).unwrap());
                q[0] - q[1]
            }
            Kind::Entropy => {
                let h: f64 = p.iter().filter(|&&v| v > 0.0).map(|v| v * v.ln()).sum();
                1.0 + h / (row.len() as f64).ln()
            }
        };
        (v, a)
    }

    fn lcg(state: &mut u64) -> f64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 11) as f64) / ((1u64 << 53) as f64)
    }

    #[test]
    fn matches_f64_reference_all_kinds_and_layouts() {
        let (k, n, c) = (3, 17, 37);
        let mut st = 7u64;
        let data: Vec<f64> = (0..k * n * c)
            .map(|_| (lcg(&mut st) - 0.5) * 12.0)
            .collect();
        let a64 = Array3::from_shape_vec((k, n, c), data.clone()).unwrap();
        let a32 = a64.mapv(|x| x as f32);
        // Same values, Fortran order: every row is strided.
        let mut f32f = Array3::<f32>::zeros((k, n, c).f());
        f32f.assign(&a32);
        for kind in [Kind::MaxSoftmax, Kind::Margin, Kind::Entropy] {
            let inv = [1.0f32, 0.5, 2.0];
            let (s32, p32) = exit_scores(a32.view(), kind, &inv).unwrap();
            let (s64, p64) = exit_scores(a64.view(), kind, &inv).unwrap();
            let (sf, pf) = exit_scores(f32f.view(), kind, &inv).unwrap();
            assert_eq!(s32, sf);
            assert_eq!(p32, pf);
            for r in 0..k * n {
                let row: Vec<f64> = a32.as_slice().unwrap()[r * c..(r + 1) * c]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let (want, a) = reference(&row, inv[r / n] as f64, kind);
                assert!(
                    (s32[r] as f64 - want).abs() <= 2e-6 * want.abs().max(1e-3),
                    "{kind:?} row {r}: {} vs {want}",
                    s32[r]
                );
                assert_eq!(p32[r] as usize, a);
                let (want64, a64) = reference(&data[r * c..(r + 1) * c], inv[r / n] as f64, kind);
                assert!((s64[r] as f64 - want64).abs() <= 2e-6 * want64.abs().max(1e-3));
                assert_eq!(p64[r] as usize, a64);
            }
        }
    }

    /// Row lengths that reach every part of the AVX2 kernel (32-wide steps, the
    /// float64 flush after 8 of them, the 8-wide and scalar tails).
    #[test]
    fn all_row_lengths_match_reference_and_report_non_finite() {
        let mut st = 11u64;
        for c in [2usize, 8, 31, 40, 100, 257, 263, 1000, 1003] {
            let n = 5;
            let data: Vec<f64> = (0..n * c).map(|_| (lcg(&mut st) - 0.5) * 30.0).collect();
            let a = Array3::from_shape_vec((1, n, c), data.iter().map(|&x| x as f32).collect())
                .unwrap();
            for kind in [Kind::MaxSoftmax, Kind::Margin, Kind::Entropy] {
                for inv in [1.0f32, 0.7] {
                    let (s, p) = exit_scores(a.view(), kind, &[inv]).unwrap();
                    for i in 0..n {
                        let row: Vec<f64> = a.as_slice().unwrap()[i * c..(i + 1) * c]
                            .iter()
                            .map(|&x| x as f64)
                            .collect();
                        let (want, am) = reference(&row, inv as f64, kind);
                        // Margin and entropy are differences: absolute error ~1e-7 on top.
                        let abs = if kind == Kind::MaxSoftmax { 0.0 } else { 1e-7 };
                        assert!(
                            (s[i] as f64 - want).abs() <= 1e-6 * want.abs() + abs,
                            "{kind:?} c={c} row {i}: {} vs {want}",
                            s[i]
                        );
                        assert_eq!(p[i] as usize, am);
                    }
                }
            }
            for j in [0, c / 2, c - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut b = a.clone();
                    b[[0, 3, j]] = bad;
                    let err = exit_scores(b.view(), Kind::MaxSoftmax, &[1.0]).unwrap_err();
                    assert!(
                        err.message.contains(&format!("sample i=3, class c={j}")),
                        "c={c} j={j} {bad}: {err}"
                    );
                }
            }
        }
    }

    /// The portable kernels (forced on this machine) against the AVX2+FMA ones on the
    /// same random logits, every kind, dtype, temperature and the row lengths that reach
    /// each part of the AVX2 kernel. Predictions and non-finite reports are the same
    /// bit for bit (max, min and the first index of the max are exact in both). Scores
    /// are not: the AVX2 kernel fuses the `exp` polynomial's multiply-adds (the portable
    /// one rounds twice) and sums in 4 x 8 float32 lanes where the portable one uses 16,
    /// so each path is within about 2e-7 relative of the exact value (checked against
    /// float64 above) and the two within 2e-6 relative (plus 2e-7 absolute for margin
    /// and entropy, which are differences).
    #[test]
    fn portable_path_matches_avx2_path() {
        let Some(simd) = Avx2Fma::detect() else {
            eprintln!("no AVX2+FMA on this CPU: only the portable path exists");
            return;
        };
        let mut st = 5u64;
        for c in [2usize, 7, 8, 31, 32, 40, 100, 257, 263, 1000, 1003] {
            let (k, n) = (2, 9);
            let data: Vec<f64> = (0..k * n * c)
                .map(|_| (lcg(&mut st) - 0.5) * 30.0)
                .collect();
            let a64 = Array3::from_shape_vec((k, n, c), data).unwrap();
            let a32 = a64.mapv(|x| x as f32);
            let a16 = a32.mapv(f32_to_f16_bits);
            for kind in [Kind::MaxSoftmax, Kind::Margin, Kind::Entropy] {
                for inv in [[1.0f32, 1.0], [0.7, 1.3]] {
                    let pairs = [
                        (
                            exit_scores_on(None, a32.view(), kind, &inv).unwrap(),
                            exit_scores_on(Some(simd), a32.view(), kind, &inv).unwrap(),
                        ),
                        (
                            exit_scores_on(None, a64.view(), kind, &inv).unwrap(),
                            exit_scores_on(Some(simd), a64.view(), kind, &inv).unwrap(),
                        ),
                        (
                            exit_scores_on(None, a16.view(), kind, &inv).unwrap(),
                            exit_scores_on(Some(simd), a16.view(), kind, &inv).unwrap(),
                        ),
                    ];
                    for ((sp, pp), (sv, pv)) in pairs {
                        assert_eq!(pp, pv, "{kind:?} c={c}: predictions differ");
                        let abs = if kind == Kind::MaxSoftmax { 0.0 } else { 2e-7 };
                        for (r, (&x, &y)) in sp.iter().zip(&sv).enumerate() {
                            assert!(
                                (x as f64 - y as f64).abs() <= 2e-6 * (y as f64).abs() + abs,
                                "{kind:?} c={c} row {r}: portable {x} vs avx2 {y}"
                            );
                        }
                    }
                }
            }
            for j in [0, c / 2, c - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut b = a32.clone();
                    b[[1, 4, j]] = bad;
                    for kind in [Kind::MaxSoftmax, Kind::Margin, Kind::Entropy] {
                        let p = exit_scores_on(None, b.view(), kind, &[1.0, 1.0]).unwrap_err();
                        let v =
                            exit_scores_on(Some(simd), b.view(), kind, &[1.0, 1.0]).unwrap_err();
                        assert_eq!(p.message, v.message);
                    }
                }
            }
        }
    }

    /// Nearest-even IEEE binary16 bits of `x` (test data only; `x` in f16 range).
    fn f32_to_f16_bits(x: f32) -> u16 {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let a = x.abs();
        if a < 6.103_515_6e-5 {
            // Subnormal (or zero): multiples of 2^-24.
            return sign | (a * 16_777_216.0).round_ties_even() as u16;
        }
        let e = ((a.to_bits() >> 23) as i32) - 127;
        let m = a / 2f32.powi(e) - 1.0; // in [0, 1)
        let mm = (m * 1024.0).round_ties_even() as u32;
        let (e, mm) = if mm == 1024 { (e + 1, 0) } else { (e, mm) };
        sign | (((e + 15) as u16) << 10) | mm as u16
    }

    #[test]
    fn huge_and_tiny_logits_are_safe() {
        let a = Array3::from_shape_vec(
            (1, 3, 3),
            vec![1e4f32, 0.0, -1e4, -1e4, -1e4, -1e4, 3e38, -3e38, 3e38],
        )
        .unwrap();
        let (s, p) = exit_scores(a.view(), Kind::MaxSoftmax, &[1.0]).unwrap();
        assert_eq!(s[0], 1.0);
        assert!((s[1] - 1.0 / 3.0).abs() < 1e-7);
        assert!((s[2] - 0.5).abs() < 1e-7);
        assert_eq!(p, vec![0, 0, 0]);
        let (e, _) = exit_scores(a.view(), Kind::Entropy, &[1.0]).unwrap();
        assert!((e[0] - 1.0).abs() < 1e-7 && e[1].abs() < 1e-6);
        let (m, _) = exit_scores(a.view(), Kind::Margin, &[1.0]).unwrap();
        assert_eq!(m, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn reports_first_non_finite_position() {
        let mut a = Array3::<f32>::zeros((2, 4, 20));
        a[[1, 2, 17]] = f32::NAN;
        a[[1, 3, 0]] = f32::INFINITY;
        let err = exit_scores(a.view(), Kind::MaxSoftmax, &[1.0, 1.0]).unwrap_err();
        assert!(
            err.message.contains("exit k=1, sample i=2, class c=17"),
            "{err}"
        );
        let h = Array3::<u16>::from_elem((1, 2, 3), 0x3c00);
        let mut h2 = h.clone();
        h2[[0, 1, 2]] = 0xfc00;
        assert!(exit_scores(h.view(), Kind::Margin, &[1.0]).is_ok());
        assert!(exit_scores(h2.view(), Kind::Margin, &[1.0])
            .unwrap_err()
            .message
            .contains("sample i=1, class c=2"));
        let mut d = Array3::<f64>::zeros((1, 1, 3));
        d[[0, 0, 1]] = f64::NEG_INFINITY;
        assert!(exit_scores(d.view(), Kind::Entropy, &[1.0])
            .unwrap_err()
            .message
            .contains("class c=1"));
    }

    #[test]
    fn rejects_bad_shapes_and_temperatures() {
        assert!(exit_scores(
            Array3::<f32>::zeros((1, 0, 3)).view(),
            Kind::MaxSoftmax,
            &[1.0]
        )
        .is_err());
        assert!(exit_scores(
            Array3::<f32>::zeros((1, 2, 1)).view(),
            Kind::MaxSoftmax,
            &[1.0]
        )
        .is_err());
        assert!(inverse_temperatures(&[0.0], 2).is_err());
        assert!(inverse_temperatures(&[f64::NAN], 2).is_err());
        assert!(inverse_temperatures(&[1.0, 2.0, 3.0], 2).is_err());
        assert_eq!(inverse_temperatures(&[2.0], 2).unwrap(), vec![0.5, 0.5]);
        assert!(Kind::parse("softmax").is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use ndarray::Array3;
    use std::time::Instant;

    /// `cargo test --release -- --ignored --nocapture scores::timing`.
    #[test]
    #[ignore]
    fn timing_exit_scores() {
        let (k, n, c) = (5, 20_000, 1000);
        let mut st = 3u64;
        let a = Array3::from_shape_fn((k, n, c), |_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 40) as f32) / (1u64 << 24) as f32 * 8.0
        });
        let inv = vec![1.0f32; k];
        for kind in [Kind::MaxSoftmax, Kind::Margin, Kind::Entropy] {
            let t = Instant::now();
            let _ = exit_scores(a.view(), kind, &inv).unwrap();
            let dt = t.elapsed().as_secs_f64();
            println!(
                "{kind:?}: {:.1} ms, {:.2} GB/s",
                dt * 1e3,
                (k * n * c * 4) as f64 / dt / 1e9
            );
        }
        let t = Instant::now();
        let s: f32 = a.as_slice().unwrap().iter().sum();
        let dt = t.elapsed().as_secs_f64();
        println!(
            "plain sum {s}: {:.2} GB/s",
            (k * n * c * 4) as f64 / dt / 1e9
        );
    }
}
