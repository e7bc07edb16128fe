//! 2×2 stride-2 max pooling (with a fused ReLU) forward and backward, with a one-byte argmax
//! per output.

#[cfg(target_arch = "x86_64")]
use super::simd::Simd;
use super::*;

/// Planes per pooling task: a whole tensor on one thread under [`serial`].
pub(super) fn pool_min_len() -> usize {
    if threads() == 1 { usize::MAX } else { 8 }
}

/// Maximum of a 2×2 window and its position: the first maximum, or the last NaN (burn's rule).
/// Branch-free on the common path: which position wins is random for activations, and
/// mispredicted branches made pooling cost six times its memory traffic.
#[inline(always)]
pub(super) fn window_max(v: [f32; 4]) -> (f32, u8) {
    let [a, b, c, d] = v;
    if a.is_nan() | b.is_nan() | c.is_nan() | d.is_nan() {
        let last = v.iter().rposition(|x| x.is_nan()).unwrap_or(0);
        return (f32::NAN, last as u8);
    }
    let m = a.max(b).max(c.max(d));
    let (na, nb, nc) = ((a != m) as u8, (b != m) as u8, (c != m) as u8);
    (m, na * (1 + nb * (1 + nc)))
}

/// The window position that takes no gradient: the fused ReLU clamped the window's maximum.
pub(super) const NO_GRAD: u8 = 4;

/// One plane `[h, w]` pooled into `o` (`[h/2, w/2]`) with its argmax in `a`; see
/// [`pool_forward`]. Sixteen windows at a time on AVX-512, eight on AVX2 (the set of
/// [`Simd::chosen`]), with the same values and positions.
#[inline]
pub(super) fn pool_plane(xp: &[f32], o: &mut [f32], a: &mut [u8], h: usize, w: usize, relu: bool) {
    let (ho, wo) = (h / 2, w / 2);
    for i in 0..ho {
        let r0 = &xp[2 * i * w..(2 * i + 1) * w];
        let r1 = &xp[(2 * i + 1) * w..(2 * i + 2) * w];
        let o = &mut o[i * wo..(i + 1) * wo];
        let a = &mut a[i * wo..(i + 1) * wo];
        // SAFETY: the CPU runs the chosen set; each row holds w ≥ 2·wo values, o and a wo
        // each.
        #[cfg(target_arch = "x86_64")]
        match Simd::chosen() {
            Some(Simd::Avx512) => unsafe { avx512::pool_row(r0, r1, o, a, relu) },
            Some(Simd::Avx2) => unsafe { avx2::pool_row(r0, r1, o, a, relu) },
            None => pool_row(r0, r1, o, a, relu),
        }
        #[cfg(not(target_arch = "x86_64"))]
        pool_row(r0, r1, o, a, relu);
    }
}

/// One row of windows: input rows `r0` and `r1` into `o` and `a` (`o.len()` windows).
#[inline]
fn pool_row(r0: &[f32], r1: &[f32], o: &mut [f32], a: &mut [u8], relu: bool) {
    for j in 0..o.len() {
        let (m, at) = window_max([r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]]);
        // A clamped window (and NaN, which stays NaN like burn's ReLU) takes no
        // gradient. Arithmetic selects keep the loop free of branches.
        let clamp = (relu & ((m <= 0.0) | m.is_nan())) as u8;
        o[j] = if (clamp == 1) & !m.is_nan() { 0.0 } else { m };
        a[j] = at + clamp * (NO_GRAD - at);
    }
}

