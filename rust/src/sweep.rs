//! The budget sweep: calibrate on validation scores for every budget `q`, score the
//! thresholds on validation and test, in one call, parallel over budgets.

use crate::calibrate::{check_n, geometric_fractions, group_size, per_stage_fractions, quotas, validate_scores, SortedExits, MAX_EXITS};
use crate::error::{Error, Result};
use crate::simulate::{check_correct, score_many, validate_costs, Outcome};
use rayon::prelude::*;

/// How budgets turn into exit fractions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// [`geometric_fractions`].
    Geometric,
    /// [`per_stage_fractions`] (q in (0, 1]).
    PerStage,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "geometric" => Ok(Mode::Geometric),
            "per_stage" => Ok(Mode::PerStage),
            _ => Err(Error::new(format!("mode must be 'geometric' or 'per_stage'; received {s:?}"))),
        }
    }

    pub fn fractions(self, q: f64, k: usize) -> Result<Vec<f64>> {
        match self {
            Mode::Geometric => geometric_fractions(q, k),
            Mode::PerStage => per_stage_fractions(q, k),
        }
    }
}

/// One row per budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// `B*K` row-major.
    pub thresholds: Vec<f64>,
    pub val_accuracy: Vec<f64>,
    pub val_mean_cost: Vec<f64>,
    pub test_accuracy: Vec<f64>,
    /// Expected cost per test sample.
    pub mean_cost: Vec<f64>,
    /// Test exit counts, `B*K` row-major.
    pub exit_counts: Vec<u64>,
}

/// A data set as `(K*N scores, K*N correct flags, N)`.
pub type Set<'a> = (&'a [f32], &'a [bool], usize);

