//! Direct convolutions on AVX-512 or AVX2: the unfolded input (im2col) is never built.
//!
//! - Forward ([`sample`]): for one output row and a run of up to 7 (AVX2: 6) output columns,
//!   one block of output channels (32 or 16; AVX2: 16) accumulates in registers over every
//!   (input channel, kernel row, kernel column): a vector of weights times one input value
//!   broadcast from a zero-padded copy of the sample.
//! - Input gradient: the same kernel on dY, padded by k − 1 − p, with the weights transposed
//!   and flipped ([`input_gradient`], [`DirectWeights::transposed_flipped`]).
//! - Weight gradient ([`sample_dw`]): dY transposed to [position, channel]; a block of output
//!   channels by up to 7 (AVX2: 5) kernel columns accumulates over every output position.
//!
//! im2col + GEMM copied each sample's 800×196 columns of W1's second convolution twice
//! (unfold, then the GEMM's packing) in each pass; here the only copies are the padded input
//! (18×18 per channel), dY's transpose and the weights, rearranged once per call.
//!
//! The kernels are written once over [`Vector`] and compiled for each instruction set. Used
//! where the AVX-512 or AVX2 GEMM kernels are chosen for the CPU (`gemm_glue::gemm_kernels`),
//! the stride is 1, the convolution is not pointwise and the output channels (for dX, the
//! input channels) are a multiple of 16; otherwise im2col + GEMM.

use super::conv::Geom;
#[cfg(target_arch = "x86_64")]
use super::simd::Vector;
use super::simd::{Simd, per_simd};

/// `$tile.run::<CB, NW>($simd)`: two vectors of channels (`$wide`) or one, by `$n` (1..=7)
/// columns.
macro_rules! by_columns {
    ($tile:expr, $simd:expr, $wide:expr, $n:expr) => {
        match ($wide, $n) {
            (true, 7) => $tile.run::<2, 7>($simd),
            (true, 6) => $tile.run::<2, 6>($simd),
            (true, 5) => $tile.run::<2, 5>($simd),
            (true, 4) => $tile.run::<2, 4>($simd),
            (true, 3) => $tile.run::<2, 3>($simd),
            (true, 2) => $tile.run::<2, 2>($simd),
            (true, _) => $tile.run::<2, 1>($simd),
            (false, 7) => $tile.run::<1, 7>($simd),
            (false, 6) => $tile.run::<1, 6>($simd),
            (false, 5) => $tile.run::<1, 5>($simd),
            (false, 4) => $tile.run::<1, 4>($simd),
            (false, 3) => $tile.run::<1, 3>($simd),
            (false, 2) => $tile.run::<1, 2>($simd),
            (false, _) => $tile.run::<1, 1>($simd),
        }
    };
}

/// Output channels per block of the weights' layout: two vectors.
fn block(simd: Simd) -> usize {
    2 * simd.lanes()
}

/// The most output columns of a forward tile: with two vectors of channels, the accumulators,
/// the weights and one broadcast fill the registers.
fn max_columns(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => 7,
        Simd::Avx2 => 6,
    }
}

/// Output columns of the next forward tile with `left` columns to go: the most a tile
/// holds, but never leaving a last tile under 4 wide when that can be helped (6 + 6 + 2 for 14
/// columns becomes 6 + 4 + 4). A tile of 2 columns keeps 4 chains of dependent FMAs, fewer
/// than the 8 that keep two FMA units busy; on AVX2 it took a fifth of the forward time.
fn tile_columns(left: usize, max: usize) -> usize {
    if left <= max {
        left
    } else if left >= max + 4 {
        max
    } else {
        left - 4
    }
}

/// The most kernel columns of a weight-gradient tile.
fn max_kernel_columns(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => 7,
        Simd::Avx2 => 5,
    }
}

/// The weights of one convolution rearranged for [`sample`]: per block of output channels
/// ([`Simd::block`], and one of 16 when AVX-512's `cout` is an odd multiple of 16), for each
/// (input channel, kernel row, kernel column) in that order, the block's weights contiguous.
pub(super) struct DirectWeights {
    data: Vec<f32>,
    simd: Simd,
}

/// The instruction set the direct kernel runs this convolution on, if it does (see the module
/// docs).
pub(super) fn applies(g: &Geom) -> Option<Simd> {
    supported(g).then(Simd::chosen).flatten()
}

fn supported(g: &Geom) -> bool {
    g.s == 1 && !g.pointwise() && g.cout.is_multiple_of(16) && g.cout > 0 && g.ho > 0 && g.wo > 0
}

