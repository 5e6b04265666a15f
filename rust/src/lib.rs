//! keras-ee native core: confidence scores and budgeted-batch threshold calibration.
//!
//! Pure-Rust functions live in the modules below and are tested with `cargo test`
//! (no Python needed); the PyO3 bindings are in [`python`] behind the `python`
//! feature. Layout everywhere: exits first, `(K, N)` row-major.

pub mod calibrate;
pub mod error;
pub mod fastmath;
pub mod hugebuf;
pub mod scores;
pub mod simd;
pub mod simulate;
pub mod solve;
pub mod sweep;

#[cfg(feature = "python")]
mod python;
