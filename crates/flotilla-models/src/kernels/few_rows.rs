//! Linear layers of a micro-batch (a product with few rows) on AVX-512 or AVX2, reading the
//! weights in place.
//!
//! A micro-batch of 16 samples through W1's first linear layer (3136 → 512) is a product with
//! 16 rows against a 6.4 MB weight matrix. The gemm crate packs that matrix into its tile
//! layout on every call (in the forward pass, and transposed again for dX), and the packing
//! cost more than the arithmetic: on the Intel Xeon a micro-batch of 16 took 0.48 ms forward,
//! 1.25 ms for dX and 0.68 ms for dW (with its zeroed buffer), where the FMAs alone take about
//! 0.25 ms each at one core's peak. Here each product reads W once, where it lies:
//! - forward, `y += x · W` ([`forward`]): up to 6 rows by 4 vectors of columns (AVX2: 2) in
//!   registers; W is read in chunks of 128 rows, each staying in L1 while every row tile of
//!   `x` passes over it;
//! - dX = dY · Wᵀ ([`input_grad`]): dot products of 4 rows of dY with 4 rows of W (AVX2: 2)
//!   at a time, their sums reduced across lanes together (`Vector::sum_each`);
//! - dW = Xᵀ · dY ([`weight_grad`]): 6 rows of dW by 4 vectors of columns (AVX2: 2) in
//!   registers, summed over the micro-batch and written once (no zeroed buffer first).
//!
//! Used for products of at most [`MAX_ROWS`] rows (a micro-batch on its own thread, see
//! `local::micro` in the engine, or a small batch split over the pool by blocks of columns)
//! where the AVX-512 or AVX2 GEMM kernels are chosen for the CPU; the gemm crate otherwise.

use super::conv::SharedOut;
#[cfg(target_arch = "x86_64")]
use super::simd::Vector;
use super::simd::{Simd, per_simd};
use super::threads;

/// The most rows for which these kernels replace the GEMM: a micro-batch of batch 128 on two
/// threads (64) is the largest measured faster (docs/performance.md).
pub(super) const MAX_ROWS: usize = 64;

/// Calls `$tile.run::<R, CB>($simd)` for `$rows` rows (1..=6) and `$cb` vectors (1..=4).
macro_rules! by_shape {
    ($tile:expr, $simd:expr, $rows:expr, $cb:expr) => {
        match ($rows, $cb) {
            (6, 4) => $tile.run::<6, 4>($simd),
            (6, 3) => $tile.run::<6, 3>($simd),
            (6, 2) => $tile.run::<6, 2>($simd),
            (6, _) => $tile.run::<6, 1>($simd),
            (5, 4) => $tile.run::<5, 4>($simd),
            (5, 3) => $tile.run::<5, 3>($simd),
            (5, 2) => $tile.run::<5, 2>($simd),
            (5, _) => $tile.run::<5, 1>($simd),
            (4, 4) => $tile.run::<4, 4>($simd),
            (4, 3) => $tile.run::<4, 3>($simd),
            (4, 2) => $tile.run::<4, 2>($simd),
            (4, _) => $tile.run::<4, 1>($simd),
            (3, 4) => $tile.run::<3, 4>($simd),
            (3, 3) => $tile.run::<3, 3>($simd),
            (3, 2) => $tile.run::<3, 2>($simd),
            (3, _) => $tile.run::<3, 1>($simd),
            (2, 4) => $tile.run::<2, 4>($simd),
            (2, 3) => $tile.run::<2, 3>($simd),
            (2, 2) => $tile.run::<2, 2>($simd),
            (2, _) => $tile.run::<2, 1>($simd),
            (_, 4) => $tile.run::<1, 4>($simd),
            (_, 3) => $tile.run::<1, 3>($simd),
            (_, 2) => $tile.run::<1, 2>($simd),
            (_, _) => $tile.run::<1, 1>($simd),
        }
    };
}

/// Rows of W per forward chunk: 128 × 64 columns × 4 bytes = 32 KiB, within L1.
const CHUNK: usize = 128;

/// The instruction set these kernels run a linear layer over `n` rows on, if they do (see
/// the module docs).
pub(super) fn applies(n: usize) -> Option<Simd> {
    (1..=MAX_ROWS).contains(&n).then(Simd::chosen).flatten()
}

