//! CPU kernels for the hot training ops (square convolution, 2×2 max pooling), plugged into
//! burn's `flex` backend and its autodiff through the backend extension API, so that layers,
//! models and methods stay as they are.
//!
//! - Convolution: per-sample im2col + one GEMM, NCHW in and out, bias folded into the GEMM.
//!   Backward recomputes im2col (nothing extra is kept alive) and produces dW, dX and the bias
//!   gradient in one pass over the batch: dW accumulates dY_b · cols_bᵀ, dX is col2im(Wᵀ · dY_b),
//!   and dX is skipped when the input needs no gradient (the first layer).
//! - Linear layers: one GEMM with the bias folded in; the backward reads Wᵀ and Xᵀ through
//!   strides (no transposed copies) and sums the bias gradient in one pass.
//! - Convolution + ReLU + 2×2 max pooling fused: each sample's convolution output is pooled
//!   while in cache and never stored; the backward pass rebuilds a sample's output gradient
//!   from the pooled one in a scratch buffer.
//! - Max pooling 2×2 stride 2: keeps a one-byte argmax per output instead of the input and i64
//!   indices; ties and NaNs resolve like burn's (first maximum, NaN wins).
//!
//! The batch is split across rayon's threads with single-threaded GEMMs; a batch smaller than
//! the thread count runs sample by sample with multi-threaded GEMMs instead.
//!
//! [`set_fast`] switches back to burn's own ops process-wide (for comparisons and tests).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

static FAST: AtomicBool = AtomicBool::new(true);

/// Chooses between these kernels (`true`, the default) and burn's reference ops (`false`)
/// for every convolution and 2×2 max pool built by this crate, process-wide.
pub fn set_fast(on: bool) {
    FAST.store(on, Ordering::Relaxed);
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the fast kernels are in use on this thread (see [`set_fast`], [`with_fast`]).
pub fn fast() -> bool {
    OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(|| FAST.load(Ordering::Relaxed))
}

/// Runs `f` with the fast kernels on or off for ops dispatched from this thread only (the
/// backward pass follows the choice made in the forward pass), leaving other threads alone.
pub fn with_fast<T>(on: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(on))));
    f()
}

/// Runs `f` with these kernels kept on the calling thread: no batch split and no
/// multi-threaded GEMM. For callers that already give every thread its own share of the work
/// (micro-batches of one training step), where a second level of splitting only adds waiting.
pub fn serial<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Threads these kernels may use from the calling thread.
fn threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    }
}

type Ad = Autodiff<Flex>;

