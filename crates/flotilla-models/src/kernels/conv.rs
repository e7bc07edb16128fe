//! Square convolution (im2col + GEMM) forward and backward, and the fused convolution + ReLU +
//! 2×2 max pooling, registered with burn's autodiff.

use super::direct::{self, DirectWeights};
use super::simd::Simd;
use super::*;

/// Shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) k: usize,
    pub(super) s: usize,
    pub(super) p: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geom {
    pub(super) fn new(x: [usize; 4], wt: [usize; 4], s: usize, p: usize) -> Option<Self> {
        let [b, cin, h, w] = x;
        let [cout, wcin, k, k2] = wt;
        if wcin != cin || k != k2 || k == 0 || s == 0 || h + 2 * p < k || w + 2 * p < k {
            return None;
        }
        Some(Self {
            b,
            cin,
            h,
            w,
            cout,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        })
    }
    pub(super) fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }
    pub(super) fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    pub(super) fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// A 1×1, stride-1, unpadded convolution: im2col is the input itself.
    pub(super) fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
}

/// Output columns `lo..hi` whose input column `ow·s + kw − p` lies inside `0..w`.
pub(super) fn valid_cols(kw: usize, g: &Geom) -> (usize, usize) {
    let lo = if kw >= g.p {
        0
    } else {
        (g.p - kw).div_ceil(g.s)
    };
    let hi = if g.w - 1 + g.p < kw {
        0
    } else {
        (g.w - 1 + g.p - kw) / g.s + 1
    };
    let lo = lo.min(g.wo);
    (lo, hi.min(g.wo).max(lo))
}

/// `dst.copy_from_slice(src)` for the short rows of im2col (an output row: 14 values in W1's
/// second convolution). `copy_from_slice` of a run-time length is a call to `memcpy`, whose
/// fixed cost made up most of im2col's time; fixed 8-value moves (the last one overlapping)
/// compile to vector loads and stores in place.
#[inline(always)]
pub(super) fn copy_row(dst: &mut [f32], src: &[f32]) {
    const W: usize = 8;
    let n = dst.len();
    assert_eq!(n, src.len());
    if n < W {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
        return;
    }
    let mut i = 0;
    while i + W < n {
        let d: &mut [f32; W] = (&mut dst[i..i + W]).try_into().expect("8 values");
        *d = src[i..i + W].try_into().expect("8 values");
        i += W;
    }
    let d: &mut [f32; W] = (&mut dst[n - W..]).try_into().expect("8 values");
    *d = src[n - W..].try_into().expect("8 values");
}

/// Zeroes a short row (the one or two padding values of an im2col row, or a row of padding)
/// without a `memset` call, whose fixed cost is many times the work. Volatile stores keep the
/// compiler from turning the loop back into that call.
#[inline(always)]
pub(super) fn zero_row(dst: &mut [f32]) {
    for v in dst {
        // SAFETY: `v` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(v, 0.0) };
    }
}

/// One sample's `[cin, h, w]` into columns `[cin·k·k, ho·wo]`.
pub(super) fn im2col(x: &[f32], g: &Geom, cols: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.cin {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for kh in 0..g.k {
            for kw in 0..g.k {
                let r = (c * g.k + kh) * g.k + kw;
                let row = &mut cols[r * hw..(r + 1) * hw];
                let (lo, hi) = valid_cols(kw, g);
                for oh in 0..g.ho {
                    let dst = &mut row[oh * g.wo..(oh + 1) * g.wo];
                    let ih = (oh * g.s + kh) as isize - g.p as isize;
                    if ih < 0 || ih >= g.h as isize {
                        zero_row(dst);
                        continue;
                    }
                    let src = &xc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    // Padding first; the copy below overwrites what is not padding.
                    if lo > 0 {
                        zero_row(&mut dst[..lo]);
                    }
                    if hi < g.wo {
                        zero_row(&mut dst[hi..]);
                    }
                    if g.s == 1 {
                        let a = lo + kw - g.p;
                        copy_row(&mut dst[lo..hi], &src[a..a + hi - lo]);
                    } else {
                        for (ow, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = src[(ow + lo) * g.s + kw - g.p];
                        }
                    }
                }
            }
        }
    }
}

