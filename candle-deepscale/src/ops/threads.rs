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
/// each fighting over both cores, as torchrun's one thread per process), and candle's own pool
/// for its element-wise ops (`CANDLE_NUM_THREADS`, read when candle first builds it) to the same
/// share: sized to every core, each rank's pool spun on the others' cores (5-7% of a dp 2 step
/// under `mpirun -np 2` here, BENCHMARKS.md session 22). `RAYON_NUM_THREADS` wins (candle reads
/// it too), as does a `CANDLE_NUM_THREADS` of the user's; a pool already built (any parallel op
/// ran before) is left as it is. Returns the threads set, if any. Call it first thing in `main`,
/// before any other thread starts (it sets an environment variable).
pub fn share_cores_with_local_ranks() -> Option<usize> {
    let local = local_mpi_ranks().filter(|&n| n > 1)?;
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / local).max(1);
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok()
        .map(|_| threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs this test binary's `child` test in a fresh process (candle's pool is built once per
    /// process) as one of two MPI ranks on the node, with `CANDLE_NUM_THREADS` as given; the
    /// child asserts candle's pool's worker count.
    fn in_child(candle_threads: Option<&str>, workers: usize) {
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", "ops::threads::tests::child", "--nocapture"])
            .env("DEEPSCALE_THREADS_CHILD_WORKERS", workers.to_string())
            .env("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
            .env_remove("CANDLE_NUM_THREADS")
            .env_remove("RAYON_NUM_THREADS");
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
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(share_cores_with_local_ranks(), Some((cores / 2).max(1)));
        assert_eq!(sum_of_twos(100_000), 200_000.0);
        assert_eq!(
            candle_core::utils::barrier_pool().n_workers().to_string(),
            workers
        );
    }

    /// `x + x` over `n` ones, summed: an element-wise op large enough for candle's parallel path.
    fn sum_of_twos(n: usize) -> f32 {
        let x = candle_core::Tensor::ones(n, candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("tensor");
        (&x + &x)
            .and_then(|y| y.sum_all()?.to_scalar())
            .expect("sum")
    }

    #[test]
    fn mpi_ranks_size_candles_pool_to_their_share_of_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Without it, candle's pool would take every core: `cores - 1` workers.
        in_child(None, (cores / 2).max(1) - 1);
    }

    #[test]
    fn a_users_candle_num_threads_wins() {
        in_child(Some("3"), 2);
    }

    /// In-process ranks (rayon pools smaller than candle's) run candle's element-wise ops on
    /// their own pool (the vendored candle's patch), with the same results; a rank with every
    /// core, and a thread outside rayon, use candle's pool.
    #[test]
    fn in_process_ranks_keep_candles_ops_on_their_own_pool() {
        use candle_core::utils::rayon_share;
        assert_eq!(rayon_share(2), None);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let (share, sum) = pool.install(|| (rayon_share(2), sum_of_twos(300_001)));
            assert_eq!(share, (threads < 2).then_some(threads));
            assert_eq!(sum, 600_002.0);
        }
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
