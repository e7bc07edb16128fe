//! Linear layers of a micro-batch (a product with few rows) on AVX-512, reading the weights in
//! place.
//!
//! A micro-batch of 16 samples through W1's first linear layer (3136 → 512) is a product with
//! 16 rows against a 6.4 MB weight matrix. The gemm crate packs that matrix into its tile
//! layout on every call (in the forward pass, and transposed again for dX), and the packing
//! cost more than the arithmetic: on the Intel Xeon a micro-batch of 16 took 0.48 ms forward,
//! 1.25 ms for dX and 0.68 ms for dW (with its zeroed buffer), where the FMAs alone take about
//! 0.25 ms each at one core's peak. Here each product reads W once, where it lies:
//! - forward, `y += x · W` ([`forward`]): 64 columns by up to 6 rows in registers; W is read
//!   in chunks of 128 rows, each staying in L1 while every row tile of `x` passes over it;
//! - dX = dY · Wᵀ ([`input_grad`]): dot products of 4 rows of dY with 4 rows of W at a time,
//!   the 16 sums reduced across lanes together by a shuffle tree ([`reduce16`]);
//! - dW = Xᵀ · dY ([`weight_grad`]): 6 rows of dW by 64 columns in registers, summed over the
//!   micro-batch and written once (no zeroed buffer first).
//!
//! Used for products of at most [`MAX_ROWS`] rows on one thread (a micro-batch's own thread,
//! see `local::micro` in the engine) where the AVX-512 GEMM kernels are chosen for the CPU;
//! the gemm crate otherwise.

use super::gemm_glue::{GemmKernels, gemm_kernels};
use super::threads;

/// The most rows for which these kernels replace the GEMM: a micro-batch of batch 128 on two
/// threads (64) is the largest measured faster (docs/performance.md).
pub(super) const MAX_ROWS: usize = 64;

/// Calls `$tile.run::<R, CB>()` for `$rows` rows (1..=`$max`) and `$cb` vectors (1..=4).
macro_rules! by_shape {
    ($tile:expr, $rows:expr, $cb:expr, 6) => {
        match ($rows, $cb) {
            (6, 4) => $tile.run::<6, 4>(),
            (6, 3) => $tile.run::<6, 3>(),
            (6, 2) => $tile.run::<6, 2>(),
            (6, _) => $tile.run::<6, 1>(),
            (5, 4) => $tile.run::<5, 4>(),
            (5, 3) => $tile.run::<5, 3>(),
            (5, 2) => $tile.run::<5, 2>(),
            (5, _) => $tile.run::<5, 1>(),
            (4, 4) => $tile.run::<4, 4>(),
            (4, 3) => $tile.run::<4, 3>(),
            (4, 2) => $tile.run::<4, 2>(),
            (4, _) => $tile.run::<4, 1>(),
            (3, 4) => $tile.run::<3, 4>(),
            (3, 3) => $tile.run::<3, 3>(),
            (3, 2) => $tile.run::<3, 2>(),
            (3, _) => $tile.run::<3, 1>(),
            (2, 4) => $tile.run::<2, 4>(),
            (2, 3) => $tile.run::<2, 3>(),
            (2, 2) => $tile.run::<2, 2>(),
            (2, _) => $tile.run::<2, 1>(),
            (_, 4) => $tile.run::<1, 4>(),
            (_, 3) => $tile.run::<1, 3>(),
            (_, 2) => $tile.run::<1, 2>(),
            (_, _) => $tile.run::<1, 1>(),
        }
    };
}

/// Rows of W per forward chunk: 128 × 64 columns × 4 bytes = 32 KiB, within L1.
const CHUNK: usize = 128;

/// Whether a linear layer over `n` rows runs on these kernels (see the module docs).
pub(super) fn applies(n: usize) -> bool {
    (1..=MAX_ROWS).contains(&n) && threads() == 1 && gemm_kernels() == GemmKernels::Avx512
}

fn check_cpu() {
    assert!(
        GemmKernels::Avx512.available(),
        "few-row linear kernels outside their CPU"
    );
}

