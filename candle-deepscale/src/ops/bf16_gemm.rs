//! bf16 GEMM for CPUs with AVX512-BF16 (`vdpbf16ps`): fp32 operands are rounded to bfloat16 while
//! they are packed, products accumulate in fp32, the output is fp32 — the numerics of PyTorch's
//! bf16 autocast. No maintained Rust crate uses `vdpbf16ps` for GEMM (the `gemm` crate's f16/bf16
//! paths convert to f32), hence this kernel.
//!
//! BLIS structure: all of A is packed into `MR`-row panels and, per column block, all of B into
//! `NR`-column panels, both as bf16 pairs along k (the operand layout of `vdpbf16ps`), in `KC`
//! slices of k; tasks over (row block, column block) then run the `MR x NR` micro-kernel over every
//! slice, so that a task's block of C stays in L2 instead of being read and written once per slice.
//! The micro-kernel is the only CPU-specific part: a portable one with the same arithmetic tests
//! the packing and blocking on any machine.

/// Rows of the micro-tile (12 x 2 accumulators + 2 B vectors + 1 broadcast = 27 zmm registers).
pub const MR: usize = 12;
/// Columns of the micro-tile: two 16-lane fp32 vectors.
pub const NR: usize = 32;
/// Shared-dimension slice (even, so pairs never straddle slices): a B micro-panel is 24 KiB.
const KC: usize = 384;
/// Packed B per column block (all of k at once, so that each task runs every k slice over its
/// block of C while that block is in L2).
const B_BLOCK_BYTES: usize = 4 << 20;
/// A panels per task (96 rows, 72 KiB of A for L2) and B panels per task (512 columns).
const TASK_A_PANELS: usize = 8;
const TASK_B_PANELS: usize = 16;

