//! The MPI backend under `mpirun` (feature `mpi`): collectives at 2 and 4 processes, tensor
//! parallelism equal to one rank, the CLI at tp=2, pretraining at tp 2 x dp 2 with ZeRO-2, ranks
//! splitting the node's cores, and a failing or stalled rank ending the job.
//!
//! A custom harness: run plainly, it drives `mpirun -np N <this binary>`; started by mpirun (with
//! DEEPSCALE_MPI_WORKER set) it is a worker rank.
mod common;

#[path = "common/collectives.rs"]
mod collectives;

use candle_core::{Device, Tensor};
use candle_deepscale::comm::mpi::MpiComm;
use candle_deepscale::comm::{Communicator, ReduceOp};
use candle_deepscale::layers::tensor_parallel::TensorParallel;
use candle_deepscale::runtime::topology::Topology;
use common::tp::{assert_trace_matches, run_bert, run_gpt2, Trace, STEPS};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn save_trace(t: &Trace, path: &Path) {
    let mut m: HashMap<String, Tensor> = HashMap::new();
    m.insert(
        "losses".into(),
        Tensor::new(t.losses.as_slice(), &Device::Cpu).unwrap(),
    );
    m.insert("logits".into(), t.logits.clone());
    for (k, v) in &t.grads {
        m.insert(format!("grad.{k}"), v.clone());
    }
    for (k, v) in &t.params {
        m.insert(format!("param.{k}"), v.clone());
    }
    candle_core::safetensors::save(&m, path).unwrap();
}

fn load_trace(path: &Path) -> Trace {
    let m = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let pick = |prefix: &str| -> BTreeMap<String, Tensor> {
        m.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    };
    Trace {
        losses: m["losses"].to_vec1().unwrap(),
        logits: m["logits"].clone(),
        grads: pick("grad."),
        params: pick("param."),
    }
}

/// Worker side: one rank of an mpirun job.
fn worker(case: &str, out: &Path) {
    let comm = Arc::new(MpiComm::init(candle_deepscale::comm::default_timeout()).unwrap());
    let (rank, size) = (comm.rank(), comm.world_size());
    let dyn_comm: Arc<dyn Communicator> = comm.clone();
    match case {
        "collectives" => {
            let topo = Topology::from_world(size, 2, 1).unwrap();
            collectives::check_collectives(dyn_comm.as_ref(), &topo).unwrap();
            collectives::check_started_reduce_scatter(dyn_comm.clone(), &topo).unwrap();
            collectives::check_start_does_not_wait(dyn_comm.clone(), Duration::from_secs(2))
                .unwrap();
            // One node: the blocking collectives above went through shared memory unless
            // DEEPSCALE_MPI_SHM=0 (then through MPI's messages), the large ones reading the
            // other processes' buffers directly unless DEEPSCALE_MPI_SINGLE_COPY=0 (then
            // through the segment's slots): every path is checked.
            let world: Vec<usize> = (0..size).collect();
            let off = |v: &str| std::env::var(v).is_ok_and(|v| v == "0");
            let shm = !off("DEEPSCALE_MPI_SHM");
            assert_eq!(comm.uses_shared_memory(&world).unwrap(), shm);
            let single_copy = shm && !off("DEEPSCALE_MPI_SINGLE_COPY") && cfg!(target_os = "linux");
            assert_eq!(
                comm.uses_single_copy(&world).unwrap(),
                single_copy,
                "single-copy reads between the ranks (process_vm_readv needs ptrace's permission)"
            );
            std::fs::write(out.join(format!("rank{rank}.ok")), "ok").unwrap();
        }
        "tp-gpt2" | "tp-bert" => {
            let tp = TensorParallel::new(dyn_comm, (0..size).collect()).unwrap();
            let t = if case == "tp-gpt2" {
                run_gpt2(Some(tp), STEPS)
            } else {
                run_bert(Some(tp), STEPS)
            };
            save_trace(&t, &out.join(format!("rank{rank}.safetensors")));
        }
        "fail" => {
            if rank == 1 {
                comm.abort("simulated failure on rank 1");
            }
            let mut v = vec![1f32; 4];
            dyn_comm.all_reduce(&[0, 1], &mut v, ReduceOp::Sum).unwrap();
            // Unreachable: rank 1 never joins.
            std::fs::write(out.join("completed"), "should not happen").unwrap();
        }
        "mismatch" => {
            // Rank 1 gathers twice as much as rank 0: a bug in the caller, named, not misread.
            let world = [0, 1];
            let send = vec![1f32; 4 * (rank + 1)];
            let mut recv = vec![0f32; 2 * send.len()];
            dyn_comm.all_gather(&world, &send, &mut recv).unwrap();
            std::fs::write(out.join("completed"), "should not happen").unwrap();
        }
        "stall" => {
            if rank == 1 {
                std::thread::sleep(Duration::from_secs(20));
                return;
            }
            let mut v = vec![1f32; 4];
            dyn_comm.all_reduce(&[0, 1], &mut v, ReduceOp::Sum).unwrap();
        }
        other => panic!("unknown worker case {other}"),
    }
}