/// `y[n×o] += x[n×i] · w[i×o]`, all row-major (`y` holds the bias rows).
pub(super) fn forward(x: &[f32], w: &[f32], y: &mut [f32], [n, i, o]: [usize; 3]) {
    check_cpu();
    assert!(x.len() >= n * i && w.len() >= i * o && y.len() >= n * o);
    for i0 in (0..i).step_by(CHUNK) {
        let depth = (i - i0).min(CHUNK);
        for c0 in (0..o).step_by(64) {
            let cols = (o - c0).min(64);
            for r0 in (0..n).step_by(6) {
                let tile = FwdTile {
                    // In bounds: r0 < n, i0 < i, c0 < o (the asserts above).
                    x: x[r0 * i + i0..].as_ptr(),
                    x_row: i,
                    w: w[i0 * o + c0..].as_ptr(),
                    y: y[r0 * o + c0..].as_mut_ptr(),
                    o,
                    depth,
                    cols,
                };
                // SAFETY: AVX-512 is available (checked); the tile reads rows r0..r0+rows of
                // x at columns i0..i0+depth, rows i0..i0+depth of w and rows r0..r0+rows of y
                // at columns c0..c0+cols, all inside the slices (asserted above).
                unsafe { by_shape!(tile, (n - r0).min(6), cols.div_ceil(16), 6) };
            }
        }
    }
}

/// `dX[n×i] = dY[n×o] · w[i×o]ᵀ`, row-major.
pub(super) fn input_grad(dy: &[f32], w: &[f32], [n, i, o]: [usize; 3]) -> Vec<f32> {
    check_cpu();
    assert!(dy.len() >= n * o && w.len() >= i * o && n > 0 && i > 0);
    let mut dx = vec![0f32; n * i];
    for a0 in (0..i).step_by(4) {
        let acount = (i - a0).min(4);
        // Rows past the edge repeat the last one: valid memory whose sums are not stored.
        let wrows = [0, 1, 2, 3].map(|j| w[(a0 + j.min(acount - 1)) * o..][..o].as_ptr());
        for r0 in (0..n).step_by(4) {
            let rcount = (n - r0).min(4);
            let drows = [0, 1, 2, 3].map(|j| dy[(r0 + j.min(rcount - 1)) * o..][..o].as_ptr());
            let mut sums = [0f32; 16];
            // SAFETY: AVX-512 is available (checked); each pointer starts o valid values.
            unsafe { dot4x4(drows, wrows, o, &mut sums) };
            for (ri, s) in sums.chunks(4).take(rcount).enumerate() {
                dx[(r0 + ri) * i + a0..][..acount].copy_from_slice(&s[..acount]);
            }
        }
    }
    dx
}

/// `dW[i×o] = x[n×i]ᵀ · dY[n×o]`, row-major.
pub(super) fn weight_grad(x: &[f32], dy: &[f32], [n, i, o]: [usize; 3]) -> Vec<f32> {
    check_cpu();
    assert!(x.len() >= n * i && dy.len() >= n * o);
    let mut dw: Vec<f32> = Vec::with_capacity(i * o);
    let out = dw.spare_capacity_mut().as_mut_ptr().cast::<f32>();
    for a0 in (0..i).step_by(6) {
        for c0 in (0..o).step_by(64) {
            let cols = (o - c0).min(64);
            let tile = DwTile {
                x: x[a0..].as_ptr(),
                x_row: i,
                dy: dy[c0..].as_ptr(),
                n,
                o,
                // SAFETY: a0 < i and c0 < o, so the offset lies inside the i·o capacity.
                dw: unsafe { out.add(a0 * o + c0) },
                cols,
            };
            // SAFETY: AVX-512 is available (checked); the tile reads columns a0..a0+rows of
            // the n rows of x, columns c0..c0+cols of the n rows of dY, and writes rows
            // a0..a0+rows, columns c0..c0+cols of the i·o capacity of dw.
            unsafe { by_shape!(tile, (i - a0).min(6), cols.div_ceil(16), 6) };
        }
    }
    // SAFETY: the tiles cover every row (a0 steps over 0..i) and column (c0 over 0..o, masked
    // stores of exactly `cols` values) of the i·o values.
    unsafe { dw.set_len(i * o) };
    dw
}

