use candle_core::{Device, Tensor};
use std::time::Instant;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let m = 1024;
    let mut total_c = 0.0;
    let mut total_g = 0.0;
    let mut total_flop = 0.0;
    for &(o, i) in &[
        (2304usize, 768usize),
        (768, 768),
        (3072, 768),
        (768, 3072),
        (50304, 768),
    ] {
        let x = Tensor::randn(0f32, 1., (m, i), &dev)?;
        let w = Tensor::randn(0f32, 1., (o, i), &dev)?;
        let dy = Tensor::randn(0f32, 1., (m, o), &dev)?;
        let flop = 2.0 * (m * o * i) as f64;
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            ("fwd x@W^T", x.clone(), w.t()?),
            ("dx dy@W", dy.clone(), w.clone()),
            ("dW dy^T@x", dy.t()?, x.clone()),
        ];
        for (name, a, b) in cases {
            let tc = time(|| {
                let _ = a.matmul(&b).unwrap();
            });
            // gemm direct, preallocated dst
            let (a_s, a_l) = a.storage_and_layout();
            let (b_s, b_l) = b.storage_and_layout();
            let av = match &*a_s {
                candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?.to_vec(),
                _ => unreachable!(),
            };
            let bv = match &*b_s {
                candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?.to_vec(),
                _ => unreachable!(),
            };
            let (am, ak) = a.dims2()?;
            let (_, bn) = b.dims2()?;
            let (ars, acs) = (a_l.stride()[0] as isize, a_l.stride()[1] as isize);
            let (brs, bcs) = (b_l.stride()[0] as isize, b_l.stride()[1] as isize);
            drop(a_s);
            drop(b_s);
            let mut dst = vec![0f32; am * bn];
            let tg = time(|| unsafe {
                gemm::gemm(
                    am,
                    bn,
                    ak,
                    dst.as_mut_ptr(),
                    1,
                    bn as isize,
                    false,
                    av.as_ptr(),
                    acs,
                    ars,
                    bv.as_ptr(),
                    bcs,
                    brs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(2),
                );
            });
            let ts = time(|| split_gemm(am, bn, ak, &mut dst, &av, acs, ars, &bv, bcs, brs));
            let t1 = time(|| unsafe {
                gemm::gemm(
                    am,
                    bn,
                    ak,
                    dst.as_mut_ptr(),
                    1,
                    bn as isize,
                    false,
                    av.as_ptr(),
                    acs,
                    ars,
                    bv.as_ptr(),
                    bcs,
                    brs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            });
            println!(
                "   split {:6.1} GF/s   1-thread {:6.1} GF/s",
                flop / ts / 1e9,
                flop / t1 / 1e9
            );
            total_c += tc;
            total_g += tg;
            total_flop += flop;
            println!(
                "{o:>6}x{i:<5} {name:<10} candle {:6.1} GF/s  gemm-direct {:6.1} GF/s",
                flop / tc / 1e9,
                flop / tg / 1e9
            );
        }
    }
    println!(
        "total candle {:.1} ms {:.1} GF/s, direct {:.1} ms {:.1} GF/s",
        total_c * 1e3,
        total_flop / total_c / 1e9,
        total_g * 1e3,
        total_flop / total_g / 1e9
    );
    // attention
    let q = Tensor::randn(0f32, 1., (48, 256, 64), &dev)?;
    let k = Tensor::randn(0f32, 1., (48, 256, 64), &dev)?;
    let flop = 2.0 * 48.0 * 256.0 * 256.0 * 64.0;
    let t = time(|| {
        let _ = q.matmul(&k.t().unwrap()).unwrap();
    });
    println!(
        "attn q@k^T candle {:.1} GF/s {:.2} ms",
        flop / t / 1e9,
        t * 1e3
    );
    Ok(())
}
// split experiment
#[allow(dead_code)]
pub fn split_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: &[f32],
    acs: isize,
    ars: isize,
    b: &[f32],
    bcs: isize,
    brs: isize,
) {
    let half = (n / 2 + 15) / 16 * 16;
    let dptr = dst.as_mut_ptr() as usize;
    rayon::scope(|s| {
        for (c0, c1) in [(0, half), (half, n)] {
            s.spawn(move |_| unsafe {
                gemm::gemm(
                    m,
                    c1 - c0,
                    k,
                    (dptr as *mut f32).add(c0),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    acs,
                    ars,
                    b.as_ptr().offset(c0 as isize * bcs),
                    bcs,
                    brs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            });
        }
    });
}