/// One plane's gradient `[h, w]` from the pooled gradient `g` and argmax `a`, into a zeroed
/// `dxp`: a scatter without a branch on the winner (random for activations); a clamped
/// window (NO_GRAD, q & 3 = 0) writes its zero to position 0. On AVX-512 (AVX2), sixteen
/// (eight) windows at a time, every position of each window written (the winner's gradient or
/// zero).
#[inline]
pub(super) fn unpool_plane(g: &[f32], a: &[u8], h: usize, w: usize, dxp: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = Simd::chosen() {
        for i in 0..ho {
            let (top, bottom) = dxp[2 * i * w..(2 * i + 2) * w].split_at_mut(w);
            let q = i * wo..(i + 1) * wo;
            let (g, a) = (&g[q.clone()], &a[q]);
            // SAFETY: the CPU runs the chosen set; each row holds w ≥ 2·wo values, g and a
            // wo each.
            match simd {
                Simd::Avx512 => unsafe { avx512::unpool_row(g, a, top, bottom) },
                Simd::Avx2 => unsafe { avx2::unpool_row(g, a, top, bottom) },
            }
        }
        return;
    }
    for i in 0..ho {
        for j in 0..wo {
            let (q, v) = (a[i * wo + j], g[i * wo + j]);
            let r = (q & 3) as usize;
            dxp[(2 * i + (r >> 1)) * w + 2 * j + (r & 1)] = if q == NO_GRAD { 0.0 } else { v };
        }
    }
}

/// The pooling kernels on 512-bit vectors: 16 windows of one row at a time, the even and odd
/// columns of two input rows separated by permutes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::NO_GRAD;
    use std::arch::x86_64::*;

    /// Lanes 0..n set.
    fn first(n: usize) -> u16 {
        if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
    }

    /// The even and odd values of `2n` (≤ 32) from `row`, and whether any is NaN.
    ///
    /// # Safety
    /// AVX-512F is available; `row` starts 2n readable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn split(row: *const f32, n: usize) -> (__m512, __m512, bool) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        // SAFETY: the masks cover the first 2n values from `row`, no more.
        let (lo, hi) = unsafe {
            (
                _mm512_maskz_loadu_ps(first(2 * n), row),
                _mm512_maskz_loadu_ps(first(2 * n.saturating_sub(8)), row.add(16)),
            )
        };
        let nan =
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(lo, lo) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(hi, hi);
        (
            _mm512_permutex2var_ps(lo, even, hi),
            _mm512_permutex2var_ps(lo, odd, hi),
            nan != 0,
        )
    }

    /// `super::pool_row` sixteen windows at a time, with the same values and positions; a run
    /// of windows holding a NaN takes the scalar path (NaN wins, the last one's position).
    ///
    /// # Safety
    /// AVX-512F is available; `r0` and `r1` hold at least 2·`o.len()` values, `a` `o.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pool_row(r0: &[f32], r1: &[f32], o: &mut [f32], a: &mut [u8], relu: bool) {
        let wo = o.len();
        for j0 in (0..wo).step_by(16) {
            let n = (wo - j0).min(16);
            // SAFETY: windows j0..j0+n read values 2·j0..2·(j0+n) of each row.
            let ((a0, b0, nan0), (c0, d0, nan1)) = unsafe {
                (
                    split(r0.as_ptr().add(2 * j0), n),
                    split(r1.as_ptr().add(2 * j0), n),
                )
            };
            if nan0 | nan1 {
                let (r0, r1) = (&r0[2 * j0..], &r1[2 * j0..]);
                super::pool_row(r0, r1, &mut o[j0..j0 + n], &mut a[j0..j0 + n], relu);
                continue;
            }
            let m = _mm512_max_ps(_mm512_max_ps(a0, b0), _mm512_max_ps(c0, d0));
            // The first position holding the maximum: later tests override earlier ones.
            let is_max = |v| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, m);
            let mut at = _mm512_set1_epi32(3);
            at = _mm512_mask_mov_epi32(at, is_max(c0), _mm512_set1_epi32(2));
            at = _mm512_mask_mov_epi32(at, is_max(b0), _mm512_set1_epi32(1));
            at = _mm512_mask_mov_epi32(at, is_max(a0), _mm512_setzero_si512());
            let mut out = m;
            if relu {
                let clamped = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(m, _mm512_setzero_ps());
                out = _mm512_mask_mov_ps(m, clamped, _mm512_setzero_ps());
                let no_grad = _mm512_set1_epi32(i32::from(NO_GRAD));
                at = _mm512_mask_mov_epi32(at, clamped, no_grad);
            }
            // SAFETY: n values of o and a from j0.
            unsafe {
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(j0), first(n), out);
                _mm512_mask_cvtepi32_storeu_epi8(a.as_mut_ptr().add(j0).cast(), first(n), at);
            }
        }
    }

    /// One row of windows' gradient: `g` and `a` (one value and position per window) into the
    /// two input rows `top` and `bottom`, every position of the windows written.
    ///
    /// # Safety
    /// AVX-512F is available; `top` and `bottom` hold at least 2·`g.len()` values, `a`
    /// `g.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpool_row(g: &[f32], a: &[u8], top: &mut [f32], bottom: &mut [f32]) {
        let wo = g.len();
        // Interleaving two registers of 16: the first and the second half of the 32.
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
        for j0 in (0..wo).step_by(16) {
            let n = (wo - j0).min(16);
            let mut bytes = [0u8; 16];
            bytes[..n].copy_from_slice(&a[j0..j0 + n]);
            // SAFETY: the 16 bytes of `bytes`; n values of g from j0.
            let (pos, v) = unsafe {
                (
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().cast())),
                    _mm512_maskz_loadu_ps(first(n), g.as_ptr().add(j0)),
                )
            };
            // The gradient where the window's winner is position p, else 0 (NO_GRAD: all 0).
            let winner =
                |p| _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(pos, _mm512_set1_epi32(p)), v);
            for (row, p) in [(&mut *top, 0), (&mut *bottom, 2)] {
                let (even, odd) = (winner(p), winner(p + 1));
                // SAFETY: values 2·j0..2·(j0+n) of the row.
                unsafe {
                    let out = row.as_mut_ptr().add(2 * j0);
                    let (first_half, second_half) = (
                        _mm512_permutex2var_ps(even, lo, odd),
                        _mm512_permutex2var_ps(even, hi, odd),
                    );
                    _mm512_mask_storeu_ps(out, first(2 * n), first_half);
                    _mm512_mask_storeu_ps(out.add(16), first(2 * n.saturating_sub(8)), second_half);
                }
            }
        }
    }
}