/// The load masks of `CB` vectors covering `cols` (≤ 16·CB) columns: full but for the last.
#[cfg(target_arch = "x86_64")]
fn masks<const CB: usize>(cols: usize) -> [u16; CB] {
    let mut m = [u16::MAX; CB];
    let last = cols - 16 * (CB - 1);
    debug_assert!((1..=16).contains(&last));
    m[CB - 1] = if last >= 16 {
        u16::MAX
    } else {
        (1u16 << last) - 1
    };
    m
}

/// One register tile of the forward product: `R` rows by `cols` (≤ 16·CB) columns, over
/// `depth` rows of W.
struct FwdTile {
    x: *const f32,
    x_row: usize,
    w: *const f32,
    y: *mut f32,
    /// Row length of W and y.
    o: usize,
    depth: usize,
    cols: usize,
}

impl FwdTile {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const CB: usize>(&self) {
        use std::arch::x86_64::*;
        let m = masks::<CB>(self.cols);
        let mut acc = [[_mm512_setzero_ps(); CB]; R];
        // SAFETY (every offset below): within the tile the caller vouches for.
        for (r, a) in acc.iter_mut().enumerate() {
            for (c, v) in a.iter_mut().enumerate() {
                *v = unsafe { _mm512_maskz_loadu_ps(m[c], self.y.add(r * self.o + 16 * c)) };
            }
        }
        for k in 0..self.depth {
            let wr = unsafe { self.w.add(k * self.o) };
            let mut wv = [_mm512_setzero_ps(); CB];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_maskz_loadu_ps(m[c], wr.add(16 * c)) };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(unsafe { *self.x.add(r * self.x_row + k) });
                for c in 0..CB {
                    a[c] = _mm512_fmadd_ps(wv[c], xv, a[c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                unsafe { _mm512_mask_storeu_ps(self.y.add(r * self.o + 16 * c), m[c], *v) };
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const R: usize, const CB: usize>(&self) {
        unreachable!("AVX-512 is x86-64 only")
    }
}

/// One register tile of the weight gradient: `R` rows of dW (columns of x) by `cols`
/// (≤ 16·CB) columns, summed over the `n` rows of the micro-batch.
struct DwTile {
    x: *const f32,
    x_row: usize,
    dy: *const f32,
    n: usize,
    /// Row length of dY and dW.
    o: usize,
    dw: *mut f32,
    cols: usize,
}

impl DwTile {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize, const CB: usize>(&self) {
        use std::arch::x86_64::*;
        let m = masks::<CB>(self.cols);
        let mut acc = [[_mm512_setzero_ps(); CB]; R];
        // SAFETY (every offset below): within the tile the caller vouches for.
        for s in 0..self.n {
            let dr = unsafe { self.dy.add(s * self.o) };
            let mut dv = [_mm512_setzero_ps(); CB];
            for (c, v) in dv.iter_mut().enumerate() {
                *v = unsafe { _mm512_maskz_loadu_ps(m[c], dr.add(16 * c)) };
            }
            let xr = unsafe { self.x.add(s * self.x_row) };
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(unsafe { *xr.add(r) });
                for c in 0..CB {
                    a[c] = _mm512_fmadd_ps(dv[c], xv, a[c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                unsafe { _mm512_mask_storeu_ps(self.dw.add(r * self.o + 16 * c), m[c], *v) };
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const R: usize, const CB: usize>(&self) {
        unreachable!("AVX-512 is x86-64 only")
    }
}

/// `sums[4·r + a] = Σ_j d[r][j] · w[a][j]` over `len` values: 16 dot products at once.
///
/// # Safety
/// AVX-512F is available and every pointer starts `len` readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4x4(d: [*const f32; 4], w: [*const f32; 4], len: usize, sums: &mut [f32; 16]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 16];
    let full = len / 16;
    for s in 0..=full {
        let (off, m) = if s < full {
            (16 * s, u16::MAX)
        } else if !len.is_multiple_of(16) {
            (16 * full, (1u16 << (len % 16)) - 1)
        } else {
            break;
        };
        // SAFETY: off + 16 ≤ len, or the mask covers only the values below len.
        let mut wv = [_mm512_setzero_ps(); 4];
        for (v, p) in wv.iter_mut().zip(w) {
            *v = unsafe { _mm512_maskz_loadu_ps(m, p.add(off)) };
        }
        for (r, p) in d.iter().enumerate() {
            let dv = unsafe { _mm512_maskz_loadu_ps(m, p.add(off)) };
            for (a, v) in wv.iter().enumerate() {
                acc[4 * r + a] = _mm512_fmadd_ps(dv, *v, acc[4 * r + a]);
            }
        }
    }
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(acc)) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot4x4(_: [*const f32; 4], _: [*const f32; 4], _: usize, _: &mut [f32; 16]) {
    unreachable!("AVX-512 is x86-64 only")
}

/// The lane sums of 16 vectors as one vector (lane j = Σ v[j]), in 45 shuffles and adds
/// rather than 16 separate reductions of 8 each. Each level halves the vectors: pairs of
/// lanes within 128-bit groups, then pairs of pairs, then 128-bit groups across the register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce16(v: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // [a0+a2, b0+b2, a1+a3, b1+b3] per 128-bit group, for a, b = v[2k], v[2k+1].
    let mut s1 = [_mm512_setzero_ps(); 8];
    for (k, s) in s1.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        *s = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // [Σa, Σb, Σc, Σd] per 128-bit group, for v[4k..4k+4].
    let mut s2 = [_mm512_setzero_ps(); 4];
    for (k, s) in s2.iter_mut().enumerate() {
        let (c, d) = (_mm512_castps_pd(s1[2 * k]), _mm512_castps_pd(s1[2 * k + 1]));
        *s = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)),
        );
    }
    // 128-bit groups 0+1 and 2+3 of two such vectors, side by side.
    let s3 = [halves(s2[0], s2[1]), halves(s2[2], s2[3])];
    halves(s3[0], s3[1])
}

/// `[e0+e1, e2+e3, f0+f1, f2+f3]` in 128-bit groups.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn halves(e: std::arch::x86_64::__m512, f: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(e, f),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(e, f),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The three products against f64 sums, on W1's two linear layers at micro-batch sizes
    /// and on shapes that take every edge (rows, columns and depths not multiples of the
    /// tiles, a single row, a single column).
    #[test]
    fn products_match_f64() {
        if !GemmKernels::Avx512.available() {
            eprintln!("no AVX-512 on this CPU: the few-row kernels are not used here");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let shapes = [
            [16, 3136, 512],
            [16, 512, 10],
            [64, 3136, 512],
            [1, 1, 1],
            [7, 130, 65],
            [5, 3, 17],
            [13, 257, 33],
        ];
        for [n, i, o] in shapes {
            let mut v = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
            };
            let (x, w, dy, bias) = (v(n * i), v(i * o), v(n * o), v(o));
            let close = |what: &str, got: &[f32], want: &[f64], depth: usize| {
                assert_eq!(got.len(), want.len());
                let tol = 1e-5 * depth as f64;
                for (k, (g, e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (f64::from(*g) - e).abs() <= tol.max(1e-6),
                        "{what} {n}×{i}×{o} [{k}]: {g} vs {e}"
                    );
                }
            };
            let mut y: Vec<f32> = (0..n).flat_map(|_| bias.iter().copied()).collect();
            forward(&x, &w, &mut y, [n, i, o]);
            let want: Vec<f64> = (0..n * o)
                .map(|e| {
                    let (r, c) = (e / o, e % o);
                    f64::from(bias[c])
                        + (0..i)
                            .map(|k| f64::from(x[r * i + k]) * f64::from(w[k * o + c]))
                            .sum::<f64>()
                })
                .collect();
            close("y", &y, &want, i);
            let want: Vec<f64> = (0..n * i)
                .map(|e| {
                    let (r, a) = (e / i, e % i);
                    (0..o)
                        .map(|c| f64::from(dy[r * o + c]) * f64::from(w[a * o + c]))
                        .sum()
                })
                .collect();
            close("dX", &input_grad(&dy, &w, [n, i, o]), &want, o);
            let want: Vec<f64> = (0..i * o)
                .map(|e| {
                    let (a, c) = (e / o, e % o);
                    (0..n)
                        .map(|r| f64::from(x[r * i + a]) * f64::from(dy[r * o + c]))
                        .sum()
                })
                .collect();
            close("dW", &weight_grad(&x, &dy, [n, i, o]), &want, n);
        }
    }
}
