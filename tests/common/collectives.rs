//! The collective checks every backend must pass: each collective on every sub-group of a grid
//! against a one-rank reference computed here.
use candle_core::Result;
use candle_deepscale::comm::{Communicator, ReduceOp};
use candle_deepscale::runtime::topology::Topology;

/// Rank r's input: 12 values that differ per rank and per position.
pub fn input(rank: usize) -> Vec<f32> {
    (0..12)
        .map(|i| (rank as f32 + 1.0) * 0.37 + (i as f32) * 1.3 - (rank * i) as f32 * 0.11)
        .collect()
}

pub fn reference_reduce(group: &[usize], op: ReduceOp) -> Vec<f32> {
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

/// Runs every check as rank `c.rank()` of `topo` (all ranks must call it).
pub fn check_collectives(c: &dyn Communicator, topo: &Topology) -> Result<()> {
    let r = c.rank();
    for group in [
        topo.model_group(r),
        topo.data_group(r),
        topo.pipe_group(r),
        (0..topo.world_size()).collect(),
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
    // Large buffers (backends may switch algorithm: MPI reduce-scatters and all-gathers them),
    // of a length no group size divides, with values whose sum depends on the order: still the
    // group-order sum, bit for bit; and a large reduce-scatter.
    let world: Vec<usize> = (0..topo.world_size()).collect();
    for group in [topo.data_group(r), world] {
        let big = |rank: usize| -> Vec<f32> {
            (0..100_003u64)
                .map(|i| {
                    let x = (i * 2654435761 + rank as u64 * 40503) % 1_000_003;
                    (x as f32 * 1e-3).powi(3 - (i % 3) as i32)
                        * if i % 2 == 0 { 1.0 } else { -1e-4 }
                })
                .collect()
        };
        // All-reduces of several of the MPI backend's 512 KiB segments per member, the last
        // one partial.
        let long = |rank: usize| -> Vec<f32> { (0..6).flat_map(|k| big(rank + 5 * k)).collect() };
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let big = long;
            let mut want = big(group[0]);
            for &g in &group[1..] {
                want.iter_mut().zip(big(g)).for_each(|(w, x)| match op {
                    ReduceOp::Max => *w = w.max(x),
                    _ => *w += x,
                });
            }
            if op == ReduceOp::Avg {
                want.iter_mut().for_each(|w| *w /= group.len() as f32);
            }
            let mut v = big(r);
            c.all_reduce(&group, &mut v, op)?;
            assert!(v == want, "large all_reduce {op:?} on {group:?}");
        }
        // Each member's chunk spans several of the MPI backend's 512 KiB segments, the last
        // one partial.
        let n = group.len();
        let chunk = 2 * 100_003 * 4 / n;
        let big = |rank: usize| -> Vec<f32> { (0..8).flat_map(|k| big(rank + 7 * k)).collect() };
        let send = big(r)[..chunk * n].to_vec();
        let mut part = vec![0f32; chunk];
        c.reduce_scatter(&group, &send, &mut part, ReduceOp::Sum)?;
        let me = group.iter().position(|&g| g == r).unwrap();
        let mut want = big(group[0])[me * chunk..(me + 1) * chunk].to_vec();
        for &g in &group[1..] {
            let x = big(g);
            want.iter_mut()
                .zip(&x[me * chunk..(me + 1) * chunk])
                .for_each(|(w, x)| *w += x);
        }
        assert!(part == want, "large reduce_scatter on {group:?}");
        // A large all-gather (MPI reads the others' buffers directly at this size).
        let mut all = vec![0f32; 100_003 * n];
        c.all_gather(&group, &big(r)[..100_003], &mut all)?;
        let want: Vec<f32> = group
            .iter()
            .flat_map(|&g| big(g)[..100_003].to_vec())
            .collect();
        assert!(all == want, "large all_gather on {group:?}");
    }
    // Empty buffers (a rank whose partition is empty): nothing moves, nothing fails.
    let world: Vec<usize> = (0..topo.world_size()).collect();
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        let mut e: Vec<f32> = Vec::new();
        c.all_reduce(&world, &mut e, op)?;
    }
    let mut none: Vec<f32> = Vec::new();
    c.all_gather(&world, &[], &mut none)?;
    c.reduce_scatter(&world, &[], &mut none, ReduceOp::Sum)?;
    c.broadcast(&world, &mut none, 0)?;
    assert!(none.is_empty());
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
    c.all_reduce(
        &(0..topo.world_size()).collect::<Vec<_>>(),
        &mut i,
        ReduceOp::Max,
    )?;
    assert_eq!(i, [topo.world_size() as i64 - 1; 2]);
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
}