/// The blocks of output channels: (first channel, width).
fn blocks(cout: usize, simd: Simd) -> impl Iterator<Item = (usize, usize)> {
    let full = block(simd);
    (0..cout)
        .step_by(full)
        .map(move |c| (c, (cout - c).min(full)))
}

impl DirectWeights {
    /// `w` is `[cout, cin, k, k]`.
    pub(super) fn new(w: &[f32], g: &Geom, simd: Simd) -> Self {
        let ckk = g.ckk();
        let mut data = Vec::with_capacity(g.cout * ckk);
        for (c0, width) in blocks(g.cout, simd) {
            for r in 0..ckk {
                data.extend((c0..c0 + width).map(|co| w[co * ckk + r]));
            }
        }
        Self { data, simd }
    }
}

/// The convolution whose output is the input gradient of the stride-1 convolution `g`: dY
/// (`cout` channels of `ho × wo`) padded by k − 1 − p, with [`DirectWeights::transposed_flipped`];
/// `None` where that is not `g`'s input shape.
pub(super) fn input_gradient(g: &Geom) -> Option<Geom> {
    if g.s != 1 || g.p >= g.k {
        return None;
    }
    Geom::new(
        [1, g.cout, g.ho, g.wo],
        [g.cin, g.cout, g.k, g.k],
        1,
        g.k - 1 - g.p,
    )
    .filter(|t| t.ho == g.h && t.wo == g.w)
}

impl DirectWeights {
    /// The weights of `g`'s [`input_gradient`] convolution: `w[co, ci, kh, kw]` as
    /// `[ci, co, k − 1 − kh, k − 1 − kw]`.
    pub(super) fn transposed_flipped(w: &[f32], g: &Geom, simd: Simd) -> Self {
        let k = g.k;
        let mut flipped = vec![0f32; w.len()];
        for co in 0..g.cout {
            for ci in 0..g.cin {
                for kh in 0..k {
                    for kw in 0..k {
                        flipped[((ci * g.cout + co) * k + kh) * k + kw] =
                            w[((co * g.cin + ci) * k + k - 1 - kh) * k + k - 1 - kw];
                    }
                }
            }
        }
        let t = input_gradient(g).expect("a stride-1 convolution with p < k");
        Self::new(&flipped, &t, simd)
    }
}

/// Floats of rearranged weights per chunk of input channels in [`sample`]: 25 KiB, which stay
/// in L1 (48 KiB on the Xeon) beside the chunk's padded input while every output tile passes
/// over them. Without the chunks, each tile streamed its block's whole weights (100 KiB for
/// W1's second convolution, 200 KiB for its dX) through L1, evicting the input it broadcasts
/// from.
const WEIGHTS_PER_CHUNK: usize = 6400;

/// One sample's convolution `[cout, ho, wo]` into `y`, starting from the bias (or zero).
/// `scratch` holds the zero-padded input and the output block being accumulated.
pub(super) fn sample(
    xb: &[f32],
    dw: &DirectWeights,
    bias: Option<&[f32]>,
    g: &Geom,
    scratch: &mut Vec<f32>,
    y: &mut [f32],
) {
    let hw = g.hw_out();
    assert!(y.len() >= g.cout * hw);
    blocks_of_sample(xb, dw, bias, g, scratch, 0, |c0, width, out, _| {
        // [position][channel] back to the output's [channel][position].
        transpose(out, width, hw, width, &mut y[c0 * hw..], hw, dw.simd);
    });
}

/// One sample's convolution, ReLU and 2×2 max pool: `pooled` and `arg` (`[cout, ho/2, wo/2]`
/// each) as `pool::pool_plane` leaves them with the ReLU, bit for bit. Each block of channels
/// is pooled in the kernel's own [position][channel] layout (a window is the lane-wise maximum
/// of four vectors), so only the pooled quarter goes back to [channel][position].
pub(super) fn sample_pooled(
    xb: &[f32],
    dw: &DirectWeights,
    bias: Option<&[f32]>,
    g: &Geom,
    scratch: &mut Vec<f32>,
    pooled: &mut [f32],
    arg: &mut [u8],
) {
    let (hq, wq) = (g.ho / 2, g.wo / 2);
    let pp = hq * wq;
    assert!(pooled.len() >= g.cout * pp && arg.len() >= g.cout * pp);
    let simd = dw.simd;
    blocks_of_sample(xb, dw, bias, g, scratch, 2 * pp, |c0, width, out, spare| {
        let (values, positions) = spare.split_at_mut(pp * width);
        let tile = PoolTile {
            out,
            wo: g.wo,
            hq,
            wq,
            values,
            positions: &mut positions[..pp * width],
        };
        // SAFETY: the CPU runs `simd` (checked by `blocks_of_sample`); `PoolTile::run` checks
        // its bounds.
        unsafe {
            if width == block(simd) {
                tile.run::<2, 1>(simd)
            } else {
                tile.run::<1, 1>(simd)
            }
        }
        transpose(values, width, pp, width, &mut pooled[c0 * pp..], pp, simd);
        // The positions (0..=4 as the bits of an f32: blends and transposes move bits only)
        // the same way, then to bytes; `values` is free again.
        transpose(positions, width, pp, width, values, pp, simd);
        for (a, p) in arg[c0 * pp..(c0 + width) * pp].iter_mut().zip(&values[..]) {
            *a = p.to_bits() as u8;
        }
    });
}