/// The pooling kernels on 256-bit vectors (AVX2): 8 windows of one row at a time, as
/// [`avx512`] does 16.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::NO_GRAD;
    use std::arch::x86_64::*;

    /// Lanes 0..n of a mask vector set.
    #[target_feature(enable = "avx2")]
    fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// The even and odd values of `2n` (≤ 16) from `row`, and whether any is NaN.
    ///
    /// # Safety
    /// AVX2 is available; `row` starts 2n readable values.
    #[target_feature(enable = "avx2")]
    unsafe fn split(row: *const f32, n: usize) -> (__m256, __m256, bool) {
        // SAFETY: the masks cover the first 2n values from `row`, no more.
        let (lo, hi) = unsafe {
            (
                _mm256_maskload_ps(row, first(2 * n)),
                _mm256_maskload_ps(row.add(8), first(2 * n.saturating_sub(4))),
            )
        };
        let nan = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(lo, lo))
            | _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(hi, hi));
        // Per 128-bit half [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then the 64-bit pairs in order.
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (
            order(_mm256_shuffle_ps::<0b10_00_10_00>(lo, hi)),
            order(_mm256_shuffle_ps::<0b11_01_11_01>(lo, hi)),
            nan != 0,
        )
    }

    /// `super::pool_row` eight windows at a time, with the same values and positions; a run
    /// of windows holding a NaN takes the scalar path.
    ///
    /// # Safety
    /// AVX2 is available; `r0` and `r1` hold at least 2·`o.len()` values, `a` `o.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pool_row(r0: &[f32], r1: &[f32], o: &mut [f32], a: &mut [u8], relu: bool) {
        let wo = o.len();
        for j0 in (0..wo).step_by(8) {
            let n = (wo - j0).min(8);
            // SAFETY: windows j0..j0+n read values 2·j0..2·(j0+n) of each row.
            let ((a0, b0, nan0), (c0, d0, nan1)) = unsafe {
                (
                    split(r0.as_ptr().add(2 * j0), n),
                    split(r1.as_ptr().add(2 * j0), n),
                )
            };
            if nan0 | nan1 {
                let (r0, r1) = (&r0[2 * j0..], &r1[2 * j0..]);
                super::pool_row(r0, r1, &mut o[j0..j0 + n], &mut a[j0..j0 + n], relu);
                continue;
            }
            let m = _mm256_max_ps(_mm256_max_ps(a0, b0), _mm256_max_ps(c0, d0));
            // The first position holding the maximum: later tests override earlier ones.
            let is_max = |v| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, m));
            let mut at = _mm256_set1_epi32(3);
            at = _mm256_blendv_epi8(at, _mm256_set1_epi32(2), is_max(c0));
            at = _mm256_blendv_epi8(at, _mm256_set1_epi32(1), is_max(b0));
            at = _mm256_blendv_epi8(at, _mm256_setzero_si256(), is_max(a0));
            let mut out = m;
            if relu {
                let clamped = _mm256_cmp_ps::<_CMP_LE_OQ>(m, _mm256_setzero_ps());
                out = _mm256_blendv_ps(m, _mm256_setzero_ps(), clamped);
                let no_grad = _mm256_set1_epi32(i32::from(NO_GRAD));
                at = _mm256_blendv_epi8(at, no_grad, _mm256_castps_si256(clamped));
            }
            let mut positions = [0i32; 8];
            // SAFETY: n values of o from j0; the 8 of `positions`.
            unsafe {
                _mm256_maskstore_ps(o.as_mut_ptr().add(j0), first(n), out);
                _mm256_storeu_si256(positions.as_mut_ptr().cast(), at);
            }
            for (d, p) in a[j0..j0 + n].iter_mut().zip(positions) {
                *d = p as u8;
            }
        }
    }

    /// One row of windows' gradient, as `avx512::unpool_row`, eight windows at a time.
    ///
    /// # Safety
    /// AVX2 is available; `top` and `bottom` hold at least 2·`g.len()` values, `a`
    /// `g.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpool_row(g: &[f32], a: &[u8], top: &mut [f32], bottom: &mut [f32]) {
        let wo = g.len();
        for j0 in (0..wo).step_by(8) {
            let n = (wo - j0).min(8);
            let mut bytes = [0u8; 16];
            bytes[..n].copy_from_slice(&a[j0..j0 + n]);
            // SAFETY: the first 8 of the 16 bytes of `bytes`; n values of g from j0.
            let (pos, v) = unsafe {
                (
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr().cast())),
                    _mm256_maskload_ps(g.as_ptr().add(j0), first(n)),
                )
            };
            // The gradient where the window's winner is position p, else 0 (NO_GRAD: all 0).
            let winner = |p| {
                let hit = _mm256_cmpeq_epi32(pos, _mm256_set1_epi32(p));
                _mm256_and_ps(_mm256_castsi256_ps(hit), v)
            };
            for (row, p) in [(&mut *top, 0), (&mut *bottom, 2)] {
                let (even, odd) = (winner(p), winner(p + 1));
                // Per half [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7].
                let (lo, hi) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
                let (first_half, second_half) = (
                    _mm256_permute2f128_ps::<0x20>(lo, hi),
                    _mm256_permute2f128_ps::<0x31>(lo, hi),
                );
                // SAFETY: values 2·j0..2·(j0+n) of the row.
                unsafe {
                    let out = row.as_mut_ptr().add(2 * j0);
                    _mm256_maskstore_ps(out, first(2 * n), first_half);
                    _mm256_maskstore_ps(out.add(8), first(2 * n.saturating_sub(4)), second_half);
                }
            }
        }
    }
}

