//! 2×2 stride-2 max pooling (with a fused ReLU) forward and backward, with a one-byte argmax
//! per output.

use super::simd::per_simd;
#[cfg(target_arch = "x86_64")]
use super::simd::{Simd, Vector};
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

/// [`window_max`] with the fused ReLU when `relu`: a window whose maximum is not positive (or
/// NaN) takes no gradient ([`NO_GRAD`]) and gives 0 (NaN stays NaN, like burn's ReLU).
/// Arithmetic selects keep a loop over it free of branches.
#[inline(always)]
pub(super) fn relu_window(v: [f32; 4], relu: bool) -> (f32, u8) {
    let (m, at) = window_max(v);
    let clamp = (relu & ((m <= 0.0) | m.is_nan())) as u8;
    let value = if (clamp == 1) & !m.is_nan() { 0.0 } else { m };
    (value, at + clamp * (NO_GRAD - at))
}

/// One plane `[h, w]` pooled into `o` (`[h/2, w/2]`) with its argmax in `a`; see
/// [`pool_forward`]. Sixteen windows at a time on AVX-512, eight on AVX2 (the set of
/// [`Simd::chosen`]), with the same values and positions.
#[inline]
pub(super) fn pool_plane(xp: &[f32], o: &mut [f32], a: &mut [u8], h: usize, w: usize, relu: bool) {
    let (ho, wo) = (h / 2, w / 2);
    #[cfg(target_arch = "x86_64")]
    let simd = Simd::chosen();
    for i in 0..ho {
        let r0 = &xp[2 * i * w..(2 * i + 1) * w];
        let r1 = &xp[(2 * i + 1) * w..(2 * i + 2) * w];
        let o = &mut o[i * wo..(i + 1) * wo];
        let a = &mut a[i * wo..(i + 1) * wo];
        // SAFETY: the CPU runs the chosen set; each row holds w ≥ 2·wo values, o and a wo
        // each.
        #[cfg(target_arch = "x86_64")]
        match simd {
            Some(simd) => unsafe { PoolRow { r0, r1, o, a, relu }.run::<1, 1>(simd) },
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
        (o[j], a[j]) = relu_window([r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]], relu);
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
            unsafe { UnpoolRow { g, a, top, bottom }.run::<1, 1>(simd) };
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

/// [`relu_window`] on vectors: lane j of `apply`'s four vectors is one window's values, in
/// the order of [`window_max`]. The position is carried as the bits of an f32 (blends, stores
/// and transposes move bits unchanged; read it back with `to_bits() as u8`). The caller rules
/// out NaN (the lanes' maximum would not follow burn's rule).
#[cfg(target_arch = "x86_64")]
pub(super) struct VectorWindows<V> {
    zero: V,
    one: V,
    two: V,
    three: V,
    no_grad: V,
}

#[cfg(target_arch = "x86_64")]
impl<V: Vector> VectorWindows<V> {
    /// # Safety
    /// V's instruction set is enabled.
    #[inline(always)]
    pub(super) unsafe fn new() -> Self {
        let position = |p: u8| f32::from_bits(u32::from(p));
        // SAFETY: forwarded from the caller.
        unsafe {
            Self {
                zero: V::zero(),
                one: V::splat(position(1)),
                two: V::splat(position(2)),
                three: V::splat(position(3)),
                no_grad: V::splat(position(NO_GRAD)),
            }
        }
    }

    /// The windows' values (clamped at 0 with `relu`) and positions.
    ///
    /// # Safety
    /// V's instruction set is enabled.
    #[inline(always)]
    pub(super) unsafe fn apply(&self, [a, b, c, d]: [V; 4], relu: bool) -> (V, V) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let m = a.max(b).max(c.max(d));
            // The first position holding the maximum: later tests override earlier ones.
            let mut pos = self.three;
            pos = c.select_eq(m, self.two, pos);
            pos = b.select_eq(m, self.one, pos);
            pos = a.select_eq(m, self.zero, pos);
            if !relu {
                return (m, pos);
            }
            // A window whose maximum is not positive gives 0 and no gradient.
            let zero = self.zero;
            (
                m.select_le(zero, zero, m),
                m.select_le(zero, self.no_grad, pos),
            )
        }
    }
}

/// One row of windows, `o.len()` of them, from input rows `r0` and `r1`: [`pool_row`] a vector
/// of windows at a time, with the same values and positions. A run of windows holding a NaN
/// takes the scalar row (NaN wins, the last one's position).
struct PoolRow<'a> {
    r0: &'a [f32],
    r1: &'a [f32],
    o: &'a mut [f32],
    a: &'a mut [u8],
    relu: bool,
}