/// The direct convolution of one sample, block of output channels by block: `each(c0, width,
/// out, spare)` receives the block's output as [position][channel] (`ho·wo` rows of `width`)
/// and `spare_per_channel · width` floats of scratch. `scratch` holds the zero-padded input, the
/// block being accumulated and the spare floats.
fn blocks_of_sample(
    xb: &[f32],
    dw: &DirectWeights,
    bias: Option<&[f32]>,
    g: &Geom,
    scratch: &mut Vec<f32>,
    spare_per_channel: usize,
    mut each: impl FnMut(usize, usize, &[f32], &mut [f32]),
) {
    let simd = dw.simd;
    simd.check();
    assert!(supported(g), "direct convolution outside its shapes");
    let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
    let hw = g.hw_out();
    assert!(xb.len() >= g.in_len());
    assert!(dw.data.len() == g.cout * g.ckk() && bias.is_none_or(|b| b.len() >= g.cout));
    assert!(hp >= g.ho + g.k - 1 && wp >= g.wo + g.k - 1);
    let padded = g.cin * hp * wp;
    // Grown (zeroed) only when too short: the output block and the spare floats are written
    // before they are read, and only the padded input's borders need their zeros back.
    let need = padded + (hw + spare_per_channel) * block(simd);
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (xpad, rest) = scratch[..need].split_at_mut(padded);
    let (block_out, spare) = rest.split_at_mut(hw * block(simd));
    xpad.fill(0.0);
    pad(xb, g, xpad);
    let (ckk, kk) = (g.ckk(), g.k * g.k);
    for (c0, width) in blocks(g.cout, simd) {
        let wblock = &dw.data[c0 * ckk..(c0 + width) * ckk];
        // The block's output as [position][channel], so that a tile loads and stores whole
        // vectors between chunks; it starts as the bias.
        let out = &mut block_out[..hw * width];
        for pos in out.chunks_mut(width) {
            match bias {
                Some(b) => pos.copy_from_slice(&b[c0..c0 + width]),
                None => pos.fill(0.0),
            }
        }
        let chunks = (g.cin * kk * width).div_ceil(WEIGHTS_PER_CHUNK);
        let per_chunk = g.cin.div_ceil(chunks);
        let wide = width == block(simd);
        for ci0 in (0..g.cin).step_by(per_chunk) {
            let cin = per_chunk.min(g.cin - ci0);
            for oh in 0..g.ho {
                let mut ow = 0;
                while ow < g.wo {
                    let n = tile_columns(g.wo - ow, max_columns(simd));
                    let at = Tile {
                        x: &xpad[ci0 * hp * wp + oh * wp + ow..],
                        plane: hp * wp,
                        row: wp,
                        cin,
                        k: g.k,
                        w: &wblock[ci0 * kk * width..],
                        out: &mut out[(oh * g.wo + ow) * width..],
                    };
                    // SAFETY: the CPU runs `simd` (checked); `Tile::run` checks its bounds.
                    unsafe { by_columns!(at, simd, wide, n) };
                    ow += n;
                }
            }
        }
        each(c0, width, out, &mut spare[..spare_per_channel * width]);
    }
}

/// One sample `[cin, h, w]` zero-padded by `p` into `xpad`, `[cin, h + 2p, w + 2p]` (zeroed).
fn pad(xb: &[f32], g: &Geom, xpad: &mut [f32]) {
    let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
    for c in 0..g.cin {
        for i in 0..g.h {
            let src = &xb[(c * g.h + i) * g.w..][..g.w];
            xpad[(c * hp + i + g.p) * wp + g.p..][..g.w].copy_from_slice(src);
        }
    }
}

