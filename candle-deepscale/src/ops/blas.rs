//! A system BLAS, loaded at run time, for the f32 products of [`crate::ops::matmul`]: BLIS or OpenBLAS
//! where one is installed (Debian's `libblis4-serial`, `libopenblas0-pthread`), the `gemm` crate
//! otherwise.
//!
//! Why: on GPT-2 124M's shapes these run 10-20% faster than the `gemm` crate here (2 AVX2 cores;
//! `deepscale bench gemm`, BENCHMARKS.md), and GEMMs are 85% of a training step. Loaded, not
//! linked: the binary still runs where no BLAS is installed, on the `gemm` crate.
//!
//! The library runs single-threaded (its thread count set to 1) and is called from rayon's threads
//! on row or column panels of the output: rayon stays the only thread pool, where a BLAS's own
//! workers would spin after each call and take the cores from the element-wise kernels that follow.
//!
//! `DEEPSCALE_BLAS`: unset, the usual library names are tried; a path or library name, that
//! library (an error if it does not load); `off`, the `gemm` crate.
use crate::ops::bf16_gemm::Mat;
use rayon::prelude::*;
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// Tried in order when `DEEPSCALE_BLAS` is unset (see [`open`] for which OpenBLAS builds).
const CANDIDATES: &[&str] = &[
    "libblis.so.4",
    "libblis.so",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
];

/// A loaded CBLAS.
pub struct Blas {
    sgemm: Sgemm,
    /// What was loaded, e.g. `OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen (libopenblas.so.0)`.
    pub name: String,
    /// Whether its f32 kernels are AVX-512 ones (BLIS's skx/knl/zen4/zen5 sub-configs, OpenBLAS's
    /// SkylakeX/Cooperlake/SapphireRapids cores): then bf16 products are faster rounded and run
    /// here than on `ops::bf16_gemm`'s AVX512-BF16 kernel (BENCHMARKS.md, session 21).
    pub avx512: bool,
    // Keeps the symbols valid.
    _lib: libloading::Library,
}

static BLAS: OnceLock<std::result::Result<Option<Blas>, String>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Off: every f32 product on the `gemm` crate (for A/B benchmarks).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The BLAS the products use, `None` for the `gemm` crate; an error where `DEEPSCALE_BLAS` names
/// a library that does not load or has no `cblas_sgemm`.
pub fn backend() -> candle_core::Result<Option<&'static Blas>> {
    match BLAS.get_or_init(load) {
        Ok(b) => Ok(b.as_ref().filter(|_| ENABLED.load(Ordering::Relaxed))),
        Err(e) => Err(candle_core::Error::Msg(e.clone())),
    }
}

/// One line for logs and benchmark reports: the BLAS in use, or the `gemm` crate.
pub fn describe() -> String {
    match backend() {
        Ok(Some(b)) => b.name.clone(),
        Ok(None) => "gemm crate".into(),
        Err(e) => format!("gemm crate ({e})"),
    }
}

/// The BLAS for a product, if any (a failed explicit load is reported once, then ignored here:
/// [`backend`] is where callers that can fail see it).
pub(crate) fn active() -> Option<&'static Blas> {
    match backend() {
        Ok(b) => b,
        Err(e) => {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| eprintln!("warning: {e}; f32 products use the gemm crate"));
            None
        }
    }
}

fn load() -> std::result::Result<Option<Blas>, String> {
    match std::env::var("DEEPSCALE_BLAS") {
        Ok(v) if matches!(v.as_str(), "off" | "none" | "0" | "") => Ok(None),
        Ok(v) => open(&v)
            .map(Some)
            .map_err(|e| format!("DEEPSCALE_BLAS={v}: {e}")),
        Err(_) => Ok(CANDIDATES.iter().find_map(|c| open(c).ok())),
    }
}

