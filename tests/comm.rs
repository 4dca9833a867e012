//! Collectives against a one-rank reference on the sub-groups of a 2x2x2 grid, and failure
//! handling: a rank that errors, panics or stalls turns into an error on its peers, never a hang.
use candle_core::{DType, Device, Tensor};
use candle_deepscale::comm::{Communicator, InProcessWorld, ReduceOp};
use candle_deepscale::runtime::topology::Topology;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/collectives.rs"]
mod collectives;

/// Ranks of `InProcessWorld::run` with fewer threads than candle's process-wide pool run
/// candle's element-wise ops on their own rayon pools (the vendored candle-core's patch), with
/// the same results; where a rank has as many threads as candle's pool, candle's pool serves.
#[test]
fn in_process_ranks_run_candles_element_wise_ops_on_their_own_pools() {
    let candle_threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let per_rank = (rayon::current_num_threads() / 2).max(1);
    let outs = InProcessWorld::run(2, Duration::from_secs(60), |_| {
        let share = candle_core::utils::rayon_share(candle_threads);
        let x = Tensor::ones(300_001, DType::F32, &Device::Cpu)?;
        let sum: f32 = (&x + &x)?.sum_all()?.to_scalar()?;
        Ok((share, sum))
    });
    for out in outs {
        let (share, sum) = out.expect("rank");
        assert_eq!(share, (per_rank < candle_threads).then_some(per_rank));
        assert_eq!(sum, 600_002.0);
    }
}

