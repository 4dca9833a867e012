//! Starting the ranks of a layout: in-process threads (`--world-size N`), processes under mpirun,
//! or a single rank; on the CPU or one GPU per rank (`--device cuda`, ranks over NCCL).
use crate::args::{DeviceKind, Layout};
use anyhow::{anyhow, Result};
use candle_deepscale::comm::{Communicator, InProcessWorld};
use candle_deepscale::ops::threads::on_worker_thread;
use candle_deepscale::runtime::topology::{Grid, Topology};
use std::sync::Arc;

/// One rank's place in the run: its grid (process groups, built by the library) and device.
pub struct RankCtx {
    pub grid: Grid,
    /// Where this rank's tensors live.
    pub device: candle_core::Device,
}

impl std::ops::Deref for RankCtx {
    type Target = Grid;
    fn deref(&self) -> &Grid {
        &self.grid
    }
}

impl RankCtx {
    fn new(
        topo: Topology,
        comm: Option<Arc<dyn Communicator>>,
        device: candle_core::Device,
    ) -> Result<Self> {
        let grid = match comm {
            Some(c) => Grid::new(topo, c)?,
            None => Grid {
                topo,
                ..Grid::single()
            },
        };
        Ok(Self { grid, device })
    }
}

/// The world size given by an MPI launcher, if this process was started by one.
pub fn mpi_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.parse().ok())
}

#[cfg(feature = "mpi")]
fn launch_mpi<T: Send>(
    topo: Topology,
    timeout: std::time::Duration,
    f: impl Fn(RankCtx) -> Result<T> + Send + Sync,
) -> Result<Option<T>> {
    use candle_deepscale::comm::mpi::MpiComm;
    let comm = Arc::new(MpiComm::init(timeout)?);
    let rank = comm.rank();
    if comm.world_size() != topo.world_size() {
        comm.abort(&format!(
            "mpirun started {} processes but the layout needs {}",
            comm.world_size(),
            topo.world_size()
        ))
    }
    let dyn_comm: Arc<dyn Communicator> = comm.clone();
    // One rank per process: it runs on a rayon worker (see cpu_threads; MPI is initialised
    // `Serialized`, so any one thread may call it).
    match on_worker_thread(|| {
        f(RankCtx::new(
            topo,
            Some(dyn_comm),
            candle_core::Device::Cpu,
        )?)
    }) {
        Ok(v) => Ok((rank == 0).then_some(v)),
        // Open MPI cannot recover a communicator once a member leaves mid-collective.
        Err(e) if comm.world_size() > 1 => comm.abort(&format!("{e:#}")),
        Err(e) => Err(e),
    }
}

/// Runs `f` on every rank of `layout` and returns rank 0's result (`None` on the other processes of
/// an MPI job). When in-process ranks fail, the error returned is the root cause (a rank's own
/// failure), not a peer's "rank X is gone"; under MPI a failing rank aborts the job.
pub fn launch<T: Send>(
    layout: &Layout,
    f: impl Fn(RankCtx) -> Result<T> + Send + Sync,
) -> Result<Option<T>> {
    let topo = Topology::new(layout.pp, layout.dp, layout.tp)?;
    if layout.device == DeviceKind::Cuda {
        return gpu::launch(layout, topo, f);
    }
    if mpi_world_size().is_some() {
        #[cfg(feature = "mpi")]
        return launch_mpi(topo, layout.timeout, f);
        #[cfg(not(feature = "mpi"))]
        if layout.world_size > 1 {
            anyhow::bail!(
                "started by mpirun, but this deepscale was built without the `mpi` feature (cargo build --features mpi)"
            )
        }
    }
    if layout.world_size == 1 {
        // A lone rank runs on a rayon worker (see cpu_threads); in-process ranks cannot.
        return on_worker_thread(|| f(RankCtx::new(topo, None, candle_core::Device::Cpu)?))
            .map(Some);
    }
    let watchdog = Watchdog::start(layout.world_size);
    let results = InProcessWorld::run(layout.world_size, layout.timeout, |comm| {
        let rank = comm.rank();
        let comm: Arc<dyn Communicator> = comm;
        let r = RankCtx::new(topo, Some(comm), candle_core::Device::Cpu)
            .and_then(&f)
            .map_err(|e| candle_core::Error::Msg(ranked(rank, &format!("{e:#}"))));
        watchdog.finished(rank, r.as_ref().err().map(|e| e.to_string()));
        r
    });
    root_result(results)
}