/// Loads `name` and sets it to one thread per call. OpenBLAS is taken only in its pthread build:
/// the single-threaded one is unsafe to call from several threads unless built with
/// `USE_LOCKING` (which its config string does not show), and the OpenMP one shares buffers
/// between concurrent callers. BLIS is thread-safe in every build.
fn open(name: &str) -> std::result::Result<Blas, String> {
    // SAFETY: loading a BLAS runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| e.to_string())?;
    blis_skx(&lib)?;
    // SAFETY: the symbols are declared with CBLAS's / the libraries' C signatures.
    unsafe {
        let sgemm = *lib
            .get::<Sgemm>(b"cblas_sgemm\0")
            .map_err(|_| format!("{name} has no cblas_sgemm"))?;
        // One thread per call: the panels are spread over rayon's threads instead.
        for setter in [
            &b"openblas_set_num_threads\0"[..],
            b"bli_thread_set_num_threads\0",
            b"mkl_set_num_threads\0",
        ] {
            if let Ok(f) = lib.get::<unsafe extern "C" fn(i32)>(setter) {
                f(1);
            }
        }
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let call = |s: &[u8]| {
            lib.get::<unsafe extern "C" fn() -> *const c_char>(s)
                .ok()
                .and_then(|f| text(f()))
        };
        let about = call(b"openblas_get_config\0").or_else(|| {
            let version = call(b"bli_info_get_version_str\0")?;
            // The sub-configuration BLIS picked for this CPU (zen3, haswell, ...).
            let arch = lib
                .get::<unsafe extern "C" fn() -> i32>(b"bli_arch_query_id\0")
                .ok()
                .zip(
                    lib.get::<unsafe extern "C" fn(i32) -> *const c_char>(b"bli_arch_string\0")
                        .ok(),
                )
                .and_then(|(id, s)| text(s(id())));
            Some(
                format!("{version} {}", arch.unwrap_or_default())
                    .trim()
                    .to_string(),
            )
        });
        let name = match about {
            Some(a) if a.contains("SINGLE_THREADED") || a.contains("USE_OPENMP") => {
                return Err(format!(
                    "{name} is `{a}`: not safe to call from several threads; install OpenBLAS's \
                     pthread build (Debian: libopenblas0-pthread) or BLIS"
                ))
            }
            Some(a) if a.starts_with("OpenBLAS") => format!("{a} ({name})"),
            Some(v) => format!("BLIS {v} ({name})"),
            None => name.to_string(),
        };
        let avx512 = [
            " skx ",
            " knl ",
            " zen4 ",
            " zen5 ",
            "SkylakeX",
            "Cooperlake",
            "SapphireRapids",
        ]
        .iter()
        .any(|k| name.contains(k));
        Ok(Blas {
            sgemm,
            name,
            avx512,
            _lib: lib,
        })
    }
}

/// BLIS's own message where it cannot count FMA units, compiled in only with its skx sub-config.
const BLIS_HAS_SKX: &[u8] = b"Number of FMA units unknown; using 'haswell'";

/// BLIS 0.9 runs its AVX-512 kernels (sub-config `skx`) only where it can tell from the CPU's
/// brand string that the cores have two FMA units; a cloud VM's generic "Intel(R) Xeon(R)
/// Processor" leaves the count unknown and BLIS on its AVX2 kernels (`haswell`), at ~55% of the
/// speed (`deepscale bench gemm`: ~160 against ~290 GFLOP/s on such a VM, BENCHMARKS.md
/// session 21). Where the CPU has the AVX-512 subsets skx needs, its brand string names no tier
/// BLIS counts units by, the library has the skx sub-config (its own "FMA units unknown" message
/// is compiled in only then) and its first arch id is skx, BLIS is initialised with
/// `BLIS_ARCH_TYPE` naming it. BLIS sets its sub-config once, at its initialisation (which loading
/// does not do); a `BLIS_ARCH_TYPE` of the user's is left alone, and a BLIS that something else
/// initialised first keeps its choice.
fn blis_skx(lib: &libloading::Library) -> std::result::Result<(), String> {
    if std::env::var_os("BLIS_ARCH_TYPE").is_some() || !avx512_without_fma_count() {
        return Ok(());
    }
    // SAFETY: BLIS's `const char* bli_arch_string(arch_t)` (a table lookup, no initialisation;
    // id 0 is always in the table) and `void bli_init(void)`.
    let (first, init) = unsafe {
        let Ok(name) = lib.get::<unsafe extern "C" fn(i32) -> *const c_char>(b"bli_arch_string\0")
        else {
            return Ok(());
        };
        let Ok(init) = lib.get::<unsafe extern "C" fn()>(b"bli_init\0") else {
            return Ok(());
        };
        let p = name(0);
        (
            (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes() == b"skx"),
            init,
        )
    };
    if first != Some(true) {
        return Ok(());
    }
    let Some(path) = library_path(*init as *const std::ffi::c_void) else {
        return Ok(());
    };
    let has_skx = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if memchr::memmem::find(&has_skx, BLIS_HAS_SKX).is_none() {
        return Ok(());
    }
    // Set while no other thread reads the environment (the binary loads the BLAS first thing)
    // and removed once BLIS has read it.
    std::env::set_var("BLIS_ARCH_TYPE", "0");
    // SAFETY: bli_init has no preconditions.
    unsafe { init() };
    std::env::remove_var("BLIS_ARCH_TYPE");
    Ok(())
}

