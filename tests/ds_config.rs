//! DeepSpeed configs: every shipped config parses; the seed's own mistakes are caught with a
//! suggestion; wrong types and inconsistent batch sizes are clear errors.
use candle_deepscale::runtime::config::{DeepSpeedConfig, OptimizerKind};
use std::path::Path;

fn assets() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"))
}

#[test]
fn every_shipped_config_parses() {
    let mut n = 0;
    for dir in [
        "megatron-lm",
        "megatron-lm-v1.1.5-3d",
        "megatron-lm-v1.1.5-zero3",
    ] {
        for e in std::fs::read_dir(assets().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                DeepSpeedConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
    }
    assert_eq!(n, 7);
    let inf = DeepSpeedConfig::from_file(
        &assets().join("megatron-lm-v1.1.5-zero3/ds_zero_stage_infinity_config.json"),
    )
    .unwrap();
    let z = inf.zero_optimization.as_ref().unwrap();
    assert_eq!(z.stage, 3);
    assert_eq!(z.stage3_param_persistence_threshold, Some(100_000));
    assert_eq!(z.sub_group_size, Some(100_000_000));
    assert_eq!(
        z.offload_param.as_ref().unwrap().device.as_deref(),
        Some("nvme")
    );
    assert_eq!(inf.aio.as_ref().unwrap().queue_depth, Some(16));
    let off = DeepSpeedConfig::from_file(&assets().join("megatron-lm/ds_zero-offload_config.json"))
        .unwrap();
    // Legacy cpu_offload means the optimizer state lives on the CPU.
    let o = off
        .zero_optimization
        .as_ref()
        .unwrap()
        .effective_offload_optimizer()
        .unwrap();
    assert_eq!(o.device.as_deref(), Some("cpu"));
    let b = off.batch(2, None, None).unwrap();
    assert_eq!(
        (b.train_batch_size, b.micro_batch, b.accumulation),
        (120, 12, 5)
    );
    let z2 =
        DeepSpeedConfig::from_file(&assets().join("megatron-lm/ds_zero2_config.json")).unwrap();
    assert_eq!(
        z2.optimizer.as_ref().unwrap().kind().unwrap(),
        OptimizerKind::Adam { adam_w_mode: true }
    );
    assert_eq!(z2.batch(4, Some(4), None).unwrap().accumulation, 1);
}

fn err(text: &str) -> String {
    DeepSpeedConfig::from_json_str(text, "cfg.json")
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn seed_mistakes_are_caught_with_a_suggestion() {
    let e = err(
        r#"{"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_param_persitance_threshold": 1e5}}"#,
    );
    assert!(
        e.contains("`zero_optimization.stage3_param_persitance_threshold`")
            && e.contains("did you mean `stage3_param_persistence_threshold`"),
        "{e}"
    );
    let e = err(
        r#"{"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_param_persitence_threshold": 8.192e4}}"#,
    );
    assert!(
        e.contains("did you mean `stage3_param_persistence_threshold`"),
        "{e}"
    );
    let e = err(
        r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": true, "comm_overlap": true}}"#,
    );
    assert!(
        e.contains("`zero_optimization.comm_overlap`") && e.contains("did you mean `overlap_comm`"),
        "{e}"
    );
    let e = err(r#"{"train_batch_size": 8, "gradient_clipings": 1.0}"#);
    assert!(
        e.contains("did you mean `gradient_clipping`") && e.contains("cfg.json"),
        "{e}"
    );
    // DeepSpeed_Adam is an alias of Adam, not a mistake.
    let c = DeepSpeedConfig::from_json_str(r#"{"train_batch_size": 8, "optimizer": {"type": "DeepSpeed_Adam", "params": {"lr": 1e-4}}}"#, "x").unwrap();
    assert_eq!(
        c.optimizer.unwrap().kind().unwrap(),
        OptimizerKind::Adam { adam_w_mode: true }
    );
    let c = DeepSpeedConfig::from_json_str(r#"{"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}"#, "x").unwrap();
    assert_eq!(
        c.optimizer.unwrap().kind().unwrap(),
        OptimizerKind::Adam { adam_w_mode: false }
    );
}

#[test]
fn wrong_types_and_bad_values_are_clear_errors() {
    let e = err(r#"{"train_batch_size": "sixteen"}"#);
    assert!(
        e.contains("cfg.json")
            && e.contains("`train_batch_size`: invalid type")
            && e.contains("line 1"),
        "{e}"
    );
    // A wrong type deep in the config names its whole key path.
    let e = err(r#"{"fp16": {"enabled": true, "loss_scale_window": -5}}"#);
    assert!(e.contains("`fp16.loss_scale_window`: invalid value"), "{e}");
    let e = err(r#"{"optimizer": {"type": "Adam", "params": {"betas": [0.9, "x"]}}}"#);
    assert!(
        e.contains("`optimizer.params.betas[1]`: invalid type"),
        "{e}"
    );
    let e = err(r#"{"zero_optimization": {"stage": 4}}"#);
    assert!(e.contains("zero_optimization.stage"), "{e}");
    let e = err(r#"{"optimizer": {"type": "Lamb"}}"#);
    assert!(e.contains("Lamb") && e.contains("not supported"), "{e}");
    let e = err(r#"{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1.5}}"#);
    assert!(e.contains("whole number"), "{e}");
    let e = err(r#"{"fp16": {"enabled": true}, "bf16": {"enabled": true}}"#);
    assert!(e.contains("fp16 and bf16"), "{e}");
    let e = err("{not json");
    assert!(e.contains("cfg.json"), "{e}");
}

#[test]
fn inconsistent_batch_triples_are_errors() {
    let c = DeepSpeedConfig::from_json_str(r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}"#, "x").unwrap();
    let e = c.batch(2, None, None).unwrap_err().to_string();
    assert!(
        e.contains("inconsistent batch sizes") && e.contains("30"),
        "{e}"
    );
    // Flags against the config.
    let c =
        DeepSpeedConfig::from_json_str(r#"{"train_micro_batch_size_per_gpu": 4}"#, "x").unwrap();
    let e = c.batch(1, Some(8), None).unwrap_err().to_string();
    assert!(
        e.contains("--batch-size 8") && e.contains("train_micro_batch_size_per_gpu 4"),
        "{e}"
    );
    assert_eq!(c.batch(2, Some(4), Some(2)).unwrap().train_batch_size, 16);
    assert!(DeepSpeedConfig::default().batch(2, None, None).is_err());
}

#[test]
fn missing_config_file_names_the_path() {
    let e = DeepSpeedConfig::from_file(Path::new("/nonexistent/ds_config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/ds_config.json"), "{e}");
}

/// `zero_optimization.overlap_comm` reaches the engine, with DeepSpeed's default where it is
/// absent: on at stage 3, off below.
#[test]
fn overlap_comm_follows_deepspeed_defaults() {
    use candle_deepscale::runtime::engine_config::EngineConfig;
    let overlap = |zero: &str| {
        let text = format!(r#"{{"train_batch_size": 8, "zero_optimization": {zero}}}"#);
        let ds = DeepSpeedConfig::from_json_str(&text, "cfg.json").unwrap();
        EngineConfig::from_deepspeed(&ds, 2).unwrap().overlap_comm
    };
    assert!(!overlap(r#"{"stage": 2}"#));
    assert!(!overlap(r#"{"stage": 1}"#));
    assert!(overlap(r#"{"stage": 3}"#));
    assert!(overlap(r#"{"stage": 2, "overlap_comm": true}"#));
    assert!(!overlap(r#"{"stage": 3, "overlap_comm": false}"#));
}

/// `zero_optimization.allgather_bucket_size` reaches the engine (DeepSpeed's default 5e8 where
/// it is absent).
#[test]
fn allgather_bucket_size_reaches_the_engine() {
    use candle_deepscale::runtime::engine_config::EngineConfig;
    let size = |zero: &str| {
        let text = format!(r#"{{"train_batch_size": 8, "zero_optimization": {zero}}}"#);
        let ds = DeepSpeedConfig::from_json_str(&text, "cfg.json").unwrap();
        EngineConfig::from_deepspeed(&ds, 2)
            .unwrap()
            .allgather_bucket_size
    };
    assert_eq!(size(r#"{"stage": 2}"#), 500_000_000);
    assert_eq!(
        size(r#"{"stage": 2, "allgather_bucket_size": 2e7}"#),
        20_000_000
    );
}
