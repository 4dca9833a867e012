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

#[cfg(test)]
mod tests {
    use super::*;

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
