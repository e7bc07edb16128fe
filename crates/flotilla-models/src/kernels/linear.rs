//! Linear layers: one GEMM with the bias folded in, the backward through strides.

use super::few_rows;
use super::*;

/// Threshold (multiply-adds) above which one linear product is split across threads.
pub(super) const LINEAR_PAR_WORK: usize = 1 << 21;

pub(super) fn linear_par(work: usize) -> gemm::Parallelism {
    if work >= LINEAR_PAR_WORK {
        gemm_par(threads())
    } else {
        gemm::Parallelism::None
    }
}

/// `x[n×i] · w[i×o] + bias`, row-major; the bias rows are the GEMM's starting value.
pub(super) fn linear_forward(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    [n, i, o]: [usize; 3],
) -> Vec<f32> {
    let mut y = Vec::with_capacity(n * o);
    for _ in 0..n {
        y.extend_from_slice(bias);
    }
    if let Some(simd) = few_rows::applies(n) {
        few_rows::forward(x, w, &mut y, [n, i, o], simd);
        return y;
    }
    matmul(
        n,
        o,
        i,
        &mut y,
        true,
        x,
        false,
        w,
        false,
        linear_par(n * i * o),
    );
    y
}

#[derive(Clone, Debug)]
pub(super) struct LinearState {
    pub(super) x: FlexTensor,
    pub(super) w: FlexTensor,
    pub(super) dims: [usize; 3],
}

#[derive(Debug)]
pub(super) struct LinearOp;

impl Backward<Flex, 3> for LinearOp {
    type State = LinearState;

    fn backward(self, ops: Ops<LinearState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw, nb] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let LinearState { x, w, dims } = ops.state;
        let [n, i, o] = dims;
        let (dy, x, w) = (values(&dy), values(&x), values(&w));
        let par = linear_par(n * i * o);
        let few = few_rows::applies(n);
        if let Some(node) = nx {
            // dX = dY · Wᵀ, reading W [i×o] as the transpose of a [o×i] operand.
            let dx = if let Some(simd) = few {
                few_rows::input_grad(dy, w, dims, simd)
            } else {
                let mut dx = vec![0f32; n * i];
                matmul(n, i, o, &mut dx, false, dy, false, w, true, par);
                dx
            };
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [n, i])));
        }
        if let Some(node) = nw {
            // dW = Xᵀ · dY, reading X [n×i] as the transpose of a [i×n] operand.
            let dw = if let Some(simd) = few {
                few_rows::weight_grad(x, dy, dims, simd)
            } else {
                let mut dw = vec![0f32; i * o];
                matmul(i, o, n, &mut dw, false, x, true, dy, false, par);
                dw
            };
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, [i, o])));
        }
        if let Some(node) = nb {
            let mut db = vec![0f32; o];
            for row in dy.chunks(o) {
                db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
            }
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [o])));
        }
    }
}

/// `x · w + bias` for `x` of shape `[n, i]`, `w` of shape `[i, o]` (burn's layout) and `bias`
/// of shape `[o]`: one GEMM forward (bias folded in), one GEMM per input gradient backward,
/// reading the transposes through strides instead of copying them. burn's matmul and add when
/// the fast kernels are off or the tensors are not f32 on flex.
pub fn linear(x: Tensor<2>, w: Tensor<2>, bias: Tensor<1>) -> Tensor<2> {
    let [n, i] = x.dims();
    let [wi, o] = w.dims();
    let f32s = [x.dtype(), w.dtype(), bias.dtype()]
        .iter()
        .all(|d| *d == DType::F32);
    let ad = [x.is_autodiff(), w.is_autodiff(), bias.is_autodiff()];
    if !flotilla_kernels()
        || !f32s
        || wi != i
        || bias.dims() != [o]
        || ad[0] != ad[1]
        || ad[1] != ad[2]
    {
        return x.matmul(w) + bias.unsqueeze::<2>();
    }
    count_fast_call();
    let dims = [n, i, o];
    if ad[0] {
        let ((xp, xn), (wp, wn), (bp, bn)) = (tracked(x), tracked(w), tracked(bias));
        let y = linear_forward(values(&xp), values(&wp), values(&bp), dims);
        let y = FlexTensor::from_data(TensorData::new(y, [n, o]));
        let out = match LinearOp
            .prepare::<NoCheckpointing>([xn, wn, bn])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(LinearState { x: xp, w: wp, dims }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive::<Ad>(out)
    } else {
        let (xp, wp, bp) = (untracked(x), untracked(w), untracked(bias));
        let y = linear_forward(values(&xp), values(&wp), values(&bp), dims);
        Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(y, [n, o])))
    }
}