/// Adds columns `[cin·k·k, ho·wo]` back into one sample's `[cin, h, w]`.
pub(super) fn col2im(cols: &[f32], g: &Geom, x: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.cin {
        let xc = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for kh in 0..g.k {
            for kw in 0..g.k {
                let r = (c * g.k + kh) * g.k + kw;
                let row = &cols[r * hw..(r + 1) * hw];
                let (lo, hi) = valid_cols(kw, g);
                for oh in 0..g.ho {
                    let ih = (oh * g.s + kh) as isize - g.p as isize;
                    if ih < 0 || ih >= g.h as isize {
                        continue;
                    }
                    let src = &row[oh * g.wo + lo..oh * g.wo + hi];
                    let dst = &mut xc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    if g.s == 1 {
                        let a = lo + kw - g.p;
                        for (d, v) in dst[a..a + hi - lo].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (ow, v) in src.iter().enumerate() {
                            dst[(ow + lo) * g.s + kw - g.p] += v;
                        }
                    }
                }
            }
        }
    }
}

/// One sample's columns `[cin·k·k, ho·wo]`: the input itself for a pointwise convolution,
/// else unfolded into `cols`.
pub(super) fn columns<'a>(xb: &'a [f32], g: &Geom, cols: &'a mut Vec<f32>) -> &'a [f32] {
    if g.pointwise() {
        xb
    } else {
        cols.resize(g.ckk() * g.hw_out(), 0.0);
        im2col(xb, g, cols);
        cols
    }
}

/// One sample's convolution into `yb` (`cout` rows of `ho·wo`, uninitialised is fine): the
/// rows start as the bias (or zeros) and the GEMM of W with the sample's columns adds on, or,
/// with `direct` weights, the direct kernel writes them (`cols` is then its padded input).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_sample<'y>(
    xb: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    direct: Option<&DirectWeights>,
    cols: &mut Vec<f32>,
    yb: &'y mut [std::mem::MaybeUninit<f32>],
    par: gemm::Parallelism,
) -> &'y mut [f32] {
    use std::mem::MaybeUninit;
    let hw = g.hw_out();
    if let Some(dw) = direct {
        yb.fill(MaybeUninit::new(0.0));
        // SAFETY: every element of `yb` was written just above.
        let yb = unsafe { &mut *(yb as *mut [MaybeUninit<f32>] as *mut [f32]) };
        direct::sample(xb, dw, bias, g, cols, yb);
        return yb;
    }
    match bias {
        Some(bias) => {
            for (row, v) in yb.chunks_mut(hw).zip(bias) {
                row.fill(MaybeUninit::new(*v));
            }
        }
        None => yb.fill(MaybeUninit::new(0.0)),
    }
    // SAFETY: every element of `yb` (cout rows of hw) was written just above.
    let yb = unsafe { &mut *(yb as *mut [MaybeUninit<f32>] as *mut [f32]) };
    let cols = columns(xb, g, cols);
    matmul(g.cout, hw, g.ckk(), yb, true, w, false, cols, false, par);
    yb
}

/// The direct kernel's weights when it runs convolution `g` over a batch of `b`: its shapes
/// and CPU, and each sample on one thread (it has no multi-threaded form).
pub(super) fn direct_weights(w: &[f32], g: &Geom, b: usize) -> Option<DirectWeights> {
    direct_runs(g, b).map(|simd| DirectWeights::new(w, g, simd))
}

/// The instruction set of the direct kernel when it runs convolution `g` over a batch of `b`.
fn direct_runs(g: &Geom, b: usize) -> Option<Simd> {
    let (split, threads) = split_batch(b);
    (split || threads == 1)
        .then(|| direct::applies(g))
        .flatten()
}