#[test]
fn collectives_on_grid_subgroups_match_reference() {
    let topo = Topology::new(2, 2, 2).unwrap();
    let results = InProcessWorld::run(8, Duration::from_secs(30), |comm| {
        collectives::check_collectives(comm.as_ref(), &topo)
    });
    for (r, res) in results.into_iter().enumerate() {
        res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
}

#[test]
fn reductions_are_bit_identical_on_every_rank() {
    let results = InProcessWorld::run(4, Duration::from_secs(30), |comm| {
        let c: &dyn Communicator = comm.as_ref();
        let mut v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 + c.rank() * 104729) % 1000) as f32 * 1e-3 + 1e-7)
            .collect();
        c.all_reduce(&[0, 1, 2, 3], &mut v, ReduceOp::Sum)?;
        Ok(v)
    });
    let results: Vec<Vec<f32>> = results.into_iter().map(|r| r.unwrap()).collect();
    for r in &results[1..] {
        assert!(r
            .iter()
            .zip(&results[0])
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

fn assert_peers_fail(
    results: Vec<candle_core::Result<()>>,
    culprit: usize,
    needles: &[&str],
    started: Instant,
    limit: Duration,
) {
    assert!(
        started.elapsed() < limit,
        "peers took {:?} to give up",
        started.elapsed()
    );
    for (r, res) in results.into_iter().enumerate() {
        let e = res.expect_err("every rank must fail").to_string();
        if r == culprit {
            continue;
        }
        for n in needles {
            assert!(e.contains(n), "rank {r}: error `{e}` lacks `{n}`");
        }
    }
}

/// Started reduce-scatters (`overlap_comm`'s collectives) on a 2x2x2 grid: in flight two at a
/// time around a blocking all-reduce, the blocking result bit for bit.
#[test]
fn started_reduce_scatters_equal_the_blocking_ones() {
    let topo = Topology::new(2, 2, 2).unwrap();
    let results = InProcessWorld::run(8, Duration::from_secs(30), |comm| {
        collectives::check_started_reduce_scatter(comm, &topo)
    });
    for (r, res) in results.into_iter().enumerate() {
        res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
}

/// A started reduce-scatter does not wait for its peers: rank 0's is in flight, not complete,
/// until the others start theirs (they start only once rank 0 has looked).
#[test]
fn a_started_reduce_scatter_returns_before_its_peers_join() {
    use candle_deepscale::comm::ProcessGroup;
    use std::sync::atomic::{AtomicBool, Ordering};
    let looked = AtomicBool::new(false);
    let results = InProcessWorld::run(3, Duration::from_secs(20), |comm| {
        let g = ProcessGroup::new(comm.clone(), vec![0, 1, 2])?;
        let send: Vec<f32> = (0..6).map(|i| (i + 10 * comm.rank()) as f32).collect();
        if comm.rank() != 0 {
            while !looked.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut work = g.reduce_scatter_start(send, ReduceOp::Sum)?;
        if comm.rank() == 0 {
            assert!(!work.is_completed()?, "complete before the peers started");
            looked.store(true, Ordering::Release);
        }
        let mut got = vec![0f32; 2];
        work.wait(&mut got)?;
        Ok(got)
    });
    for (r, res) in results.into_iter().enumerate() {
        let got = res.unwrap();
        let want: Vec<f32> = (0..2)
            .map(|i| (0..3).map(|k| (2 * r + i + 10 * k) as f32).sum())
            .collect();
        assert_eq!(got, want, "rank {r}");
    }
}

/// A peer that fails while a started reduce-scatter waits for it fails the wait, naming it.
#[test]
fn a_started_reduce_scatter_fails_when_a_peer_is_gone() {
    use candle_deepscale::comm::ProcessGroup;
    let t = Instant::now();
    let results = InProcessWorld::run(2, Duration::from_secs(20), |comm: Arc<_>| {
        if comm.rank() == 1 {
            candle_core::bail!("simulated data error on rank 1");
        }
        let g = ProcessGroup::new(comm.clone(), vec![0, 1])?;
        let work = g.reduce_scatter_start(vec![1f32; 8], ReduceOp::Sum)?;
        let mut got = vec![0f32; 4];
        work.wait(&mut got)
    });
    assert_peers_fail(
        results,
        1,
        &["reduce_scatter", "peer rank 1", "simulated data error"],
        t,
        Duration::from_secs(10),
    );
}

#[test]
fn a_rank_that_errors_fails_its_peers() {
    let t = Instant::now();
    let results = InProcessWorld::run(4, Duration::from_secs(20), |comm: Arc<_>| {
        let c: &dyn Communicator = comm.as_ref();
        if c.rank() == 2 {
            candle_core::bail!("simulated data error on rank 2");
        }
        let mut v = vec![1f32; 8];
        c.all_reduce(&[0, 1, 2, 3], &mut v, ReduceOp::Sum)
    });
    // Peers learn at once (well before the 20 s deadline) and the error names the op and the peer.
    assert_peers_fail(
        results,
        2,
        &["all_reduce", "peer rank 2", "simulated data error"],
        t,
        Duration::from_secs(10),
    );
}

#[test]
fn a_rank_that_panics_mid_step_fails_its_peers() {
    let t = Instant::now();
    let results = InProcessWorld::run(3, Duration::from_secs(20), |comm: Arc<_>| {
        let c: &dyn Communicator = comm.as_ref();
        let mut v = vec![1f32; 8];
        c.all_reduce(&[0, 1, 2], &mut v, ReduceOp::Sum)?;
        if c.rank() == 1 {
            panic!("boom in the middle of a step");
        }
        let mut all = vec![0f32; 24];
        c.all_gather(&[0, 1, 2], &v, &mut all)?;
        Ok(())
    });
    assert_peers_fail(
        results,
        1,
        &["all_gather", "peer rank 1", "panicked", "boom"],
        t,
        Duration::from_secs(10),
    );
}

#[test]
fn a_stalled_rank_times_out_its_peers() {
    let t = Instant::now();
    let results = InProcessWorld::run(2, Duration::from_millis(500), |comm: Arc<_>| {
        let c: &dyn Communicator = comm.as_ref();
        if c.rank() == 0 {
            std::thread::sleep(Duration::from_secs(2));
            candle_core::bail!("rank 0 woke up too late");
        }
        let mut v = vec![0f32; 4];
        c.recv(0, 1, &mut v)
    });
    assert!(t.elapsed() < Duration::from_secs(5));
    let e = results[1]
        .as_ref()
        .expect_err("rank 1 must time out")
        .to_string();
    assert!(
        e.contains("timed out") && e.contains("recv from rank 0"),
        "{e}"
    );
}

#[test]
fn mismatched_collectives_are_an_error() {
    let results = InProcessWorld::run(2, Duration::from_secs(5), |comm: Arc<_>| {
        let c: &dyn Communicator = comm.as_ref();
        let mut v = vec![0f32; 4];
        if c.rank() == 0 {
            c.all_reduce(&[0, 1], &mut v, ReduceOp::Sum)
        } else {
            c.broadcast(&[0, 1], &mut v, 0)
        }
    });
    let errs: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    assert!(
        errs.iter().any(|e| e.contains("collective mismatch")),
        "{errs:?}"
    );
}

/// One process of a torchrun-style world (the test below re-runs itself with
/// DEEPSCALE_RENDEZVOUS_CHILD set): rank 0 brings a fresh id (on GPUs, NCCL's unique id) and every
/// rank prints what the rendezvous gave it.
fn rendezvous_child() {
    use candle_deepscale::comm::tcp_rendezvous;
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let n: usize = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
    let (host, port) = tcp_rendezvous::address_from_env().unwrap();
    let mine: Vec<u8> = (0..128u32)
        .map(|i| (i * 31 + std::process::id()) as u8)
        .collect();
    let id = tcp_rendezvous::exchange(
        &host,
        port,
        rank,
        n,
        (rank == 0).then_some(&mine[..]),
        Duration::from_secs(60),
    )
    .unwrap();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    println!("RENDEZVOUS rank={rank} port={port} id={hex}");
}

#[test]
fn torchrun_style_processes_exchange_the_id_over_loopback() {
    if std::env::var_os("DEEPSCALE_RENDEZVOUS_CHILD").is_some() {
        return rendezvous_child();
    }
    // Stand in for torchrun's agent, which listens on MASTER_PORT itself: the rendezvous must use
    // MASTER_PORT + 1.
    let (agent, master_port) = loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break (l, p);
        }
    };
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "torchrun_style_processes_exchange_the_id_over_loopback",
                    "--nocapture",
                ])
                .env("DEEPSCALE_RENDEZVOUS_CHILD", "1")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", master_port.to_string())
                .env_remove("DEEPSCALE_RENDEZVOUS_PORT")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let lines: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "a rank failed");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .find(|l| l.starts_with("RENDEZVOUS "))
                .unwrap_or_else(|| panic!("no result in {text}"))
                .to_string()
        })
        .collect();
    drop(agent);
    let field = |l: &str, k: &str| {
        l.split(' ')
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    for l in &lines {
        assert_eq!(field(l, "port="), (master_port + 1).to_string(), "{l}");
    }
    let ids: Vec<String> = lines.iter().map(|l| field(l, "id=")).collect();
    assert_eq!(ids[0].len(), 256);
    assert_eq!(ids[0], ids[1], "rank 1 got another id than rank 0 made");
}
