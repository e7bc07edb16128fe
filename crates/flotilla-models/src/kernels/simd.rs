//! The vector instruction sets flotilla's own kernels (the direct convolutions, the few-row
//! linear layers) are written over: each kernel body is generic over [`Vector`] and compiled
//! once per set inside a function that enables it ([`per_simd`]).

use super::gemm_glue::{GemmKernels, gemm_kernels};

/// The instruction set a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Simd {
    /// 16 lanes, 32 registers.
    Avx512,
    /// 8 lanes, 16 registers (AVX2 + FMA).
    Avx2,
}

impl Simd {
    /// The set flotilla's kernels use in this process: that of the GEMM kernels, none where
    /// the crate's own dispatch runs.
    pub(super) fn chosen() -> Option<Self> {
        match gemm_kernels() {
            GemmKernels::Avx512 => Some(Simd::Avx512),
            GemmKernels::Avx2 => Some(Simd::Avx2),
            GemmKernels::Library => None,
        }
    }

    pub(super) fn available(self) -> bool {
        match self {
            Simd::Avx512 => GemmKernels::Avx512.available(),
            Simd::Avx2 => GemmKernels::Avx2.available(),
        }
    }

    /// f32 lanes per vector.
    pub(super) fn lanes(self) -> usize {
        match self {
            Simd::Avx512 => 16,
            Simd::Avx2 => 8,
        }
    }

    /// Panics unless this CPU runs the set (the kernels' entry points check before any
    /// `unsafe` call).
    pub(super) fn check(self) {
        assert!(
            self.available(),
            "a kernel on {self:?}, which this CPU lacks"
        );
    }
}

/// A vector of f32 lanes. Every method is `unsafe`: callable only where the vector's
/// instruction set is enabled, on pointers the caller vouches for.
#[cfg(target_arch = "x86_64")]
pub(super) trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// The first `n` (< LANES) values from `p`, zeros after.
    unsafe fn load_first(p: *const f32, n: usize) -> Self;
    /// Stores the first `n` (< LANES) lanes at `p`.
    unsafe fn store_first(self, p: *mut f32, n: usize);
    unsafe fn splat(x: f32) -> Self;
    /// `self · b + c`.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    /// Lane j of the result is the sum of the lanes of `v[j]` (`v` holds LANES vectors).
    unsafe fn sum_each(v: &[Self]) -> Self;
    /// The lane-wise maximum (either operand where a lane holds a NaN: callers rule them out).
    unsafe fn max(self, b: Self) -> Self;
    /// `then` in the lanes where `self == b` (ordered), `other` elsewhere.
    unsafe fn select_eq(self, b: Self, then: Self, other: Self) -> Self;
    /// `then` in the lanes where `self <= b` (ordered), `other` elsewhere.
    unsafe fn select_le(self, b: Self, then: Self, other: Self) -> Self;
    /// Whether any lane is NaN.
    unsafe fn has_nan(self) -> bool;
    /// The even and the odd values of the 2·LANES values `lo` then `hi`.
    unsafe fn deinterleave(lo: Self, hi: Self) -> (Self, Self);
    /// `even` and `odd` interleaved, as 2·LANES values: the first LANES, then the rest.
    unsafe fn interleave(even: Self, odd: Self) -> (Self, Self);

    /// `n` values from `p` (all lanes when `n ≥ LANES`).
    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe {
            if n >= Self::LANES {
                Self::load(p)
            } else {
                Self::load_first(p, n)
            }
        }
    }

    /// Stores `n` lanes at `p` (all when `n ≥ LANES`).
    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if n >= Self::LANES {
                self.store(p)
            } else {
                self.store_first(p, n)
            }
        }
    }
}

/// 16 lanes (AVX-512F).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct V16(std::arch::x86_64::__m512);

