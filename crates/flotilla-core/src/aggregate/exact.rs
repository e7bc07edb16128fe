//! Order-independent sums for the weighted mean.
//!
//! A server that folds each reply into its running sum as the reply arrives (so it never holds
//! all of them) sees the replies in arrival order, which depends on the network. Float
//! addition is not associative, so a float running sum would give a different model each run.
//! [`Fixed`] instead sums on a fixed-point grid in integers, where addition is exact and
//! associative: the sum, and so the mean, is the same for every order. The simulator's batch
//! mean uses the same accumulator, so a served run equals its simulation bit for bit.
//!
//! Each term is cut, with f64 operations that are all exact, into four integers of at most 40
//! bits on grids of 2²⁴, 2⁻¹⁶, 2⁻⁵⁶ and 2⁻⁹⁶, each summed in an i64 (room for 2²³ terms). The
//! integers are read from the bits of `x + 1.5·2⁵²` (which rounds x to an integer held in the
//! mantissa), so a term costs a few float operations and integer additions, no conversion
//! instruction and no branch: the loop vectorises.

/// Terms must be smaller than this in magnitude (2⁶⁴), so that each part fits 40 bits.
pub const TERM_LIMIT: f64 = 18_446_744_073_709_551_616.0;

/// Most terms one [`Fixed`] may sum: 2²³ parts of at most 2⁴⁰ fit an i64.
pub const MAX_TERMS: usize = 1 << 23;

/// 1.5·2⁵²: adding it to |x| < 2⁵¹ rounds x to an integer held in the low mantissa bits.
const ROUNDER: f64 = 6_755_399_441_055_744.0;
/// Bits per part, and the unit of the coarsest part as a power of two.
const PART_BITS: i32 = 40;
const COARSE_EXP: i32 = 24;
/// Unit of the finest part: 2^(24 − 3·40) = 2⁻⁹⁶.
const FINE_EXP: i32 = COARSE_EXP - 3 * PART_BITS;

/// x rounded to the nearest integer (ties to even) as (f64, i64), for |x| < 2⁵¹: exact.
#[inline(always)]
fn round_to_integer(x: f64) -> (f64, i64) {
    let shifted = x + ROUNDER;
    let n = shifted.to_bits() as i64 - ROUNDER.to_bits() as i64;
    (shifted - ROUNDER, n)
}

/// `v`'s four parts, coarse to fine: v·2⁻²⁴ = a + r with |r| ≤ ½ (rounding and subtraction
/// both exact); the remainder scaled by 2⁴⁰ gives the next part, and so on.
#[inline(always)]
fn split(v: f64) -> [i64; 4] {
    debug_assert!(v.is_finite() && v.abs() < TERM_LIMIT, "{v}");
    let scale = 2f64.powi(PART_BITS);
    let mut x = v * 2f64.powi(-COARSE_EXP);
    let mut parts = [0i64; 4];
    for p in &mut parts {
        let (whole, n) = round_to_integer(x);
        *p = n;
        x = (x - whole) * scale;
    }
    parts
}

/// Exact sums of many values side by side (one per tensor value), stored part by part so
/// that adding a weighted tensor is one vectorisable pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixedVec {
    /// `parts[k][i]`: the sum of part k of value i's terms.
    parts: [Vec<i64>; 4],
}

impl FixedVec {
    /// `len` zero sums.
    pub fn zeros(len: usize) -> Self {
        Self {
            parts: std::array::from_fn(|_| vec![0; len]),
        }
    }

    /// Number of sums.
    pub fn len(&self) -> usize {
        self.parts[0].len()
    }

    /// Resets every sum to zero and sets the length to `len`.
    pub fn reset(&mut self, len: usize) {
        for p in &mut self.parts {
            p.clear();
            p.resize(len, 0);
        }
    }

    /// sums[i] += weight · values[i] (each product rounded once to f64), for every i; the
    /// terms must pass [`TERM_LIMIT`] (callers check).
    pub fn add_scaled(&mut self, values: &[f32], weight: f64) {
        let [p0, p1, p2, p3] = &mut self.parts;
        let n = values.len();
        let parts = [&mut p0[..n], &mut p1[..n], &mut p2[..n], &mut p3[..n]];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { add_scaled_avx2(parts, values, weight) };
            return;
        }
        add_scaled_body(parts, values, weight);
    }

    /// Sum `i`.
    pub fn get(&self, i: usize) -> Fixed {
        Fixed {
            parts: std::array::from_fn(|k| self.parts[k][i]),
        }
    }
}

/// [`FixedVec::add_scaled`] compiled for AVX2 (four lanes instead of SSE2's two). Same
/// operations in the same order, so the same bits: every step is exact or a single rounding,
/// and nothing is fused.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_scaled_avx2(parts: [&mut [i64]; 4], values: &[f32], weight: f64) {
    add_scaled_body(parts, values, weight)
}

