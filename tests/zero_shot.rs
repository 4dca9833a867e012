//! Zero-shot evaluation (Megatron's tasks/zeroshot_gpt2): LAMBADA accuracy and WikiText-103
//! perplexity with overlapping windows equal direct computations of the same quantities, and the
//! `evaluate` command gives the same numbers at every layout.
mod common;

use candle_core::{Device, Tensor};
use candle_deepscale::layers::module::ForwardCtx;
use std::process::Command;
use zoo::evaluation::{lambada_accuracy, overlapping_windows_loss};
use zoo::generation::{generate, SamplingConfig};

fn text_tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 29 + 7) % 251) as u32).collect()
}

#[test]
fn overlapping_windows_score_every_target_once_with_megatrons_context() {
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 11);
    let tokens = text_tokens(90);
    for (seq, overlap) in [(32, 32), (32, 8), (20, 5), (64, 64)] {
        let got = overlapping_windows_loss(&model, &tokens, seq, overlap, None, None).unwrap();
        // Directly: target j is predicted from the start of the first window that scores it.
        let mut want = 0f64;
        for j in 1..tokens.len() {
            let w = if j <= seq {
                0
            } else {
                (j - seq).div_ceil(overlap)
            };
            let start = w * overlap;
            let input = Tensor::new(&tokens[start..j], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&input, &ForwardCtx::eval()).unwrap();
            let last = logits.narrow(1, j - start - 1, 1).unwrap();
            let l = model
                .token_losses(&last, &Tensor::new(&[tokens[j]], &Device::Cpu).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0];
            want += l as f64;
        }
        assert!(
            (got - want).abs() <= 1e-4 * want,
            "seq {seq} overlap {overlap}: {got} vs {want}"
        );
    }
}

#[test]
fn lambada_counts_exactly_the_words_greedy_decoding_reproduces() {
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 12);
    let mut examples = Vec::new();
    let mut expected = 0;
    for k in 0..6 {
        let context: Vec<u32> = text_tokens(10 + 3 * k).into_iter().skip(k).collect();
        let greedy = generate(
            &model,
            &context,
            &SamplingConfig {
                greedy: true,
                max_new_tokens: 1 + k % 3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut target = greedy.clone();
        if k % 2 == 1 {
            // Any wrong token makes the word wrong.
            let last = target.len() - 1;
            target[last] = (target[last] + 1) % 257;
        } else {
            expected += 1;
        }
        examples.push((context, target));
    }
    let r = lambada_accuracy(&model, &examples, None, None).unwrap();
    assert_eq!((r.correct, r.total), (expected, 6));
}

fn deepscale(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

#[test]
fn evaluate_lambada_and_wikitext_agree_across_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 13);
    common::write_hf_gpt2_dir(&model, tmp.path(), "", 1);
    let d = tmp.path().to_str().unwrap();
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/eval");
    let lambada = format!("{assets}/lambada_sample.jsonl");
    let wiki = format!("{assets}/wikitext_sample.txt");
    let mut seen = Vec::new();
    // Each pipeline stage builds and reads only its layers (4 stages of 4 layers: uniform).
    for (world, tp, pp, method) in [
        ("1", "1", "1", "type:transformer"),
        ("2", "2", "1", "type:transformer"),
        ("4", "2", "1", "type:transformer"),
        ("2", "1", "2", "type:transformer"),
        ("4", "2", "2", "parameters"),
        ("4", "1", "4", "uniform"),
    ] {
        let layout = [
            "--world-size",
            world,
            "--model-parallel-size",
            tp,
            "--pipe-parallel-size",
            pp,
            "--partition-method",
            method,
        ];
        let mut a = vec![
            "evaluate",
            "--task",
            "lambada",
            "--hf-dir",
            d,
            "--valid-data",
            &lambada,
            "--strict-lambada",
            "--json",
        ];
        a.extend(layout);
        let l = deepscale(&a);
        assert_eq!(l["total"], 8);
        let mut w = vec![
            "evaluate",
            "--task",
            "wikitext103",
            "--hf-dir",
            d,
            "--valid-data",
            &wiki,
            "--seq-length",
            "48",
            "--overlapping-eval",
            "16",
            "--json",
        ];
        w.extend(layout);
        let v = deepscale(&w);
        let (loss, ratio) = (
            v["loss"].as_f64().unwrap(),
            v["token_ratio"].as_f64().unwrap(),
        );
        assert!(ratio > 1.0, "bytes per word");
        assert!(
            (v["adjusted_perplexity"].as_f64().unwrap() - (loss * ratio).min(20.0).exp()).abs()
                < 1e-6 * (loss * ratio).exp()
        );
        seen.push((l["correct"].clone(), loss));
    }
    for (c, loss) in &seen[1..] {
        assert_eq!(c, &seen[0].0);
        assert!(
            (loss - seen[0].1).abs() <= 1e-5 * seen[0].1,
            "{loss} vs {}",
            seen[0].1
        );
    }
    // Generation and the plain loss through a pipeline (pp 2 x tp 2) match one rank.
    let gen = |layout: &[&str]| {
        let mut g = vec![
            "generate",
            "--hf-dir",
            d,
            "--prompt",
            "abc",
            "--greedy",
            "--out-seq-length",
            "6",
            "--json",
        ];
        g.extend_from_slice(layout);
        deepscale(&g)["token_ids"].clone()
    };
    assert_eq!(
        gen(&[
            "--world-size",
            "4",
            "--model-parallel-size",
            "2",
            "--pipe-parallel-size",
            "2"
        ]),
        gen(&[])
    );
    let loss = |layout: &[&str]| {
        let mut g = vec![
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            d,
            "--text",
            "Pipelines score the same text.",
            "--json",
        ];
        g.extend_from_slice(layout);
        deepscale(&g)["loss"].as_f64().unwrap()
    };
    let (a, b) = (
        loss(&["--world-size", "2", "--pipe-parallel-size", "2"]),
        loss(&[]),
    );
    assert!((a - b).abs() <= 1e-5 * b, "{a} vs {b}");
    // The detokenized text is what is scored.
    let raw = std::fs::read_to_string(&wiki).unwrap();
    let text = zoo::evaluation::wikitext_detokenize(&raw);
    assert!(
        text.contains("42-mile (68 km)")
            && text.contains("120,000 pounds")
            && text.contains("== Construction =="),
        "{text}"
    );
}