/// The file of the loaded library holding `symbol`.
fn library_path(symbol: *const std::ffi::c_void) -> Option<std::path::PathBuf> {
    // SAFETY: `dladdr` only reads the loader's tables; `info` is plain data it fills in.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(symbol, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a C string owned by the loader while the library stays loaded.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(std::path::PathBuf::from(
        name.to_string_lossy().into_owned(),
    ))
}

/// An Intel CPU with AVX-512 F, DQ, BW and VL (what BLIS's skx kernels use) whose brand string
/// names no tier BLIS counts the FMA units by (Xeon Bronze/Silver/Gold/Platinum/W; Core parts,
/// where one unit is common, are left to BLIS too).
fn avx512_without_fma_count() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let avx512 = crate::ops::fast_math::cpu_has_avx512();
        // (cpuid is safe on x86_64; a leaf past the maximum returns zeros or the last one.)
        let leaf = |l: u32| __cpuid(l);
        let v = leaf(0);
        let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        if !avx512 || vendor != b"GenuineIntel" || leaf(0x8000_0000).eax < 0x8000_0004 {
            return false;
        }
        let brand: Vec<u8> = (0x8000_0002..=0x8000_0004)
            .map(leaf)
            .flat_map(|r| [r.eax, r.ebx, r.ecx, r.edx])
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let brand = String::from_utf8_lossy(&brand);
        !["Bronze", "Silver", "Gold", "Platinum", "W-", "Core"]
            .iter()
            .any(|t| brand.contains(t))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `(transpose, leading dimension)` of a `rows x cols` operand for row-major CBLAS, `None` where
/// neither of its strides is 1 (the caller falls back to the `gemm` crate). A stride along a
/// dimension of size 1 is never used, so it may be anything.
fn operand(x: Mat, rows: usize, cols: usize) -> Option<(i32, i32)> {
    let ld = |v: usize| i32::try_from(v.max(1)).ok();
    if (cols == 1 || x.cs == 1) && (rows == 1 || x.rs >= cols as isize) {
        Some((NO_TRANS, ld(if rows == 1 { cols } else { x.rs as usize })?))
    } else if (rows == 1 || x.rs == 1) && (cols == 1 || x.cs >= rows as isize) {
        Some((TRANS, ld(if cols == 1 { rows } else { x.cs as usize })?))
    } else {
        None
    }
}

