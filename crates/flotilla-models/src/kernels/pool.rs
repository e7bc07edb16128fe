//! 2×2 stride-2 max pooling (with a fused ReLU) forward and backward, with a one-byte argmax
//! per output.

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
/// [`pool_forward`].
#[inline]
pub(super) fn pool_plane(xp: &[f32], o: &mut [f32], a: &mut [u8], h: usize, w: usize, relu: bool) {
    let (ho, wo) = (h / 2, w / 2);
    for i in 0..ho {
        let r0 = &xp[2 * i * w..(2 * i + 1) * w];
        let r1 = &xp[(2 * i + 1) * w..(2 * i + 2) * w];
        let o = &mut o[i * wo..(i + 1) * wo];
        let a = &mut a[i * wo..(i + 1) * wo];
        for j in 0..wo {
            let (m, at) = window_max([r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]]);
            // A clamped window (and NaN, which stays NaN like burn's ReLU) takes no
            // gradient. Arithmetic selects keep the loop free of branches.
            let clamp = (relu & ((m <= 0.0) | m.is_nan())) as u8;
            o[j] = if (clamp == 1) & !m.is_nan() { 0.0 } else { m };
            a[j] = at + clamp * (NO_GRAD - at);
        }
    }
}

/// One plane's gradient `[h, w]` from the pooled gradient `g` and argmax `a`, into a zeroed
/// `dxp`: a scatter without a branch on the winner (random for activations); a clamped
/// window (NO_GRAD, q & 3 = 0) writes its zero to position 0.
#[inline]
pub(super) fn unpool_plane(g: &[f32], a: &[u8], h: usize, w: usize, dxp: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    for i in 0..ho {
        for j in 0..wo {
            let (q, v) = (a[i * wo + j], g[i * wo + j]);
            let r = (q & 3) as usize;
            dxp[(2 * i + (r >> 1)) * w + 2 * j + (r & 1)] = if q == NO_GRAD { 0.0 } else { v };
        }
    }
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