fn mpirun(np: usize, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(program)
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output()
        .expect("mpirun must be installed (scripts/install-system-deps.sh)")
}

fn run_worker(np: usize, case: &str, env: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut e = vec![
        ("DEEPSCALE_MPI_WORKER", case),
        ("DEEPSCALE_MPI_OUT", dir.path().to_str().unwrap()),
    ];
    e.extend_from_slice(env);
    let out = mpirun(np, &me, &[], &e);
    (out, dir)
}

/// The candle-transformers Llama example (whole-model engine, ZeRO-2) under `mpirun -np 2`
/// equals its run on 2 in-process ranks: same losses, to the bit (fixed-order reductions).
fn llama_example_under_mpirun() {
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/llama_zero2");
    assert!(
        example.exists(),
        "{} is not built: `cargo build --workspace --examples --features deepscale/mpi` first (scripts/test.sh does)",
        example.display()
    );
    let last = |out: &Output| -> serde_json::Value {
        let s = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(s.lines().last().unwrap_or_default()).expect("JSON summary")
    };
    let local = Command::new(&example).output().unwrap();
    expect_ok(&local, "llama example in-process");
    let mpi = mpirun(2, &example, &[], &[]);
    expect_ok(&mpi, "llama example under mpirun");
    let (a, b) = (last(&local), last(&mpi));
    assert_eq!(b["ranks"], 2);
    for k in ["initial_loss", "final_loss", "parameters"] {
        assert_eq!(a[k], b[k], "{k}: in-process {a} vs mpirun {b}");
    }
}

fn expect_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: mpirun failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn collectives(np: usize, env: &[(&str, &str)]) {
    let (out, dir) = run_worker(np, "collectives", env);
    expect_ok(&out, "collectives");
    for r in 0..np {
        assert!(
            dir.path().join(format!("rank{r}.ok")).exists(),
            "rank {r} did not finish its checks"
        );
    }
}

fn tp_equivalence(case: &str) {
    let (out, dir) = run_worker(2, case, &[]);
    expect_ok(&out, case);
    let reference = if case == "tp-gpt2" {
        run_gpt2(None, STEPS)
    } else {
        run_bert(None, STEPS)
    };
    for r in 0..2 {
        let t = load_trace(&dir.path().join(format!("rank{r}.safetensors")));
        assert_trace_matches(&t, &reference, case, 2, r);
    }
}