/// Adds one sample's weight gradient, Σ over output positions of dY[co, oh, ow] ·
/// X[ci, oh + kh − p, ow + kw − p], to `dw` in the layout of [`DirectWeights`] on `simd`
/// (convert with [`standard_layout`]). `dyb` is the sample's `[cout, ho, wo]` output gradient;
/// `xpad` and `dyt` are scratch (the padded input, dY transposed to `[ho·wo, cout]`).
pub(super) fn sample_dw(
    xb: &[f32],
    dyb: &[f32],
    g: &Geom,
    simd: Simd,
    xpad: &mut Vec<f32>,
    dyt: &mut Vec<f32>,
    dw: &mut [f32],
) {
    simd.check();
    assert!(supported(g), "direct convolution outside its shapes");
    let (hw, ckk, k) = (g.hw_out(), g.ckk(), g.k);
    assert!(xb.len() >= g.in_len() && dyb.len() >= g.cout * hw && dw.len() >= g.cout * ckk);
    xpad.clear();
    xpad.resize(g.cin * (g.h + 2 * g.p) * (g.w + 2 * g.p), 0.0);
    pad(xb, g, xpad);
    dyt.clear();
    dyt.resize(hw * g.cout, 0.0);
    transpose(dyb, hw, g.cout, hw, dyt, g.cout, simd);
    let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
    for (c0, width) in blocks(g.cout, simd) {
        let wide = width == block(simd);
        let block = &mut dw[c0 * ckk..(c0 + width) * ckk];
        for ci in 0..g.cin {
            for kh in 0..k {
                let mut kw = 0;
                while kw < k {
                    let n = match k - kw {
                        n if n >= max_kernel_columns(simd) => max_kernel_columns(simd),
                        n if n >= 5 => 5,
                        n => n,
                    };
                    let at = DwTile {
                        x: &xpad[(ci * hp + kh) * wp + kw..],
                        row: wp,
                        ho: g.ho,
                        wo: g.wo,
                        dyt: &dyt[c0..],
                        cout: g.cout,
                        out: &mut block[((ci * k + kh) * k + kw) * width..],
                    };
                    // SAFETY: the CPU runs `simd` (checked); `DwTile::run` checks its bounds.
                    unsafe { by_columns!(at, simd, wide, n) };
                    kw += n;
                }
            }
        }
    }
}

/// `dst[c][r] = src[r][c]` for the `rows × cols` matrix at `src` (row stride `src_row`) into
/// `dst` (row stride `dst_row`), in blocks of 16 × 16 (AVX2: 8 × 8) transposed in registers.
/// The direct kernels switch layouts ([channel][position] and [position][channel]) in every
/// pass; a scalar loop took 6% of a training step.
fn transpose(
    src: &[f32],
    src_row: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_row: usize,
    simd: Simd,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(cols <= src_row && rows <= dst_row);
    assert!(src.len() >= (rows - 1) * src_row + cols && dst.len() >= (cols - 1) * dst_row + rows);
    simd.check();
    let step = match simd {
        Simd::Avx512 => 16,
        Simd::Avx2 => 8,
    };
    for r0 in (0..rows).step_by(step) {
        for c0 in (0..cols).step_by(step) {
            let (r, c) = ((rows - r0).min(step), (cols - c0).min(step));
            let (s, d) = (r0 * src_row + c0, c0 * dst_row + r0);
            if simd == Simd::Avx2 && (r < 8 || c < 8) {
                // A partial block at the edge, value by value.
                for i in 0..r {
                    for j in 0..c {
                        dst[d + j * dst_row + i] = src[s + i * src_row + j];
                    }
                }
                continue;
            }
            // SAFETY: the CPU runs `simd` (checked); the block's r rows of c values lie inside
            // `src` and its c rows of r values inside `dst` (asserted above).
            unsafe {
                let (src, dst) = (src.as_ptr().add(s), dst.as_mut_ptr().add(d));
                match simd {
                    Simd::Avx512 => transpose16(src, src_row, r, c, dst, dst_row),
                    Simd::Avx2 => transpose8(src, src_row, dst, dst_row),
                }
            }
        }
    }
}

