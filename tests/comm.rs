//! Collectives against a one-rank reference on the sub-groups of a 2x2x2 grid, and failure
//! handling: a rank that errors, panics or stalls turns into an error on its peers, never a hang.
use candle_deepscale::comm::{Communicator, InProcessWorld, ReduceOp};
use candle_deepscale::topology::Topology;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rank r's input: 12 values that differ per rank and per position.
fn input(rank: usize) -> Vec<f32> {
    (0..12)
        .map(|i| (rank as f32 + 1.0) * 0.37 + (i as f32) * 1.3 - (rank * i) as f32 * 0.11)
        .collect()
}

fn reference_reduce(group: &[usize], op: ReduceOp) -> Vec<f32> {
    let mut out = input(group[0]);
    for &r in &group[1..] {
        for (o, x) in out.iter_mut().zip(input(r)) {
            *o = match op {
                ReduceOp::Max => o.max(x),
                _ => *o + x,
            };
        }
    }
    if op == ReduceOp::Avg {
        out.iter_mut().for_each(|o| *o /= group.len() as f32);
    }
    out
}

#[test]
fn collectives_on_grid_subgroups_match_reference() {
    let topo = Topology::new(2, 2, 2).unwrap();
    let results = InProcessWorld::run(8, Duration::from_secs(30), |comm| {
        let c: &dyn Communicator = comm.as_ref();
        let r = c.rank();
        for group in [
            topo.model_group(r),
            topo.data_group(r),
            topo.pipe_group(r),
            (0..8).collect(),
        ] {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                let mut v = input(r);
                c.all_reduce(&group, &mut v, op)?;
                assert_eq!(
                    v,
                    reference_reduce(&group, op),
                    "all_reduce {op:?} on {group:?}"
                );
            }
            let mut all = vec![0f32; 12 * group.len()];
            c.all_gather(&group, &input(r), &mut all)?;
            let want: Vec<f32> = group.iter().flat_map(|&g| input(g)).collect();
            assert_eq!(all, want, "all_gather on {group:?}");

            let me = group.iter().position(|&g| g == r).unwrap();
            let chunk = 12 / group.len();
            let send: Vec<f32> = (0..group.len())
                .flat_map(|_| input(r)[..chunk].to_vec())
                .collect();
            let mut part = vec![0f32; chunk];
            // Every member sends group.len() copies of its first `chunk` values: chunk i reduced.
            c.reduce_scatter(&group, &send, &mut part, ReduceOp::Sum)?;
            assert_eq!(
                part,
                reference_reduce(&group, ReduceOp::Sum)[..chunk].to_vec(),
                "reduce_scatter on {group:?} (member {me})"
            );

            let root = *group.last().unwrap();
            let mut b = if r == root { input(r) } else { vec![0f32; 12] };
            c.broadcast(&group, &mut b, root)?;
            assert_eq!(b, input(root), "broadcast on {group:?}");
            c.barrier(&group)?;
        }
        // Other element types.
        let mut d = vec![r as f64; 3];
        c.all_reduce(&topo.data_group(r), &mut d, ReduceOp::Sum)?;
        assert_eq!(
            d[0],
            topo.data_group(r).iter().map(|&x| x as f64).sum::<f64>()
        );
        let mut h = vec![half::bf16::from_f32(1.5); 4];
        c.all_reduce(&topo.model_group(r), &mut h, ReduceOp::Sum)?;
        assert_eq!(h[0].to_f32(), 3.0);
        let mut i = vec![r as i64; 2];
        c.all_reduce(&(0..8).collect::<Vec<_>>(), &mut i, ReduceOp::Max)?;
        assert_eq!(i, [7, 7]);
        // Point to point around the pipeline: stage 0 sends, stage 1 receives, twice in order.
        if let Some(next) = topo.next_stage(r) {
            c.send(next, 7, &input(r))?;
            c.send(next, 7, &[r as f32])?;
        }
        if let Some(prev) = topo.prev_stage(r) {
            let mut got = vec![0f32; 12];
            c.recv(prev, 7, &mut got)?;
            assert_eq!(got, input(prev));
            let mut one = [0f32];
            c.recv(prev, 7, &mut one)?;
            assert_eq!(one[0], prev as f32);
        }
        Ok(())
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