fn failing_rank_aborts_the_job() {
    let t = Instant::now();
    let (out, dir) = run_worker(2, "fail", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job must fail");
    assert!(stderr.contains("simulated failure on rank 1"), "{stderr}");
    assert!(!dir.path().join("completed").exists());
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
}

/// Ranks calling different collectives on shared memory end the job with a message naming both
/// calls (MPI's own messages would truncate or hang).
fn mismatched_collectives_abort_naming_both() {
    let t = Instant::now();
    let (out, dir) = run_worker(2, "mismatch", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job must fail");
    // Whichever rank sees the other's call first reports it; both name the two calls.
    let rank0_saw = "member 1 (rank 1) called all_gather of 32 bytes where this rank called all_gather of 16 bytes";
    let rank1_saw = "member 0 (rank 0) called all_gather of 16 bytes where this rank called all_gather of 32 bytes";
    assert!(
        stderr.contains("all_gather on group [0, 1]")
            && (stderr.contains(rank0_saw) || stderr.contains(rank1_saw)),
        "{stderr}"
    );
    assert!(!dir.path().join("completed").exists());
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
}

fn stalled_rank_times_out() {
    let t = Instant::now();
    let (out, _dir) = run_worker(2, "stall", &[("DEEPSCALE_COMM_TIMEOUT", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job must fail");
    assert!(
        stderr.contains("all_reduce on group [0, 1] timed out"),
        "{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

fn cli_under_mpirun_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::random_gpt2(&common::tiny_gpt2_config(), 31);
    common::write_hf_gpt2_dir(&model, tmp.path(), "transformer.", 1);
    let d = tmp.path().to_str().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_deepscale"));
    let text = "Under mpirun the loss is the same as on one rank.";
    let last = |o: &Output| -> serde_json::Value {
        expect_ok(o, "deepscale");
        let s = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(s.lines().last().unwrap()).unwrap()
    };
    let eval = [
        "evaluate", "--task", "loss", "--hf-dir", d, "--text", text, "--json",
    ];
    let one = last(&Command::new(bin).args(eval).output().unwrap());
    let mut tp2 = eval.to_vec();
    tp2.extend(["--model-parallel-size", "2"]);
    let two = last(&mpirun(2, bin, &tp2, &[]));
    assert_eq!(two["tp"], 2);
    assert_eq!(two["world_size"], 2);
    let (a, b) = (one["loss"].as_f64().unwrap(), two["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-5 * a, "{a} vs {b}");
    let gen = [
        "generate",
        "--hf-dir",
        d,
        "--prompt",
        "abc",
        "--greedy",
        "--out-seq-length",
        "10",
        "--json",
    ];
    let one = last(&Command::new(bin).args(gen).output().unwrap());
    let mut g2 = gen.to_vec();
    g2.extend(["--model-parallel-size", "2"]);
    assert_eq!(
        last(&mpirun(2, bin, &g2, &[]))["token_ids"],
        one["token_ids"]
    );
}

/// Two MPI ranks on one node split its cores (rayon sized by OMPI_COMM_WORLD_LOCAL_SIZE) unless
/// RAYON_NUM_THREADS says otherwise; `bench dp` runs its dp-2 step under mpirun, every round
/// in one job.
fn mpi_ranks_share_the_cores() {
    let bin = Path::new(env!("CARGO_BIN_EXE_deepscale"));
    let run = |env: &[(&str, &str)]| -> serde_json::Value {
        let out = mpirun(2, bin, &common::cli::BENCH_DP_TINY, env);
        expect_ok(&out, "bench dp under mpirun");
        common::cli::last_json(&out)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let v = run(&[]);
    assert_eq!(v["mpi"], true);
    assert_eq!(v["data_parallel"], 2);
    assert_eq!(v["rounds"][0]["threads_per_rank"]["dp"], (cores / 2).max(1));
    assert!(v["rounds"][0]["ratio"].is_null(), "{v}");
    let v = run(&[("RAYON_NUM_THREADS", "3")]);
    assert_eq!(v["rounds"][0]["threads_per_rank"]["dp"], 3);
    // Several rounds, with and without overlap_comm, in one MPI job (MPI starts once).
    let mut args = common::cli::BENCH_DP_TINY.to_vec();
    args.extend([
        "--rounds",
        "2",
        "--overlap-comm",
        "--reduce-bucket-size",
        "200000",
    ]);
    let out = mpirun(2, bin, &args, &[]);
    expect_ok(&out, "bench dp --rounds 2 --overlap-comm under mpirun");
    let v = common::cli::last_json(&out);
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(2), "{v}");
    for round in v["rounds"].as_array().unwrap() {
        assert!(round["dp_ms"].as_f64().is_some() && round["overlap_ms"].as_f64().is_some());
    }
}

/// `pretrain-gpt2` on 4 MPI processes (tp 2 x dp 2, ZeRO-2) logs the losses of the 1-rank run.
fn pretrain_under_mpirun_equals_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_deepscale"));
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
    let run = |metrics: &Path, extra: &[&str], np: Option<usize>| {
        let m = metrics.to_str().unwrap().to_string();
        let mut args: Vec<&str> = vec![
            "pretrain-gpt2",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "32",
            "--train-iters",
            "4",
            "--lr",
            "5e-3",
            "--log-interval",
            "1",
            "--eval-interval",
            "0",
            "--eval-iters",
            "1",
            "--hidden-dropout",
            "0",
            "--attention-dropout",
            "0",
            "--sample-length",
            "0",
            "--metrics-file",
            &m,
        ];
        args.extend_from_slice(extra);
        let out = match np {
            Some(n) => mpirun(n, bin, &args, &[("DEEPSCALE_ASSETS", assets)]),
            None => Command::new(bin)
                .args(&args)
                .env("DEEPSCALE_ASSETS", assets)
                .output()
                .unwrap(),
        };
        expect_ok(&out, "pretrain-gpt2");
        std::fs::read_to_string(metrics)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l.get("loss").is_some())
            .collect::<Vec<_>>()
    };
    let one = run(&tmp.path().join("one.jsonl"), &["--batch-size", "4"], None);
    // And a pipeline: pp 2 x tp 2 on 4 processes, 2 micro-batches of 2.
    let pipe = run(
        &tmp.path().join("pipe.jsonl"),
        &[
            "--batch-size",
            "2",
            "--gas",
            "2",
            "--model-parallel-size",
            "2",
            "--pipe-parallel-size",
            "2",
            "--partition-method",
            "uniform",
        ],
        Some(4),
    );
    for (a, b) in pipe.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "pipeline under MPI: loss {la} vs {lb}"
        );
        assert_eq!(a["pp"].as_u64(), Some(2));
    }
    let four = run(
        &tmp.path().join("four.jsonl"),
        &[
            "--batch-size",
            "2",
            "--model-parallel-size",
            "2",
            "--zero-stage",
            "2",
            "--zero-reduce-bucket-size",
            "20000",
        ],
        Some(4),
    );
    assert_eq!(one.len(), 4);
    assert_eq!(four.len(), 4);
    for (a, b) in four.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= 1e-5 * lb, "loss {la} vs {lb}");
        assert_eq!(
            (a["world_size"].as_u64(), a["dp"].as_u64()),
            (Some(4), Some(2))
        );
    }
    // DeepSpeed's `overlap_comm` at stages 1 and 2 across 4 processes (dp 4): bucket reductions
    // left in flight as nonblocking MPI collectives, polled between layers.
    for stage in [1, 2] {
        let cfg = tmp.path().join(format!("overlap{stage}.json"));
        std::fs::write(
            &cfg,
            serde_json::json!({
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": stage, "overlap_comm": true,
                    "reduce_bucket_size": 20000}
            })
            .to_string(),
        )
        .unwrap();
        let overlapped = run(
            &tmp.path().join(format!("overlap{stage}.jsonl")),
            &["--deepscale", "--deepscale-config", cfg.to_str().unwrap()],
            Some(4),
        );
        assert_eq!(overlapped.len(), 4);
        for (a, b) in overlapped.iter().zip(&one) {
            let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!(
                (la - lb).abs() <= 1e-5 * lb,
                "ZeRO-{stage} overlap_comm under MPI: loss {la} vs {lb}"
            );
            assert_eq!(a["dp"].as_u64(), Some(4));
        }
    }
    // ZeRO-3 across processes: tp 2 x dp 2, blocks partitioned too (a low persistence
    // threshold through a DeepSpeed config), with the parameter pieces and optimizer state
    // swapped to NVMe (a temp folder per process rank).
    let cfg = tmp.path().join("zero3.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 500,
                "sub_group_size": 4096,
                "offload_optimizer": {"device": "nvme", "nvme_path": tmp.path().join("nvme")},
                "offload_param": {"device": "nvme", "nvme_path": tmp.path().join("nvme")}}
        })
        .to_string(),
    )
    .unwrap();
    let zero3 = run(
        &tmp.path().join("zero3.jsonl"),
        &[
            "--model-parallel-size",
            "2",
            "--deepscale",
            "--deepscale-config",
            cfg.to_str().unwrap(),
        ],
        Some(4),
    );
    assert_eq!(zero3.len(), 4);
    for (a, b) in zero3.iter().zip(&one) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * lb,
            "ZeRO-3 under MPI: loss {la} vs {lb}"
        );
        assert_eq!(a["zero_stage"].as_u64(), Some(3));
        assert!(a["offload_bytes_written"].as_u64().unwrap() > 0);
    }
}