/// 8 lanes (AVX2 + FMA).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct V8(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Vector for V16 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { std::arch::x86_64::_mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) })
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, self.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        V16(unsafe { std::arch::x86_64::_mm512_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn select_eq(self, b: Self, then: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, b.0);
            V16(_mm512_mask_blend_ps(m, other.0, then.0))
        }
    }
    #[inline(always)]
    unsafe fn select_le(self, b: Self, then: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(self.0, b.0);
            V16(_mm512_mask_blend_ps(m, other.0, then.0))
        }
    }
    #[inline(always)]
    unsafe fn has_nan(self) -> bool {
        use std::arch::x86_64::*;
        unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) != 0 }
    }
    #[inline(always)]
    unsafe fn deinterleave(lo: Self, hi: Self) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            (
                V16(_mm512_permutex2var_ps(lo.0, even, hi.0)),
                V16(_mm512_permutex2var_ps(lo.0, odd, hi.0)),
            )
        }
    }
    #[inline(always)]
    unsafe fn interleave(even: Self, odd: Self) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
            (
                V16(_mm512_permutex2var_ps(even.0, first, odd.0)),
                V16(_mm512_permutex2var_ps(even.0, second, odd.0)),
            )
        }
    }
    /// In 45 shuffles and adds rather than 16 reductions of 8: each level halves the vectors
    /// (pairs of lanes within 128-bit groups, pairs of pairs, then the groups).
    #[inline(always)]
    unsafe fn sum_each(v: &[Self]) -> Self {
        use std::arch::x86_64::*;
        assert_eq!(v.len(), 16);
        // SAFETY (all below): AVX-512F is enabled where this inlines.
        unsafe {
            // [a0+a2, b0+b2, a1+a3, b1+b3] per 128-bit group, for a, b = v[2k], v[2k+1].
            // (Loops, not closures: a closure would not inherit the instruction set.)
            let mut s1 = [_mm512_setzero_ps(); 8];
            for (k, s) in s1.iter_mut().enumerate() {
                let (a, b) = (v[2 * k].0, v[2 * k + 1].0);
                *s = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            }
            // [Σa, Σb, Σc, Σd] per 128-bit group, for v[4k..4k+4].
            let mut s2 = [_mm512_setzero_ps(); 4];
            for (k, s) in s2.iter_mut().enumerate() {
                let (c, d) = (_mm512_castps_pd(s1[2 * k]), _mm512_castps_pd(s1[2 * k + 1]));
                *s = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)),
                );
            }
            // 128-bit groups 0+1 and 2+3 of two such vectors, side by side.
            let mut s3 = [_mm512_setzero_ps(); 2];
            for (k, s) in s3.iter_mut().enumerate() {
                let (e, f) = (s2[2 * k], s2[2 * k + 1]);
                *s = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(e, f),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(e, f),
                );
            }
            V16(_mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(s3[0], s3[1]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(s3[0], s3[1]),
            ))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl V8 {
    /// Lanes 0..n of an AVX2 mask vector set.
    #[inline(always)]
    unsafe fn first(n: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled where this inlines.
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Vector for V8 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { std::arch::x86_64::_mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_maskload_ps(p, Self::first(n)) })
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        unsafe { std::arch::x86_64::_mm256_maskstore_ps(p, Self::first(n), self.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        V8(unsafe { std::arch::x86_64::_mm256_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn select_eq(self, b: Self, then: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, b.0);
            V8(_mm256_blendv_ps(other.0, then.0, m))
        }
    }
    #[inline(always)]
    unsafe fn select_le(self, b: Self, then: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm256_cmp_ps::<_CMP_LE_OQ>(self.0, b.0);
            V8(_mm256_blendv_ps(other.0, then.0, m))
        }
    }
    #[inline(always)]
    unsafe fn has_nan(self) -> bool {
        use std::arch::x86_64::*;
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0)) != 0 }
    }
    /// Within 128-bit halves, then the 64-bit quarters put in order.
    #[inline(always)]
    unsafe fn deinterleave(lo: Self, hi: Self) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            // Per half [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then quarters 0, 2, 1, 3.
            let order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            (
                V8(order(_mm256_shuffle_ps::<0b10_00_10_00>(lo.0, hi.0))),
                V8(order(_mm256_shuffle_ps::<0b11_01_11_01>(lo.0, hi.0))),
            )
        }
    }
    #[inline(always)]
    unsafe fn interleave(even: Self, odd: Self) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            // Per half [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
            let (lo, hi) = (
                _mm256_unpacklo_ps(even.0, odd.0),
                _mm256_unpackhi_ps(even.0, odd.0),
            );
            (
                V8(_mm256_permute2f128_ps::<0x20>(lo, hi)),
                V8(_mm256_permute2f128_ps::<0x31>(lo, hi)),
            )
        }
    }
    /// Horizontal adds within 128-bit halves, then the halves added across.
    #[inline(always)]
    unsafe fn sum_each(v: &[Self]) -> Self {
        use std::arch::x86_64::*;
        assert_eq!(v.len(), 8);
        // SAFETY (all below): AVX2 is enabled where this inlines.
        unsafe {
            // Per half: [a0+a1, a2+a3, b0+b1, b2+b3].
            let mut h = [_mm256_setzero_ps(); 4];
            for (k, s) in h.iter_mut().enumerate() {
                *s = _mm256_hadd_ps(v[2 * k].0, v[2 * k + 1].0);
            }
            // Per half: the half's sums of v[4k..4k+4].
            let (lo, hi) = (_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
            V8(_mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(lo, hi),
                _mm256_permute2f128_ps::<0x31>(lo, hi),
            ))
        }
    }
}

/// For a kernel struct with a generic `body::<V: Vector, const A, const B>(self)`: its
/// `run::<A, B>(simd)`, which calls the body compiled with `simd` enabled.
macro_rules! per_simd {
    ($ty:ident $(<$lt:lifetime>)?) => {
        impl $ty $(<$lt>)? {
            /// # Safety
            /// The CPU runs `simd`, and the body's own conditions hold.
            unsafe fn run<const A: usize, const B: usize>(self, simd: super::simd::Simd) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: forwarded from the caller.
                unsafe {
                    match simd {
                        super::simd::Simd::Avx512 => self.run_avx512::<A, B>(),
                        super::simd::Simd::Avx2 => self.run_avx2::<A, B>(),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("these kernels are x86-64 only ({simd:?}, {})", A * B)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn run_avx512<const A: usize, const B: usize>(self) {
                // SAFETY: AVX-512F is enabled here.
                unsafe { self.body::<super::simd::V16, A, B>() }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run_avx2<const A: usize, const B: usize>(self) {
                // SAFETY: AVX2 and FMA are enabled here.
                unsafe { self.body::<super::simd::V8, A, B>() }
            }
        }
    };
}
pub(super) use per_simd;
