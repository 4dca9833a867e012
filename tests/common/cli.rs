//! Running the `deepscale` binary from the tests: with the repository's assets, the status and
//! the error checked the same way everywhere.
#![allow(dead_code)]
use std::process::{Command, Output};

pub const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

/// `deepscale args` with `env` added to the environment.
pub fn deepscale_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepscale"))
        .args(args)
        .env("DEEPSCALE_ASSETS", ASSETS)
        .envs(env.iter().copied())
        .output()
        .expect("run deepscale")
}

pub fn deepscale(args: &[&str]) -> Output {
    deepscale_env(args, &[])
}

/// `deepscale args`, which must succeed.
pub fn ok(args: &[&str]) -> Output {
    let out = deepscale(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The stderr of a run that had to be refused: exit status 1 (an error, not a panic's 101 or
/// an abort's 134) and an error holding every needle.
pub fn refusal(out: &Output, args: &[&str], needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: the error lacks `{n}`: {err}");
    }
    err
}

/// The last line of a command's stdout as JSON (the `--json` summary).
pub fn last_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.lines().last().expect("a JSON line")).expect("JSON")
}

/// `bench dp` on a few tokens, one step, one round, its JSON summary.
pub const BENCH_DP_TINY: [&str; 11] = [
    "bench",
    "dp",
    "--seq-length",
    "16",
    "--batch-size",
    "2",
    "--iters",
    "1",
    "--rounds",
    "1",
    "--json",
];
