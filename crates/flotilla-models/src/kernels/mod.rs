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
//! [`use_flotilla_kernels`] switches back to burn's own ops process-wide (for comparisons and tests).
//!
//! On CPUs given the AVX-512 or AVX2 GEMM kernels (`gemm_glue` chooses the micro-kernels per
//! CPU), convolutions of stride 1 with multiples of 16 channels run on direct kernels instead
//! (`direct`): forward, dX and dW without im2col; linear layers over at most 64 rows (a
//! micro-batch) read their weights in place (`few_rows`) instead of having the GEMM pack them;
//! pooling runs 16 or 8 windows at a time.
//!
//! One file per op: `conv` (im2col + GEMM convolution), `direct` (the direct convolutions),
//! `conv_pool` (the fused convolution + ReLU + pooling), `pool`, `linear`, `few_rows` (the
//! few-row linear products), `gemm_glue` (the kernel choice, the GEMM call and the batch
//! split), `simd` (the vector type the own kernels are written over, per instruction set);
//! `tests` checks each against burn's ops.

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

mod conv;
mod conv_pool;
mod direct;
mod few_rows;
mod gemm_glue;
mod linear;
mod pool;
mod simd;
#[cfg(test)]
mod tests;

pub use conv::conv2d;
pub use conv_pool::conv_relu_pool2;
use gemm_glue::*;
pub use gemm_glue::{
    GemmKernels, gemm_kernels, gemm_kernels_for_cpu, gemm_kernels_from_env, set_gemm_kernels,
    square_matmul,
};
pub use linear::linear;
use pool::*;
pub use pool::{max_pool2, relu_max_pool2};

static FLOTILLA_KERNELS: AtomicBool = AtomicBool::new(true);

/// Chooses flotilla's kernels (`true`, the default) or burn's reference ops (`false`)
/// for every convolution and 2×2 max pool built by this crate, process-wide.
pub fn use_flotilla_kernels(on: bool) {
    FLOTILLA_KERNELS.store(on, Ordering::Relaxed);
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether flotilla's kernels (rather than burn's reference ops) are in use on this thread
/// (see [`use_flotilla_kernels`], [`with_flotilla_kernels`]).
pub fn flotilla_kernels() -> bool {
    OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(|| FLOTILLA_KERNELS.load(Ordering::Relaxed))
}

/// Runs `f` with flotilla's kernels on or off for ops dispatched from this thread only (the
/// backward pass follows the choice made in the forward pass), leaving other threads alone.
pub fn with_flotilla_kernels<T>(on: bool, f: impl FnOnce() -> T) -> T {
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
