//! The GEMM glue: which micro-kernels run on this CPU, the matrix product on strided slices,
//! and how a batch is split over threads.
//!
//! One binary runs on every x86-64 machine, so the micro-kernels are chosen at run time
//! ([`gemm_kernels`]): the `gemm` crate's AVX-512 kernels where the CPU runs 512-bit vectors at
//! full width, its AVX2/FMA kernels elsewhere, and the crate's own dispatch on other
//! architectures. The choice is fixed per machine (a rule on the CPU, never a timing), so a run
//! with a given seed gives the same bits every time on that machine.

use super::*;
use std::sync::atomic::AtomicU8;

/// A set of GEMM micro-kernels flotilla's kernels can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernels {
    /// 64×6 tiles of 512-bit vectors (`avx512f` and the rest of x86-64-v4).
    Avx512,
    /// 16×6 tiles of 256-bit vectors (`avx2` + `fma`).
    Avx2,
    /// Whatever the `gemm` crate dispatches to itself (NEON, scalar, …).
    Library,
}

impl GemmKernels {
    /// Every set, widest first.
    const ALL: [Self; 3] = [Self::Avx512, Self::Avx2, Self::Library];

    /// Its name, as `FLOTILLA_GEMM_KERNELS` takes it.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernels::Avx512 => "avx512",
            GemmKernels::Avx2 => "avx2",
            GemmKernels::Library => "library",
        }
    }

    /// The set named `name` (`avx512`, `avx2` or `library`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU can run these kernels.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            GemmKernels::Avx512 => gemm_common::simd::V4::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            GemmKernels::Avx2 => gemm_common::simd::V3::try_new().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            GemmKernels::Avx512 | GemmKernels::Avx2 => false,
            GemmKernels::Library => true,
        }
    }

    /// Every set this CPU can run, widest first.
    pub fn all_available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.available()).collect()
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }

    /// `Ok(self)` when this CPU runs these kernels, else an error naming the sets it runs.
    fn runnable(self) -> Result<Self, String> {
        if self.available() {
            return Ok(self);
        }
        Err(format!(
            "this CPU cannot run the {} GEMM kernels; it can run: {}",
            self.name(),
            Self::all_available()
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// 0 until chosen; then `GemmKernels::code`.
static KERNELS: AtomicU8 = AtomicU8::new(0);

/// The micro-kernels flotilla's kernels use in this process: the set given to
/// [`set_gemm_kernels`], else the one `FLOTILLA_GEMM_KERNELS` names when it is valid here
/// ([`gemm_kernels_from_env`]; the command refuses an invalid one), else
/// [`gemm_kernels_for_cpu`].
pub fn gemm_kernels() -> GemmKernels {
    match GemmKernels::from_code(KERNELS.load(Ordering::Relaxed)) {
        Some(k) => k,
        None => {
            let k = gemm_kernels_from_env()
                .ok()
                .flatten()
                .unwrap_or_else(gemm_kernels_for_cpu);
            KERNELS.store(k.code(), Ordering::Relaxed);
            k
        }
    }
}

/// The set `FLOTILLA_GEMM_KERNELS` names, if it is set. An error names a value that is not a
/// set, or a set this CPU cannot run, and the sets accepted.
pub fn gemm_kernels_from_env() -> Result<Option<GemmKernels>, String> {
    let Ok(name) = std::env::var("FLOTILLA_GEMM_KERNELS") else {
        return Ok(None);
    };
    GemmKernels::parse(&name)
        .ok_or_else(|| {
            format!("FLOTILLA_GEMM_KERNELS must be `avx512`, `avx2` or `library`, got `{name}`")
        })?
        .runnable()
        .map(Some)
}

/// Makes every later GEMM of flotilla's kernels, process-wide, use `kernels` (the bench's
/// comparison). An error names what this CPU lacks.
pub fn set_gemm_kernels(kernels: GemmKernels) -> Result<(), String> {
    KERNELS.store(kernels.runnable()?.code(), Ordering::Relaxed);
    Ok(())
}

/// The rule: AVX-512 where the CPU has it and executes 512-bit FMAs at full width, AVX2/FMA
/// where it has those, else the `gemm` crate's own choice.
///
/// Measured (docs/performance.md): on an Intel Xeon with AVX-512 the AVX-512 kernels run
/// W1 training 1.3× faster; on AMD Zen 4, which splits 512-bit operations into two 256-bit
/// halves, they were not faster (their 64-row tiles only moved time into packing), so AMD
/// before family 1Ah (Zen 5, full-width AVX-512) keeps the AVX2 kernels.
pub fn gemm_kernels_for_cpu() -> GemmKernels {
    let full_width_512 = amd_family().is_none_or(|family| family >= 0x1A);
    if full_width_512 && GemmKernels::Avx512.available() {
        GemmKernels::Avx512
    } else if GemmKernels::Avx2.available() {
        GemmKernels::Avx2
    } else {
        GemmKernels::Library
    }
}

/// The CPU family when the vendor is AMD (CPUID leaf 1: base family, plus the extended family
/// when the base is 0Fh).
fn amd_family() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (vendor, sig) = unsafe { (__cpuid(0), __cpuid(1)) };
        let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6E65, 0x444D_4163];
        let base = (sig.eax >> 8) & 0xF;
        let family = if base == 0xF {
            base + ((sig.eax >> 20) & 0xFF)
        } else {
            base
        };
        amd.then_some(family)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

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
    let s = Strided::row_major(m, n, k, dst, accumulate, a, a_t, b, b_t);
    // SAFETY: `row_major` checked every (row, column) the strides reach against the slices,
    // and `dst` does not alias `a` or `b` (it is borrowed mutably).
    unsafe { s.run(gemm_kernels(), par) }
}

/// `c[n×n] = a[n×n] · b[n×n]` (row-major) with the given kernels on `threads` threads: the
/// bench's measure of a machine's GEMM peak for each kernel set.
pub fn square_matmul(
    n: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    kernels: GemmKernels,
    threads: usize,
) {
    assert!(
        kernels.available(),
        "{} kernels are not available",
        kernels.name()
    );
    let s = Strided::row_major(n, n, n, c, false, a, false, b, false);
    // SAFETY: three n×n buffers (checked), `c` exclusive; the kernels run on this CPU.
    unsafe { s.run(kernels, gemm_par(threads)) }
}

/// One GEMM's operands as the `gemm` crate takes them (column and row strides in elements).
struct Strided {
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
}

impl Strided {
    /// The operands of `dst[m×n] (+)= op(A) · op(B)`, all row-major, A and B read from their
    /// transposes when `a_t` / `b_t` (as [`matmul`] takes them). Panics when a slice is too
    /// short for its shape.
    #[allow(clippy::too_many_arguments)]
    fn row_major(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
    ) -> Self {
        assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
        let (a_cs, a_rs) = if a_t { (m, 1) } else { (1, k) };
        let (b_cs, b_rs) = if b_t { (k, 1) } else { (1, n) };
        Strided {
            m,
            n,
            k,
            dst: dst.as_mut_ptr(),
            dst_cs: 1,
            dst_rs: n as isize,
            read_dst: accumulate,
            lhs: a.as_ptr(),
            lhs_cs: a_cs as isize,
            lhs_rs: a_rs as isize,
            rhs: b.as_ptr(),
            rhs_cs: b_cs as isize,
            rhs_rs: b_rs as isize,
        }
    }

    /// Runs `dst (+)= lhs · rhs` on `kernels`.
    ///
    /// # Safety
    /// Every element the strides reach lies in live buffers, `dst` aliases neither operand, and
    /// `kernels` is available on this CPU.
    unsafe fn run(self, kernels: GemmKernels, par: gemm::Parallelism) {
        let s = self;
        match kernels {
            #[cfg(target_arch = "x86_64")]
            GemmKernels::Avx512 | GemmKernels::Avx2 => {
                // As `gemm::gemm` does before its dispatch: the micro-kernels want a
                // column-oriented destination, so a row-oriented one is computed as
                // dstᵀ = rhsᵀ · lhsᵀ.
                let s = if s.dst_cs.abs() < s.dst_rs.abs() {
                    Strided {
                        m: s.n,
                        n: s.m,
                        k: s.k,
                        dst: s.dst,
                        dst_cs: s.dst_rs,
                        dst_rs: s.dst_cs,
                        read_dst: s.read_dst,
                        lhs: s.rhs,
                        lhs_cs: s.rhs_rs,
                        lhs_rs: s.rhs_cs,
                        rhs: s.lhs,
                        rhs_cs: s.lhs_rs,
                        rhs_rs: s.lhs_cs,
                    }
                } else {
                    s
                };
                // SAFETY: forwarded from the caller; the simd token exists only when the CPU
                // has the features (checked by `available`).
                unsafe {
                    if kernels == GemmKernels::Avx512 {
                        s.basic_avx512(par)
                    } else {
                        s.basic_avx2(par)
                    }
                }
            }
            _ => {
                // SAFETY: forwarded from the caller.
                unsafe {
                    gemm::gemm(
                        s.m, s.n, s.k, s.dst, s.dst_cs, s.dst_rs, s.read_dst, s.lhs, s.lhs_cs,
                        s.lhs_rs, s.rhs, s.rhs_cs, s.rhs_rs, 1.0, 1.0, false, false, false, par,
                    )
                }
            }
        }
    }
}

/// `Strided::$name`: the crate's generic driver on one simd token and micro-kernel table
/// (`$lanes` f32 per vector).
#[cfg(target_arch = "x86_64")]
macro_rules! basic {
    ($name:ident, $simd:ty, $ukr:path, $lanes:literal, $what:literal) => {
        impl Strided {
            unsafe fn $name(self, par: gemm::Parallelism) {
                use gemm_common::simd::MixedSimd;
                use $ukr as ukr;
                let simd = <$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                    .expect(concat!($what, " checked by `available`"));
                // SAFETY: forwarded from `run`.
                unsafe {
                    gemm_common::gemm::gemm_basic_generic::<
                        _,
                        f32,
                        $lanes,
                        { ukr::MR_DIV_N * $lanes },
                        { ukr::NR },
                        { ukr::MR_DIV_N },
                        { ukr::H_M },
                        { ukr::H_N },
                    >(
                        simd,
                        self.m,
                        self.n,
                        self.k,
                        self.dst,
                        self.dst_cs,
                        self.dst_rs,
                        self.read_dst,
                        self.lhs,
                        self.lhs_cs,
                        self.lhs_rs,
                        self.rhs,
                        self.rhs_cs,
                        self.rhs_rs,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        |a, b, c| a * b + c,
                        &ukr::UKR,
                        &ukr::H_UKR,
                        false,
                        par,
                    )
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
basic!(
    basic_avx512,
    gemm_common::simd::V4,
    gemm_f32::microkernel::avx512f::f32,
    16,
    "AVX-512"
);
#[cfg(target_arch = "x86_64")]
basic!(
    basic_avx2,
    gemm_common::simd::V3,
    gemm_f32::microkernel::fma::f32,
    8,
    "AVX2/FMA"
);

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `dst (+)= op(A) · op(B)` in f64, the reference for every kernel set.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        dst: &[f32],
        acc: bool,
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
    ) -> Vec<f32> {
        (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                let dot: f64 = (0..k)
                    .map(|p| {
                        let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                        let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
                (dot + if acc { dst[ij] as f64 } else { 0.0 }) as f32
            })
            .collect()
    }

    #[test]
    fn every_kernel_set_computes_the_product() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // W1's convolution and linear shapes, edges of the tiles (m or n one more or less than
        // a multiple of 16 or 6), vectors, and a product large enough to be threaded.
        let shapes = [
            (64, 196, 800),
            (800, 196, 64),
            (64, 800, 196),
            (16, 512, 3136),
            (1, 7, 5),
            (7, 1, 9),
            (17, 13, 33),
            (65, 7, 1),
            (3, 200, 2),
            (130, 140, 150),
        ];
        let sets = GemmKernels::all_available();
        assert!(sets.contains(&GemmKernels::Library));
        for (m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            for (acc, a_t, b_t) in [
                (false, false, false),
                (true, true, false),
                (true, false, true),
                (false, true, true),
            ] {
                let want = reference(m, n, k, &init, acc, &a, a_t, &b, b_t);
                for &set in &sets {
                    for threads in [1, 2] {
                        let mut dst = init.clone();
                        let s = Strided::row_major(m, n, k, &mut dst, acc, &a, a_t, &b, b_t);
                        // SAFETY: buffers of the stated shapes; `set` is available.
                        unsafe { s.run(set, gemm_par(threads)) };
                        let scale = (k as f32).sqrt().max(1.0);
                        for (i, (g, w)) in dst.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * scale * w.abs().max(1.0) * 4.0,
                                "{} kernels, {m}×{n}×{k} acc {acc} a_t {a_t} b_t {b_t} \
                                 threads {threads}: [{i}] {g} vs {w}",
                                set.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_cpu_rule_and_the_names() {
        assert!(gemm_kernels_for_cpu().available());
        for set in [GemmKernels::Avx512, GemmKernels::Avx2, GemmKernels::Library] {
            assert_eq!(GemmKernels::parse(set.name()), Some(set));
            assert_eq!(GemmKernels::from_code(set.code()), Some(set));
            if !set.available() {
                let e = set_gemm_kernels(set).expect_err("unavailable set refused");
                assert!(e.contains(set.name()) && e.contains("library"), "{e}");
            }
        }
        assert_eq!(GemmKernels::parse("sse"), None);
    }
}