/// Whether [`unpool_plane`] writes every value of an `[h, w]` plane (the vector kernels write
/// each window whole, and even sides leave no row or column outside the windows), so that
/// its output buffer need not be zeroed first.
pub(super) fn unpool_writes_all(h: usize, w: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vector = Simd::chosen().is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let vector = false;
    vector && h.is_multiple_of(2) && w.is_multiple_of(2)
}

/// One sample's `[C, h, w]` gradient from its pooled gradient, into a zeroed `dx`.
pub(super) fn unpool_sample(g: &[f32], a: &[u8], h: usize, w: usize, dx: &mut [f32]) {
    let plen = (h / 2) * (w / 2);
    if plen == 0 {
        return;
    }
    for ((gp, ap), dxp) in g.chunks(plen).zip(a.chunks(plen)).zip(dx.chunks_mut(h * w)) {
        unpool_plane(gp, ap, h, w, dxp);
    }
}

/// Flattened `[B, C, H/2, W/2]` maximum and its position in each 2×2 window (0..4, row-major).
/// With `relu`, the maximum is clamped at 0 (max(relu(x)) = relu(max(x))) and a clamped window
/// records [`NO_GRAD`].
pub(super) fn pool_forward(x: &[f32], [b, c, h, w]: [usize; 4], relu: bool) -> (Vec<f32>, Vec<u8>) {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0f32; b * c * ho * wo];
    let mut arg = vec![0u8; b * c * ho * wo];
    if ho * wo == 0 {
        return (out, arg);
    }
    out.par_chunks_mut(ho * wo)
        .zip(arg.par_chunks_mut(ho * wo))
        .zip(x.par_chunks(h * w))
        .with_min_len(pool_min_len())
        .for_each(|((o, a), xp)| pool_plane(xp, o, a, h, w, relu));
    (out, arg)
}