/// One block of `r × c` (≤ 16 each): rows past `r` load as zeros, stores are masked to `r`.
///
/// # Safety
/// AVX-512F is available; `src` starts r rows of c readable values (stride `ss`), `dst` c
/// rows of r writable ones (stride `ds`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, ss: usize, r: usize, c: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| if n >= 16 { u16::MAX } else { (1u16 << n) - 1 };
    let mut v = [_mm512_setzero_ps(); 16];
    for (i, row) in v.iter_mut().enumerate().take(r) {
        // SAFETY: row i < r of c values.
        *row = unsafe { _mm512_maskz_loadu_ps(lanes(c), src.add(i * ss)) };
    }
    // Pairs of rows interleaved: per 128-bit group, [a0 b0 a1 b1] and [a2 b2 a3 b3].
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // Per 128-bit group q, u[4i + j] holds column 4q + j of rows 4i..4i + 4.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let p = |k: usize| _mm512_castps_pd(t[4 * i + k]);
        let ps = _mm512_castpd_ps;
        u[4 * i] = ps(_mm512_unpacklo_pd(p(0), p(2)));
        u[4 * i + 1] = ps(_mm512_unpackhi_pd(p(0), p(2)));
        u[4 * i + 2] = ps(_mm512_unpacklo_pd(p(1), p(3)));
        u[4 * i + 3] = ps(_mm512_unpackhi_pd(p(1), p(3)));
    }
    // Column 4q + j gathers group q of u[j], u[4 + j], u[8 + j], u[12 + j].
    for j in 0..4 {
        let even = |a, b| _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
        let odd = |a, b| _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        let (v02, v13) = (even(u[j], u[4 + j]), odd(u[j], u[4 + j]));
        let (w02, w13) = (even(u[8 + j], u[12 + j]), odd(u[8 + j], u[12 + j]));
        let cols = [even(v02, w02), even(v13, w13), odd(v02, w02), odd(v13, w13)];
        for (q, col) in cols.into_iter().enumerate() {
            let k = 4 * q + j;
            if k < c {
                // SAFETY: row k < c of r values.
                unsafe { _mm512_mask_storeu_ps(dst.add(k * ds), lanes(r), col) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose16(_: *const f32, _: usize, _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX-512 is x86-64 only")
}

/// One full 8 × 8 block on AVX2.
///
/// # Safety
/// AVX2 is available; `src` starts 8 rows of 8 readable values (stride `ss`), `dst` 8 rows
/// of 8 writable ones (stride `ds`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    // SAFETY: rows 0..8 of 8 values.
    let v: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * ss)) });
    // Per 128-bit half: [a0 b0 a1 b1] and [a2 b2 a3 b3] of row pairs.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // Columns j and j + 4 of rows 4q..4q + 4, for j = 0..4 (halves low and high).
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (q, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + j / 2], t[4 * q + 2 + j / 2]);
        if j % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    for j in 0..4 {
        let (lo, hi) = (
            _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]),
            _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]),
        );
        // SAFETY: rows j and j + 4 of 8 values.
        unsafe {
            _mm256_storeu_ps(dst.add(j * ds), lo);
            _mm256_storeu_ps(dst.add((j + 4) * ds), hi);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose8(_: *const f32, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX2 is x86-64 only")
}

/// A weight gradient in the layout of [`DirectWeights`] on `simd` back in `[cout, cin, k, k]`.
pub(super) fn standard_layout(direct: &[f32], g: &Geom, simd: Simd) -> Vec<f32> {
    let ckk = g.ckk();
    let mut out = vec![0f32; g.cout * ckk];
    for (c0, width) in blocks(g.cout, simd) {
        let block = &direct[c0 * ckk..(c0 + width) * ckk];
        for r in 0..ckk {
            for lane in 0..width {
                out[(c0 + lane) * ckk + r] = block[r * width + lane];
            }
        }
    }
    out
}

/// ReLU + 2×2 max pooling of one block's output in [position][channel] layout: for each
/// window, the lane-wise maximum of its four position vectors, clamped at 0, and the position
/// of the first maximum (4 where clamped; the bits of an f32), both as [window][channel]
/// (`pool::VectorWindows`). A window holding a NaN takes `pool::relu_window` lane by lane, as
/// the scalar rows do.
struct PoolTile<'a> {
    out: &'a [f32],
    /// Output columns of the convolution.
    wo: usize,
    /// Windows down and across.
    hq: usize,
    wq: usize,
    values: &'a mut [f32],
    positions: &'a mut [f32],
}

