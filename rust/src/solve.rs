//! The budget solver: the budget parameter `q` whose validation mean cost meets a
//! target Mul-Add count, and its thresholds (what a deployed early-exit model needs
//! when its budget changes).
//!
//! The validation mean cost of the thresholds calibrated at `q` is a step function of
//! `q`, non-decreasing in the "lateness" of the split (larger `q` for the geometric
//! split, smaller `q` for the per-stage split) up to tie effects. The solver brackets
//! the target on the caller's `q` grid (a saved sweep's budgets), widened by two end
//! points (almost everyone at exit 1, almost everyone at exit K), then bisects in
//! `ln q` between the last grid point that meets the target and the first that does
//! not. It returns the feasible end: the latest split found whose validation mean
//! cost is `<= target`, so a deployed model never exceeds its budget on validation.

use crate::calibrate::{check_n, quotas, validate_scores, Shortfall, SortedExits};
use crate::error::{Error, Result};
use crate::simulate::{score_many, validate_costs};
use crate::sweep::Mode;

/// The solver's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// The budget parameter; `0` / `+inf` (geometric) or `1` / `0` (per-stage) stand
    /// for "everyone at exit 1" / "everyone at exit K".
    pub q: f64,
    /// `(K,)` thresholds, `-inf` at the last exit.
    pub thresholds: Vec<f64>,
    /// Validation mean cost of `thresholds` (`<= target`).
    pub val_mean_cost: f64,
}

/// Bisection steps in `ln q` (the bracket shrinks 2^-64 times: far below any step of
/// the cost function).
const STEPS: usize = 64;
/// How far the end points lie beyond the grid, in factors of `q`.
const WIDEN: f64 = 1e6;