/// Vectors of columns per forward and weight-gradient tile: with 6 rows, the accumulators,
/// the loaded vectors and a broadcast fill the registers (32 on AVX-512, 16 on AVX2).
fn column_vectors(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => 4,
        Simd::Avx2 => 2,
    }
}

/// Runs `f(b)` for every block `b` in `0..blocks`: on the pool's threads when the caller may
/// use several (a batch that is not split into micro-batches), in order on this one
/// otherwise. No sum crosses blocks, so the values do not depend on the thread count.
fn each_block(blocks: usize, f: impl Fn(usize) + Sync + Send) {
    if threads() > 1 && blocks > 1 {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(f);
    } else {
        (0..blocks).for_each(f);
    }
}

/// `y[n×o] += x[n×i] · w[i×o]`, all row-major (`y` holds the bias rows).
pub(super) fn forward(x: &[f32], w: &[f32], y: &mut [f32], [n, i, o]: [usize; 3], simd: Simd) {
    simd.check();
    assert!(x.len() >= n * i && w.len() >= i * o && y.len() >= n * o);
    let (lanes, width) = (simd.lanes(), column_vectors(simd) * simd.lanes());
    let y_out = SharedOut(y.as_mut_ptr());
    // A block of columns per thread (all of them on one thread), each walking W's rows in
    // chunks, so that every chunk is read as contiguous row segments.
    let per_block = o.div_ceil(threads()).div_ceil(width) * width;
    each_block(o.div_ceil(per_block), |b| {
        let y_out = &y_out;
        let (first, last) = (b * per_block, ((b + 1) * per_block).min(o));
        for i0 in (0..i).step_by(CHUNK) {
            let depth = (i - i0).min(CHUNK);
            for c0 in (first..last).step_by(width) {
                let cols = (last - c0).min(width);
                for r0 in (0..n).step_by(6) {
                    let tile = FwdTile {
                        // In bounds: r0 < n, i0 < i, c0 < o (the asserts above).
                        x: x[r0 * i + i0..].as_ptr(),
                        x_row: i,
                        w: w[i0 * o + c0..].as_ptr(),
                        // SAFETY: r0 < n and c0 < o: inside y's n·o values.
                        y: unsafe { y_out.0.add(r0 * o + c0) },
                        o,
                        depth,
                        cols,
                    };
                    // SAFETY: the CPU runs `simd` (checked); the tile reads rows r0..r0+rows
                    // of x at columns i0..i0+depth, rows i0..i0+depth of w, and rows
                    // r0..r0+rows of y at columns c0..c0+cols, all inside the slices (asserted
                    // above); only this block touches those columns of y.
                    unsafe { by_shape!(tile, simd, (n - r0).min(6), cols.div_ceil(lanes)) };
                }
            }
        }
    });
}

/// Rows of W per block of [`input_grad`] and [`weight_grad`] (a multiple of 4 and of 6).
const ROWS_PER_BLOCK: usize = 48;

