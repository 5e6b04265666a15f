//! The budget sweep: calibrate on validation scores for every budget `q`, score the
//! thresholds on validation and test, in one call, parallel over budgets.

use crate::calibrate::{check_n, geometric_fractions, per_stage_fractions, quotas, validate_scores, SortedExits};
use crate::error::{Error, Result};
use crate::simulate::{check_correct, score_many, validate_costs};
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
    validate_scores("val_scores", vs, k, vn)?;
    validate_scores("test_scores", ts, k, tn)?;
    check_correct("val_correct", vc, k, vn)?;
    check_correct("test_correct", tc, k, tn)?;
    check_n(vn)?;
    validate_costs(costs, k)?;
    if qs.is_empty() {
        return Err(Error::new("qs must hold at least one budget; received an empty sequence"));
    }
    let fractions = qs
        .iter()
        .enumerate()
        .map(|(j, &q)| mode.fractions(q, k).map_err(|e| Error::new(format!("qs[{j}]: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let sorted = SortedExits::new(vs, k, vn);
    let thresholds: Vec<f64> = fractions
        .par_iter()
        .map(|f| sorted.calibrate(&quotas(vn, f)))
        .collect::<Vec<_>>()
        .concat();
    drop(sorted);
    let val_out = score_many(vs, vc, k, vn, &thresholds, costs);
    let test_out = score_many(ts, tc, k, tn, &thresholds, costs);
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
            let c = (0..k * n).map(|_| next() % 4 != 0).collect();
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
