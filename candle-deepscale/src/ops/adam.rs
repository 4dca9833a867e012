//! Fused AdamW over flat fp32 slices: one multi-threaded, vectorisable pass per partition
//! (DeepSpeedCPUAdam's job). The engine calls it on its flat ZeRO partitions, one call per
//! contiguous run of parameters sharing a weight-decay setting.
use crate::ops::fast_math::vectorized;
use rayon::prelude::*;

/// Hyper-parameters of one step (the bias corrections come from `step`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW); false adds it to the gradient (Adam + L2).
    pub adam_w_mode: bool,
    /// 1-based step number.
    pub step: u64,
    /// Multiplies every gradient first (clipping and loss-scale removal folded in).
    pub grad_scale: f32,
}

const CHUNK: usize = 1 << 14;

/// Per-step constants of the element loop.
struct Consts {
    b1: f32,
    b2: f32,
    eps: f32,
    gs: f32,
    l2: f32,
    decay: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
}

/// The element loop. Zipped iterators carry no bounds checks, so it vectorises; run through
/// [`vectorized`] it runs 16 or 8 lanes wide (AVX-512 or AVX2; no FMA contraction, and sqrt and
/// division are exact: results equal the SSE build bit for bit).
#[inline(always)]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &Consts) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let grad = g * c.gs + c.l2 * *p;
        *m = c.b1 * *m + (1.0 - c.b1) * grad;
        *v = c.b2 * *v + (1.0 - c.b2) * grad * grad;
        *p = *p * c.decay - c.step_size * *m / (v.sqrt() * c.inv_sqrt_bc2 + c.eps);
    }
}

/// Updates `params`, `exp_avg` and `exp_avg_sq` in place from `grads`.
pub fn adam_step(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamStep,
) {
    assert!(
        grads.len() == params.len()
            && exp_avg.len() == params.len()
            && exp_avg_sq.len() == params.len(),
        "adam_step: slices of different lengths"
    );
    let bc1 = 1.0 - (s.beta1 as f64).powi(s.step as i32);
    let bc2 = 1.0 - (s.beta2 as f64).powi(s.step as i32);
    let step_size = (s.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let (b1, b2, eps, gs) = (s.beta1, s.beta2, s.eps, s.grad_scale);
    let decay = if s.adam_w_mode {
        1.0 - s.lr * s.weight_decay
    } else {
        1.0
    };
    let l2 = if s.adam_w_mode { 0.0 } else { s.weight_decay };
    let c = Consts {
        b1,
        b2,
        eps,
        gs,
        l2,
        decay,
        step_size,
        inv_sqrt_bc2,
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(exp_avg.par_chunks_mut(CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            vectorized(
                #[inline(always)]
                || update(p, g, m, v, &c),
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baseline, AVX2 and AVX-512 copies give the same bits (1003 elements: every tail).
    #[test]
    fn every_vector_copy_gives_the_same_bits() {
        let (x, g) = crate::ops::fast_math::bits_rows();
        let p: Vec<f32> = x.iter().map(|v| v / 60.0).collect();
        let g: Vec<f32> = g.iter().map(|v| v * 1e-2).collect();
        let m: Vec<f32> = g.iter().map(|v| v * 0.3).collect();
        let v: Vec<f32> = g.iter().map(|v| v * v * 0.7).collect();
        let c = Consts {
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            gs: 0.5,
            l2: 0.01,
            decay: 0.999,
            step_size: 1e-3,
            inv_sqrt_bc2: 1.7,
        };
        let runs = crate::ops::fast_math::on_each_copy(
            #[inline(always)]
            || {
                let (mut p, mut m, mut v) = (p.clone(), m.clone(), v.clone());
                update(&mut p, &g, &mut m, &mut v, &c);
                [p, m, v].map(|a| crate::ops::fast_math::bits(&a))
            },
        );
        assert!(runs.iter().all(|r| *r == runs[0]), "{} copies", runs.len());
    }

    /// Textbook AdamW in f64, one element at a time.
    fn reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], s: &AdamStep) {
        let (b1, b2) = (s.beta1 as f64, s.beta2 as f64);
        for i in 0..p.len() {
            let mut grad = g[i] * s.grad_scale as f64;
            if !s.adam_w_mode {
                grad += s.weight_decay as f64 * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * grad;
            v[i] = b2 * v[i] + (1.0 - b2) * grad * grad;
            let mh = m[i] / (1.0 - b1.powi(s.step as i32));
            let vh = v[i] / (1.0 - b2.powi(s.step as i32));
            if s.adam_w_mode {
                p[i] -= s.lr as f64 * s.weight_decay as f64 * p[i];
            }
            p[i] -= s.lr as f64 * mh / (vh.sqrt() + s.eps as f64);
        }
    }

    #[test]
    fn matches_textbook_adamw_and_adam_l2() {
        for adam_w_mode in [true, false] {
            let n = 50_000;
            let mut p: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let mut m = vec![0f32; n];
            let mut v = vec![0f32; n];
            let mut rp: Vec<f64> = p.iter().map(|x| *x as f64).collect();
            let mut rm = vec![0f64; n];
            let mut rv = vec![0f64; n];
            for step in 1..=5u64 {
                let g: Vec<f32> = (0..n)
                    .map(|i| (((i * 13 + step as usize * 7) % 97) as f32 - 48.0) * 1e-3)
                    .collect();
                let s = AdamStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    adam_w_mode,
                    step,
                    grad_scale: 0.5,
                };
                adam_step(&mut p, &g, &mut m, &mut v, &s);
                let g64: Vec<f64> = g.iter().map(|x| *x as f64).collect();
                reference(&mut rp, &g64, &mut rm, &mut rv, &s);
            }
            let err = p
                .iter()
                .zip(&rp)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            // f32 against f64: where grad + L2 nearly cancel, Adam's normalisation magnifies f32
            // rounding, so allow 1% of one step's size (lr = 1e-3) over the 5 steps.
            assert!(err < 1e-5, "adam_w_mode {adam_w_mode}: max error {err}");
        }
    }
}