per_simd!(PoolRow<'_>);

impl PoolRow<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const UNUSED_A: usize, const UNUSED_B: usize>(self) {
        let wo = self.o.len();
        assert!(self.r0.len() >= 2 * wo && self.r1.len() >= 2 * wo && self.a.len() >= wo);
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the asserted bounds (loads and stores of n windows read
        // and write 2n values of a row, n of the output).
        let rule = unsafe { VectorWindows::<V>::new() };
        for j0 in (0..wo).step_by(V::LANES) {
            let n = (wo - j0).min(V::LANES);
            let (((a0, b0), nan0), ((c0, d0), nan1)) =
                unsafe { (split::<V>(self.r0, j0, n), split::<V>(self.r1, j0, n)) };
            if nan0 | nan1 {
                let (r0, r1) = (&self.r0[2 * j0..], &self.r1[2 * j0..]);
                let (o, a) = (&mut self.o[j0..j0 + n], &mut self.a[j0..j0 + n]);
                pool_row(r0, r1, o, a, self.relu);
                continue;
            }
            let mut positions = [0f32; 16];
            unsafe {
                let (out, pos) = rule.apply([a0, b0, c0, d0], self.relu);
                out.store_n(self.o.as_mut_ptr().add(j0), n);
                pos.store(positions.as_mut_ptr());
            }
            for (d, p) in self.a[j0..j0 + n].iter_mut().zip(positions) {
                *d = p.to_bits() as u8;
            }
        }
    }
}

/// The even and odd values of windows `j0..j0 + n` of `row` (≤ LANES windows), and whether any
/// is NaN. (A function, not a closure, so that it inlines into the caller's instruction set.)
///
/// # Safety
/// V's instruction set is enabled; `row` holds at least 2·(j0 + n) values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn split<V: Vector>(row: &[f32], j0: usize, n: usize) -> ((V, V), bool) {
    // SAFETY: forwarded from the caller; the loads cover values 2·j0..2·(j0 + n).
    unsafe {
        let p = row.as_ptr().add(2 * j0);
        let (lo, hi) = (
            V::load_n(p, 2 * n),
            V::load_n(p.add(V::LANES), (2 * n).saturating_sub(V::LANES)),
        );
        (V::deinterleave(lo, hi), lo.has_nan() | hi.has_nan())
    }
}

/// One row of windows' gradient: `g` and `a` (one value and position per window) into the two
/// input rows `top` and `bottom`, a vector of windows at a time, every position of each window
/// written (the winner's gradient or zero).
struct UnpoolRow<'a> {
    g: &'a [f32],
    a: &'a [u8],
    top: &'a mut [f32],
    bottom: &'a mut [f32],
}

per_simd!(UnpoolRow<'_>);

impl UnpoolRow<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const UNUSED_A: usize, const UNUSED_B: usize>(self) {
        let wo = self.g.len();
        assert!(self.a.len() >= wo && self.top.len() >= 2 * wo && self.bottom.len() >= 2 * wo);
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the asserted bounds.
        let zero = unsafe { V::zero() };
        for j0 in (0..wo).step_by(V::LANES) {
            let n = (wo - j0).min(V::LANES);
            // Positions as small whole floats, compared exactly (NO_GRAD matches none of 0..4).
            let mut positions = [f32::from(NO_GRAD); 16];
            for (p, a) in positions.iter_mut().zip(&self.a[j0..j0 + n]) {
                *p = f32::from(*a);
            }
            let (pos, v) = unsafe {
                (
                    V::load(positions.as_ptr()),
                    V::load_n(self.g.as_ptr().add(j0), n),
                )
            };
            for (row, p) in [(&mut *self.top, 0.0), (&mut *self.bottom, 2.0)] {
                unsafe {
                    let even = pos.select_eq(V::splat(p), v, zero);
                    let odd = pos.select_eq(V::splat(p + 1.0), v, zero);
                    let (first, second) = V::interleave(even, odd);
                    let out = row.as_mut_ptr().add(2 * j0);
                    first.store_n(out, 2 * n);
                    second.store_n(out.add(V::LANES), (2 * n).saturating_sub(V::LANES));
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
                    let row = PoolRow {
                        r0: &r0,
                        r1: &r1,
                        o: &mut o2,
                        a: &mut a2,
                        relu,
                    };
                    unsafe { row.run::<1, 1>(simd) };
                    assert_eq!(a1, a2, "{simd:?} argmax, {wo} windows, relu {relu}");
                    for (x, y) in o1.iter().zip(&o2) {
                        // Equal, or both NaN; a zero's sign may differ (max of ±0).
                        assert!(x == y || (x.is_nan() && y.is_nan()), "{x} vs {y}, {wo}");
                    }
                    // The gradient scattered back, against the scalar scatter.
                    let g: Vec<f32> = (0..wo).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    // An odd width (its last column outside every window) into zeros, and an
                    // even one over stale values: every value must then be written.
                    for (w, fill) in [(2 * wo + 1, 0.0), (2 * wo, f32::NAN)] {
                        let mut want = vec![0f32; 2 * w];
                        for j in 0..wo {
                            let (q, v) = (a1[j], g[j]);
                            let r = (q & 3) as usize;
                            want[(r >> 1) * w + 2 * j + (r & 1)] =
                                if q == NO_GRAD { 0.0 } else { v };
                        }
                        let mut got = vec![fill; 2 * w];
                        let (top, bottom) = got.split_at_mut(w);
                        let row = UnpoolRow {
                            g: &g,
                            a: &a1,
                            top,
                            bottom,
                        };
                        // SAFETY: as above; rows of at least 2·wo values.
                        unsafe { row.run::<1, 1>(simd) };
                        assert_eq!(got, want, "{simd:?} unpool, {wo} windows, width {w}");
                    }
                }
            }
        }
    }
}
