//! Preemption: SIGTERM/SIGINT stop every rank after the same iteration, save, and exit with
//! 128 + the signal; the resumed run ends bit-exactly where an uninterrupted one does. Megatron's
//! --exit-signal-handler / --exit-signal, --exit-interval and --exit-duration-in-mins save and
//! exit 0. A second signal exits at once and removes the NVMe swap files.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");

fn args(extra: &[&str]) -> Vec<String> {
    [
        "pretrain-gpt2",
        "--num-layers",
        "1",
        "--hidden-size",
        "16",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "16",
        "--batch-size",
        "2",
        "--eval-iters",
        "1",
        "--eval-interval",
        "0",
        "--sample-length",
        "0",
        "--world-size",
        "2",
        "--zero-stage",
        "2",
        "--log-interval",
        "1",
        "--json",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

fn command(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepscale"));
    c.args(args).env("DEEPSCALE_ASSETS", ASSETS);
    c
}

fn run(args: &[String]) -> Output {
    command(args).output().expect("run deepscale")
}

/// Starts a run and a reader of its stderr lines.
fn spawn(args: &[String], env: &[(&str, &str)]) -> (Child, mpsc::Receiver<String>) {
    let mut c = command(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn deepscale");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a stderr line containing `needle`; returns every line read so far.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no `{needle}` in: {}", seen.join("\n")),
        }
    }
}

fn finish(
    mut child: Child,
    rx: mpsc::Receiver<String>,
    mut seen: Vec<String>,
) -> (i32, String, String) {
    let status = child.wait().unwrap();
    seen.extend(rx.iter());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    (status.code().unwrap_or(-1), seen.join("\n"), out)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Metrics lines by iteration: (loss, lr, grad_norm) as written.
fn metrics(path: &Path) -> Vec<(u64, String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss")?;
            Some((
                v["iteration"].as_u64()?,
                v["loss"].to_string(),
                v["lr"].to_string(),
                v["grad_norm"].to_string(),
            ))
        })
        .collect()
}

fn last_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().expect("a JSON line")).unwrap()
}

#[test]
fn sigterm_saves_every_rank_at_one_iteration_and_the_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (ck, m_full, m_cut, m_resumed) = (
        tmp.path().join("ck"),
        tmp.path().join("full.jsonl"),
        tmp.path().join("cut.jsonl"),
        tmp.path().join("resumed.jsonl"),
    );
    let iters = "150";
    let full = run(&args(&[
        "--train-iters",
        iters,
        "--metrics-file",
        m_full.to_str().unwrap(),
    ]));
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );

    let (child, rx) = spawn(
        &args(&[
            "--train-iters",
            iters,
            "--save",
            ck.to_str().unwrap(),
            "--metrics-file",
            m_cut.to_str().unwrap(),
        ]),
        &[],
    );
    let mut seen = Vec::new();
    wait_for(&rx, "iteration        5/", &mut seen);
    signal(&child, libc::SIGTERM);
    let (code, err, out) = finish(child, rx, seen);
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(err.contains("SIGTERM received"), "{err}");
    let v = last_json(&out);
    assert_eq!(v["stopped"], "SIGTERM");
    let k = v["iterations"].as_u64().unwrap();
    assert!((5..150).contains(&k), "stopped at {k}: {err}");
    assert!(
        err.contains(&format!("saved checkpoint at iteration {k} ")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        format!("global_step{k}")
    );

    let resumed = run(&args(&[
        "--train-iters",
        iters,
        "--load",
        ck.to_str().unwrap(),
        "--metrics-file",
        m_resumed.to_str().unwrap(),
    ]));
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let full = metrics(&m_full);
    let resumed = metrics(&m_resumed);
    assert_eq!(resumed.first().unwrap().0, k + 1);
    let tail: Vec<_> = full.iter().filter(|m| m.0 > k).cloned().collect();
    assert_eq!(
        resumed, tail,
        "the resumed run differs from the uninterrupted one"
    );
    let cut = metrics(&m_cut);
    assert_eq!(cut, full[..k as usize].to_vec());
}