/// `msg` prefixed with its rank, once (communicator errors already name it).
fn ranked(rank: usize, msg: &str) -> String {
    if msg.starts_with(&format!("rank {rank}:")) {
        msg.to_string()
    } else {
        format!("rank {rank}: {msg}")
    }
}

/// Time the other in-process ranks get to finish after one failed: those waiting on the failed
/// rank see it gone at once; one that stalls (alive, outside any collective) never would.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends the process when a rank failed and others have not finished within [`SHUTDOWN_GRACE`]:
/// a stalled rank cannot be stopped from outside its thread, and joining it would hang the run
/// forever after its peers' collectives timed out. The error names the root cause (the peer's
/// timeout names the stalled rank and the collective) and the ranks that never finished.
struct Watchdog {
    state: Arc<std::sync::Mutex<WatchState>>,
}

struct WatchState {
    world: usize,
    done: Vec<bool>,
    /// The first failure, and when.
    failed: Option<(std::time::Instant, String)>,
}

impl Watchdog {
    fn start(world: usize) -> Self {
        let state = Arc::new(std::sync::Mutex::new(WatchState {
            world,
            done: vec![false; world],
            failed: None,
        }));
        let watched = state.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let Ok(st) = watched.lock() else { return };
            if st.done.iter().all(|d| *d) {
                return;
            }
            if let Some((at, cause)) = &st.failed {
                if at.elapsed() >= SHUTDOWN_GRACE {
                    let stuck: Vec<usize> = (0..st.world).filter(|&r| !st.done[r]).collect();
                    eprintln!("error: {cause}");
                    eprintln!(
                        "error: rank(s) {stuck:?} did not finish {} s after that failure                          (stalled); stopping the run",
                        SHUTDOWN_GRACE.as_secs()
                    );
                    std::process::exit(1);
                }
            }
        });
        Self { state }
    }

    /// Rank `rank` returned (with its error, if it failed).
    fn finished(&self, rank: usize, error: Option<String>) {
        if let Ok(mut st) = self.state.lock() {
            st.done[rank] = true;
            if let (None, Some(e)) = (&st.failed, error) {
                // The root cause, not a peer's "rank X is gone".
                if !e.contains("is gone") {
                    st.failed = Some((std::time::Instant::now(), e));
                }
            }
        }
    }
}

/// Rank 0's result of in-process ranks, or the root cause among their errors.
fn root_result<T>(results: Vec<candle_core::Result<T>>) -> Result<Option<T>> {
    let mut errors = Vec::new();
    let mut root = None;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) if r == 0 => root = Some(v),
            Ok(_) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(cause) = errors
        .iter()
        .find(|e| !e.contains("is gone"))
        .or(errors.first())
    {
        return Err(anyhow!("{cause}"));
    }
    root.map(Some)
        .ok_or_else(|| anyhow!("rank 0 produced no result"))
}