/// `dX[n×i] = dY[n×o] · w[i×o]ᵀ`, row-major.
pub(super) fn input_grad(dy: &[f32], w: &[f32], [n, i, o]: [usize; 3], simd: Simd) -> Vec<f32> {
    simd.check();
    assert!(dy.len() >= n * o && w.len() >= i * o && n > 0 && i > 0);
    // 4 rows of dY by `step` rows of W: one vector's lanes of sums.
    let step = simd.lanes() / 4;
    let mut dx = vec![0f32; n * i];
    let dx_out = SharedOut(dx.as_mut_ptr());
    each_block(i.div_ceil(ROWS_PER_BLOCK), |b| {
        let dx_out = &dx_out;
        let end = ((b + 1) * ROWS_PER_BLOCK).min(i);
        for a0 in (b * ROWS_PER_BLOCK..end).step_by(step) {
            let acount = (i - a0).min(step);
            // Rows past the edge repeat the last one: valid memory whose sums are not stored.
            let mut wrows = [std::ptr::null(); 4];
            for (j, p) in wrows.iter_mut().enumerate().take(step) {
                *p = w[(a0 + j.min(acount - 1)) * o..][..o].as_ptr();
            }
            for r0 in (0..n).step_by(4) {
                let rcount = (n - r0).min(4);
                let drows = [0, 1, 2, 3].map(|j| dy[(r0 + j.min(rcount - 1)) * o..][..o].as_ptr());
                let mut sums = [0f32; 16];
                let tile = DotTile {
                    d: drows,
                    w: wrows,
                    len: o,
                    sums: &mut sums,
                };
                // SAFETY: the CPU runs `simd` (checked); each pointer starts o valid values.
                unsafe {
                    match simd {
                        Simd::Avx512 => tile.run::<4, 4>(simd),
                        Simd::Avx2 => tile.run::<4, 2>(simd),
                    }
                };
                for (ri, s) in sums.chunks(step).take(rcount).enumerate() {
                    // SAFETY: row r0 + ri < n, columns a0..a0+acount ≤ i of dx's n·i
                    // values; only this block writes those columns.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(dx_out.0.add((r0 + ri) * i + a0), acount)
                    };
                    row.copy_from_slice(&s[..acount]);
                }
            }
        }
    });
    dx
}

/// `dW[i×o] = x[n×i]ᵀ · dY[n×o]`, row-major.
pub(super) fn weight_grad(x: &[f32], dy: &[f32], [n, i, o]: [usize; 3], simd: Simd) -> Vec<f32> {
    simd.check();
    assert!(x.len() >= n * i && dy.len() >= n * o);
    let (lanes, width) = (simd.lanes(), column_vectors(simd) * simd.lanes());
    let mut dw: Vec<f32> = Vec::with_capacity(i * o);
    let out = SharedOut(dw.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    each_block(i.div_ceil(ROWS_PER_BLOCK), |b| {
        let out = &out;
        let end = ((b + 1) * ROWS_PER_BLOCK).min(i);
        for a0 in (b * ROWS_PER_BLOCK..end).step_by(6) {
            for c0 in (0..o).step_by(width) {
                let cols = (o - c0).min(width);
                let tile = DwTile {
                    x: x[a0..].as_ptr(),
                    x_row: i,
                    dy: dy[c0..].as_ptr(),
                    n,
                    o,
                    // SAFETY: a0 < i and c0 < o, so the offset lies inside the i·o capacity.
                    dw: unsafe { out.0.add(a0 * o + c0) },
                    cols,
                };
                // SAFETY: the CPU runs `simd` (checked); the tile reads columns a0..a0+rows of
                // the n rows of x, columns c0..c0+cols of the n rows of dY, and writes rows
                // a0..a0+rows (within this block's), columns c0..c0+cols of dw's capacity.
                unsafe { by_shape!(tile, simd, (end - a0).min(6), cols.div_ceil(lanes)) };
            }
        }
    });
    // SAFETY: the blocks' tiles cover every row (a0 over 0..i) and column (c0 over 0..o, the
    // last vector of a tile storing exactly the columns left) of the i·o values.
    unsafe { dw.set_len(i * o) };
    dw
}

/// One register tile of the forward product: `R` rows by `cols` (≤ CB vectors) columns, over
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

per_simd!(FwdTile);

impl FwdTile {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const R: usize, const CB: usize>(self) {
        // Values in the last vector of columns (the others are full).
        let last = self.cols - (CB - 1) * V::LANES;
        // Values in vector c of a row.
        let count = |c: usize| if c + 1 < CB { V::LANES } else { last };
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the tile it vouches for.
        let mut acc = [[unsafe { V::zero() }; CB]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (c, v) in a.iter_mut().enumerate() {
                *v = unsafe { V::load_n(self.y.add(r * self.o + c * V::LANES), count(c)) };
            }
        }
        for k in 0..self.depth {
            let wr = unsafe { self.w.add(k * self.o) };
            let mut wv = [unsafe { V::zero() }; CB];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = unsafe { V::load_n(wr.add(c * V::LANES), count(c)) };
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = unsafe { V::splat(*self.x.add(r * self.x_row + k)) };
                for c in 0..CB {
                    a[c] = unsafe { wv[c].mul_add(xv, a[c]) };
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                unsafe { v.store_n(self.y.add(r * self.o + c * V::LANES), count(c)) };
            }
        }
    }
}

/// One register tile of the weight gradient: `R` rows of dW (columns of x) by `cols`
/// (≤ CB vectors) columns, summed over the `n` rows of the micro-batch.
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

per_simd!(DwTile);

impl DwTile {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const R: usize, const CB: usize>(self) {
        let last = self.cols - (CB - 1) * V::LANES;
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the tile it vouches for.
        let mut acc = [[unsafe { V::zero() }; CB]; R];
        for s in 0..self.n {
            let dr = unsafe { self.dy.add(s * self.o) };
            let mut dv = [unsafe { V::zero() }; CB];
            for (c, v) in dv.iter_mut().enumerate() {
                *v = unsafe {
                    if c + 1 < CB {
                        V::load(dr.add(c * V::LANES))
                    } else {
                        V::load_n(dr.add(c * V::LANES), last)
                    }
                };
            }
            let xr = unsafe { self.x.add(s * self.x_row) };
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = unsafe { V::splat(*xr.add(r)) };
                for c in 0..CB {
                    a[c] = unsafe { dv[c].mul_add(xv, a[c]) };
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                let n = if c + 1 < CB { V::LANES } else { last };
                unsafe { v.store_n(self.dw.add(r * self.o + c * V::LANES), n) };
            }
        }
    }
}

/// `sums[RW·r + a] = Σ_j d[r][j] · w[a][j]` over `len` values, for `RD` rows of dY and `RW`
/// rows of W: RD·RW = one vector's lanes of dot products at once.
struct DotTile<'a> {
    d: [*const f32; 4],
    w: [*const f32; 4],
    len: usize,
    sums: &'a mut [f32; 16],
}