/// Finds the latest split (see the module docs) whose validation mean cost is at most
/// `target`, for validation `scores` `(K*N row-major)` and cumulative `costs` `(K,)`.
///
/// `grid` holds the budgets to bracket with (any order; values invalid for `mode` are
/// an error). `target` must lie in `[costs[0], costs[K-1]]`: below the first exit's
/// cost no threshold set meets it, above the last one's there is nothing to buy.
#[allow(clippy::too_many_arguments)]
pub fn solve_budget(
    scores: &[f32],
    k: usize,
    n: usize,
    costs: &[f64],
    target: f64,
    grid: &[f64],
    mode: Mode,
    shortfall: Shortfall,
) -> Result<Solution> {
    validate_scores("scores", scores, k, n)?;
    check_n(n)?;
    validate_costs(costs, k)?;
    if !target.is_finite() {
        return Err(Error::new(format!(
            "target must be a finite cost; received {target}"
        )));
    }
    let (first, last) = (costs[0], costs[k - 1]);
    if target < first {
        return Err(Error::new(format!(
            "target {target} is below the first exit's cost {first}: no thresholds can meet it"
        )));
    }
    if target > last {
        return Err(Error::new(format!(
            "target {target} is above the last exit's cost {last}: every sample already runs to the last exit"
        )));
    }
    if grid.is_empty() {
        return Err(Error::new(
            "grid must hold at least one budget q; received an empty sequence",
        ));
    }
    for (j, &q) in grid.iter().enumerate() {
        mode.fractions(q, k)
            .map_err(|e| Error::new(format!("grid[{j}]: {e}")))?;
    }
    let (all_first_q, all_last_q) = match mode {
        Mode::Geometric => (0.0, f64::INFINITY),
        Mode::PerStage => (1.0, 0.0),
    };
    let mut all_last = vec![f64::INFINITY; k];
    all_last[k - 1] = f64::NEG_INFINITY;
    if target >= last || k == 1 {
        return Ok(Solution {
            q: all_last_q,
            thresholds: all_last,
            val_mean_cost: last,
        });
    }
    let sorted = SortedExits::new(scores, k, n, 1)?;
    let dummy = vec![false; k * n];
    let eval = |q: f64| -> Result<Solution> {
        let t = sorted.calibrate(&quotas(n, &mode.fractions(q, k)?), shortfall)?;
        let cost = score_many(scores, &dummy, k, n, &t, costs)?[0].mean_cost;
        Ok(Solution {
            q,
            thresholds: t,
            val_mean_cost: cost,
        })
    };
    // Grid by lateness, with an end point on either side.
    let late = |q: f64| match mode {
        Mode::Geometric => q.ln(),
        Mode::PerStage => -q.ln(),
    };
    let mut qs: Vec<f64> = grid.to_vec();
    qs.sort_by(|a, b| {
        late(*a)
            .partial_cmp(&late(*b))
            .expect("valid q are finite and positive")
    });
    qs.dedup();
    let (lo, hi) = (qs[0], qs[qs.len() - 1]);
    let (early, latest) = match mode {
        Mode::Geometric => (lo / WIDEN, hi * WIDEN),
        Mode::PerStage => (1.0, hi / WIDEN),
    };
    if early != qs[0] {
        qs.insert(0, early);
    }
    qs.push(latest);
    let mut feasible = None;
    let mut infeasible = None;
    for &q in &qs {
        let s = eval(q)?;
        if s.val_mean_cost <= target {
            feasible = Some(s);
        } else {
            infeasible = Some(q);
            break;
        }
    }
    let Some(mut a) = feasible else {
        // Even the earliest split runs past the target: everyone leaves at exit 1.
        return Ok(Solution {
            q: all_first_q,
            thresholds: vec![f64::NEG_INFINITY; k],
            val_mean_cost: first,
        });
    };
    let Some(mut b) = infeasible else {
        return Ok(a);
    };
    for _ in 0..STEPS {
        let mid = ((a.q.ln() + b.ln()) * 0.5).exp();
        if mid == a.q || mid == b {
            break;
        }
        let s = eval(mid)?;
        if s.val_mean_cost <= target {
            a = s;
        } else {
            b = mid;
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::calibrate;
    use crate::simulate::simulate;

    fn data(k: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut st = seed;
        (0..k * n)
            .map(|r| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                // Deeper exits are more confident on average.
                ((st % 10_000) as f32 / 9_999.0) * 0.8 + 0.05 * (r / n) as f32
            })
            .collect()
    }

    fn grid() -> Vec<f64> {
        (1..40).map(|p| p as f64 / 20.0).collect()
    }

    #[test]
    fn meets_the_target_from_below_and_tightly() {
        let (k, n) = (4, 3000);
        let s = data(k, n, 7);
        let costs = [1.0, 2.0, 3.5, 7.0];
        let dummy = vec![false; k * n];
        let mut previous = 0.0;
        for mode in [Mode::Geometric, Mode::PerStage] {
            let g: Vec<f64> = if mode == Mode::Geometric {
                grid()
            } else {
                vec![0.1, 0.3, 0.5, 0.9]
            };
            previous = 0.0;
            for step in 0..=60 {
                let target = 1.0 + 6.0 * step as f64 / 60.0;
                let sol =
                    solve_budget(&s, k, n, &costs, target, &g, mode, Shortfall::Reference).unwrap();
                assert!(
                    sol.val_mean_cost <= target,
                    "{mode:?} {target}: {}",
                    sol.val_mean_cost
                );
                // One sample moving one exit deeper changes the cost by at most 4/N.
                assert!(
                    target - sol.val_mean_cost <= 3.0 * 6.0 / n as f64,
                    "{mode:?} {target}: {}",
                    sol.val_mean_cost
                );
                assert!(sol.val_mean_cost >= previous);
                previous = sol.val_mean_cost;
                // The thresholds are those of `calibrate` at q, scoring to the reported cost.
                if sol.q > 0.0 && sol.q.is_finite() && !(mode == Mode::PerStage && sol.q == 1.0) {
                    let t = calibrate(
                        &s,
                        k,
                        n,
                        &mode.fractions(sol.q, k).unwrap(),
                        Shortfall::Reference,
                    )
                    .unwrap();
                    assert_eq!(t, sol.thresholds);
                }
                let o = simulate(&s, &dummy, k, n, &sol.thresholds, &costs).unwrap();
                assert_eq!(o.mean_cost, sol.val_mean_cost);
            }
        }
        assert_eq!(previous, 7.0);
    }

    #[test]
    fn end_points_and_grid_order() {
        let (k, n) = (3, 500);
        let s = data(k, n, 3);
        let costs = [2.0, 4.0, 8.0];
        let r = Shortfall::Reference;
        let first = solve_budget(&s, k, n, &costs, 2.0, &grid(), Mode::Geometric, r).unwrap();
        assert_eq!(first.thresholds, vec![f64::NEG_INFINITY; 3]);
        assert_eq!((first.q, first.val_mean_cost), (0.0, 2.0));
        let last = solve_budget(&s, k, n, &costs, 8.0, &grid(), Mode::Geometric, r).unwrap();
        assert_eq!(
            last.thresholds,
            vec![f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY]
        );
        assert_eq!(last.q, f64::INFINITY);
        let mut shuffled = grid();
        shuffled.reverse();
        shuffled.swap(3, 17);
        for target in [2.5, 4.0, 6.3] {
            let a = solve_budget(&s, k, n, &costs, target, &grid(), Mode::Geometric, r).unwrap();
            let b = solve_budget(&s, k, n, &costs, target, &shuffled, Mode::Geometric, r).unwrap();
            assert_eq!(a, b);
            // A single grid point brackets as well (the end points do the rest).
            let c = solve_budget(&s, k, n, &costs, target, &[1.0], Mode::Geometric, r).unwrap();
            assert!(
                c.val_mean_cost <= target && (target - c.val_mean_cost) <= 3.0 * 6.0 / n as f64
            );
        }
    }

    #[test]
    fn refuses_bad_input() {
        let (k, n) = (3, 50);
        let s = data(k, n, 5);
        let costs = [2.0, 4.0, 8.0];
        let solve =
            |t: f64, g: &[f64], m| solve_budget(&s, k, n, &costs, t, g, m, Shortfall::Reference);
        assert!(solve(1.9, &grid(), Mode::Geometric)
            .unwrap_err()
            .message
            .contains("below the first exit's cost"));
        assert!(solve(8.1, &grid(), Mode::Geometric)
            .unwrap_err()
            .message
            .contains("above the last exit's cost"));
        assert!(solve(f64::NAN, &grid(), Mode::Geometric).is_err());
        assert!(solve(3.0, &[], Mode::Geometric)
            .unwrap_err()
            .message
            .contains("grid"));
        assert!(solve(3.0, &[0.5, 1.5], Mode::PerStage)
            .unwrap_err()
            .message
            .contains("grid[1]"));
        assert!(solve_budget(
            &s,
            k,
            n,
            &[2.0, 1.0, 8.0],
            3.0,
            &grid(),
            Mode::Geometric,
            Shortfall::Reference
        )
        .is_err());
    }
}