/// An fp32 matrix read through strides: element (i, j) is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// Operands are only read, by tasks that the call waits for.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// The transpose, read through swapped strides.
    pub fn t(self) -> Mat {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[inline(always)]
    pub(crate) unsafe fn at(&self, i: usize, j: usize) -> f32 {
        *self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// An output buffer that parallel tasks write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so closures capture the Send wrapper rather than its raw-pointer field.
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Round to nearest even, as `vcvtneps2bf16` does; NaNs stay NaN (quietened). (The instruction
/// also flushes fp32 denormals, below 1.2e-38, to zero; this keeps their rounded bits.)
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bfloat16, as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// The micro-kernel: `kc2` k-pairs of an A panel (`[kc2][MR]` pairs) against a B panel
/// (`[kc2][NR]` pairs) into the `MR x NR` tile at `c` (row stride `ldc`), added to it when
/// `accumulate`, written otherwise.
pub type Kernel = unsafe fn(usize, *const u32, *const u32, *mut f32, usize, bool);

/// Which micro-kernel the CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Avx512Bf16,
    Portable,
}

/// Whether this CPU has AVX512-BF16 (checked once). `DEEPSCALE_BF16_KERNEL=off` turns the kernel
/// off, so that bf16 GEMMs take the emulated path.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("DEEPSCALE_BF16_KERNEL").is_ok_and(|v| v == "off") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

impl KernelKind {
    fn kernel(self) -> Kernel {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Bf16 => kernel_avx512bf16,
            _ => kernel_portable,
        }
    }
}

/// The arithmetic of `vdpbf16ps` in plain Rust: per pair, the odd product then the even one, each
/// exact in fp32 and added with one rounding.
unsafe fn kernel_portable(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut t = [[0f32; NR]; MR];
    for q in 0..kc2 {
        let ap = std::slice::from_raw_parts(a.add(q * MR), MR);
        let bp = std::slice::from_raw_parts(b.add(q * NR), NR);
        for (row, &av) in t.iter_mut().zip(ap) {
            let (alo, ahi) = (f32::from_bits(av << 16), f32::from_bits(av & 0xffff_0000));
            for (acc, &bv) in row.iter_mut().zip(bp) {
                let (blo, bhi) = (f32::from_bits(bv << 16), f32::from_bits(bv & 0xffff_0000));
                *acc += ahi * bhi;
                *acc += alo * blo;
            }
        }
    }
    for (r, row) in t.iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(c.add(r * ldc), NR);
        for (o, v) in out.iter_mut().zip(row) {
            *o = if accumulate { *o + v } else { *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_avx512bf16(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..kc2 {
        let bp = b.add(q * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let ap = a.add(q * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (h, v) in row.iter().enumerate() {
            let p = cr.add(16 * h);
            let v = if accumulate {
                _mm512_add_ps(_mm512_loadu_ps(p), *v)
            } else {
                *v
            };
            _mm512_storeu_ps(p, v);
        }
    }
}

/// Lanes `[first, first + count)` of `x` (its rows; columns `[p0, p0 + kc)` along k) as panels of
/// `width` lanes of bf16 pairs, `[kc2][width]` each, zero padded. A packs its rows (width `MR`);
/// B packs the rows of its transpose (width `NR`). With `vector`, operands that are contiguous along
/// k or along the lanes are converted 16 at a time (`vcvtneps2bf16`); other layouts go element by
/// element.
#[allow(clippy::too_many_arguments)]
fn pack(
    x: Mat,
    width: usize,
    (first, count): (usize, usize),
    p0: usize,
    kc: usize,
    out: &mut [u32],
    parallel: bool,
    vector: bool,
) {
    let kc2 = kc.div_ceil(2);
    let panel = |(ip, dst): (usize, &mut [u32])| {
        #[cfg(target_arch = "x86_64")]
        if vector && (x.cs == 1 || x.rs == 1) {
            // SAFETY: the vector path is only asked for where AVX512-BF16 was detected; it reads
            // lanes < count and depths < kc only.
            unsafe {
                if x.cs == 1 {
                    pack_panel_along_k(
                        x,
                        width,
                        (first + ip * width, count - ip * width),
                        p0,
                        kc,
                        dst,
                    )
                } else {
                    pack_panel_along_lanes(
                        x,
                        width,
                        (first + ip * width, count - ip * width),
                        p0,
                        kc,
                        dst,
                    )
                }
            }
            return;
        }
        let _ = vector;
        for l in 0..width {
            let i = ip * width + l;
            for q in 0..kc2 {
                let v = if i < count {
                    // SAFETY: lane i < count lies inside x; depth p0 + 2q + 1 only inside the slice.
                    let lo = unsafe { x.at(first + i, p0 + 2 * q) };
                    let hi = if 2 * q + 1 < kc {
                        unsafe { x.at(first + i, p0 + 2 * q + 1) }
                    } else {
                        0.0
                    };
                    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
                } else {
                    0
                };
                dst[q * width + l] = v;
            }
        }
    };
    let len = count.div_ceil(width) * width * kc2;
    if parallel {
        use rayon::prelude::*;
        out[..len]
            .par_chunks_mut(width * kc2)
            .enumerate()
            .for_each(panel);
    } else {
        out[..len]
            .chunks_mut(width * kc2)
            .enumerate()
            .for_each(panel);
    }
}

/// One panel of an operand whose k runs are contiguous (`cs == 1`): each lane's run is converted
/// 16 elements (8 pairs) at a time, already in pair order, and the pairs are spread over the panel.
/// `left` lanes remain from `first` (at most `width` are packed; the rest is zero padding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_panel_along_k(
    x: Mat,
    width: usize,
    (first, left): (usize, usize),
    p0: usize,
    kc: usize,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    let kc2 = kc.div_ceil(2);
    let mut pairs = [0u32; 8];
    for l in 0..width {
        if l >= left {
            for q in 0..kc2 {
                dst[q * width + l] = 0;
            }
            continue;
        }
        let src = x.ptr.offset((first + l) as isize * x.rs + p0 as isize);
        for q0 in (0..kc2).step_by(8) {
            let rest = kc - 2 * q0;
            let v = if rest >= 16 {
                _mm512_loadu_ps(src.add(2 * q0))
            } else {
                _mm512_maskz_loadu_ps(((1u32 << rest) - 1) as u16, src.add(2 * q0))
            };
            let bh: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(pairs.as_mut_ptr() as *mut __m256i, bh);
            for (j, &p) in pairs.iter().enumerate().take(kc2 - q0) {
                dst[(q0 + j) * width + l] = p;
            }
        }
    }
}

/// One panel of an operand whose lanes are contiguous (`rs == 1`): per k pair, 16 lanes of the
/// even and of the odd depth are converted and interleaved into pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_panel_along_lanes(
    x: Mat,
    width: usize,
    (first, left): (usize, usize),
    p0: usize,
    kc: usize,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    let kc2 = kc.div_ceil(2);
    let mask = |lanes: usize| ((1u32 << lanes) - 1) as u16;
    for g in (0..width).step_by(16) {
        // All of the group's lanes are stored; those past the operand's edge load as zeros.
        let n = width.min(g + 16) - g;
        let (load, store) = (mask(left.saturating_sub(g).min(n)), mask(n));
        let base = x.ptr.wrapping_add(first + g);
        for q in 0..kc2 {
            let depth = (p0 + 2 * q) as isize;
            let even = _mm512_maskz_loadu_ps(load, base.wrapping_offset(depth * x.cs));
            let odd = if 2 * q + 1 < kc {
                _mm512_maskz_loadu_ps(load, base.wrapping_offset((depth + 1) * x.cs))
            } else {
                _mm512_setzero_ps()
            };
            let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(even),
            ));
            let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(odd),
            ));
            let v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(q * width + g) as *mut i32, store, v);
        }
    }
}