pub(super) fn conv_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let out_len = g.cout * g.hw_out();
    // No zeroing pass over the whole output: each sample's block starts as its bias rows (or
    // zeros), written just before its GEMM, while it is in cache.
    let mut y: Vec<f32> = Vec::with_capacity(g.b * out_len);
    let direct = direct_weights(w, g, g.b);
    let (split, threads) = split_batch(g.b);
    let sample = |xb: &[f32], yb, cols: &mut Vec<f32>, par| {
        conv_sample(xb, w, bias, g, direct.as_ref(), cols, yb, par);
    };
    let spare = &mut y.spare_capacity_mut()[..g.b * out_len];
    if split {
        x.par_chunks(g.in_len())
            .zip(spare.par_chunks_mut(out_len))
            .for_each_init(Vec::new, |cols, (xb, yb)| {
                sample(xb, yb, cols, gemm::Parallelism::None)
            });
    } else {
        let mut cols = Vec::new();
        for (xb, yb) in x.chunks(g.in_len()).zip(spare.chunks_mut(out_len)) {
            sample(xb, yb, &mut cols, gemm_par(threads));
        }
    }
    // SAFETY: the b blocks of out_len values, all of the first b·out_len, were initialised.
    unsafe { y.set_len(g.b * out_len) };
    y
}

/// The sum of `v` over 16 running partial sums: a single running sum is a chain of dependent
/// adds that the compiler may not reorder, which made the bias gradient of W1's first
/// convolution (784 values per channel) cost 5% of a training step.
pub(super) fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(a, x)| *a += x);
    }
    acc.iter().sum::<f32>() + tail
}

/// A raw output pointer shared by workers that write disjoint ranges.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: only used to write disjoint per-sample ranges of one live buffer.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

pub(super) struct ConvGrads {
    pub(super) dx: Option<Vec<f32>>,
    pub(super) dw: Option<Vec<f32>>,
    pub(super) db: Option<Vec<f32>>,
}

/// Where the backward pass of a convolution finds its output gradient.
#[derive(Clone, Copy)]
pub(super) enum DySource<'a> {
    /// The gradient of the convolution's output, `[B, cout, ho, wo]`.
    Dense(&'a [f32]),
    /// The gradient of the fused ReLU + 2×2 max pool after it, `[B, cout, ho/2, wo/2]`, and
    /// the pool's argmax: each sample's output gradient is rebuilt in a scratch buffer.
    Pooled { dpool: &'a [f32], arg: &'a [u8] },
}