pub(super) fn pool_backward(dy: &[f32], arg: &[u8], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut dx = vec![0f32; b * c * h * w];
    if ho * wo == 0 {
        return dx;
    }
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(ho * wo))
        .zip(arg.par_chunks(ho * wo))
        .with_min_len(pool_min_len())
        .for_each(|((dxp, g), a)| unpool_plane(g, a, h, w, dxp));
    dx
}

#[derive(Debug)]
pub(super) struct PoolOp;

impl Backward<Flex, 1> for PoolOp {
    /// Input shape and the argmax of each window.
    type State = ([usize; 4], Arc<Vec<u8>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(n) = nx {
            let (shape, arg) = ops.state;
            let dy = contiguous(dy);
            let dx = pool_backward(values(&dy), &arg, shape);
            grads.register::<Flex>(n.id, flex(dx, shape));
        }
    }
}

/// 2×2 max pooling with stride 2 and no padding (odd rows and columns are dropped), on the
/// fast kernel when it is on and the tensor is f32 on flex; burn's op otherwise.
pub fn max_pool2(x: Tensor<4>) -> Tensor<4> {
    if !flotilla_kernels() || x.dtype() != DType::F32 {
        return burn::tensor::module::max_pool2d(x, burn::tensor::ops::MaxPoolOptions::new([2, 2]));
    }
    pool(x, false)
}

/// `max_pool2(relu(x))` in one pass: the pooled maximum clamped at 0, with a gradient only
/// through windows whose maximum is positive. No ReLU output is made or kept for the backward
/// pass. burn's ReLU and pooling when the fast kernels are off.
pub fn relu_max_pool2(x: Tensor<4>) -> Tensor<4> {
    if !flotilla_kernels() || x.dtype() != DType::F32 {
        return burn::tensor::module::max_pool2d(
            burn::tensor::activation::relu(x),
            burn::tensor::ops::MaxPoolOptions::new([2, 2]),
        );
    }
    pool(x, true)
}

