//! The README's Usage walk, run as written and in order in a fresh folder (the repository's
//! `assets/` beside it), with a tenth of the iterations: every command must succeed, and a
//! command with `--json` must end its stdout with one JSON object. `cargo` lines are left out
//! (the binary under test stands in for the build); `mpirun` lines run in `tests/mpi.rs`.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The shell commands of the bash blocks of the README's `## Usage` section, continuation lines
/// joined, comments dropped.
fn usage_commands(readme: &str) -> Vec<String> {
    let start = readme.find("\n## Usage").expect("a Usage section");
    let rest = &readme[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3)];
    let mut cmds = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_block = t == "```bash";
            continue;
        }
        if !in_block || t.is_empty() || (pending.is_empty() && t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(t);
                cmds.push(std::mem::take(&mut pending));
            }
        }
    }
    cmds
}

/// `--train-iters N` -> N / 10 (at least 2), `--save-interval N` -> N / 10 (at least 1).
fn fewer_iterations(cmd: &str) -> String {
    let words: Vec<&str> = cmd.split(' ').collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let prev = if i > 0 { words[i - 1] } else { "" };
        let scaled = match (prev, w.parse::<u64>()) {
            ("--train-iters", Ok(n)) => Some((n / 10).max(2)),
            ("--save-interval", Ok(n)) => Some((n / 10).max(1)),
            _ => None,
        };
        out.push(scaled.map_or(w.to_string(), |n| n.to_string()));
    }
    out.join(" ")
}

#[test]
fn readme_usage_runs_in_order() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let cmds = usage_commands(&readme);
    assert!(cmds.len() >= 20, "the walk lost its commands: {cmds:#?}");
    let tmp = tempfile::tempdir().unwrap();
    let (dir, bin) = (tmp.path(), tmp.path().join("bin"));
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_deepscale"), bin.join("deepscale")).unwrap();
    std::os::unix::fs::symlink(Path::new(REPO).join("assets"), dir.join("assets")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for cmd in &cmds {
        if cmd.starts_with("cargo ") || cmd.starts_with("mpirun ") {
            continue;
        }
        let cmd = fewer_iterations(cmd);
        let t = Instant::now();
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &cmd])
            .current_dir(dir)
            .env("PATH", &path)
            .env_remove("DEEPSCALE_ASSETS")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "README command failed: {cmd}\n{stderr}"
        );
        if cmd.split_whitespace().any(|w| w == "--json") {
            let last = stdout.lines().last().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(last)
                .unwrap_or_else(|e| panic!("{cmd}: last line is not JSON ({e}): {stdout}"));
            assert!(v.is_object(), "{cmd}: {last}");
        }
        eprintln!("{:6.1} s  {cmd}", t.elapsed().as_secs_f64());
        ran += 1;
    }
    assert!(ran >= 20, "only {ran} commands ran");
    // What the walk said it makes, it made.
    for f in [
        "runs/ds.jsonl",
        "runs/metrics.png",
        "runs/gpt2-tiny/config.json",
        "runs/samples.jsonl",
        "runs/ck-hf/config.json",
        "runs/ck-tp2",
    ] {
        assert!(dir.join(f).exists(), "the walk did not make {f}");
    }
}

#[test]
fn the_walk_is_parsed_as_written() {
    let cmds = usage_commands(
        "intro\n## Usage\n```bash\n# c\nfoo --a 1 \\\n    --train-iters 200\n```\n```toml\nx\n```\n## Next\n```bash\nbar\n```\n",
    );
    assert_eq!(cmds, ["foo --a 1 --train-iters 200"]);
    assert_eq!(
        fewer_iterations("x --train-iters 200 --save-interval 5 --train-iters 3"),
        "x --train-iters 20 --save-interval 1 --train-iters 2"
    );
}

/// The run scripts in `assets/` (one per Megatron snapshot, the configs they advertise) start and
/// train an iteration of their tiny default model.
#[test]
fn the_snapshot_run_scripts_train() {
    let assets = Path::new(REPO).join("assets");
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("megatron-lm/ds_pretrain_gpt2.sh", &[]),
        (
            "megatron-lm/ds_pretrain_gpt2.sh",
            &[("CONFIG", "ds_zero-offload_config.json")],
        ),
        (
            "megatron-lm/ds_pretrain_gpt2.sh",
            &[("CONFIG", "ds_zero-offload_10B_config.json")],
        ),
        ("megatron-lm-v1.1.5-3d/ds_pretrain_gpt2_pipe.sh", &[]),
        ("megatron-lm-v1.1.5-zero3/ds_pretrain_gpt2-zero3.sh", &[]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (script, env) in cases {
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(assets.join(script))
            .args(["--eval-iters", "1", "--json"])
            .envs(env.iter().copied())
            .env("ITERS", "1")
            .env("DEEPSCALE", env!("CARGO_BIN_EXE_deepscale"))
            .env_remove("DEEPSCALE_ASSETS")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{script} {env:?}: {err}");
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let v: serde_json::Value =
            serde_json::from_str(&last).unwrap_or_else(|e| panic!("{script}: {e}: {last}"));
        assert_eq!(v["iterations"], 1, "{script} {env:?}: {v}");
        eprintln!("{:6.1} s  {script} {env:?}", t.elapsed().as_secs_f64());
    }
}