/// Packing space reused across calls on a thread (a product's panels are megabytes: allocating them
/// per call costs page faults). Space beyond `KEPT_PACK_SPACE` is freed after the call rather than
/// held by the thread.
fn with_pack_space<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    const KEPT_PACK_SPACE: usize = 16 << 20; // u32s: 64 MiB
    thread_local! {
        static SPACE: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut space = SPACE.take();
    if space.len() < len {
        space = vec![0; len];
    }
    let r = f(&mut space[..len]);
    if space.len() <= KEPT_PACK_SPACE {
        SPACE.set(space);
    }
    r
}

/// `dst[m x n] = A[m x k] B[k x n]` with bf16 operands and fp32 accumulation; `dst` is row-major
/// with row stride `n` and is written whole (it may start uninitialised), or added to when `add`.
/// `parallel` spreads the
/// work over rayon's threads (callers that already run one product per thread pass false).
///
/// # Safety
/// `a` must address `m x k` readable elements, `b` `k x n`, `dst` `m * n` writable ones.
pub unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    a: Mat,
    b: Mat,
    parallel: bool,
    add: bool,
    kind: KernelKind,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            std::ptr::write_bytes(dst, 0, m * n);
        }
        return;
    }
    let kernel = kind.kernel();
    let vector = kind == KernelKind::Avx512Bf16;
    let (mpanels, slices, kc2max) = (m.div_ceil(MR), k.div_ceil(KC), KC.min(k).div_ceil(2));
    // A column block's packed B (all of k) stays near `B_BLOCK_BYTES`; a multiple of a task's
    // columns.
    let task_cols = TASK_B_PANELS * NR;
    let nc = (B_BLOCK_BYTES / (2 * k) / task_cols * task_cols)
        .max(task_cols)
        .min(n.div_ceil(NR) * NR);
    let (aslice, bslice) = (mpanels * MR * kc2max, nc.div_ceil(NR) * NR * kc2max);
    with_pack_space((aslice + bslice) * slices, |space| {
        let (apack, bpack) = space.split_at_mut(aslice * slices);
        let pack_slices = |x: Mat, width, lanes, out: &mut [u32], len| {
            let one = |(s, out): (usize, &mut [u32])| {
                let kc = KC.min(k - s * KC);
                pack(x, width, lanes, s * KC, kc, out, parallel, vector)
            };
            if parallel {
                use rayon::prelude::*;
                out.par_chunks_mut(len).enumerate().for_each(one);
            } else {
                out.chunks_mut(len).enumerate().for_each(one);
            }
        };
        pack_slices(a, MR, (0, m), apack, aslice);
        let out = OutPtr(dst);
        for n0 in (0..n).step_by(nc) {
            let nc = nc.min(n - n0);
            pack_slices(b.t(), NR, (n0, nc), bpack, bslice);
            let npanels = nc.div_ceil(NR);
            let (apack, bpack) = (&*apack, &*bpack);
            // A task keeps its block of C (96 x 512) in L2 over all k slices.
            let task = |(ta, tb): (usize, usize)| {
                for s in 0..slices {
                    let kc2 = KC.min(k - s * KC).div_ceil(2);
                    let acc = add || s > 0;
                    for jp in tb..(tb + TASK_B_PANELS).min(npanels) {
                        let bp = bpack[s * bslice + jp * NR * kc2..].as_ptr();
                        let cols = NR.min(nc - jp * NR);
                        for ip in ta..(ta + TASK_A_PANELS).min(mpanels) {
                            let ap = apack[s * aslice + ip * MR * kc2..].as_ptr();
                            let rows = MR.min(m - ip * MR);
                            let c = out.get().add(ip * MR * n + n0 + jp * NR);
                            if rows == MR && cols == NR {
                                kernel(kc2, ap, bp, c, n, acc);
                            } else {
                                let mut tile = [0f32; MR * NR];
                                kernel(kc2, ap, bp, tile.as_mut_ptr(), NR, false);
                                for r in 0..rows {
                                    let row = std::slice::from_raw_parts_mut(c.add(r * n), cols);
                                    for (o, v) in row.iter_mut().zip(&tile[r * NR..]) {
                                        *o = if acc { *o + v } else { *v };
                                    }
                                }
                            }
                        }
                    }
                }
            };
            let tasks: Vec<(usize, usize)> = (0..mpanels)
                .step_by(TASK_A_PANELS)
                .flat_map(|ta| (0..npanels).step_by(TASK_B_PANELS).map(move |tb| (ta, tb)))
                .collect();
            if parallel {
                use rayon::prelude::*;
                tasks.into_par_iter().for_each(task);
            } else {
                tasks.into_iter().for_each(task);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 products of the bf16-rounded operands.
    fn reference(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| unsafe {
                        round_bf16(a.at(i, p)) as f64 * round_bf16(b.at(p, j)) as f64
                    })
                    .sum();
            }
        }
        c
    }

    fn check(kind: KernelKind, m: usize, n: usize, k: usize, a_t: bool, b_t: bool, par: bool) {
        let (av, bv) = (rand(m * k, 1 + m as u64), rand(k * n, 7 + n as u64));
        // Transposed operands are stored the other way round and read through strides.
        let a = if a_t {
            Mat {
                ptr: av.as_ptr(),
                rs: 1,
                cs: m as isize,
            }
        } else {
            Mat {
                ptr: av.as_ptr(),
                rs: k as isize,
                cs: 1,
            }
        };
        let b = if b_t {
            Mat {
                ptr: bv.as_ptr(),
                rs: 1,
                cs: k as isize,
            }
        } else {
            Mat {
                ptr: bv.as_ptr(),
                rs: n as isize,
                cs: 1,
            }
        };
        let mut c = vec![f32::NAN; m * n];
        unsafe { gemm((m, n, k), c.as_mut_ptr(), a, b, par, false, kind) };
        let want = reference(m, n, k, a, b);
        for (i, (g, w)) in c.iter().zip(&want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt() + 1e-6 * w.abs();
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{kind:?} {m}x{n}x{k} (a_t {a_t}, b_t {b_t}) at {i}: {g} vs {w}"
            );
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (12, 32, 2),
        (13, 33, 3),
        (7, 100, 385),
        (100, 70, 769),
        (97, 4100, 5),
        (200, 65, 40),
        // Three k slices and two column blocks of packed B.
        (13, 2600, 769),
        (3, 5, 0),
    ];

    #[test]
    fn portable_kernel_packing_and_blocking_match_the_bf16_reference() {
        for &(m, n, k) in SHAPES {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                check(KernelKind::Portable, m, n, k, a_t, b_t, true);
            }
            check(KernelKind::Portable, m, n, k, false, false, false);
        }
    }

    /// Runs only on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later); elsewhere the
    /// portable kernel's test covers the blocking.
    #[test]
    fn avx512bf16_kernel_matches_the_bf16_reference() {
        if !available() {
            eprintln!("avx512bf16 kernel not tested: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, k) in SHAPES {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                check(KernelKind::Avx512Bf16, m, n, k, a_t, b_t, true);
            }
        }
    }

    /// Operands contiguous in neither direction (every other column of a wider matrix) are packed
    /// element by element, by either kernel kind.
    #[test]
    fn strided_operands_match_the_bf16_reference() {
        let (m, n, k) = (13, 33, 41);
        let (av, bv) = (rand(2 * m * k, 11), rand(2 * k * n, 12));
        let a = Mat {
            ptr: av.as_ptr(),
            rs: 2 * k as isize,
            cs: 2,
        };
        let b = Mat {
            ptr: bv.as_ptr(),
            rs: 2 * n as isize,
            cs: 2,
        };
        let want = reference(m, n, k, a, b);
        let mut kinds = vec![KernelKind::Portable];
        if available() {
            kinds.push(KernelKind::Avx512Bf16);
        }
        for kind in kinds {
            let mut c = vec![f32::NAN; m * n];
            unsafe { gemm((m, n, k), c.as_mut_ptr(), a, b, true, false, kind) };
            for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-4, "{kind:?} at {i}: {g} vs {w}");
            }
        }
    }

    /// `add` keeps what dst holds (a linear's bias rows) across all k slices and edge tiles.
    #[test]
    fn add_accumulates_onto_the_destination() {
        let (m, n, k) = (13, 40, 400);
        let (av, bv) = (rand(m * k, 3), rand(k * n, 4));
        let a = Mat {
            ptr: av.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let b = Mat {
            ptr: bv.as_ptr(),
            rs: n as isize,
            cs: 1,
        };
        let mut c: Vec<f32> = (0..m * n).map(|i| (i % n) as f32).collect();
        unsafe {
            gemm(
                (m, n, k),
                c.as_mut_ptr(),
                a,
                b,
                true,
                true,
                KernelKind::Portable,
            )
        };
        for (i, (g, w)) in c.iter().zip(reference(m, n, k, a, b)).enumerate() {
            let w = w + (i % n) as f64;
            assert!((*g as f64 - w).abs() < 1e-3, "at {i}: {g} vs {w}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        for x in [0.1f32, -3.7, 1e-30, 65504.0] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }
}