/// `--device cuda`: one GPU per rank (local rank -> device ordinal), NCCL between ranks.
#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::*;
    pub fn launch<T: Send>(
        _: &Layout,
        _: Topology,
        _: impl Fn(RankCtx) -> Result<T> + Send + Sync,
    ) -> Result<Option<T>> {
        anyhow::bail!(
            "--device cuda: this deepscale was built without the `cuda` feature \
             (cargo build --release --features nccl)"
        )
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use candle_core::Device;

    fn device(ordinal: usize) -> Result<Device> {
        Device::new_cuda(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e}"))
    }

    /// The GPU of a process that is one rank among several (local rank modulo the GPUs).
    #[cfg(feature = "nccl")]
    fn rank_device(rank: usize) -> Result<Device> {
        device(candle_deepscale::comm::nccl::local_device_ordinal(rank)?)
    }

    pub fn launch<T: Send>(
        layout: &Layout,
        topo: Topology,
        f: impl Fn(RankCtx) -> Result<T> + Send + Sync,
    ) -> Result<Option<T>> {
        if layout.world_size == 1 {
            let ordinal = std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return f(RankCtx::new(topo, None, device(ordinal)?)?).map(Some);
        }
        several(layout, topo, f)
    }

    #[cfg(not(feature = "nccl"))]
    fn several<T: Send>(
        layout: &Layout,
        _: Topology,
        _: impl Fn(RankCtx) -> Result<T> + Send + Sync,
    ) -> Result<Option<T>> {
        anyhow::bail!(
            "{} GPU ranks talk over NCCL: build with `--features nccl`",
            layout.world_size
        )
    }

    #[cfg(feature = "nccl")]
    fn several<T: Send>(
        layout: &Layout,
        topo: Topology,
        f: impl Fn(RankCtx) -> Result<T> + Send + Sync,
    ) -> Result<Option<T>> {
        use crate::args::Bootstrap;
        use candle_deepscale::comm::nccl::NcclComm;
        let one = |rank: usize, comm: NcclComm, device: Device| -> Result<Option<T>> {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let v = f(RankCtx::new(topo, Some(comm), device)?)?;
            Ok((rank == 0).then_some(v))
        };
        if let Some((rank, how)) = &layout.bootstrap {
            let (rank, n, t) = (*rank, layout.world_size, layout.timeout);
            let device = rank_device(rank)?;
            let comm = match how {
                Bootstrap::File(path) => NcclComm::from_file(&device, rank, n, path, t)?,
                Bootstrap::Tcp(host, port) => {
                    NcclComm::from_tcp(&device, rank, n, (host.as_str(), *port), t)?
                }
            };
            return one(rank, comm, device);
        }
        if mpi_world_size().is_some() {
            #[cfg(feature = "mpi")]
            {
                use candle_deepscale::comm::mpi::MpiComm;
                // MPI carries the NCCL id and stays initialised for the run.
                let mpi = MpiComm::init(layout.timeout)?;
                let rank = mpi.rank();
                if mpi.world_size() != topo.world_size() {
                    mpi.abort(&format!(
                        "mpirun started {} processes but the layout needs {}",
                        mpi.world_size(),
                        topo.world_size()
                    ))
                }
                let device = rank_device(rank)?;
                let comm = NcclComm::from_mpi(&mpi, &device, layout.timeout)?;
                return match one(rank, comm, device) {
                    Err(e) => mpi.abort(&format!("{e:#}")),
                    ok => ok,
                };
            }
            #[cfg(not(feature = "mpi"))]
            anyhow::bail!(
                "started by mpirun: the NCCL id travels over MPI, build with `--features nccl,mpi` \
                 (or bootstrap with --comm-file)"
            )
        }
        // Several GPUs driven by one process: a thread per rank.
        let n = layout.world_size;
        let count = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map_err(|e| anyhow!("counting CUDA devices: {e:?}"))? as usize;
        if count < n {
            anyhow::bail!(
                "--world-size {n} in one process needs {n} GPUs, {count} visible \
                 (start one process per GPU with mpirun or --comm-file to share them)"
            )
        }
        let devices = (0..n).map(device).collect::<Result<Vec<_>>>()?;
        let comms = NcclComm::in_process(&devices, layout.timeout)?;
        let results: Vec<candle_core::Result<Option<T>>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .zip(devices)
                .enumerate()
                .map(|(rank, (comm, device))| {
                    let one = &one;
                    s.spawn(move || {
                        one(rank, comm, device)
                            .map_err(|e| candle_core::Error::Msg(format!("rank {rank}: {e:#}")))
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(candle_core::Error::Msg(format!("rank {r} panicked")))
                    })
                })
                .collect()
        });
        Ok(root_result(results)?.flatten())
    }
}
