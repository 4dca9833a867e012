//! `scripts/gpu-check.sh --dry-run`: the GPU check's logic on this machine, so the script cannot
//! rot before a GPU machine runs it — every test of tests/gpu.rs is among its steps, the
//! `deepscale` flags it passes are accepted (a build without CUDA gets past parsing and stops at
//! the device), the two-GPU steps are skipped with a reason on one GPU, and the JSON summary
//! holds every step.
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn dry_run(gpus: usize) -> Value {
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new("bash")
        .arg(root().join("scripts/gpu-check.sh"))
        .args(["--dry-run", "--out"])
        .arg(out.path())
        .env("DEEPSCALE_BIN", env!("CARGO_BIN_EXE_deepscale"))
        .env("DEEPSCALE_DRY_GPUS", gpus.to_string())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "gpu-check --dry-run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("gpu-check: inventory"), "{stdout}");
    let text = std::fs::read_to_string(out.path().join("gpu-check.json")).expect("summary");
    serde_json::from_str(&text).expect("JSON summary")
}

fn status<'a>(summary: &'a Value, step: &str) -> &'a str {
    summary["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["step"] == step)
        .unwrap_or_else(|| panic!("no step {step} in {summary}"))["status"]
        .as_str()
        .expect("status")
}

#[test]
fn the_dry_run_covers_every_step_and_checks_the_flags() {
    let gpu_rs = std::fs::read_to_string(root().join("tests/gpu.rs")).expect("tests/gpu.rs");
    let tests: Vec<&str> = gpu_rs
        .split("#[test]")
        .skip(1)
        .filter_map(|s| s.split("fn ").nth(1)?.split('(').next())
        .collect();
    assert!(tests.len() >= 5, "{tests:?}");
    let one = dry_run(1);
    assert_eq!(one["dry_run"], true);
    for t in &tests {
        assert_eq!(status(&one, &format!("test-{t}")), "dry-run");
    }
    for step in ["inventory", "build", "pretrain-dp1", "bench", "infer-bf16"] {
        assert_eq!(status(&one, step), "dry-run", "{step}");
    }
    for step in ["pretrain-dp2-zero2", "pretrain-tp2"] {
        assert_eq!(status(&one, step), "skipped", "{step}");
        let s = one["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == step)
            .unwrap();
        assert!(
            s["detail"].as_str().unwrap().contains("needs 2 GPUs"),
            "{s}"
        );
    }
    // With two GPUs the two-GPU runs are planned too, their flags checked against the binary.
    let two = dry_run(2);
    for step in ["pretrain-dp2-zero2", "pretrain-tp2"] {
        assert_eq!(status(&two, step), "dry-run", "{step}");
    }
    assert_eq!(two["counts"]["fail"], Value::Null, "{two}");
}