per_simd!(DotTile<'_>);

impl DotTile<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const RD: usize, const RW: usize>(self) {
        assert!(RD * RW == V::LANES && RD <= 4 && RW <= 4);
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every pointer starts `len` readable values.
        let mut acc = [[unsafe { V::zero() }; RW]; RD];
        let full = self.len / V::LANES;
        let tail = self.len % V::LANES;
        for s in 0..full + usize::from(tail > 0) {
            let (off, n) = (s * V::LANES, if s < full { V::LANES } else { tail });
            let mut wv = [unsafe { V::zero() }; RW];
            for (v, p) in wv.iter_mut().zip(&self.w) {
                *v = unsafe { V::load_n(p.add(off), n) };
            }
            for (a, p) in acc.iter_mut().zip(&self.d) {
                let dv = unsafe { V::load_n(p.add(off), n) };
                for (x, w) in a.iter_mut().zip(&wv) {
                    *x = unsafe { dv.mul_add(*w, *x) };
                }
            }
        }
        let mut flat = [unsafe { V::zero() }; 16];
        for (r, a) in acc.iter().enumerate() {
            flat[r * RW..(r + 1) * RW].copy_from_slice(a);
        }
        unsafe { V::sum_each(&flat[..V::LANES]).store(self.sums.as_mut_ptr()) };
    }
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
        let sets: Vec<Simd> = [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|s| s.available())
            .collect();
        if sets.is_empty() {
            eprintln!("neither AVX-512 nor AVX2 on this CPU: the few-row kernels are not used");
        }
        for simd in sets {
            products_match_on(simd);
        }
    }

    fn products_match_on(simd: Simd) {
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
                        "{simd:?} {what} {n}×{i}×{o} [{k}]: {g} vs {e}"
                    );
                }
            };
            let mut y: Vec<f32> = (0..n).flat_map(|_| bias.iter().copied()).collect();
            forward(&x, &w, &mut y, [n, i, o], simd);
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
            close("dX", &input_grad(&dy, &w, [n, i, o], simd), &want, o);
            let want: Vec<f64> = (0..i * o)
                .map(|e| {
                    let (a, c) = (e / o, e % o);
                    (0..n)
                        .map(|r| f64::from(x[r * i + a]) * f64::from(dy[r * o + c]))
                        .sum()
                })
                .collect();
            close("dW", &weight_grad(&x, &dy, [n, i, o], simd), &want, n);
        }
    }
}