#[test]
fn megatron_exit_flags_save_and_exit_zero() {
    let tmp = tempfile::tempdir().unwrap();
    // --exit-interval 3.
    let ck = tmp.path().join("interval");
    let out = run(&args(&[
        "--train-iters",
        "20",
        "--save",
        ck.to_str().unwrap(),
        "--exit-interval",
        "3",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("exiting program at iteration 3"), "{err}");
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "global_step3"
    );
    assert_eq!(
        last_json(&String::from_utf8_lossy(&out.stdout))["iterations"],
        3
    );

    // --exit-duration-in-mins: a deadline already passed after the first iteration.
    let ck = tmp.path().join("duration");
    let out = run(&args(&[
        "--train-iters",
        "20",
        "--save",
        ck.to_str().unwrap(),
        "--exit-duration-in-mins",
        "0",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("stopped by --exit-duration-in-mins after iteration 1"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "global_step1"
    );

    // --exit-signal-handler --exit-signal SIGUSR1: that signal saves and exits 0.
    let ck = tmp.path().join("usr1");
    let (child, rx) = spawn(
        &args(&[
            "--train-iters",
            "100000",
            "--save",
            ck.to_str().unwrap(),
            "--exit-signal-handler",
            "--exit-signal",
            "SIGUSR1",
        ]),
        &[],
    );
    let mut seen = Vec::new();
    wait_for(&rx, "iteration        2/", &mut seen);
    signal(&child, libc::SIGUSR1);
    let (code, err, _) = finish(child, rx, seen);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("SIGUSR1 received") && err.contains("exiting program"),
        "{err}"
    );
    assert!(ck.join("latest").is_file());
}

/// A run stuck in a collective (a stalled rank) cannot finish its iteration: a second signal exits
/// at once, removing the NVMe swap files.
#[test]
fn a_second_signal_exits_at_once_and_removes_swap_files() {
    let tmp = tempfile::tempdir().unwrap();
    let nvme = tmp.path().join("nvme");
    let cfg = tmp.path().join("ds.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {
                "stage": 3,
                "sub_group_size": 20000,
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme},
                "offload_param": {"device": "nvme", "nvme_path": nvme}
            }
        })
        .to_string(),
    )
    .unwrap();
    let mut a = args(&[
        "--train-iters",
        "50",
        "--deepspeed_config",
        cfg.to_str().unwrap(),
    ]);
    // The config sets the stage.
    let z = a.iter().position(|x| x == "--zero-stage").unwrap();
    a.drain(z..z + 2);
    a.push("--deepspeed".into());
    let (child, rx) = spawn(&a, &[("DEEPSCALE_INJECT_STALL", "1:4")]);
    let mut seen = Vec::new();
    wait_for(&rx, "iteration        3/", &mut seen);
    // Let the ranks pass iteration 3's stop check (every rank asks it after logging) and reach
    // the stall: a signal landing before the check stops the run cleanly after iteration 3.
    std::thread::sleep(Duration::from_millis(1500));
    let swaps = || -> usize {
        walk(&nvme)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "swp"))
            .count()
    };
    assert!(swaps() > 0, "the run swaps to {}", nvme.display());
    signal(&child, libc::SIGTERM);
    wait_for(&rx, "SIGTERM received", &mut seen);
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, libc::SIGTERM);
    let (code, err, _) = finish(child, rx, seen);
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(err.contains("SIGTERM again: exiting now"), "{err}");
    assert_eq!(swaps(), 0, "swap files left in {}", nvme.display());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A signal during a long evaluation cuts it short, every rank after the same batch: the run
/// saves and exits as between iterations (not after hours of evaluation), with no validation loss
/// from the partial pass.
#[test]
fn a_signal_during_evaluation_cuts_it_short_and_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    // The last of a repeated flag wins: an evaluation of 10^8 batches after iteration 3.
    let (mut child, rx) = spawn(
        &args(&[
            "--train-iters",
            "50",
            "--eval-iters",
            "100000000",
            "--eval-interval",
            "3",
            "--save",
            ck.to_str().unwrap(),
        ]),
        &[],
    );
    let mut seen = Vec::new();
    wait_for(&rx, "iteration        3/", &mut seen);
    std::thread::sleep(Duration::from_millis(500));
    let sent = std::time::Instant::now();
    signal(&child, libc::SIGTERM);
    // Without the cut the run would evaluate for a day: kill it and fail instead of hanging.
    while child.try_wait().unwrap().is_none() {
        if sent.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("still evaluating 60 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, err, out) = finish(child, rx, seen);
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(
        err.contains("SIGTERM received: evaluation cut short after"),
        "{err}"
    );
    let v = last_json(&out);
    assert_eq!(v["stopped"], "SIGTERM");
    assert_eq!(v["iterations"], 3, "{err}");
    assert!(err.contains("saved checkpoint at iteration 3 "), "{err}");
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "global_step3"
    );
}
