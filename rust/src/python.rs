//! PyO3 bindings (`keras_ee._native`). Thin: borrow numpy arrays without copying,
//! release the GIL, call the pure-Rust core, turn its errors into `ValueError`
//! (bad input) or `MemoryError` (working memory that could not be allocated).
//! Dtype and ndim checks happen in the Python façade (`keras_ee.calibration`).

use crate::calibrate as cal;
use crate::simulate as sim;
use crate::{error, scores, solve, sweep};
use ndarray::{Array2, ArrayView3};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `(scores, predictions)` as numpy arrays.
type ScoresOut<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i32>>);

/// Runs `f` without the GIL; core errors become `ValueError` or `MemoryError`, a
/// panic `RuntimeError` (never an abort or a `PanicException`).
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> error::Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(match e.kind {
            error::ErrorKind::BadInput => PyValueError::new_err(e.message),
            error::ErrorKind::OutOfMemory => PyMemoryError::new_err(e.message),
        }),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!(
                "internal error in keras_ee._native (please report): {msg}"
            )))
        }
    }
}

fn c_slice<'a, T: numpy::Element>(
    name: &str,
    a: &'a PyReadonlyArray2<'_, T>,
) -> PyResult<(&'a [T], usize, usize)> {
    let v = a.as_array();
    let (k, n) = v.dim();
    let s = v.to_slice().ok_or_else(|| {
        PyValueError::new_err(format!(
            "{name} must be C-contiguous (use np.ascontiguousarray)"
        ))
    })?;
    Ok((s, k, n))
}

fn c_vec(name: &str, a: &PyReadonlyArray1<'_, f64>) -> PyResult<Vec<f64>> {
    // (K,) or (B,) vectors are tiny: copying them is free and strides do not matter.
    let _ = name;
    Ok(a.as_array().to_vec())
}

fn scores_out<'py>(
    py: Python<'py>,
    k: usize,
    n: usize,
    s: Vec<f32>,
    p: Vec<i32>,
) -> PyResult<ScoresOut<'py>> {
    let s =
        Array2::from_shape_vec((k, n), s).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let p =
        Array2::from_shape_vec((k, n), p).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok((s.into_pyarray(py), p.into_pyarray(py)))
}

fn exit_scores_generic<'py, T: scores::Logit + numpy::Element>(
    py: Python<'py>,
    logits: ArrayView3<'_, T>,
    kind: &str,
    temperatures: Vec<f64>,
) -> PyResult<ScoresOut<'py>> {
    let (k, n, _) = logits.dim();
    let (s, p) = run(py, || {
        let kind = scores::Kind::parse(kind)?;
        let inv_t = scores::inverse_temperatures(&temperatures, k)?;
        scores::exit_scores(logits, kind, &inv_t)
    })?;
    scores_out(py, k, n, s, p)
}

/// Scores and predictions from float32 logits (K, N, C); any strides, no copy.
#[pyfunction]
fn exit_scores_f32<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray3<'py, f32>,
    kind: &str,
    temperatures: Vec<f64>,
) -> PyResult<ScoresOut<'py>> {
    exit_scores_generic(py, logits.as_array(), kind, temperatures)
}

/// Same for float64 logits.
#[pyfunction]
fn exit_scores_f64<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray3<'py, f64>,
    kind: &str,
    temperatures: Vec<f64>,
) -> PyResult<ScoresOut<'py>> {
    exit_scores_generic(py, logits.as_array(), kind, temperatures)
}

/// Same for float16 logits passed as their uint16 bit patterns (`a.view(np.uint16)`).
#[pyfunction]
fn exit_scores_f16<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray3<'py, u16>,
    kind: &str,
    temperatures: Vec<f64>,
) -> PyResult<ScoresOut<'py>> {
    exit_scores_generic(py, logits.as_array(), kind, temperatures)
}

/// The `exit_scores` kernel this CPU runs (`"avx2+fma"` or `"portable"`).
#[pyfunction]
fn simd_path() -> &'static str {
    scores::simd_path()
}

#[pyfunction]
fn geometric_fractions<'py>(
    py: Python<'py>,
    q: f64,
    num_exits: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    Ok(run(py, || cal::geometric_fractions(q, num_exits))?.into_pyarray(py))
}

#[pyfunction]
fn per_stage_fractions<'py>(
    py: Python<'py>,
    q: f64,
    num_exits: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    Ok(run(py, || cal::per_stage_fractions(q, num_exits))?.into_pyarray(py))
}

#[pyfunction]
fn calibrate<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    fractions: PyReadonlyArray1<'py, f64>,
    shortfall: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (s, k, n) = c_slice("scores", &scores)?;
    let f = c_vec("fractions", &fractions)?;
    Ok(run(py, || {
        cal::calibrate(s, k, n, &f, cal::Shortfall::parse(shortfall)?)
    })?
    .into_pyarray(py))
}

