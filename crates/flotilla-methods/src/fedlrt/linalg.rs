//! The linear algebra of the bases: matrices from tensors, new orthonormal directions
//! (Gram–Schmidt and pivoted QR) and SVD truncation, in f64 (nalgebra).

use super::*;

/// A 2-D tensor as an f64 matrix.
pub(super) fn matrix(t: &Tensor) -> DMatrix<f64> {
    DMatrix::from_row_iterator(t.shape[0], t.shape[1], t.data.iter().map(|v| f64::from(*v)))
}

/// An f64 matrix as a row-major f32 tensor.
pub(super) fn tensor(name: &str, m: &DMatrix<f64>) -> Tensor {
    Tensor {
        name: name.into(),
        shape: vec![m.nrows(), m.ncols()],
        data: m.transpose().as_slice().iter().map(|v| *v as f32).collect(),
    }
}

pub(super) fn hcat(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let mut m = DMatrix::zeros(a.nrows(), a.ncols() + b.ncols());
    m.columns_mut(0, a.ncols()).copy_from(a);
    m.columns_mut(a.ncols(), b.ncols()).copy_from(b);
    m
}

/// Relative size below which a direction of the gradient counts as already in the basis
/// (methods.md §4.9 gap 2).
pub(super) const NEGLIGIBLE: f64 = 1e-6;

/// Orthonormal directions of `g`'s range outside span(`u`) (u orthonormal), strongest first:
/// the residual (I − UUᵀ)G twice (two-pass Gram–Schmidt keeps it orthogonal to U in floating
/// point), then a column-pivoted QR of the residual, keeping the columns whose pivot is above
/// [`NEGLIGIBLE`] × ‖G‖_F.
pub(super) fn new_directions(u: &DMatrix<f64>, g: &DMatrix<f64>) -> DMatrix<f64> {
    let scale = g.norm();
    if scale == 0.0 || !scale.is_finite() {
        return DMatrix::zeros(u.nrows(), 0);
    }
    let mut r = g - u * (u.transpose() * g);
    r -= u * (u.transpose() * &r);
    let qr = r.col_piv_qr();
    let tri = qr.r();
    let k = (0..tri.nrows().min(tri.ncols()))
        .take_while(|&i| tri[(i, i)].abs() > NEGLIGIBLE * scale)
        .count();
    qr.q().columns(0, k).into_owned()
}

/// Truncation (methods.md §4.3 step 5): P Σ Qᵀ = svd(S̃); the smallest rank r₁ whose dropped
/// singular values have norm below τ‖S̃‖_F, clamped to [r_min, r_max] and to S̃'s size; then
/// U = Ũ P₁, V = Ṽ Q₁, S = Σ₁, re-orthonormalised by QR with the factors folded into S.
pub(super) fn truncate(
    u_aug: &DMatrix<f64>,
    s: &DMatrix<f64>,
    v_aug: &DMatrix<f64>,
    tau: f64,
    r_min: usize,
    r_max: usize,
) -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
    let a = s.nrows();
    let svd = s.clone().svd(true, true);
    let sigma = &svd.singular_values;
    let threshold = tau * sigma.norm();
    // tail[i] = ‖σ_i..‖₂
    let mut tail = vec![0.0; a + 1];
    for i in (0..a).rev() {
        tail[i] = (tail[i + 1] * tail[i + 1] + sigma[i] * sigma[i]).sqrt();
    }
    let keep = (0..=a).find(|&r1| tail[r1] < threshold).unwrap_or(a);
    let r1 = keep.max(r_min).min(r_max).min(a).max(1);
    let p = svd.u.expect("requested").columns(0, r1).into_owned();
    let q = svd.v_t.expect("requested").rows(0, r1).transpose();
    let sig = DMatrix::from_diagonal(&sigma.rows(0, r1).into_owned());
    let (qu, ru) = (u_aug * p).qr().unpack();
    let (qv, rv) = (v_aug * q).qr().unpack();
    (qu, ru * sig * rv.transpose(), qv)
}
