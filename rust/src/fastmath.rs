//! Small numeric kernels: a vectorisable `exp` for non-positive `f32` arguments and
//! an exact IEEE binary16 -> binary32 conversion.

/// `a * b + c`, fused when the caller was compiled with FMA (const-selected, so the
/// non-FMA build never calls the slow software `mul_add`).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Smallest argument of [`exp_nonpos`]: `exp(EXP_LOWEST)` is `f32::MIN_POSITIVE`.
/// Callers clamp to it; the clamped terms (< 1.2e-38 each) are negligible next to a
/// softmax denominator that is at least 1.
pub const EXP_LOWEST: f32 = -87.336_54;

/// `exp(d)` for `d` in `[EXP_LOWEST, 0]`.
///
/// Cody-Waite range reduction `d = n ln2 + r`, `|r| <= ln2/2`, then a degree-5
/// polynomial fitted for minimal relative error on that interval (fit error 9.5e-8;
/// about 2e-7 with rounding) that is exactly 1 at `r = 0`, so `exp(0) == 1`.
/// Branch-free, so loops over it auto-vectorise.
#[inline(always)]
pub fn exp_nonpos<const FMA: bool>(d: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 355.0 / 512.0; // 0.693359375, exact in f32
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = madd::<FMA>(d, LOG2E, MAGIC);
    let nf = t - MAGIC;
    let r = madd::<FMA>(nf, -LN2_HI, d);
    let r = madd::<FMA>(nf, -LN2_LO, r);
    let mut p = 8.290_315e-3_f32;
    p = madd::<FMA>(p, r, 4.189_793e-2);
    p = madd::<FMA>(p, r, 1.666_763_6e-1);
    p = madd::<FMA>(p, r, 4.999_915e-1);
    p = madd::<FMA>(p, r, 9.999_997e-1);
    p = madd::<FMA>(p, r, 1.0);
    // The low bits of `t` hold n (two's complement, the magic's own bits vanish
    // when shifted by 23), so this is 2^n for n in [-126, 0].
    let scale = f32::from_bits((t.to_bits() << 23).wrapping_add(127 << 23));
    p * scale
}

/// Exact conversion of IEEE binary16 bits to `f32` (subnormals, inf and NaN included).
#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x03ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man * 2^-24, exactly representable in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_1e7_relative() {
        let mut worst = 0.0f64;
        let mut d = 0.0f32;
        while d >= EXP_LOWEST {
            for fma in [false, true] {
                let got = if fma {
                    exp_nonpos::<true>(d)
                } else {
                    exp_nonpos::<false>(d)
                } as f64;
                let want = (d as f64).exp();
                worst = worst.max(((got - want) / want).abs());
            }
            d -= 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos::<false>(0.0), 1.0);
        assert_eq!(exp_nonpos::<true>(0.0), 1.0);
        let lowest = exp_nonpos::<false>(EXP_LOWEST) as f64;
        assert!((lowest / (EXP_LOWEST as f64).exp() - 1.0).abs() < 3e-7);
    }

    #[test]
    fn f16_conversion_known_values() {
        assert_eq!(f16_bits_to_f32(0x3c00), 1.0);
        assert_eq!(f16_bits_to_f32(0xc000), -2.0);
        assert_eq!(f16_bits_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_bits_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_bits_to_f32(0x03ff), 6.097_555e-5);
        assert_eq!(f16_bits_to_f32(0x0400), 6.103_515_6e-5);
        assert_eq!(f16_bits_to_f32(0x3555), 0.333_251_95);
        assert!(f16_bits_to_f32(0x7c00).is_infinite());
        assert!(f16_bits_to_f32(0xfc00) < 0.0);
        assert!(f16_bits_to_f32(0x7e00).is_nan());
        assert_eq!(f16_bits_to_f32(0x8000).to_bits(), 0x8000_0000);
    }

    #[test]
    fn f16_conversion_is_monotone_over_all_finite_positive_values() {
        let mut prev = -1.0f32;
        for h in 0u16..0x7c00 {
            let v = f16_bits_to_f32(h);
            assert!(v > prev, "not increasing at {h:#x}");
            prev = v;
        }
    }
}
