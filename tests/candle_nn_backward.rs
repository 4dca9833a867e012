//! The backward passes DeepScale's patch of candle-nn 0.11 adds (vendor/candle-nn/PATCHES.md):
//! `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope_i`, `rope`, `rope_thd`. Each fused op's
//! gradients — for every input — equal the autograd of its composed `_slow` reference, and match
//! central finite differences of the fused forward in f64; candle-nn's `LayerNorm` and `RmsNorm`
//! modules pass gradients to their weights and to the layers before them.
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{ops, rotary_emb};

fn rnd(shape: &[usize], seed: u64) -> Vec<f64> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|i| {
            let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn var(shape: &[usize], seed: u64, dtype: DType) -> Result<Var> {
    let t = Tensor::from_vec(rnd(shape, seed), shape, &Device::Cpu)?.to_dtype(dtype)?;
    Var::from_tensor(&t)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = b.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Gradients of `sum(op(inputs) * w)` for each input.
fn grads(op: &Op, inputs: &[Var], w: &Tensor) -> Result<Vec<Tensor>> {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let g = (op(&ts)? * w)?.sum_all()?.backward()?;
    inputs
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))
        })
        .collect()
}

/// The fused op against its reference (f32, and f64 where the kernel takes f64) and against
/// finite differences (f64; in f32 with a coarser step for kernels without f64).
fn check(name: &str, fused: &Op, slow: &Op, shapes: &[&[usize]]) -> Result<()> {
    let probe: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::zeros(*s, DType::F64, &Device::Cpu))
        .collect::<Result<_>>()?;
    let f64_kernel = fused(&probe).is_ok();
    let dtypes: &[(DType, f64)] = if f64_kernel {
        &[(DType::F32, 1e-4), (DType::F64, 1e-9)]
    } else {
        &[(DType::F32, 1e-4)]
    };
    let fd_dtype = if f64_kernel { DType::F64 } else { DType::F32 };
    for &(dtype, tol) in dtypes {
        let inputs: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| var(s, 11 + i as u64, dtype))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let out = fused(&ts)?;
        let w = Tensor::from_vec(rnd(out.dims(), 99), out.dims(), &Device::Cpu)?.to_dtype(dtype)?;
        let want = slow(&ts)?;
        assert!(
            max_rel(&out, &want) < tol,
            "{name} {dtype:?}: forward differs"
        );
        let (gf, gs) = (grads(fused, &inputs, &w)?, grads(slow, &inputs, &w)?);
        for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{name}: input {i} gradient shape");
            let e = max_rel(a, b);
            assert!(
                e < tol * 10.0,
                "{name} {dtype:?}: input {i} gradient differs by {e}"
            );
        }
        if dtype != fd_dtype {
            continue;
        }
        // Central differences of the fused forward on a few elements of every input.
        let (h, fd_tol) = if dtype == DType::F64 {
            (1e-6, 1e-5)
        } else {
            (1e-2, 2e-2)
        };
        for (i, v) in inputs.iter().enumerate() {
            let base: Vec<f64> = v
                .as_tensor()
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            let g: Vec<f64> = gf[i].to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            for k in (0..base.len()).step_by(base.len().div_ceil(7).max(1)) {
                let eval = |delta: f64| -> Result<f64> {
                    let mut p = base.clone();
                    p[k] += delta;
                    let mut ts = ts.clone();
                    ts[i] = Tensor::from_vec(p, v.shape(), &Device::Cpu)?.to_dtype(dtype)?;
                    (fused(&ts)? * &w)?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()
                };
                let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() < fd_tol * (1.0 + fd.abs()),
                    "{name}: input {i} element {k}: finite difference {fd}, backward {}",
                    g[k]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn softmax_last_dim_has_a_backward() -> Result<()> {
    check(
        "softmax_last_dim",
        &|t| ops::softmax_last_dim(&t[0]),
        &|t| ops::softmax(&t[0], D::Minus1),
        &[&[3, 4, 9]],
    )
}

#[test]
fn rms_norm_has_a_backward() -> Result<()> {
    check(
        "rms_norm",
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
        &|t| ops::rms_norm_slow(&t[0], &t[1], 1e-5),
        &[&[2, 5, 12], &[12]],
    )
}

#[test]
fn layer_norm_has_a_backward() -> Result<()> {
    check(
        "layer_norm",
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        &|t| ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
        &[&[2, 5, 12], &[12], &[12]],
    )
}

/// A 2-D-cos/sin reference applied batch by batch, for cos/sin of `[b, t, d/2]`.
fn per_batch(
    slow: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| {
        if t[1].rank() == 2 {
            return slow(&t[0], &t[1], &t[2]);
        }
        let rows = (0..t[0].dim(0)?)
            .map(|b| slow(&t[0].narrow(0, b, 1)?, &t[1].get(b)?, &t[2].get(b)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
}

#[test]
fn rotary_embeddings_have_a_backward() -> Result<()> {
    // [b, h, t, d] with cos/sin [t', d/2] (t' > t: positions past the sequence) and [b, t, d/2].
    for cs in [&[7usize, 4][..], &[2, 5, 4][..]] {
        check(
            "rope_i",
            &|t| rotary_emb::rope_i(&t[0], &t[1], &t[2]),
            &per_batch(rotary_emb::rope_i_slow),
            &[&[2, 3, 5, 8], cs, cs],
        )?;
        check(
            "rope",
            &|t| rotary_emb::rope(&t[0], &t[1], &t[2]),
            &per_batch(rotary_emb::rope_slow),
            &[&[2, 3, 5, 8], cs, cs],
        )?;
    }
    // rope_thd: [b, t, h, d]; its reference is rope_slow on the transposed input.
    check(
        "rope_thd",
        &|t| rotary_emb::rope_thd(&t[0], &t[1], &t[2]),
        &|t| {
            rotary_emb::rope_slow(&t[0].transpose(1, 2)?.contiguous()?, &t[1], &t[2])?
                .transpose(1, 2)?
                .contiguous()
        },
        &[&[2, 5, 3, 8], &[7, 4], &[7, 4]],
    )
}

/// candle-nn's modules built from a VarBuilder: the weights before and after the norm get
/// gradients (stock 0.11 gives the first linear none).
#[test]
fn candle_nn_modules_pass_gradients_through_their_norms() -> Result<()> {
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 16, vb.pp("l1"))?;
    let ln = candle_nn::layer_norm(16, 1e-5, vb.pp("ln"))?;
    let rms = candle_nn::rms_norm(16, 1e-5, vb.pp("rms"))?;
    let l2 = candle_nn::linear(16, 4, vb.pp("l2"))?;
    let x = Tensor::from_vec(rnd(&[3, 8], 5), (3, 8), &Device::Cpu)?.to_dtype(DType::F32)?;
    let y = l2.forward(&rms.forward(&ln.forward(&l1.forward(&x)?)?)?)?;
    let y = ops::softmax_last_dim(&y)?;
    let loss = (y * Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((3, 4))?)?.sum_all()?;
    let g = loss.backward()?;
    for (name, v) in map.data().lock().unwrap().iter() {
        let gr = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = gr.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n > 0.0, "{name}: zero gradient");
    }
    Ok(())
}