/// Started reduce-scatters (`ProcessGroup::reduce_scatter_start`) on every rank of `topo`: two
/// in flight at once with a blocking all-reduce on the same group between their starts and their
/// waits, waited for in the reverse order, equal the blocking reduce-scatter bit for bit (empty,
/// small and large buffers, on the data-parallel group and the world).
pub fn check_started_reduce_scatter(
    comm: std::sync::Arc<dyn Communicator>,
    topo: &Topology,
) -> Result<()> {
    use candle_deepscale::comm::ProcessGroup;
    let r = comm.rank();
    let world: Vec<usize> = (0..topo.world_size()).collect();
    for group in [topo.data_group(r), world] {
        let g = ProcessGroup::new(comm.clone(), group.clone())?;
        let n = group.len();
        let values = |rank: usize, len: usize, salt: u64| -> Vec<f32> {
            (0..len as u64)
                .map(|i| {
                    let x = (i * 2654435761 + rank as u64 * 40503 + salt) % 1_000_003;
                    (x as f32 * 1e-3).powi(3 - (i % 3) as i32)
                        * if i % 2 == 0 { 1.0 } else { -1e-4 }
                })
                .collect()
        };
        // Empty buffers too (a rank whose gradient piece is empty).
        for len in [0, 12 * n, 100_000 * n] {
            let mut a = g.reduce_scatter_start(values(r, len, 1), ReduceOp::Sum)?;
            let b = g.reduce_scatter_start(values(r, len, 2), ReduceOp::Sum)?;
            let mut between = values(r, 1000, 3);
            comm.all_reduce(&group, &mut between, ReduceOp::Sum)?;
            a.is_completed()?;
            for (salt, work) in [(2, b), (1, a)] {
                let mut got = vec![0f32; len / n];
                work.wait(&mut got)?;
                let mut want = vec![0f32; len / n];
                comm.reduce_scatter(&group, &values(r, len, salt), &mut want, ReduceOp::Sum)?;
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "started reduce_scatter of {len} on {group:?} differs from the blocking one"
                );
            }
            let mut want_between = values(group[0], 1000, 3);
            for &m in &group[1..] {
                want_between
                    .iter_mut()
                    .zip(values(m, 1000, 3))
                    .for_each(|(w, x)| *w += x);
            }
            assert!(
                between == want_between,
                "all_reduce between started ones on {group:?}"
            );
        }
    }
    Ok(())
}

/// A started reduce-scatter returns before the peers take part: rank 0 starts one right after a
/// barrier while the others wait `hold` before starting theirs, and it is not complete then;
/// it completes with the blocking result once they join. (The in-process tests show the same
/// without a clock.)
#[allow(dead_code)]
pub fn check_start_does_not_wait(
    comm: std::sync::Arc<dyn Communicator>,
    hold: std::time::Duration,
) -> Result<()> {
    use candle_deepscale::comm::ProcessGroup;
    let world: Vec<usize> = (0..comm.world_size()).collect();
    let g = ProcessGroup::new(comm.clone(), world.clone())?;
    let send = |rank: usize| -> Vec<f32> {
        (0..4 * world.len())
            .map(|i| (i + 10 * rank) as f32)
            .collect()
    };
    comm.barrier(&world)?;
    if comm.rank() != 0 {
        std::thread::sleep(hold);
    }
    let mut work = g.reduce_scatter_start(send(comm.rank()), ReduceOp::Sum)?;
    if comm.rank() == 0 {
        assert!(
            !work.is_completed()?,
            "complete before the peers started theirs"
        );
    }
    let mut got = vec![0f32; 4];
    work.wait(&mut got)?;
    let me = comm.rank();
    let want: Vec<f32> = (0..4)
        .map(|i| world.iter().map(|&r| send(r)[me * 4 + i]).sum())
        .collect();
    assert_eq!(got, want);
    Ok(())
}
