//! Run-time CPU feature detection, and the tokens that prove it.
//!
//! Every kernel written with explicit SIMD intrinsics is an `unsafe fn` compiled with
//! `#[target_feature]`: running it on a CPU without those features is undefined
//! behaviour. Safe code reaches such a kernel only through a token below, a
//! zero-sized value that only its `detect` makes, after `is_x86_feature_detected!`
//! said yes. Code generic over "portable or SIMD" takes the token (or [`Portable`])
//! as a value, so it never runs intrinsics on a compile-time promise; and a caller
//! that passes `None` instead of a detected token forces the portable path (the tests
//! compare both paths on a machine that has the features).
//!
//! A `#[target_feature]` function is inlined only into callers compiled with the same
//! features, so each SIMD path also has one `unsafe fn` with `#[target_feature]` that
//! holds the whole hot loop (the generic loop is `#[inline(always)]`, the small
//! kernels `#[inline]`).

/// The portable kernels: plain Rust, auto-vectorised for the compile-time target.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

/// Proof that this CPU runs AVX2 and FMA instructions (only [`Avx2Fma::detect`]
/// makes one).
#[derive(Clone, Copy, Debug)]
pub struct Avx2Fma(());

impl Avx2Fma {
    /// `Some` when the CPU supports AVX2 and FMA (detected once, then cached by std).
    pub fn detect() -> Option<Avx2Fma> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Some(Avx2Fma(()));
        }
        None
    }
}

/// Proof that this CPU runs AVX2 and POPCNT instructions (only [`Avx2Popcnt::detect`]
/// makes one).
#[derive(Clone, Copy, Debug)]
pub struct Avx2Popcnt(());

impl Avx2Popcnt {
    /// `Some` when the CPU supports AVX2 and POPCNT.
    pub fn detect() -> Option<Avx2Popcnt> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
            return Some(Avx2Popcnt(()));
        }
        None
    }
}