/// Calls that took a fast path (tests check that the fast kernels really ran).
#[cfg(test)]
static FAST_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_fast_call() {
    #[cfg(test)]
    FAST_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Geom {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: [usize; 4], wt: [usize; 4], s: usize, p: usize) -> Option<Self> {
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
    fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// A 1×1, stride-1, unpadded convolution: im2col is the input itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
}

/// Output columns `lo..hi` whose input column `ow·s + kw − p` lies inside `0..w`.
fn valid_cols(kw: usize, g: &Geom) -> (usize, usize) {
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
fn copy_row(dst: &mut [f32], src: &[f32]) {
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
fn zero_row(dst: &mut [f32]) {
    for v in dst {
        // SAFETY: `v` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(v, 0.0) };
    }
}

/// One sample's `[cin, h, w]` into columns `[cin·k·k, ho·wo]`.
fn im2col(x: &[f32], g: &Geom, cols: &mut [f32]) {
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
fn col2im(cols: &[f32], g: &Geom, x: &mut [f32]) {
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

/// `dst[m×n] (+)= A[m×k] · B[k×n]`, all row-major; `a_t`/`b_t` read A/B from their transposes
/// (`[k×m]`, `[n×k]` row-major).
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_cs, a_rs) = if a_t { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if b_t { (k, 1) } else { (1, n) };
    // SAFETY: the asserts above keep every (row, column) the strides reach inside the slices,
    // and `dst` does not alias `a` or `b` (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Whether to split the batch across threads (single-threaded GEMMs) or to run the samples one
/// after another with multi-threaded GEMMs.
fn split_batch(b: usize) -> (bool, usize) {
    let threads = threads();
    (threads > 1 && b >= threads, threads)
}

fn gemm_par(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// One sample's columns `[cin·k·k, ho·wo]`: the input itself for a pointwise convolution,
/// else unfolded into `cols`.
fn columns<'a>(xb: &'a [f32], g: &Geom, cols: &'a mut Vec<f32>) -> &'a [f32] {
    if g.pointwise() {
        xb
    } else {
        cols.resize(g.ckk() * g.hw_out(), 0.0);
        im2col(xb, g, cols);
        cols
    }
}

/// One sample's convolution into `yb` (`cout` rows of `ho·wo`, uninitialised is fine): the
/// rows start as the bias (or zeros) and the GEMM of W with the sample's columns adds on.
fn conv_sample<'y>(
    xb: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    cols: &mut Vec<f32>,
    yb: &'y mut [std::mem::MaybeUninit<f32>],
    par: gemm::Parallelism,
) -> &'y mut [f32] {
    use std::mem::MaybeUninit;
    let hw = g.hw_out();
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

fn conv_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let out_len = g.cout * g.hw_out();
    // No zeroing pass over the whole output: each sample's block starts as its bias rows (or
    // zeros), written just before its GEMM, while it is in cache.
    let mut y: Vec<f32> = Vec::with_capacity(g.b * out_len);
    let sample = |xb: &[f32], yb, cols: &mut Vec<f32>, par| {
        conv_sample(xb, w, bias, g, cols, yb, par);
    };
    let spare = &mut y.spare_capacity_mut()[..g.b * out_len];
    let (split, threads) = split_batch(g.b);
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

/// Convolution (with bias), ReLU and 2×2 max pool per sample: each sample's convolution
/// output is pooled while it is in cache and never stored. Returns the pooled output and the
/// pool's argmax, `[B, cout, ho/2, wo/2]` each.
fn conv_pool_forward(x: &[f32], w: &[f32], bias: &[f32], g: &Geom) -> (Vec<f32>, Vec<u8>) {
    let hw = g.hw_out();
    let plen = g.cout * (g.ho / 2) * (g.wo / 2);
    let mut out = vec![0f32; g.b * plen];
    let mut arg = vec![0u8; g.b * plen];
    if plen == 0 {
        return (out, arg);
    }
    // Per worker: columns and one sample's convolution output.
    let sample =
        |xb: &[f32], ob: &mut [f32], ab: &mut [u8], bufs: &mut (Vec<f32>, Vec<f32>), par| {
            let (cols, y) = (&mut bufs.0, &mut bufs.1);
            y.clear();
            y.reserve(g.cout * hw);
            let y = conv_sample(
                xb,
                w,
                Some(bias),
                g,
                cols,
                &mut y.spare_capacity_mut()[..g.cout * hw],
                par,
            );
            let pp = (g.ho / 2) * (g.wo / 2);
            for ((yp, op), ap) in y.chunks(hw).zip(ob.chunks_mut(pp)).zip(ab.chunks_mut(pp)) {
                pool_plane(yp, op, ap, g.ho, g.wo, true);
            }
        };
    let (split, threads) = split_batch(g.b);
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

/// A raw output pointer shared by workers that write disjoint ranges.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used to write disjoint per-sample ranges of one live buffer.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

struct ConvGrads {
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
    db: Option<Vec<f32>>,
}

/// Where the backward pass of a convolution finds its output gradient.
#[derive(Clone, Copy)]
enum DySource<'a> {
    /// The gradient of the convolution's output, `[B, cout, ho, wo]`.
    Dense(&'a [f32]),
    /// The gradient of the fused ReLU + 2×2 max pool after it, `[B, cout, ho/2, wo/2]`, and
    /// the pool's argmax: each sample's output gradient is rebuilt in a scratch buffer.
    Pooled { dpool: &'a [f32], arg: &'a [u8] },
}

fn conv_backward(x: &[f32], w: &[f32], dy: DySource, g: &Geom, need: [bool; 3]) -> ConvGrads {
    let [need_dx, need_dw, need_db] = need;
    let (hw, ckk, out_len) = (g.hw_out(), g.ckk(), g.cout * g.hw_out());
    let mut dx = need_dx.then(|| vec![0f32; g.b * g.in_len()]);
    let dx_ptr = SharedOut(dx.as_mut().map_or(std::ptr::null_mut(), |v| v.as_mut_ptr()));
    let wlen = g.cout * ckk;

    let pooled_len = g.cout * (g.ho / 2) * (g.wo / 2);

    // Per worker: (dW accumulator, bias accumulator, columns, column gradients, output
    // gradient of one sample when it is rebuilt from the pool's).
    type Acc = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let new_acc = || -> Acc {
        (
            vec![0f32; if need_dw { wlen } else { 0 }],
            vec![0f32; if need_db { g.cout } else { 0 }],
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )
    };
    let sample = |mut acc: Acc, i: usize, par: gemm::Parallelism| -> Acc {
        let (dw, db, cols, dcols, dy_buf) =
            (&mut acc.0, &mut acc.1, &mut acc.2, &mut acc.3, &mut acc.4);
        let xb = &x[i * g.in_len()..(i + 1) * g.in_len()];
        let dyb: &[f32] = match dy {
            DySource::Dense(dy) => &dy[i * out_len..(i + 1) * out_len],
            DySource::Pooled { dpool, arg } => {
                dy_buf.clear();
                dy_buf.resize(out_len, 0.0);
                let range = i * pooled_len..(i + 1) * pooled_len;
                unpool_sample(&dpool[range.clone()], &arg[range], g.ho, g.wo, dy_buf);
                dy_buf
            }
        };
        if need_dw {
            let cols = columns(xb, g, cols);
            matmul(g.cout, ckk, hw, dw, true, dyb, false, cols, true, par);
        }
        if need_db {
            for (d, row) in db.iter_mut().zip(dyb.chunks(hw)) {
                *d += row.iter().sum::<f32>();
            }
        }
        if need_dx {
            // SAFETY: sample i owns `in_len` elements at offset i·in_len of the dX buffer,
            // which outlives this pass; no other worker touches them.
            let dxb = unsafe {
                std::slice::from_raw_parts_mut({ dx_ptr }.0.add(i * g.in_len()), g.in_len())
            };
            if g.pointwise() {
                matmul(ckk, hw, g.cout, dxb, false, w, true, dyb, false, par);
            } else {
                dcols.resize(ckk * hw, 0.0);
                matmul(ckk, hw, g.cout, dcols, false, w, true, dyb, false, par);
                col2im(dcols, g, dxb);
            }
        }
        acc
    };
    let (split, threads) = split_batch(g.b);
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
    ConvGrads {
        dx,
        dw: need_dw.then_some(acc.0),
        db: need_db.then_some(acc.1),
    }
}

/// Planes per pooling task: a whole tensor on one thread under [`serial`].
fn pool_min_len() -> usize {
    if threads() == 1 { usize::MAX } else { 8 }
}

/// Maximum of a 2×2 window and its position: the first maximum, or the last NaN (burn's rule).
/// Branch-free on the common path: which position wins is random for activations, and
/// mispredicted branches made pooling cost six times its memory traffic.
#[inline(always)]
fn window_max(v: [f32; 4]) -> (f32, u8) {
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
const NO_GRAD: u8 = 4;

/// One plane `[h, w]` pooled into `o` (`[h/2, w/2]`) with its argmax in `a`; see
/// [`pool_forward`].
#[inline]
fn pool_plane(xp: &[f32], o: &mut [f32], a: &mut [u8], h: usize, w: usize, relu: bool) {
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
fn unpool_plane(g: &[f32], a: &[u8], h: usize, w: usize, dxp: &mut [f32]) {
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
fn unpool_sample(g: &[f32], a: &[u8], h: usize, w: usize, dx: &mut [f32]) {
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
fn pool_forward(x: &[f32], [b, c, h, w]: [usize; 4], relu: bool) -> (Vec<f32>, Vec<u8>) {
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

fn pool_backward(dy: &[f32], arg: &[u8], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
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

/// The tensor with contiguous storage (a copy only when it is a strided view).
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The contiguous flex values and the autodiff node of a tensor on the training device.
fn tracked<const D: usize>(t: Tensor<D>) -> (FlexTensor, NodeGuard) {
    let (p, node) = t
        .try_into_primitive::<Ad>()
        .expect("autodiff flex tensor")
        .into_parts();
    (contiguous(p), node)
}

/// The contiguous flex values of a tensor on the inference device.
fn untracked<const D: usize>(t: Tensor<D>) -> FlexTensor {
    contiguous(t.try_into_primitive::<Flex>().expect("flex tensor"))
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn flex(v: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

#[derive(Clone, Debug)]
struct ConvState {
    x: FlexTensor,
    w: FlexTensor,
    g: Geom,
}

#[derive(Debug)]
struct ConvOp;

#[derive(Debug)]
struct ConvBiasOp;

/// Runs a convolution's backward pass and registers the gradients of the parents in `ids`
/// (input, weight, bias).
fn conv_register(
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
        Some(g) if fast() && f32s && same && x.device() == weight.device() => {
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

fn conv_plain(x: Tensor<4>, w: Tensor<4>, bias: Option<Tensor<1>>, g: Geom) -> Tensor<4> {
    count_fast_call();
    let (x, w) = (untracked(x), untracked(w));
    let b = bias.map(untracked);
    let y = conv_forward(values(&x), values(&w), b.as_ref().map(values), &g);
    Tensor::from_primitive::<Flex>(flex(y, [g.b, g.cout, g.ho, g.wo]))
}

fn conv_autodiff(x: Tensor<4>, w: Tensor<4>, bias: Option<Tensor<1>>, g: Geom) -> Tensor<4> {
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

#[derive(Debug)]
struct PoolOp;

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
    if !fast() || x.dtype() != DType::F32 {
        return burn::tensor::module::max_pool2d(x, burn::tensor::ops::MaxPoolOptions::new([2, 2]));
    }
    pool(x, false)
}

/// `max_pool2(relu(x))` in one pass: the pooled maximum clamped at 0, with a gradient only
/// through windows whose maximum is positive. No ReLU output is made or kept for the backward
/// pass. burn's ReLU and pooling when the fast kernels are off.
pub fn relu_max_pool2(x: Tensor<4>) -> Tensor<4> {
    if !fast() || x.dtype() != DType::F32 {
        return burn::tensor::module::max_pool2d(
            burn::tensor::activation::relu(x),
            burn::tensor::ops::MaxPoolOptions::new([2, 2]),
        );
    }
    pool(x, true)
}

fn pool(x: Tensor<4>, relu: bool) -> Tensor<4> {
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

#[derive(Clone, Debug)]
struct ConvPoolState {
    x: FlexTensor,
    w: FlexTensor,
    arg: Arc<Vec<u8>>,
    g: Geom,
}

#[derive(Debug)]
struct ConvPoolOp;

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
            if fast()
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

/// Threshold (multiply-adds) above which one linear product is split across threads.
const LINEAR_PAR_WORK: usize = 1 << 21;

fn linear_par(work: usize) -> gemm::Parallelism {
    if work >= LINEAR_PAR_WORK {
        gemm_par(threads())
    } else {
        gemm::Parallelism::None
    }
}

/// `x[n×i] · w[i×o] + bias`, row-major; the bias rows are the GEMM's starting value.
fn linear_forward(x: &[f32], w: &[f32], bias: &[f32], [n, i, o]: [usize; 3]) -> Vec<f32> {
    let mut y = Vec::with_capacity(n * o);
    for _ in 0..n {
        y.extend_from_slice(bias);
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
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    dims: [usize; 3],
}

#[derive(Debug)]
struct LinearOp;

impl Backward<Flex, 3> for LinearOp {
    type State = LinearState;

    fn backward(self, ops: Ops<LinearState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw, nb] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let LinearState { x, w, dims } = ops.state;
        let [n, i, o] = dims;
        let (dy, x, w) = (values(&dy), values(&x), values(&w));
        let par = linear_par(n * i * o);
        if let Some(node) = nx {
            // dX = dY · Wᵀ, reading W [i×o] as the transpose of a [o×i] operand.
            let mut dx = vec![0f32; n * i];
            matmul(n, i, o, &mut dx, false, dy, false, w, true, par);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, [n, i])));
        }
        if let Some(node) = nw {
            // dW = Xᵀ · dY, reading X [n×i] as the transpose of a [i×n] operand.
            let mut dw = vec![0f32; i * o];
            matmul(i, o, n, &mut dw, false, x, true, dy, false, par);
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
    if !fast() || !f32s || wi != i || bias.dims() != [o] || ad[0] != ad[1] || ad[1] != ad[2] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::{Rng, SeedableRng};

    /// Relative tolerance: |a − b| ≤ TOL · max(1, max |b|) over a whole tensor.
    const TOL: f32 = 1e-4;

    fn rand_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], dev: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(v, shape), dev)
    }

    fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= TOL * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Output, dX, dW and dB of one convolution with the loss Σ y·r.
    fn conv_run(
        fast_on: bool,
        data: &(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
        g: &Geom,
        bias: bool,
        dx: bool,
    ) -> Vec<Vec<f32>> {
        let dev = Device::flex().autodiff();
        let mut x = tensor(data.0.clone(), [g.b, g.cin, g.h, g.w], &dev);
        if dx {
            x = x.require_grad();
        }
        let w = tensor(data.1.clone(), [g.cout, g.cin, g.k, g.k], &dev).require_grad();
        let b = bias.then(|| tensor(data.2.clone(), [g.cout], &dev).require_grad());
        let before = FAST_CALLS.load(Ordering::Relaxed);
        let y = with_fast(fast_on, || {
            conv2d(x.clone(), w.clone(), b.clone(), g.s, g.p)
        });
        if fast_on {
            assert!(
                FAST_CALLS.load(Ordering::Relaxed) > before,
                "fast conv not taken"
            );
        }
        assert_eq!(y.dims(), [g.b, g.cout, g.ho, g.wo]);
        let r = tensor(data.3.clone(), [g.b, g.cout, g.ho, g.wo], &dev);
        let grads = (y.clone() * r).sum().backward();
        let mut out = vec![vals(y)];
        if dx {
            out.push(vals(x.grad(&grads).expect("dx")));
        } else {
            assert!(x.grad(&grads).is_none());
        }
        out.push(vals(w.grad(&grads).expect("dw")));
        if let Some(b) = b {
            out.push(vals(b.grad(&grads).expect("db")));
        }
        out
    }

    #[test]
    fn conv_matches_burn_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // (batch, cin, h, w, cout, kernel, stride, padding)
        let cases = [
            (1, 1, 28, 28, 4, 5, 1, 2),
            (3, 2, 7, 9, 5, 3, 1, 1),
            (2, 3, 9, 6, 4, 3, 2, 1),
            (4, 4, 8, 8, 6, 1, 1, 0),
            (2, 4, 9, 7, 3, 1, 2, 0),
            (5, 3, 11, 10, 2, 5, 2, 2),
            (2, 6, 6, 5, 7, 3, 1, 0),
            (3, 2, 5, 5, 3, 5, 1, 0),
            (1, 5, 12, 12, 8, 4, 4, 0),
            (2, 1, 3, 4, 2, 3, 2, 2),
            (6, 8, 14, 14, 16, 5, 1, 2),
        ];
        for (n, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
            let g = Geom::new([b, cin, h, w], [cout, cin, k, k], s, p).expect("valid");
            let data = (
                rand_vec(&mut rng, b * cin * h * w),
                rand_vec(&mut rng, cout * cin * k * k),
                rand_vec(&mut rng, cout),
                rand_vec(&mut rng, b * cout * g.ho * g.wo),
            );
            for (bias, dx) in [(true, true), (false, true), (true, false)] {
                let fast = conv_run(true, &data, &g, bias, dx);
                let want = conv_run(false, &data, &g, bias, dx);
                for (i, (f, r)) in fast.iter().zip(&want).enumerate() {
                    assert_close(&format!("case {n} bias {bias} dx {dx} part {i}"), f, r);
                }
            }
        }
    }

    #[test]
    fn conv_inference_matches_burn() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let dev = Device::flex();
        for &(b, cin, h, w, cout, k, s, p) in &[(3, 2, 9, 8, 4, 3, 1, 1), (2, 3, 10, 7, 5, 5, 2, 2)]
        {
            let x = tensor(rand_vec(&mut rng, b * cin * h * w), [b, cin, h, w], &dev);
            let wt = tensor(
                rand_vec(&mut rng, cout * cin * k * k),
                [cout, cin, k, k],
                &dev,
            );
            let bias = tensor(rand_vec(&mut rng, cout), [cout], &dev);
            let run = |on| {
                with_fast(on, || {
                    vals(conv2d(x.clone(), wt.clone(), Some(bias.clone()), s, p))
                })
            };
            assert_close("inference conv", &run(true), &run(false));
        }
    }

    #[test]
    fn max_pool_matches_burn_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let dev = Device::flex().autodiff();
        type Op = fn(Tensor<4>) -> Tensor<4>;
        let ops: [(&str, Op); 2] = [("pool", max_pool2), ("relu pool", relu_max_pool2)];
        for (&[b, c, h, w], (name, op)) in [
            [1, 1, 4, 4],
            [2, 3, 7, 9],
            [3, 2, 28, 28],
            [2, 4, 5, 2],
            [1, 2, 1, 6],
        ]
        .iter()
        .flat_map(|s| ops.iter().map(move |o| (s, *o)))
        {
            // Rounded values give ties and zeros (also all-negative windows for the fused
            // ReLU), which must resolve like burn's ops.
            let xv: Vec<f32> = rand_vec(&mut rng, b * c * h * w)
                .into_iter()
                .map(|v| (v * 4.0).round())
                .collect();
            let rv = rand_vec(&mut rng, b * c * (h / 2) * (w / 2));
            let run = |on| {
                let x = tensor(xv.clone(), [b, c, h, w], &dev).require_grad();
                let before = FAST_CALLS.load(Ordering::Relaxed);
                let y = with_fast(on, || op(x.clone()));
                if on {
                    assert!(
                        FAST_CALLS.load(Ordering::Relaxed) > before,
                        "fast pool not taken"
                    );
                }
                assert_eq!(y.dims(), [b, c, h / 2, w / 2]);
                let r = tensor(rv.clone(), [b, c, h / 2, w / 2], &dev);
                let grads = (y.clone() * r).sum().backward();
                (vals(y), vals(x.grad(&grads).expect("dx")))
            };
            let (fy, fdx) = run(true);
            let (ry, rdx) = run(false);
            assert_close(&format!("{name} out"), &fy, &ry);
            assert_close(&format!("{name} dx"), &fdx, &rdx);
            let plain = tensor(xv.clone(), [b, c, h, w], &Device::flex());
            let py = with_fast(true, || vals(op(plain)));
            assert_close(&format!("{name} inference"), &py, &ry);
        }
    }

    /// The fused convolution + ReLU + pool against burn's conv2d, relu and max_pool2d.
    #[test]
    fn conv_relu_pool_matches_burn_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        // (batch, cin, h, w, cout, kernel, stride, padding): W1's shapes, odd output sizes
        // (the last row and column are dropped), stride 2, no padding, 1×1.
        let cases = [
            (2, 1, 28, 28, 4, 5, 1, 2),
            (3, 4, 14, 14, 6, 5, 1, 2),
            (2, 3, 9, 7, 5, 3, 1, 1),
            (3, 2, 11, 10, 3, 3, 2, 1),
            (2, 3, 6, 6, 2, 1, 1, 0),
            (5, 2, 8, 9, 4, 3, 1, 0),
        ];
        for (n, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
            let g = Geom::new([b, cin, h, w], [cout, cin, k, k], s, p).expect("valid");
            let (xv, wv, bv) = (
                rand_vec(&mut rng, b * cin * h * w),
                rand_vec(&mut rng, cout * cin * k * k),
                rand_vec(&mut rng, cout),
            );
            let rv = rand_vec(&mut rng, b * cout * (g.ho / 2) * (g.wo / 2));
            let dev = Device::flex().autodiff();
            for dx in [true, false] {
                let run = |on: bool| {
                    let mut x = tensor(xv.clone(), [b, cin, h, w], &dev);
                    if dx {
                        x = x.require_grad();
                    }
                    let wt = tensor(wv.clone(), [cout, cin, k, k], &dev).require_grad();
                    let bt = tensor(bv.clone(), [cout], &dev).require_grad();
                    let before = FAST_CALLS.load(Ordering::Relaxed);
                    let y = with_fast(on, || {
                        conv_relu_pool2(x.clone(), wt.clone(), bt.clone(), s, p)
                    });
                    if on {
                        assert!(
                            FAST_CALLS.load(Ordering::Relaxed) > before,
                            "fused op not taken"
                        );
                    }
                    assert_eq!(y.dims(), [b, cout, g.ho / 2, g.wo / 2]);
                    let r = tensor(rv.clone(), [b, cout, g.ho / 2, g.wo / 2], &dev);
                    let grads = (y.clone() * r).sum().backward();
                    let mut out = vec![vals(y)];
                    if dx {
                        out.push(vals(x.grad(&grads).expect("dx")));
                    }
                    out.push(vals(wt.grad(&grads).expect("dw")));
                    out.push(vals(bt.grad(&grads).expect("db")));
                    out
                };
                let (fast, want) = (run(true), run(false));
                for (i, (f, r)) in fast.iter().zip(&want).enumerate() {
                    assert_close(&format!("case {n} dx {dx} part {i}"), f, r);
                }
            }
            let plain = |on: bool| {
                let d = Device::flex();
                with_fast(on, || {
                    vals(conv_relu_pool2(
                        tensor(xv.clone(), [b, cin, h, w], &d),
                        tensor(wv.clone(), [cout, cin, k, k], &d),
                        tensor(bv.clone(), [cout], &d),
                        s,
                        p,
                    ))
                })
            };
            assert_close(&format!("case {n} inference"), &plain(true), &plain(false));
        }
    }

    #[test]
    fn linear_matches_burn_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // (rows, inputs, outputs): odd sizes, a single row, and one above the threading
        // threshold.
        for &(n, i, o) in &[
            (1, 1, 1),
            (3, 7, 5),
            (1, 33, 17),
            (13, 9, 1),
            (64, 200, 180),
        ] {
            let xv = rand_vec(&mut rng, n * i);
            let wv = rand_vec(&mut rng, i * o);
            let bv = rand_vec(&mut rng, o);
            let rv = rand_vec(&mut rng, n * o);
            let dev = Device::flex().autodiff();
            let run = |on: bool| {
                let x = tensor(xv.clone(), [n, i], &dev).require_grad();
                let w = tensor(wv.clone(), [i, o], &dev).require_grad();
                let b = tensor(bv.clone(), [o], &dev).require_grad();
                let before = FAST_CALLS.load(Ordering::Relaxed);
                let y = with_fast(on, || linear(x.clone(), w.clone(), b.clone()));
                if on {
                    assert!(
                        FAST_CALLS.load(Ordering::Relaxed) > before,
                        "fast linear not taken"
                    );
                }
                assert_eq!(y.dims(), [n, o]);
                let grads = (y.clone() * tensor(rv.clone(), [n, o], &dev))
                    .sum()
                    .backward();
                let g = |t: &Tensor<2>| vals(t.grad(&grads).expect("grad"));
                vec![
                    vals(y.clone()),
                    g(&x),
                    g(&w),
                    vals(b.grad(&grads).expect("db")),
                ]
            };
            let (fast, want) = (run(true), run(false));
            for (k, (f, r)) in fast.iter().zip(&want).enumerate() {
                assert_close(&format!("linear {n}x{i}x{o} part {k}"), f, r);
            }
            let plain = |on: bool| {
                let d = Device::flex();
                with_fast(on, || {
                    vals(linear(
                        tensor(xv.clone(), [n, i], &d),
                        tensor(wv.clone(), [i, o], &d),
                        tensor(bv.clone(), [o], &d),
                    ))
                })
            };
            assert_close("linear inference", &plain(true), &plain(false));
        }
    }

    /// Loss and every parameter gradient of whole models, fast kernels against burn's ops.
    #[test]
    fn models_match_with_switch_on_and_off() {
        use crate::{Architecture, ModelSpec, Net, View, training_device};
        use burn::optim::GradientsParams;
        let resnet = ModelSpec {
            arch: Architecture::Resnet {
                blocks_per_stage: 1,
            },
            input: [1, 28, 28],
            classes: 10,
            width: 0.25,
            ranks: Default::default(),
        };
        let vit = ModelSpec {
            arch: Architecture::Vit {
                patch: 7,
                dim: 16,
                depth: 1,
                heads: 2,
                mlp_ratio: 2,
            },
            input: [1, 28, 28],
            classes: 10,
            width: 1.0,
            ranks: Default::default(),
        };
        for spec in [ModelSpec::fedavg_cnn(), ModelSpec::mlp_2nn(), resnet, vit] {
            let params = Net::init_params(&spec, 3).expect("params");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
            let batch = 4;
            let pixels = rand_vec(&mut rng, batch * 784);
            let weights = rand_vec(&mut rng, batch * spec.classes);
            let run = |on: bool| {
                with_fast(on, || {
                    let dev = training_device();
                    let net = Net::from_params(&spec, &params, &dev).expect("net");
                    let x = Net::input(pixels.clone(), batch, spec.input, &dev);
                    let r = tensor(weights.clone(), [batch, spec.classes], &dev);
                    let loss = (net.forward(x, &View::full()) * r).sum();
                    let grads = GradientsParams::from_grads(loss.backward(), &net);
                    let mut out = vec![vals(loss)];
                    for (name, id, rank) in net.param_ids() {
                        let g = match rank {
                            1 => grads.get::<1>(id).map(vals),
                            2 => grads.get::<2>(id).map(vals),
                            3 => grads.get::<3>(id).map(vals),
                            _ => grads.get::<4>(id).map(vals),
                        };
                        out.push(g.unwrap_or_else(|| panic!("no gradient for {name}")));
                    }
                    out
                })
            };
            let before = FAST_CALLS.load(Ordering::Relaxed);
            let fast = run(true);
            assert!(
                FAST_CALLS.load(Ordering::Relaxed) > before + 1,
                "fast kernels not taken"
            );
            let reference = run(false);
            for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
                assert_close(&format!("{:?} tensor {i}", spec.arch), f, r);
            }
        }
    }
}