/// `split` of every weighted value, written out so that the loop vectorises.
#[inline(always)]
fn add_scaled_body(parts: [&mut [i64]; 4], values: &[f32], weight: f64) {
    let [p0, p1, p2, p3] = parts;
    let n = values.len().min(p0.len());
    let (p0, p1, p2, p3) = (&mut p0[..n], &mut p1[..n], &mut p2[..n], &mut p3[..n]);
    let scale = 2f64.powi(PART_BITS);
    let first = weight * 2f64.powi(-COARSE_EXP);
    let offset = ROUNDER.to_bits() as i64;
    for i in 0..n {
        let x = first * f64::from(values[i]);
        let s0 = x + ROUNDER;
        let w0 = s0 - ROUNDER;
        let x = (x - w0) * scale;
        let s1 = x + ROUNDER;
        let w1 = s1 - ROUNDER;
        let x = (x - w1) * scale;
        let s2 = x + ROUNDER;
        let w2 = s2 - ROUNDER;
        let x = (x - w2) * scale;
        let s3 = x + ROUNDER;
        p0[i] = p0[i].wrapping_add((s0.to_bits() as i64).wrapping_sub(offset));
        p1[i] = p1[i].wrapping_add((s1.to_bits() as i64).wrapping_sub(offset));
        p2[i] = p2[i].wrapping_add((s2.to_bits() as i64).wrapping_sub(offset));
        p3[i] = p3[i].wrapping_add((s3.to_bits() as i64).wrapping_sub(offset));
    }
}

/// An exact sum of f64 terms on the 2⁻⁹⁶ grid (each term is first rounded to that grid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fixed {
    /// Sums of the terms' parts, coarse (units of 2²⁴) to fine (units of 2⁻⁹⁶).
    parts: [i64; 4],
}

impl Fixed {
    /// Adds `v`, which must be finite with `|v| <` [`TERM_LIMIT`], and at most [`MAX_TERMS`]
    /// times (callers check).
    #[inline(always)]
    pub fn add(&mut self, v: f64) {
        for (sum, n) in self.parts.iter_mut().zip(split(v)) {
            *sum = sum.wrapping_add(n);
        }
    }

    /// The sum as f64: a function of the exact sum alone (so of no order), rounded.
    pub fn to_f64(self) -> f64 {
        // Carry each part into the next coarser one, leaving the finer three in [0, 2⁴⁰).
        // (Shifts and masks: floor division and remainder by 2⁴⁰ without i128 division.)
        let radix: i128 = 1 << PART_BITS;
        let mut parts = self.parts.map(i128::from);
        for i in (1..4).rev() {
            parts[i - 1] += parts[i] >> PART_BITS;
            parts[i] &= radix - 1;
        }
        // Negate a negative sum first: adding parts of opposite signs in f64 would cancel.
        let negative = parts[0] < 0;
        if negative {
            let mut borrow = 0;
            for i in (1..4).rev() {
                let p = -parts[i] - borrow;
                (parts[i], borrow) = if p < 0 { (p + radix, 1) } else { (p, 0) };
            }
            parts[0] = -parts[0] - borrow;
        }
        // Finest first, so each addition rounds once.
        let mut magnitude = 0.0;
        for (i, p) in parts.iter().enumerate().rev() {
            // Through i64 where it fits: i128 → f64 is a library call.
            let p = i64::try_from(*p).map_or(*p as f64, |p| p as f64);
            magnitude += p * 2f64.powi(FINE_EXP + PART_BITS * (3 - i as i32));
        }
        if negative { -magnitude } else { magnitude }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn sum(terms: &[f64]) -> Fixed {
        let mut f = Fixed::default();
        for &t in terms {
            f.add(t);
        }
        f
    }

    #[test]
    fn small_sums_are_exact() {
        assert_eq!(sum(&[1.0, 2.0, -0.5]).to_f64(), 2.5);
        assert_eq!(sum(&[-3.25]).to_f64(), -3.25);
        assert_eq!(sum(&[1e-3, -1e-3]).to_f64(), 0.0);
        assert_eq!(sum(&[]).to_f64(), 0.0);
        // A large and a tiny term that f64 addition would lose keep each other.
        let f = sum(&[1e15, 1e-10, -1e15]);
        assert!((f.to_f64() - 1e-10).abs() < 1e-24, "{}", f.to_f64());
        // Near the limit, both signs, without wrapping.
        let big = TERM_LIMIT * 0.99;
        assert_eq!(sum(&[big, big, -big]).to_f64(), big);
        assert_eq!(sum(&[-big, -big]).to_f64(), -2.0 * big);
    }

    #[test]
    fn every_instruction_set_gives_the_same_sums() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let values: Vec<f32> = (0..1001)
            .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-20..6)))
            .collect();
        let mut dispatched = FixedVec::zeros(values.len());
        let mut plain = FixedVec::zeros(values.len());
        for w in [1.0, 37.0, 60000.0] {
            dispatched.add_scaled(&values, w);
            let [a, b, c, d] = &mut plain.parts;
            add_scaled_body([a, b, c, d], &values, w);
        }
        assert_eq!(dispatched, plain);
        // And each value's sum is the sum of its terms added one by one.
        for (i, v) in values.iter().enumerate() {
            let mut one = Fixed::default();
            for w in [1.0, 37.0, 60000.0] {
                one.add(w * f64::from(*v));
            }
            assert_eq!(plain.get(i), one, "value {i}");
        }
    }

    #[test]
    fn the_sum_does_not_depend_on_the_order() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let terms: Vec<f64> = (0..2000)
            .map(|i| {
                let scale = 10f64.powi(rng.random_range(-12..12));
                let v: f64 = rng.random_range(-1.0..1.0) * scale;
                if i % 7 == 0 { -v } else { v }
            })
            .collect();
        let reference = sum(&terms);
        let mut shuffled = terms.clone();
        for _ in 0..5 {
            shuffled.shuffle(&mut rng);
            assert_eq!(sum(&shuffled), reference);
        }
        // And it is close to the true sum (f64 pairwise as a check of scale, not of bits).
        let naive: f64 = terms.iter().sum();
        assert!((reference.to_f64() - naive).abs() <= 1e-9 * naive.abs().max(1.0));
    }
}