/// `deepscale launch --hostfile` (`localhost slots=2`) starts the job through mpirun, printing
/// the command, and trains exactly as two in-process ranks.
fn launch_with_a_hostfile_equals_in_process_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_deepscale"));
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
    let hostfile = tmp.path().join("hostfile");
    std::fs::write(&hostfile, "localhost slots=2\n").unwrap();
    let train = [
        "pretrain-gpt2",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--train-iters",
        "3",
        "--batch-size",
        "2",
        "--eval-iters",
        "1",
        "--sample-length",
        "0",
        "--zero-stage",
        "2",
        "--json",
    ];
    let launched = Command::new(bin)
        .args(["launch", "--hostfile", hostfile.to_str().unwrap()])
        .args(train)
        .env("DEEPSCALE_ASSETS", assets)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    expect_ok(&launched, "deepscale launch");
    let err = String::from_utf8_lossy(&launched.stderr);
    assert!(err.contains("launch: mpirun -np 2 -H localhost:2"), "{err}");
    let in_process = Command::new(bin)
        .args(train)
        .args(["--world-size", "2"])
        .env("DEEPSCALE_ASSETS", assets)
        .output()
        .unwrap();
    expect_ok(&in_process, "in-process ranks");
    let last = |o: &Output| -> serde_json::Value {
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
    };
    let (a, b) = (last(&launched), last(&in_process));
    assert_eq!(a["world_size"], 2);
    for k in ["initial_loss", "final_loss", "valid_loss"] {
        assert_eq!(a[k], b[k], "{k}: launched {a} vs in-process {b}");
    }
    // The DeepSpeed launcher's path: `deepspeed --force_multi --hostfile H --launcher openmpi
    // --no_python --no_local_rank deepscale ...` runs the command its OpenMPIRunner.get_cmd
    // (0.19.8) builds — this one, with the exports it always adds — and the binary is an MPI job.
    // Where the machine's interface has another name than DeepSpeed's default eth0, name it as
    // its --launcher_args would (DeepSpeed then leaves out its own btl_tcp_if_include).
    let iface = if Path::new("/sys/class/net/eth0").exists() {
        "eth0"
    } else {
        "lo"
    };
    let ds = Command::new("mpirun")
        .args(["-n", "2", "-hostfile", hostfile.to_str().unwrap()])
        .args([
            "--mca",
            "btl",
            "^openib",
            "--mca",
            "btl_tcp_if_include",
            iface,
        ])
        .args([
            "-x",
            "UCX_TLS=tcp",
            "-x",
            &format!("PYTHONPATH={}", tmp.path().display()),
        ])
        .arg(bin)
        .args(train)
        .env("DEEPSCALE_ASSETS", assets)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    expect_ok(&ds, "DeepSpeed launcher's openmpi command");
    let c = last(&ds);
    for k in ["world_size", "initial_loss", "final_loss", "valid_loss"] {
        assert_eq!(c[k], b[k], "{k}: DeepSpeed's mpirun {c} vs in-process {b}");
    }
}