/// `--bf16` on evaluate and generate: PyTorch's CPU autocast (bf16 products, fp32 accumulation
/// and weights) — the loss moves by bf16 rounding, not more; every layout agrees.
#[test]
fn bf16_inference_is_cpu_autocast() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 17);
    common::write_hf_gpt2_dir(&model, tmp.path(), "", 1);
    let d = tmp.path().to_str().unwrap();
    let loss = |extra: &[&str]| {
        let mut g = vec![
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            d,
            "--text",
            "Autocast rounds the operands of every product to bfloat16.",
            "--json",
        ];
        g.extend_from_slice(extra);
        deepscale(&g)["loss"].as_f64().unwrap()
    };
    let (fp32, bf16) = (loss(&[]), loss(&["--bf16"]));
    assert!(fp32 != bf16, "--bf16 changed nothing: {fp32}");
    assert!((fp32 - bf16).abs() <= 2e-2 * fp32, "{fp32} vs {bf16}");
    let tp2 = loss(&["--bf16", "--world-size", "2", "--model-parallel-size", "2"]);
    assert!((tp2 - bf16).abs() <= 1e-5 * bf16, "{tp2} vs {bf16}");
    let g = deepscale(&[
        "generate",
        "--hf-dir",
        d,
        "--prompt",
        "abc",
        "--greedy",
        "--out-seq-length",
        "4",
        "--bf16",
        "--json",
    ]);
    assert_eq!(g["token_ids"].as_array().map(Vec::len), Some(4), "{g}");
}

/// `--bf16` on GPUs loads bf16 parameters (`zoo::hub::load_gpt2_as`, what `evaluate` and
/// `generate` call there), run here on the CPU: the windowed loss, LAMBADA and sampling read a
/// bf16 model's logits, and the loss moves by the weights' and activations' bf16 rounding, not
/// more.
#[test]
fn bf16_parameters_evaluate_and_generate() {
    use candle_core::DType;
    let tmp = tempfile::tempdir().unwrap();
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 19);
    common::write_hf_gpt2_dir(&model, tmp.path(), "", 1);
    let load = |dtype| zoo::hub::load_gpt2_as(tmp.path(), &Device::Cpu, dtype, None, |_| {});
    let ((m32, _), (m16, _)) = (load(DType::F32).unwrap(), load(DType::BF16).unwrap());
    for p in m16.parameters() {
        assert_eq!(p.tensor().dtype(), DType::BF16, "{}", p.meta.name);
    }
    let tokens = text_tokens(70);
    let loss = |m: &zoo::gpt2::Gpt2| overlapping_windows_loss(m, &tokens, 32, 8, None, None);
    let (l32, l16) = (loss(&m32).unwrap(), loss(&m16).unwrap());
    assert!(l32 != l16, "bf16 parameters changed nothing: {l32}");
    assert!((l32 - l16).abs() <= 3e-2 * l32, "{l32} vs {l16}");
    let greedy = SamplingConfig {
        greedy: true,
        max_new_tokens: 3,
        ..Default::default()
    };
    let context = &tokens[..12];
    let next = generate(&m16, context, &greedy).unwrap();
    assert_eq!(next.len(), 3, "{next:?}");
    let sampled = generate(
        &m16,
        context,
        &SamplingConfig {
            max_new_tokens: 3,
            top_k: 5,
            seed: 7,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sampled.len(), 3, "{sampled:?}");
    // The bf16 model's own greedy continuation is what its LAMBADA scoring predicts.
    let r = lambada_accuracy(&m16, &[(context.to_vec(), next)], None, None).unwrap();
    assert_eq!((r.correct, r.total), (1, 1));
}