pub(super) fn pool(x: Tensor<4>, relu: bool) -> Tensor<4> {
    count_fast_call();
    let shape = x.dims();
    let [b, c, h, w] = shape;
    let out_shape = [b, c, h / 2, w / 2];
    if x.is_autodiff() {
        let (xp, xn) = tracked(x);
        let (y, arg) = pool_forward(values(&xp), shape, relu);
        let y = flex(y, out_shape);
        let out = match PoolOp
            .prepare::<NoCheckpointing>([xn])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((shape, Arc::new(arg)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive::<Ad>(out)
    } else {
        let (y, _) = pool_forward(values(&untracked(x)), shape, relu);
        Tensor::from_primitive::<Flex>(flex(y, out_shape))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The vector rows against the scalar ones, bit for bit: ties, zeros, all-negative
    /// windows and NaNs, at every width from 1 to 40 windows (partial and several registers).
    #[test]
    fn vector_rows_match_scalar_rows() {
        for simd in [Simd::Avx512, Simd::Avx2] {
            if simd.available() {
                rows_match_on(simd);
            }
        }
    }

    fn rows_match_on(simd: Simd) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for wo in 1..=40 {
            for trial in 0..20 {
                let mut row = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| match rng.random_range(0..40) {
                            0 if trial % 4 == 0 => f32::NAN,
                            1 => -0.0,
                            _ => (rng.random_range(-4.0f32..4.0)).round(),
                        })
                        .collect()
                };
                let (r0, r1) = (row(2 * wo + 1), row(2 * wo + 1));
                for relu in [false, true] {
                    let (mut o1, mut a1) = (vec![7f32; wo], vec![9u8; wo]);
                    let (mut o2, mut a2) = (vec![7f32; wo], vec![9u8; wo]);
                    pool_row(&r0, &r1, &mut o1, &mut a1, relu);
                    // SAFETY: the CPU runs `simd` (checked by the caller); rows of 2·wo + 1
                    // values.
                    match simd {
                        Simd::Avx512 => unsafe {
                            avx512::pool_row(&r0, &r1, &mut o2, &mut a2, relu)
                        },
                        Simd::Avx2 => unsafe { avx2::pool_row(&r0, &r1, &mut o2, &mut a2, relu) },
                    }
                    assert_eq!(a1, a2, "{simd:?} argmax, {wo} windows, relu {relu}");
                    for (x, y) in o1.iter().zip(&o2) {
                        // Equal, or both NaN; a zero's sign may differ (max of ±0).
                        assert!(x == y || (x.is_nan() && y.is_nan()), "{x} vs {y}, {wo}");
                    }
                    // The gradient scattered back, against the scalar scatter.
                    let g: Vec<f32> = (0..wo).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let (h, w) = (2, 2 * wo + 1);
                    let mut want = vec![0f32; h * w];
                    for j in 0..wo {
                        let (q, v) = (a1[j], g[j]);
                        let r = (q & 3) as usize;
                        want[(r >> 1) * w + 2 * j + (r & 1)] = if q == NO_GRAD { 0.0 } else { v };
                    }
                    let mut got = vec![0f32; h * w];
                    let (top, bottom) = got.split_at_mut(w);
                    // SAFETY: as above; rows of 2·wo + 1 values.
                    match simd {
                        Simd::Avx512 => unsafe { avx512::unpool_row(&g, &a1, top, bottom) },
                        Simd::Avx2 => unsafe { avx2::unpool_row(&g, &a1, top, bottom) },
                    }
                    assert_eq!(got, want, "{simd:?} unpool, {wo} windows");
                    // Even sides: every value is written, over whatever the buffer held.
                    let w = 2 * wo;
                    let mut want = vec![0f32; 2 * w];
                    for j in 0..wo {
                        let (q, v) = (a1[j], g[j]);
                        let r = (q & 3) as usize;
                        want[(r >> 1) * w + 2 * j + (r & 1)] = if q == NO_GRAD { 0.0 } else { v };
                    }
                    let mut got = vec![f32::NAN; 2 * w];
                    let (top, bottom) = got.split_at_mut(w);
                    // SAFETY: as above; rows of 2·wo values.
                    match simd {
                        Simd::Avx512 => unsafe { avx512::unpool_row(&g, &a1, top, bottom) },
                        Simd::Avx2 => unsafe { avx2::unpool_row(&g, &a1, top, bottom) },
                    }
                    assert_eq!(got, want, "{simd:?} unpool over stale values, {wo} windows");
                }
            }
        }
    }
}
