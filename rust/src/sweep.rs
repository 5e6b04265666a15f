//! The budget sweep: calibrate on validation scores for every budget `q`, score the
//! thresholds on validation and test, in one call, parallel over budgets.

use crate::calibrate::{
    check_n, geometric_fractions, group_size, per_stage_fractions, quotas, validate_scores,
    Shortfall, SortedExits, MAX_EXITS,
};
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
            _ => Err(Error::new(format!(
                "mode must be 'geometric' or 'per_stage'; received {s:?}"
            ))),
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

/// Calibrates on `val` for every budget in `qs` (fractions by `mode`, short exits by
/// `shortfall`), then scores the thresholds on `val` and `test`.
pub fn budget_sweep(
    k: usize,
    val: Set,
    test: Set,
    costs: &[f64],
    qs: &[f64],
    mode: Mode,
    shortfall: Shortfall,
) -> Result<Sweep> {
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
            return Err(Error::new(
                "qs must hold at least one budget; received an empty sequence",
            ));
        }
        qs.iter()
            .enumerate()
            .map(|(j, &q)| {
                mode.fractions(q, k)
                    .map_err(|e| Error::new(format!("qs[{j}]: {e}")))
            })
            .collect()
    };
    // The sort of the first exit runs on one thread: the (parallel) checks of both
    // splits fill the other cores meanwhile. The sort needs only a consistent
    // shape; its result is dropped if a check fails (bad input is reported before
    // memory that could not be allocated).
    let shape_ok =
        (1..=MAX_EXITS).contains(&k) && vn >= 1 && vn <= u32::MAX as usize && vs.len() == k * vn;
    let (fractions, sorted) = if shape_ok {
        rayon::join(checks, || Some(SortedExits::new(vs, k, vn, qs.len())))
    } else {
        (checks(), None)
    };
    let fractions = fractions?;
    let sorted = sorted.expect("checks pass only for a consistent shape")?;
    let q: Vec<Vec<usize>> = fractions.iter().map(|f| quotas(vn, f)).collect();
    // Each group of budgets is scored as soon as its walk ends: walks differ in length
    // (small budgets walk further), so a worker whose walk ends early scores its
    // budgets while the others still walk, instead of waiting for them.
    let parts: Vec<(Vec<f64>, Vec<Outcome>, Vec<Outcome>)> = q
        .par_chunks(group_size(q.len()))
        .map(|g| {
            let t: Vec<f64> = sorted.calibrate_group(g, shortfall)?.concat();
            let v = score_many(vs, vc, k, vn, &t, costs)?;
            let o = score_many(ts, tc, k, tn, &t, costs)?;
            Ok((t, v, o))
        })
        .collect::<Result<_>>()?;
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

    /// `(K*N scores, K*N correct flags)`: scores in 1000 levels, or tie-heavy (`saturated`:
    /// a growing share of 1.0 with depth, as a max softmax that saturates in float32).
    fn data(
        k: usize,
        n: usize,
        saturated: bool,
        next: &mut dyn FnMut() -> u64,
    ) -> (Vec<f32>, Vec<bool>) {
        let s = (0..k * n)
            .map(|r| {
                let x = (next() % 1000) as f32 / 999.0;
                if saturated && x < 0.5 + 0.4 * (r / n) as f32 / k as f32 {
                    1.0
                } else {
                    x
                }
            })
            .collect();
        let c = (0..k * n).map(|_| !next().is_multiple_of(4)).collect();
        (s, c)
    }

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
        let costs = [1.0, 2.0, 3.5, 7.0];
        let mut shortfalls = 0;
        for saturated in [false, true] {
            let (vs, vc) = data(k, vn, saturated, &mut next);
            let (ts, tc) = data(k, tn, saturated, &mut next);
            for mode in [Mode::Geometric, Mode::PerStage] {
                let qs: Vec<f64> = if mode == Mode::Geometric {
                    (1..40).map(|p| p as f64 / 20.0).collect()
                } else {
                    vec![0.05, 0.5, 1.0]
                };
                let mut by_rule = vec![];
                for sf in [Shortfall::Reference, Shortfall::ExitAll] {
                    let sw = budget_sweep(k, (&vs, &vc, vn), (&ts, &tc, tn), &costs, &qs, mode, sf)
                        .unwrap();
                    for (b, &q) in qs.iter().enumerate() {
                        let t = calibrate(&vs, k, vn, &mode.fractions(q, k).unwrap(), sf).unwrap();
                        assert_eq!(&sw.thresholds[b * k..(b + 1) * k], &t[..]);
                        let o = simulate(&ts, &tc, k, tn, &t, &costs).unwrap();
                        assert_eq!(sw.test_accuracy[b], o.accuracy);
                        assert_eq!(sw.mean_cost[b], o.mean_cost);
                        assert_eq!(&sw.exit_counts[b * k..(b + 1) * k], &o.exit_counts[..]);
                        let v = simulate(&vs, &vc, k, vn, &t, &costs).unwrap();
                        assert_eq!(sw.val_accuracy[b], v.accuracy);
                    }
                    by_rule.push(sw.thresholds);
                }
                // The rules differ exactly where the reference leaves a quota'd exit at +inf.
                shortfalls += by_rule[0]
                    .iter()
                    .zip(&by_rule[1])
                    .filter(|(r, a)| r != a)
                    .count();
                if !saturated {
                    assert_eq!(by_rule[0], by_rule[1]);
                }
            }
        }
        assert!(
            shortfalls > 10,
            "the tie-heavy data took the shortfall branch only {shortfalls} times"
        );
        let (vs, vc) = data(k, vn, false, &mut next);
        let r = Shortfall::Reference;
        let sweep =
            |qs: &[f64], mode| budget_sweep(k, (&vs, &vc, vn), (&vs, &vc, vn), &costs, qs, mode, r);
        assert!(sweep(&[0.5, -1.0], Mode::Geometric)
            .unwrap_err()
            .message
            .contains("qs[1]"));
        assert!(sweep(&[1.5], Mode::PerStage).is_err());
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
        let n: usize = std::env::var("SWEEP_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let k = 8;
        let mut st = 1u64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (st >> 11) as f64 / (1u64 << 53) as f64
        };
        let base: Vec<f64> = (0..n).map(|_| next()).collect();
        let s: Vec<f32> = (0..k * n)
            .map(|r| (0.5 * base[r % n] + 0.5 * next() + 0.05 * (r / n) as f64) as f32)
            .collect();
        let c: Vec<bool> = (0..k * n).map(|_| next() < 0.7).collect();
        let costs: Vec<f64> = (1..=k).map(|x| x as f64).collect();
        let qs: Vec<f64> = (1..40).map(|p| p as f64 / 20.0).collect();
        let mut best = f64::MAX;
        for _ in 0..4 {
            let t = Instant::now();
            drop(std::hint::black_box(
                SortedExits::new(&s, k, n, qs.len()).unwrap(),
            ));
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("sort (best of 4) {:.1} ms", best * 1e3);
        let sorted = SortedExits::new(&s, k, n, qs.len()).unwrap();
        let t = Instant::now();
        let q: Vec<Vec<usize>> = qs
            .iter()
            .map(|&q| quotas(n, &geometric_fractions(q, k).unwrap()))
            .collect();
        let thr: Vec<f64> = sorted
            .calibrate_many(&q, Shortfall::Reference)
            .unwrap()
            .concat();
        println!("39 calibrations {:?}", t.elapsed());
        let t = Instant::now();
        let _ = score_many(&s, &c, k, n, &thr, &costs).unwrap();
        println!("score 39 budgets {:?}", t.elapsed());
        let t = Instant::now();
        let _ = budget_sweep(
            k,
            (&s, &c, n),
            (&s, &c, n),
            &costs,
            &qs,
            Mode::Geometric,
            Shortfall::Reference,
        )
        .unwrap();
        println!("full sweep {:?}", t.elapsed());
    }
}