per_simd!(PoolTile<'_>);

impl PoolTile<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const CB: usize, const UNUSED: usize>(self) {
        use super::pool::{VectorWindows, relu_window};
        let width = CB * V::LANES;
        let wo = self.wo;
        assert!(self.hq * 2 <= self.out.len() / width / wo.max(1) && self.wq * 2 <= wo);
        assert!(self.values.len() >= self.hq * self.wq * width);
        assert!(self.positions.len() >= self.hq * self.wq * width);
        let (out, values, positions) = (
            self.out.as_ptr(),
            self.values.as_mut_ptr(),
            self.positions.as_mut_ptr(),
        );
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the asserted bounds.
        let rule = unsafe { VectorWindows::<V>::new() };
        for i in 0..self.hq {
            for j in 0..self.wq {
                let top = (2 * i * wo + 2 * j) * width;
                let q = (i * self.wq + j) * width;
                for c in 0..CB {
                    let at = |p: usize| unsafe { out.add(p + c * V::LANES) };
                    let (a, b, cc, d) = unsafe {
                        (
                            V::load(at(top)),
                            V::load(at(top + width)),
                            V::load(at(top + wo * width)),
                            V::load(at(top + (wo + 1) * width)),
                        )
                    };
                    let (vq, pq) = unsafe {
                        (
                            values.add(q + c * V::LANES),
                            positions.add(q + c * V::LANES),
                        )
                    };
                    if unsafe { a.has_nan() | b.has_nan() | cc.has_nan() | d.has_nan() } {
                        for lane in 0..V::LANES {
                            let v = |p: usize| unsafe { *at(p).add(lane) };
                            let window = [
                                v(top),
                                v(top + width),
                                v(top + wo * width),
                                v(top + (wo + 1) * width),
                            ];
                            let (value, pos) = relu_window(window, true);
                            unsafe {
                                *vq.add(lane) = value;
                                *pq.add(lane) = f32::from_bits(u32::from(pos));
                            }
                        }
                        continue;
                    }
                    unsafe {
                        let (value, pos) = rule.apply([a, b, cc, d], true);
                        value.store(vq);
                        pos.store(pq);
                    }
                }
            }
        }
    }
}

/// One register tile of the weight gradient: `NW` consecutive kernel columns of one (input
/// channel, kernel row), `CB` vectors of output channels, summed over every output position.
struct DwTile<'a> {
    /// The padded input from (this channel, this kernel row, this kernel column).
    x: &'a [f32],
    row: usize,
    ho: usize,
    wo: usize,
    /// dY transposed, `[position, cout]`, from this block's first channel.
    dyt: &'a [f32],
    cout: usize,
    /// This block's gradient from (this channel, kernel row, kernel column).
    out: &'a mut [f32],
}

per_simd!(DwTile<'_>);

impl DwTile<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const CB: usize, const NW: usize>(self) {
        let lanes = V::LANES * CB;
        // Every access below stays inside these bounds.
        assert!(self.x.len() > (self.ho - 1) * self.row + self.wo - 1 + NW - 1);
        assert!(self.dyt.len() >= (self.ho * self.wo - 1) * self.cout + lanes);
        assert!(self.out.len() >= NW * lanes);
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the asserted bounds.
        let mut acc = [[unsafe { V::zero() }; CB]; NW];
        let (x, dyt) = (self.x.as_ptr(), self.dyt.as_ptr());
        for oh in 0..self.ho {
            let xr = unsafe { x.add(oh * self.row) };
            for ow in 0..self.wo {
                let mut dv = [unsafe { V::zero() }; CB];
                for (c, v) in dv.iter_mut().enumerate() {
                    *v =
                        unsafe { V::load(dyt.add((oh * self.wo + ow) * self.cout + c * V::LANES)) };
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = unsafe { V::splat(*xr.add(ow + j)) };
                    for c in 0..CB {
                        a[c] = unsafe { dv[c].mul_add(xv, a[c]) };
                    }
                }
            }
        }
        let out = self.out.as_mut_ptr();
        for (j, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                unsafe {
                    let o = out.add(j * lanes + c * V::LANES);
                    V::load(o).add(*v).store(o);
                }
            }
        }
    }
}

/// One register tile: `NW` output columns of one row, `CB` vectors of output channels, over
/// the input channels of one chunk.
struct Tile<'a> {
    /// The padded input from (the chunk's first channel, this output row, this column).
    x: &'a [f32],
    plane: usize,
    row: usize,
    cin: usize,
    k: usize,
    /// This block's rearranged weights from the chunk's first channel.
    w: &'a [f32],
    /// The block's output as [position][channel] from this row and column: added to.
    out: &'a mut [f32],
}