pub(super) fn conv_backward(
    x: &[f32],
    w: &[f32],
    dy: DySource,
    g: &Geom,
    need: [bool; 3],
) -> ConvGrads {
    let [need_dx, need_dw, need_db] = need;
    let (hw, ckk, out_len) = (g.hw_out(), g.ckk(), g.cout * g.hw_out());
    let mut dx = need_dx.then(|| vec![0f32; g.b * g.in_len()]);
    let dx_ptr = SharedOut(dx.as_mut().map_or(std::ptr::null_mut(), |v| v.as_mut_ptr()));
    let wlen = g.cout * ckk;

    let pooled_len = g.cout * (g.ho / 2) * (g.wo / 2);
    let (split, threads) = split_batch(g.b);
    // dX is the convolution of dY that `direct::input_gradient` describes: on the direct
    // kernel it needs no column gradients or col2im.
    let direct_dx = need_dx
        .then(|| direct::input_gradient(g))
        .flatten()
        .and_then(|t| direct_runs(&t, g.b).map(|simd| (t, simd)))
        .map(|(t, simd)| (t, DirectWeights::transposed_flipped(w, g, simd)));
    // dW on the direct kernel: accumulated in its layout, converted once at the end.
    let direct_dw = need_dw.then(|| direct_runs(g, g.b)).flatten();
    // Per worker: (dW accumulator, bias accumulator, columns, column gradients, output
    // gradient of one sample when it is rebuilt from the pool's, dY transposed).
    type Acc = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let new_acc = || -> Acc {
        (
            vec![0f32; if need_dw { wlen } else { 0 }],
            vec![0f32; if need_db { g.cout } else { 0 }],
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )
    };
    let sample = |mut acc: Acc, i: usize, par: gemm::Parallelism| -> Acc {
        let (dw, db, cols, dcols, dy_buf, dyt) = (
            &mut acc.0, &mut acc.1, &mut acc.2, &mut acc.3, &mut acc.4, &mut acc.5,
        );
        let xb = &x[i * g.in_len()..(i + 1) * g.in_len()];
        let dyb: &[f32] = match dy {
            DySource::Dense(dy) => &dy[i * out_len..(i + 1) * out_len],
            DySource::Pooled { dpool, arg } => {
                // Zeroed when first sized; again per sample only where the scatter leaves
                // some values unwritten.
                dy_buf.resize(out_len, 0.0);
                if !unpool_writes_all(g.ho, g.wo) {
                    dy_buf.fill(0.0);
                }
                let range = i * pooled_len..(i + 1) * pooled_len;
                unpool_sample(&dpool[range.clone()], &arg[range], g.ho, g.wo, dy_buf);
                dy_buf
            }
        };
        if let Some(simd) = direct_dw {
            direct::sample_dw(xb, dyb, g, simd, cols, dyt, dw);
        } else if need_dw {
            let cols = columns(xb, g, cols);
            matmul(g.cout, ckk, hw, dw, true, dyb, false, cols, true, par);
        }
        if need_db {
            for (d, row) in db.iter_mut().zip(dyb.chunks(hw)) {
                *d += sum_lanes(row);
            }
        }
        if need_dx {
            // SAFETY: sample i owns `in_len` elements at offset i·in_len of the dX buffer,
            // which outlives this pass; no other worker touches them.
            let dxb = unsafe {
                std::slice::from_raw_parts_mut({ dx_ptr }.0.add(i * g.in_len()), g.in_len())
            };
            if let Some((t, dwt)) = &direct_dx {
                direct::sample(dyb, dwt, None, t, dcols, dxb);
            } else if g.pointwise() {
                matmul(ckk, hw, g.cout, dxb, false, w, true, dyb, false, par);
            } else {
                dcols.resize(ckk * hw, 0.0);
                matmul(ckk, hw, g.cout, dcols, false, w, true, dyb, false, par);
                col2im(dcols, g, dxb);
            }
        }
        acc
    };
    let acc = if split {
        (0..g.b)
            .into_par_iter()
            .with_min_len(g.b.div_ceil(threads))
            .fold(new_acc, |acc, i| sample(acc, i, gemm::Parallelism::None))
            .reduce(new_acc, |mut a, b| {
                a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
                a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
                a
            })
    } else {
        (0..g.b).fold(new_acc(), |acc, i| sample(acc, i, gemm_par(threads)))
    };
    let dw = match (need_dw, direct_dw) {
        (true, Some(simd)) => Some(direct::standard_layout(&acc.0, g, simd)),
        (true, None) => Some(acc.0),
        (false, _) => None,
    };
    ConvGrads {
        dx,
        dw,
        db: need_db.then_some(acc.1),
    }
}

#[derive(Clone, Debug)]
pub(super) struct ConvState {
    pub(super) x: FlexTensor,
    pub(super) w: FlexTensor,
    pub(super) g: Geom,
}

#[derive(Debug)]
pub(super) struct ConvOp;

#[derive(Debug)]
pub(super) struct ConvBiasOp;

