//! The GEMM glue: the gemm crate's matrix product on strided slices, and how a batch is split
//! over threads.

use super::*;

/// `dst[m×n] (+)= A[m×k] · B[k×n]`, all row-major; `a_t`/`b_t` read A/B from their transposes
/// (`[k×m]`, `[n×k]` row-major).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
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
pub(super) fn split_batch(b: usize) -> (bool, usize) {
    let threads = threads();
    (threads > 1 && b >= threads, threads)
}

pub(super) fn gemm_par(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}