pub fn budget_sweep(k: usize, val: Set, test: Set, costs: &[f64], qs: &[f64], mode: Mode) -> Result<Sweep> {
    let (vs, vc, vn) = val;
    let (ts, tc, tn) = test;
    let checks = || -> Result<Vec<Vec<f64>>> {
        validate_scores("val_scores", vs, k, vn)?;
        validate_scores("test_scores", ts, k, tn)?;
        check_correct("val_correct", vc, k, vn)?;
        check_correct("test_correct", tc, k, tn)?;
        check_n(vn)?;
        validate_costs(costs, k)?;
        if qs.is_empty() {
            return Err(Error::new("qs must hold at least one budget; received an empty sequence"));
        }
        qs.iter()
            .enumerate()
            .map(|(j, &q)| mode.fractions(q, k).map_err(|e| Error::new(format!("qs[{j}]: {e}"))))
            .collect()
    };
    // The sort of the first exit runs on one thread: the (parallel) checks of both
    // splits fill the other cores meanwhile. The sort needs only a consistent
    // shape; its result is dropped if a check fails.
    let shape_ok = (1..=MAX_EXITS).contains(&k) && vn >= 1 && vn <= u32::MAX as usize && vs.len() == k * vn;
    let (fractions, sorted) = if shape_ok {
        rayon::join(checks, || Some(SortedExits::new(vs, k, vn)))
    } else {
        (checks(), None)
    };
    let fractions = fractions?;
    let sorted = sorted.expect("checks pass only for a consistent shape");
    let q: Vec<Vec<usize>> = fractions.iter().map(|f| quotas(vn, f)).collect();
    // Each group of budgets is scored as soon as its walk ends: walks differ in length
    // (small budgets walk further), so a worker whose walk ends early scores its
    // budgets while the others still walk, instead of waiting for them.
    let parts: Vec<(Vec<f64>, Vec<Outcome>, Vec<Outcome>)> = q
        .par_chunks(group_size(q.len()))
        .map(|g| {
            let t: Vec<f64> = sorted.calibrate_group(g).concat();
            let v = score_many(vs, vc, k, vn, &t, costs);
            let o = score_many(ts, tc, k, tn, &t, costs);
            (t, v, o)
        })
        .collect();
    drop(sorted);
    let mut thresholds = Vec::with_capacity(q.len() * k);
    let (mut val_out, mut test_out) = (Vec::with_capacity(q.len()), Vec::with_capacity(q.len()));
    for (t, v, o) in parts {
        thresholds.extend(t);
        val_out.extend(v);
        test_out.extend(o);
    }
    Ok(Sweep {
        thresholds,
        val_accuracy: val_out.iter().map(|o| o.accuracy).collect(),
        val_mean_cost: val_out.iter().map(|o| o.mean_cost).collect(),
        test_accuracy: test_out.iter().map(|o| o.accuracy).collect(),
        mean_cost: test_out.iter().map(|o| o.mean_cost).collect(),
        exit_counts: test_out.into_iter().flat_map(|o| o.exit_counts).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::calibrate;
    use crate::simulate::simulate;

    #[test]
    fn sweep_equals_calibrate_then_simulate() {
        let mut st = 77u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        let (k, vn, tn) = (4, 3000, 2500);
        let gen = |n: usize, next: &mut dyn FnMut() -> u64| -> (Vec<f32>, Vec<bool>) {
            let s = (0..k * n).map(|_| (next() % 1000) as f32 / 999.0).collect();
            let c = (0..k * n).map(|_| !next().is_multiple_of(4)).collect();
            (s, c)
        };
        let (vs, vc) = gen(vn, &mut next);
        let (ts, tc) = gen(tn, &mut next);
        let costs = [1.0, 2.0, 3.5, 7.0];
        for mode in [Mode::Geometric, Mode::PerStage] {
            let qs: Vec<f64> = if mode == Mode::Geometric { (1..40).map(|p| p as f64 / 20.0).collect() } else { vec![0.05, 0.5, 1.0] };
            let sw = budget_sweep(k, (&vs, &vc, vn), (&ts, &tc, tn), &costs, &qs, mode).unwrap();
            for (b, &q) in qs.iter().enumerate() {
                let t = calibrate(&vs, k, vn, &mode.fractions(q, k).unwrap()).unwrap();
                assert_eq!(&sw.thresholds[b * k..(b + 1) * k], &t[..]);
                let o = simulate(&ts, &tc, k, tn, &t, &costs).unwrap();
                assert_eq!(sw.test_accuracy[b], o.accuracy);
                assert_eq!(sw.mean_cost[b], o.mean_cost);
                assert_eq!(&sw.exit_counts[b * k..(b + 1) * k], &o.exit_counts[..]);
                let v = simulate(&vs, &vc, k, vn, &t, &costs).unwrap();
                assert_eq!(sw.val_accuracy[b], v.accuracy);
            }
        }
        assert!(budget_sweep(k, (&vs, &vc, vn), (&ts, &tc, tn), &costs, &[0.5, -1.0], Mode::Geometric).unwrap_err().0.contains("qs[1]"));
        assert!(budget_sweep(k, (&vs, &vc, vn), (&ts, &tc, tn), &costs, &[1.5], Mode::PerStage).is_err());
        assert!(Mode::parse("uniform").is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::calibrate::SortedExits;
    use std::time::Instant;

    /// `cargo test --release -- --ignored --nocapture timing` prints where sweep time goes.
    #[test]
    #[ignore]
    fn timing_breakdown() {
        let n: usize = std::env::var("SWEEP_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
        let k = 8;
        let mut st = 1u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (st >> 11) as f64 / (1u64 << 53) as f64
        };
        let base: Vec<f64> = (0..n).map(|_| next()).collect();
        let s: Vec<f32> = (0..k * n).map(|r| (0.5 * base[r % n] + 0.5 * next() + 0.05 * (r / n) as f64) as f32).collect();
        let c: Vec<bool> = (0..k * n).map(|_| next() < 0.7).collect();
        let costs: Vec<f64> = (1..=k).map(|x| x as f64).collect();
        let qs: Vec<f64> = (1..40).map(|p| p as f64 / 20.0).collect();
        let mut best = f64::MAX;
        for _ in 0..4 {
            let t = Instant::now();
            drop(std::hint::black_box(SortedExits::new(&s, k, n)));
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("sort (best of 4) {:.1} ms", best * 1e3);
        let sorted = SortedExits::new(&s, k, n);
        let t = Instant::now();
        let q: Vec<Vec<usize>> = qs.iter().map(|&q| quotas(n, &geometric_fractions(q, k).unwrap())).collect();
        let thr: Vec<f64> = sorted.calibrate_many(&q).concat();
        println!("39 calibrations {:?}", t.elapsed());
        let t = Instant::now();
        let _ = score_many(&s, &c, k, n, &thr, &costs);
        println!("score 39 budgets {:?}", t.elapsed());
        let t = Instant::now();
        let _ = budget_sweep(k, (&s, &c, n), (&s, &c, n), &costs, &qs, Mode::Geometric).unwrap();
        println!("full sweep {:?}", t.elapsed());
    }
}