per_simd!(Tile<'_>);

impl Tile<'_> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn body<V: Vector, const CB: usize, const NW: usize>(self) {
        let (k, lanes) = (self.k, V::LANES * CB);
        // Every access below stays inside these bounds.
        assert!(self.w.len() >= self.cin * k * k * lanes);
        assert!(self.x.len() > (self.cin - 1) * self.plane + (k - 1) * self.row + NW - 1 + k - 1);
        assert!(self.out.len() >= NW * lanes);
        let out = self.out.as_mut_ptr();
        // SAFETY (every vector operation below): the caller enabled V's instruction set, and
        // every offset lies within the asserted bounds.
        let mut acc = [[unsafe { V::zero() }; CB]; NW];
        for (j, a) in acc.iter_mut().enumerate() {
            for (c, v) in a.iter_mut().enumerate() {
                *v = unsafe { V::load(out.add(j * lanes + c * V::LANES)) };
            }
        }
        let (x, w) = (self.x.as_ptr(), self.w.as_ptr());
        for ci in 0..self.cin {
            for kh in 0..k {
                let xr = unsafe { x.add(ci * self.plane + kh * self.row) };
                let wr = unsafe { w.add((ci * k + kh) * k * lanes) };
                for kw in 0..k {
                    let mut wv = [unsafe { V::zero() }; CB];
                    for (c, v) in wv.iter_mut().enumerate() {
                        *v = unsafe { V::load(wr.add(kw * lanes + c * V::LANES)) };
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let xv = unsafe { V::splat(*xr.add(j + kw)) };
                        for c in 0..CB {
                            a[c] = unsafe { wv[c].mul_add(xv, a[c]) };
                        }
                    }
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                unsafe { v.store(out.add(j * lanes + c * V::LANES)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::{Geom, conv_sample};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn transpose_matches_scalar() {
        for simd in sets() {
            for (rows, cols) in [
                (1, 1),
                (16, 16),
                (196, 32),
                (32, 196),
                (17, 33),
                (5, 40),
                (64, 7),
            ] {
                let (sr, dr) = (cols + 3, rows + 1);
                let src: Vec<f32> = (0..rows * sr).map(|v| v as f32).collect();
                let mut dst = vec![-1f32; cols * dr];
                transpose(&src, sr, rows, cols, &mut dst, dr, simd);
                for c in 0..cols {
                    for r in 0..dr {
                        let want = if r < rows { src[r * sr + c] } else { -1.0 };
                        assert_eq!(dst[c * dr + r], want, "{simd:?} {rows}×{cols} [{c}][{r}]");
                    }
                }
            }
        }
    }

    /// Convolution + ReLU + pool in the kernel's layout against the convolution then the
    /// pooling rows, bit for bit: integer values make ties and non-positive windows common,
    /// and a NaN in the input spreads to the windows that see it.
    #[test]
    fn pooled_matches_convolution_then_pooling() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for simd in sets() {
            for (cin, h, w, cout, k, p) in [
                (1, 28, 28, 32, 5, 2),
                (32, 14, 14, 64, 5, 2),
                (3, 9, 13, 48, 3, 1),
                (2, 7, 3, 16, 3, 1),
            ] {
                for nan in [false, true] {
                    let g = Geom::new([1, cin, h, w], [cout, cin, k, k], 1, p).expect("valid");
                    let mut int = |n: usize, r: i32| -> Vec<f32> {
                        (0..n).map(|_| rng.random_range(-r..=r) as f32).collect()
                    };
                    let mut x = int(g.in_len(), 2);
                    if nan {
                        x[g.in_len() / 2] = f32::NAN;
                    }
                    let (wt, bias) = (int(cout * g.ckk(), 1), int(cout, 1));
                    let dw = DirectWeights::new(&wt, &g, simd);
                    let mut y = vec![0f32; cout * g.hw_out()];
                    sample(&x, &dw, Some(&bias), &g, &mut Vec::new(), &mut y);
                    let pp = (g.ho / 2) * (g.wo / 2);
                    let (mut want, mut want_arg) = (vec![0f32; cout * pp], vec![0u8; cout * pp]);
                    for c in 0..cout {
                        let (o, a) = (&mut want[c * pp..], &mut want_arg[c * pp..]);
                        let plane = &y[c * g.hw_out()..(c + 1) * g.hw_out()];
                        super::super::pool::pool_plane(plane, o, a, g.ho, g.wo, true);
                    }
                    let (mut got, mut got_arg) = (vec![7f32; cout * pp], vec![9u8; cout * pp]);
                    let mut scratch = vec![f32::NAN; 1 << 16];
                    sample_pooled(
                        &x,
                        &dw,
                        Some(&bias),
                        &g,
                        &mut scratch,
                        &mut got,
                        &mut got_arg,
                    );
                    let what = format!("{simd:?} {cin}×{h}×{w}→{cout} k{k} nan {nan}");
                    assert_eq!(want.iter().any(|v| v.is_nan()), nan, "{what}: NaN windows");
                    assert_eq!(got_arg, want_arg, "{what}: positions");
                    for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            a == e || (a.is_nan() && e.is_nan()),
                            "{what}: [{i}] {a} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn direct_matches_im2col_and_gemm() {
        for simd in sets() {
            direct_matches_on(simd);
        }
    }

    /// The instruction sets this CPU runs.
    fn sets() -> Vec<Simd> {
        let sets: Vec<Simd> = [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|s| s.available())
            .collect();
        if sets.is_empty() {
            eprintln!("neither AVX-512 nor AVX2 on this CPU: the direct convolution is not used");
        }
        sets
    }

    fn direct_matches_on(simd: Simd) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // One scratch buffer for every case, as a worker reuses it: stale values from a
        // larger case must not leak into a smaller one. It starts full of NaN.
        let mut scratch = vec![f32::NAN; 1 << 16];
        // (cin, h, w, cout, k, p): W1's two convolutions, a tail block of 16 channels, odd
        // widths that take every tile size, no padding, a kernel as large as the input, and
        // input channels split into chunks.
        let cases = [
            (1, 28, 28, 32, 5, 2),
            (32, 14, 14, 64, 5, 2),
            (3, 9, 13, 48, 3, 1),
            (2, 5, 1, 16, 3, 1),
            (4, 8, 11, 32, 3, 0),
            (5, 6, 9, 16, 6, 0),
            (2, 7, 3, 80, 5, 2),
            // Input channels in uneven chunks (7, 7, 7, 7, 5), a block of 16 beside one of 32.
            (33, 6, 9, 48, 5, 2),
        ];
        for (cin, h, w, cout, k, p) in cases {
            let g = Geom::new([1, cin, h, w], [cout, cin, k, k], 1, p).expect("valid");
            assert!(supported(&g));
            let x: Vec<f32> = (0..g.in_len())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let wt: Vec<f32> = (0..cout * g.ckk())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bias: Vec<f32> = (0..cout).map(|_| rng.random_range(-1.0..1.0)).collect();
            // dW of one sample against dY · columnsᵀ.
            let dy: Vec<f32> = (0..cout * g.hw_out())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut cols = vec![0f32; g.ckk() * g.hw_out()];
            super::super::conv::im2col(&x, &g, &mut cols);
            let mut want_dw = vec![0f32; cout * g.ckk()];
            for co in 0..cout {
                for r in 0..g.ckk() {
                    want_dw[co * g.ckk() + r] = (0..g.hw_out())
                        .map(|j| dy[co * g.hw_out() + j] * cols[r * g.hw_out() + j])
                        .sum();
                }
            }
            let mut direct_dw = vec![0f32; cout * g.ckk()];
            // Twice: the second sample adds to the first.
            for _ in 0..2 {
                sample_dw(
                    &x,
                    &dy,
                    &g,
                    simd,
                    &mut Vec::new(),
                    &mut Vec::new(),
                    &mut direct_dw,
                );
            }
            let got_dw = standard_layout(&direct_dw, &g, simd);
            for (i, (a, e)) in got_dw.iter().zip(&want_dw).enumerate() {
                assert!(
                    (a - 2.0 * e).abs() <= 1e-4 * e.abs().max(1.0) * g.hw_out() as f32,
                    "{simd:?} dW {cin}×{h}×{w}→{cout} k{k} p{p}: [{i}] {a} vs 2×{e}"
                );
            }
            for b in [Some(&bias[..]), None] {
                let mut want = vec![std::mem::MaybeUninit::uninit(); cout * g.hw_out()];
                let want = conv_sample(
                    &x,
                    &wt,
                    b,
                    &g,
                    None,
                    &mut Vec::new(),
                    &mut want,
                    gemm::Parallelism::None,
                )
                .to_vec();
                let mut got = vec![f32::NAN; cout * g.hw_out()];
                sample(
                    &x,
                    &DirectWeights::new(&wt, &g, simd),
                    b,
                    &g,
                    &mut scratch,
                    &mut got,
                );
                for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{simd:?} {cin}×{h}×{w}→{cout} k{k} p{p} bias {}: [{i}] {a} vs {e}",
                        b.is_some()
                    );
                }
            }
        }
    }
}
