//! Convolution + ReLU + 2×2 max pooling fused: each sample's convolution output is pooled
//! while in cache and never stored; the backward pass rebuilds a sample's output gradient from
//! the pooled one in a scratch buffer.

use super::conv::*;
use super::*;

/// Convolution (with bias), ReLU and 2×2 max pool per sample: each sample's convolution
/// output is pooled while it is in cache and never stored. Returns the pooled output and the
/// pool's argmax, `[B, cout, ho/2, wo/2]` each.
pub(super) fn conv_pool_forward(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    g: &Geom,
) -> (Vec<f32>, Vec<u8>) {
    let hw = g.hw_out();
    let plen = g.cout * (g.ho / 2) * (g.wo / 2);
    let mut out = vec![0f32; g.b * plen];
    let mut arg = vec![0u8; g.b * plen];
    if plen == 0 {
        return (out, arg);
    }
    let direct = direct_weights(w, g, g.b);
    let (split, threads) = split_batch(g.b);
    // Per worker: columns and one sample's convolution output.
    let sample =
        |xb: &[f32], ob: &mut [f32], ab: &mut [u8], bufs: &mut (Vec<f32>, Vec<f32>), par| {
            let (cols, y) = (&mut bufs.0, &mut bufs.1);
            if let Some(dw) = direct.as_ref() {
                // Pooled in the direct kernel's own layout; no full output is transposed.
                super::direct::sample_pooled(xb, dw, Some(bias), g, cols, ob, ab);
                return;
            }
            y.clear();
            y.reserve(g.cout * hw);
            let y = conv_sample(
                xb,
                w,
                Some(bias),
                g,
                None,
                cols,
                &mut y.spare_capacity_mut()[..g.cout * hw],
                par,
            );
            let pp = (g.ho / 2) * (g.wo / 2);
            for ((yp, op), ap) in y.chunks(hw).zip(ob.chunks_mut(pp)).zip(ab.chunks_mut(pp)) {
                pool_plane(yp, op, ap, g.ho, g.wo, true);
            }
        };
    if split {
        x.par_chunks(g.in_len())
            .zip(out.par_chunks_mut(plen))
            .zip(arg.par_chunks_mut(plen))
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |bufs, ((xb, ob), ab)| sample(xb, ob, ab, bufs, gemm::Parallelism::None),
            );
    } else {
        let mut bufs = (Vec::new(), Vec::new());
        for ((xb, ob), ab) in x
            .chunks(g.in_len())
            .zip(out.chunks_mut(plen))
            .zip(arg.chunks_mut(plen))
        {
            sample(xb, ob, ab, &mut bufs, gemm_par(threads));
        }
    }
    (out, arg)
}

#[derive(Clone, Debug)]
pub(super) struct ConvPoolState {
    pub(super) x: FlexTensor,
    pub(super) w: FlexTensor,
    pub(super) arg: Arc<Vec<u8>>,
    pub(super) g: Geom,
}

#[derive(Debug)]
pub(super) struct ConvPoolOp;

impl Backward<Flex, 3> for ConvPoolOp {
    type State = ConvPoolState;

    fn backward(self, ops: Ops<ConvPoolState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw, nb] = ops.parents;
        let dpool = contiguous(grads.consume::<Flex>(&ops.node));
        let ConvPoolState { x, w, arg, g } = ops.state;
        let ids = [nx.map(|n| n.id), nw.map(|n| n.id), nb.map(|n| n.id)];
        let dy = DySource::Pooled {
            dpool: values(&dpool),
            arg: &arg,
        };
        conv_register(&x, &w, g, dy, ids, grads);
    }
}

/// `max_pool2(relu(conv2d(x, weight, bias)))` in one op: each sample's convolution output is
/// pooled while in cache and never stored, and the backward pass rebuilds each sample's
/// output gradient from the pooled one and the argmax. burn's ops (or the separate kernels)
/// when the fast kernels are off or the shapes or types do not suit.
pub fn conv_relu_pool2(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    let geom = Geom::new(x.dims(), weight.dims(), stride, padding);
    let f32s = [x.dtype(), weight.dtype(), bias.dtype()]
        .iter()
        .all(|d| *d == DType::F32);
    let ad = [x.is_autodiff(), weight.is_autodiff(), bias.is_autodiff()];
    let g = match geom {
        Some(g)
            if flotilla_kernels()
                && f32s
                && ad[0] == ad[1]
                && ad[1] == ad[2]
                && x.device() == weight.device()
                && bias.dims() == [g.cout]
                && g.ho >= 2
                && g.wo >= 2 =>
        {
            g
        }
        _ => return relu_max_pool2(conv2d(x, weight, Some(bias), stride, padding)),
    };
    count_fast_call();
    let out_shape = [g.b, g.cout, g.ho / 2, g.wo / 2];
    if ad[0] {
        let ((xp, xn), (wp, wn), (bp, bn)) = (tracked(x), tracked(weight), tracked(bias));
        let (y, arg) = conv_pool_forward(values(&xp), values(&wp), values(&bp), &g);
        let y = flex(y, out_shape);
        let out = match ConvPoolOp
            .prepare::<NoCheckpointing>([xn, wn, bn])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                ConvPoolState {
                    x: xp,
                    w: wp,
                    arg: Arc::new(arg),
                    g,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive::<Ad>(out)
    } else {
        let (xp, wp, bp) = (untracked(x), untracked(weight), untracked(bias));
        let (y, _) = conv_pool_forward(values(&xp), values(&wp), values(&bp), &g);
        Tensor::from_primitive::<Flex>(flex(y, out_shape))
    }
}