fn main() {
    if let Ok(case) = std::env::var("DEEPSCALE_MPI_WORKER") {
        let out = std::env::var("DEEPSCALE_MPI_OUT").expect("DEEPSCALE_MPI_OUT");
        worker(&case, Path::new(&out));
        return;
    }
    type Case = (&'static str, Box<dyn Fn()>);
    let cases: Vec<Case> = vec![
        (
            "mpi_launch_with_a_hostfile_equals_in_process_ranks",
            Box::new(launch_with_a_hostfile_equals_in_process_ranks),
        ),
        (
            "mpi_llama_example_equals_in_process_ranks",
            Box::new(llama_example_under_mpirun),
        ),
        (
            "mpi_collectives_2_processes",
            Box::new(|| collectives(2, &[])),
        ),
        (
            "mpi_collectives_4_processes",
            Box::new(|| collectives(4, &[])),
        ),
        (
            "mpi_collectives_2_and_4_processes_without_shared_memory",
            Box::new(|| {
                collectives(2, &[("DEEPSCALE_MPI_SHM", "0")]);
                collectives(4, &[("DEEPSCALE_MPI_SHM", "0")]);
            }),
        ),
        (
            "mpi_collectives_2_and_4_processes_through_the_shared_slots",
            Box::new(|| {
                collectives(2, &[("DEEPSCALE_MPI_SINGLE_COPY", "0")]);
                collectives(4, &[("DEEPSCALE_MPI_SINGLE_COPY", "0")]);
            }),
        ),
        (
            "mpi_mismatched_collectives_abort_naming_both",
            Box::new(mismatched_collectives_abort_naming_both),
        ),
        (
            "mpi_gpt2_tp2_equals_tp1",
            Box::new(|| tp_equivalence("tp-gpt2")),
        ),
        (
            "mpi_bert_tp2_equals_tp1",
            Box::new(|| tp_equivalence("tp-bert")),
        ),
        (
            "mpi_failing_rank_aborts_the_job",
            Box::new(failing_rank_aborts_the_job),
        ),
        (
            "mpi_stalled_rank_times_out",
            Box::new(stalled_rank_times_out),
        ),
        (
            "mpi_ranks_share_the_cores",
            Box::new(mpi_ranks_share_the_cores),
        ),
        (
            "mpi_cli_under_mpirun_equals_one_rank",
            Box::new(cli_under_mpirun_equals_one_rank),
        ),
        (
            "mpi_pretrain_tp2_dp2_zero2_zero3_nvme_and_pp2_tp2_equal_one_rank",
            Box::new(pretrain_under_mpirun_equals_one_rank),
        ),
    ];
    // `cargo test --test mpi -- NAME` runs the cases whose name contains NAME.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let t = Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!("mpi: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