/// Returns (accuracy, mean_cost, exit_counts).
#[pyfunction]
fn simulate<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    correct: PyReadonlyArray2<'py, bool>,
    thresholds: PyReadonlyArray1<'py, f64>,
    costs: PyReadonlyArray1<'py, f64>,
) -> PyResult<(f64, f64, Bound<'py, PyArray1<i64>>)> {
    let (s, k, n) = c_slice("scores", &scores)?;
    let (c, ck, cn) = c_slice("correct", &correct)?;
    if (ck, cn) != (k, n) {
        return Err(PyValueError::new_err(format!(
            "correct must have the shape of scores ({k}, {n}); received ({ck}, {cn})"
        )));
    }
    let t = c_vec("thresholds", &thresholds)?;
    let w = c_vec("costs", &costs)?;
    let o = run(py, || sim::simulate(s, c, k, n, &t, &w))?;
    let counts: Vec<i64> = o.exit_counts.iter().map(|&x| x as i64).collect();
    Ok((o.accuracy, o.mean_cost, counts.into_pyarray(py)))
}

#[pyfunction]
fn anytime_accuracy<'py>(
    py: Python<'py>,
    correct: PyReadonlyArray2<'py, bool>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (c, k, n) = c_slice("correct", &correct)?;
    Ok(run(py, || sim::anytime_accuracy(c, k, n))?.into_pyarray(py))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn budget_sweep<'py>(
    py: Python<'py>,
    val_scores: PyReadonlyArray2<'py, f32>,
    val_correct: PyReadonlyArray2<'py, bool>,
    test_scores: PyReadonlyArray2<'py, f32>,
    test_correct: PyReadonlyArray2<'py, bool>,
    costs: PyReadonlyArray1<'py, f64>,
    qs: PyReadonlyArray1<'py, f64>,
    mode: &str,
    shortfall: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let (vs, k, vn) = c_slice("val_scores", &val_scores)?;
    let (vc, vck, vcn) = c_slice("val_correct", &val_correct)?;
    let (ts, tk, tn) = c_slice("test_scores", &test_scores)?;
    let (tc, tck, tcn) = c_slice("test_correct", &test_correct)?;
    if (vck, vcn) != (k, vn) {
        return Err(PyValueError::new_err(format!(
            "val_correct must have the shape of val_scores ({k}, {vn}); received ({vck}, {vcn})"
        )));
    }
    if tk != k {
        return Err(PyValueError::new_err(format!(
            "test_scores must have K={k} exits like val_scores; received {tk}"
        )));
    }
    if (tck, tcn) != (k, tn) {
        return Err(PyValueError::new_err(format!(
            "test_correct must have the shape of test_scores ({k}, {tn}); received ({tck}, {tcn})"
        )));
    }
    let w = c_vec("costs", &costs)?;
    let q = c_vec("qs", &qs)?;
    let sw = run(py, || {
        let mode = sweep::Mode::parse(mode)?;
        let shortfall = cal::Shortfall::parse(shortfall)?;
        sweep::budget_sweep(k, (vs, vc, vn), (ts, tc, tn), &w, &q, mode, shortfall)
    })?;
    let b = q.len();
    let d = PyDict::new(py);
    let shape = |v: Vec<f64>| {
        Array2::from_shape_vec((b, k), v).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    };
    d.set_item("q", q.clone().into_pyarray(py))?;
    d.set_item("thresholds", shape(sw.thresholds)?.into_pyarray(py))?;
    d.set_item("val_accuracy", sw.val_accuracy.into_pyarray(py))?;
    d.set_item("test_accuracy", sw.test_accuracy.into_pyarray(py))?;
    d.set_item("mean_cost", sw.mean_cost.into_pyarray(py))?;
    let counts: Vec<i64> = sw.exit_counts.iter().map(|&x| x as i64).collect();
    let counts = Array2::from_shape_vec((b, k), counts)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    d.set_item("exit_counts", counts.into_pyarray(py))?;
    d.set_item("val_mean_cost", sw.val_mean_cost.into_pyarray(py))?;
    Ok(d)
}

/// Returns (q, thresholds, val_mean_cost) of the latest split meeting `target`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn solve_budget<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    costs: PyReadonlyArray1<'py, f64>,
    target: f64,
    grid: PyReadonlyArray1<'py, f64>,
    mode: &str,
    shortfall: &str,
) -> PyResult<(f64, Bound<'py, PyArray1<f64>>, f64)> {
    let (s, k, n) = c_slice("scores", &scores)?;
    let w = c_vec("costs", &costs)?;
    let g = c_vec("grid", &grid)?;
    let sol = run(py, || {
        let mode = sweep::Mode::parse(mode)?;
        let shortfall = cal::Shortfall::parse(shortfall)?;
        solve::solve_budget(s, k, n, &w, target, &g, mode, shortfall)
    })?;
    Ok((sol.q, sol.thresholds.into_pyarray(py), sol.val_mean_cost))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(exit_scores_f32, m)?)?;
    m.add_function(wrap_pyfunction!(exit_scores_f64, m)?)?;
    m.add_function(wrap_pyfunction!(exit_scores_f16, m)?)?;
    m.add_function(wrap_pyfunction!(geometric_fractions, m)?)?;
    m.add_function(wrap_pyfunction!(per_stage_fractions, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(anytime_accuracy, m)?)?;
    m.add_function(wrap_pyfunction!(budget_sweep, m)?)?;
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(solve_budget, m)?)?;
    Ok(())
}