/// Runs a convolution's backward pass and registers the gradients of the parents in `ids`
/// (input, weight, bias).
pub(super) fn conv_register(
    x: &FlexTensor,
    w: &FlexTensor,
    g: Geom,
    dy: DySource,
    ids: [Option<NodeId>; 3],
    grads: &mut Gradients,
) {
    let r = conv_backward(values(x), values(w), dy, &g, ids.map(|i| i.is_some()));
    if let (Some(id), Some(v)) = (ids[0], r.dx) {
        grads.register::<Flex>(id, flex(v, [g.b, g.cin, g.h, g.w]));
    }
    if let (Some(id), Some(v)) = (ids[1], r.dw) {
        grads.register::<Flex>(id, flex(v, [g.cout, g.cin, g.k, g.k]));
    }
    if let (Some(id), Some(v)) = (ids[2], r.db) {
        grads.register::<Flex>(id, FlexTensor::from_data(TensorData::new(v, [g.cout])));
    }
}

impl Backward<Flex, 2> for ConvOp {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let ids = [nx.map(|n| n.id), nw.map(|n| n.id), None];
        let (st, dy) = (ops.state, contiguous(dy));
        conv_register(&st.x, &st.w, st.g, DySource::Dense(values(&dy)), ids, grads);
    }
}

impl Backward<Flex, 3> for ConvBiasOp {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw, nb] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let ids = [nx.map(|n| n.id), nw.map(|n| n.id), nb.map(|n| n.id)];
        let (st, dy) = (ops.state, contiguous(dy));
        conv_register(&st.x, &st.w, st.g, DySource::Dense(values(&dy)), ids, grads);
    }
}

/// 2-D convolution with a square kernel, dilation 1 and one group, on the fast kernels when
/// they are on and the tensors are f32 on flex (with or without autodiff); burn's op otherwise.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    let geom = Geom::new(x.dims(), weight.dims(), stride, padding);

    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    let ad = [x.is_autodiff(), weight.is_autodiff()];
    let same = ad[0] == ad[1] && bias.as_ref().is_none_or(|b| b.is_autodiff() == ad[0]);
    match geom {
        Some(g) if flotilla_kernels() && f32s && same && x.device() == weight.device() => {
            if ad[0] {
                conv_autodiff(x, weight, bias, g)
            } else {
                conv_plain(x, weight, bias, g)
            }
        }
        _ => burn::tensor::module::conv2d(
            x,
            weight,
            bias,
            burn::tensor::ops::ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
        ),
    }
}

pub(super) fn conv_plain(
    x: Tensor<4>,
    w: Tensor<4>,
    bias: Option<Tensor<1>>,
    g: Geom,
) -> Tensor<4> {
    count_fast_call();
    let (x, w) = (untracked(x), untracked(w));
    let b = bias.map(untracked);
    let y = conv_forward(values(&x), values(&w), b.as_ref().map(values), &g);
    Tensor::from_primitive::<Flex>(flex(y, [g.b, g.cout, g.ho, g.wo]))
}

pub(super) fn conv_autodiff(
    x: Tensor<4>,
    w: Tensor<4>,
    bias: Option<Tensor<1>>,
    g: Geom,
) -> Tensor<4> {
    count_fast_call();
    let ((xp, xn), (wp, wn)) = (tracked(x), tracked(w));
    let shape = [g.b, g.cout, g.ho, g.wo];
    let out = match bias {
        Some(b) => {
            let (bp, bn) = tracked(b);
            let y = flex(
                conv_forward(values(&xp), values(&wp), Some(values(&bp)), &g),
                shape,
            );
            match ConvBiasOp
                .prepare::<NoCheckpointing>([xn, wn, bn])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(ConvState { x: xp, w: wp, g }, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
        None => {
            let y = flex(conv_forward(values(&xp), values(&wp), None, &g), shape);
            match ConvOp
                .prepare::<NoCheckpointing>([xn, wn])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(ConvState { x: xp, w: wp, g }, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    };
    Tensor::from_primitive::<Ad>(out)
}
