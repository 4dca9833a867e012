//! Where a CPU training loop should run: on one of rayon's worker threads.
//!
//! Every parallel kernel (GEMM panels, LayerNorm, attention, AdamW) is a rayon job. Called from a
//! thread outside the pool, each one is injected into the pool, both workers are woken and the
//! caller sleeps until they finish: a wake-up and a hand-back per op, thousands per step, each
//! costly on a VM whose idle vCPUs halt. Called from a worker, the caller runs its share of the
//! job at once and the other worker steals the rest. On the small GPT this is about 7% of a
//! training step (BENCHMARKS.md, session 9).

/// Runs `f` on a rayon worker thread, the caller waiting (at once when already on one).
///
/// For one rank per process (a single CPU rank, or an MPI rank). Not for in-process ranks: a rank
/// blocked in a collective would hold a worker, and with more ranks than workers the others could
/// never start.
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        return f();
    }
    rayon::scope(|_| f())
}

/// Ranks of this node under an MPI launcher (Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's
/// `MPI_LOCALNRANKS`), if started by one.
pub fn local_mpi_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Sizes rayon's global pool to this process's share of the node's cores when an MPI launcher
/// started several ranks on the node (`mpirun -np 2` on two cores: one thread each, not two
/// each fighting over both cores, as torchrun's one thread per process). `RAYON_NUM_THREADS`
/// wins; a pool already built (any parallel op ran before) is left as it is. Returns the
/// threads set, if any. Call it first thing in `main`.
pub fn share_cores_with_local_ranks() -> Option<usize> {
    let local = local_mpi_ranks().filter(|&n| n > 1)?;
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / local).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok()
        .map(|_| threads)
}

/// Makes candle's own parallel element-wise ops (its unary and binary maps over 64K elements or
/// more: residual adds, scaling) run on the calling thread, unless `CANDLE_NUM_THREADS` is set.
/// candle 0.11 runs them on a barrier pool of its own, one per process, sized to every core: a
/// second set of spinning threads beside rayon's, on the same cores. In-process ranks then queue
/// for that one pool behind its lock, and MPI ranks on one node each spin a pool over all of
/// the node's cores. Our kernels (GEMMs, fused ops, AdamW) run on rayon, which is sized per rank.
/// Measured on two cores (BENCHMARKS.md, session 22): one rank the same speed either way; dp 2
/// 0.93x -> 0.97x one rank's tokens/s in-process, 5-7% faster under `mpirun -np 2`.
///
/// Sets an environment variable read when candle first builds its pool: call it first thing in
/// `main`, before any other thread starts. Returns whether it set it.
pub fn keep_candle_elementwise_on_caller() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs this test binary's `child` test in a fresh process (candle's pool is built once per
    /// process), with `CANDLE_NUM_THREADS` as given; the child asserts the pool's worker count.
    fn in_child(candle_threads: Option<&str>, workers: usize) {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", "ops::threads::tests::child", "--nocapture"])
            .env("DEEPSCALE_THREADS_CHILD_WORKERS", workers.to_string())
            .env_remove("CANDLE_NUM_THREADS")
            .env("RAYON_NUM_THREADS", "2");
        if let Some(n) = candle_threads {
            cmd.env("CANDLE_NUM_THREADS", n);
        }
        let out = cmd.output().expect("run the test binary");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }

    /// The child half of the tests below (does nothing when not started by them).
    #[test]
    fn child() {
        let Some(workers) = std::env::var("DEEPSCALE_THREADS_CHILD_WORKERS").ok() else {
            return;
        };
        let preset = std::env::var_os("CANDLE_NUM_THREADS").is_some();
        assert_eq!(keep_candle_elementwise_on_caller(), !preset);
        // An element-wise op large enough for candle's parallel path still computes right.
        let x =
            candle_core::Tensor::ones(100_000, candle_core::DType::F32, &candle_core::Device::Cpu)
                .expect("tensor");
        let s: f32 = (&x + &x)
            .and_then(|y| y.sum_all()?.to_scalar())
            .expect("sum");
        assert_eq!(s, 200_000.0);
        assert_eq!(
            candle_core::utils::barrier_pool().n_workers().to_string(),
            workers
        );
    }

    #[test]
    fn candles_elementwise_ops_run_on_the_caller() {
        // Without the call, RAYON_NUM_THREADS=2 would give candle's pool one worker.
        in_child(None, 0);
    }

    #[test]
    fn a_users_candle_num_threads_wins() {
        in_child(Some("2"), 1);
    }

    #[test]
    fn runs_on_a_worker_and_returns_its_value() {
        let (on_worker, v) = on_worker_thread(|| (rayon::current_thread_index().is_some(), 7));
        assert_eq!(v, 7);
        assert_eq!(on_worker, rayon::current_num_threads() >= 2);
        // Parallel work inside still completes (the caller's share runs on the worker itself).
        let s: u64 = on_worker_thread(|| {
            use rayon::prelude::*;
            (0..1_000_000u64).into_par_iter().sum()
        });
        assert_eq!(s, 999_999 * 1_000_000 / 2);
    }
}