impl Blas {
    /// `dst (m x n, row-major) = a b`, or `+= a b` when `add`, over `threads` panels; false (and
    /// nothing written) where an operand's layout or size does not fit CBLAS.
    ///
    /// # Safety
    /// As for [`crate::ops::matmul`]'s `gemm`: `a`, `b` address `m x k` and `k x n` elements, `dst`
    /// `m * n` (initialised when `add`).
    pub(crate) unsafe fn sgemm(
        &self,
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        a: Mat,
        b: Mat,
        add: bool,
        threads: usize,
    ) -> bool {
        let (Some((ta, lda)), Some((tb, ldb))) = (operand(a, m, k), operand(b, k, n)) else {
            return false;
        };
        let (Ok(_), Ok(_), Ok(_)) = (i32::try_from(m), i32::try_from(n), i32::try_from(k)) else {
            return false;
        };
        let beta = if add { 1.0 } else { 0.0 };
        let out = crate::ops::bf16_gemm::OutPtr(dst);
        // Rows i0..i1 and columns j0..j1 of the product.
        let panel = |(i0, i1): (usize, usize), (j0, j1): (usize, usize)| {
            // Whole operands captured (Mat is Sync; its raw pointer fields are not).
            let (a, b) = (a, b);
            // SAFETY: the panel lies inside the operands and dst; panels do not overlap.
            unsafe {
                (self.sgemm)(
                    ROW_MAJOR,
                    ta,
                    tb,
                    (i1 - i0) as i32,
                    (j1 - j0) as i32,
                    k as i32,
                    1.0,
                    a.ptr.offset(i0 as isize * a.rs),
                    lda,
                    b.ptr.offset(j0 as isize * b.cs),
                    ldb,
                    beta,
                    out.get().add(i0 * n + j0),
                    n as i32,
                )
            }
        };
        // Panels along the longer side, in multiples of 16 rows or columns (the kernels' tile).
        let long = m.max(n);
        let chunk = long.div_ceil(threads.max(1)).next_multiple_of(16);
        if threads <= 1 || long <= chunk {
            panel((0, m), (0, n));
            return true;
        }
        (0..long.div_ceil(chunk)).into_par_iter().for_each(|p| {
            let span = (p * chunk, ((p + 1) * chunk).min(long));
            if m >= n {
                panel(span, (0, n))
            } else {
                panel((0, m), span)
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On an Intel CPU with AVX-512 whose brand string BLIS cannot count FMA units from (a cloud
    /// VM's), a BLIS with the skx sub-config runs it, not the AVX2 `haswell` one.
    #[test]
    fn blis_runs_its_avx512_kernels_where_it_cannot_count_fma_units() {
        let Ok(Some(b)) = backend() else { return };
        let lib_has_skx = b.name.starts_with("BLIS")
            && std::fs::read("/usr/lib/x86_64-linux-gnu/blis-serial/libblis.so.4")
                .is_ok_and(|f| memchr::memmem::find(&f, BLIS_HAS_SKX).is_some());
        if lib_has_skx && avx512_without_fma_count() && std::env::var_os("BLIS_ARCH_TYPE").is_none()
        {
            assert!(b.name.contains(" skx "), "{}", b.name);
        } else {
            eprintln!("not such a CPU and BLIS: {}", b.name);
        }
    }

    /// The BLAS against the definition (read through `Mat::at`) on every operand layout the
    /// products use (plain, transposed, row-strided; written or accumulated), on one thread and
    /// in row or column panels. In CI the library must be there (scripts/install-system-deps.sh
    /// installs it): no silent pass on the fallback.
    #[test]
    fn blas_products_equal_the_definition() {
        let blas = match backend() {
            Ok(Some(b)) => b,
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI: no BLAS loaded ({}); install libblis4-serial (scripts/install-system-deps.sh)", describe())
            }
            _ => {
                eprintln!("no system BLAS: skipped ({})", describe());
                return;
            }
        };
        let v: Vec<f32> = (0..100 * 80)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let at = |rs: usize, cs: usize, off: usize| Mat {
            ptr: v[off..].as_ptr(),
            rs: rs as isize,
            cs: cs as isize,
        };
        // (a, b, (m, n, k), threads, add)
        let cases = [
            (at(41, 1, 0), at(45, 1, 7), (67, 45, 38), 1, false),
            (at(41, 1, 0), at(1, 38, 3), (67, 45, 38), 3, false),
            (at(1, 67, 0), at(45, 1, 5), (67, 45, 38), 2, true),
            (at(38, 1, 11), at(1, 38, 0), (5, 60, 38), 2, false),
            (at(1, 9, 2), at(70, 1, 1), (9, 70, 40), 2, true),
            (at(50, 1, 0), at(1, 1, 0), (1, 1, 50), 2, false),
        ];
        for (a, b, (m, n, k), threads, add) in cases {
            let init = |i: usize| if add { i as f32 * 0.5 } else { f32::NAN };
            let mut c: Vec<f32> = (0..m * n).map(init).collect();
            // SAFETY: every view addresses its elements inside v (100 * 80); c holds m * n.
            assert!(unsafe { blas.sgemm((m, n, k), c.as_mut_ptr(), a, b, add, threads) });
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|p| unsafe { a.at(i, p) * b.at(p, j) }).sum();
                    let want = dot + if add { init(i * n + j) } else { 0.0 };
                    let got = c[i * n + j];
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} ({i}, {j}): {got} against {want} (threads {threads}, add {add})"
                    );
                }
            }
        }
        // Neither stride 1, or a broadcast (stride 0) row: not for CBLAS.
        assert!(operand(at(82, 2, 0), 3, 3).is_none());
        assert!(operand(at(0, 1, 0), 3, 3).is_none());
    }
}
