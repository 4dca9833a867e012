//! DeepSpeed's `comms_logger` (`deepspeed/utils/comms_logging.py`): a communicator decorator that
//! times every collective of the ops it profiles and keeps, per op and message size, the count,
//! latencies and bandwidths; [`CommsLogger::summary`] is DeepSpeed's `log_summary` table.
//!
//! Bandwidths follow DeepSpeed's `calc_bw_log` (algorithmic throughput and bus bandwidth in
//! Gbps), with `n` the size of the group the collective ran on (DeepSpeed uses the world size
//! there, which overstates bus bandwidth on sub-groups).
use super::{Communicator, ElemKind, ReduceOp, SendBuffer, Work};
use candle_core::Result;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Latencies (ms), algorithmic and bus bandwidths (Gbps) of one op at one message size.
#[derive(Debug, Clone, Default)]
pub struct OpRecord {
    pub count: u64,
    pub latencies_ms: Vec<f64>,
    pub algbw: Vec<f64>,
    pub busbw: Vec<f64>,
}

/// Records by op name, then message size in bytes.
pub type CommsRecords = BTreeMap<String, BTreeMap<u64, OpRecord>>;

/// The decorator.
pub struct CommsLogger {
    inner: Arc<dyn Communicator>,
    verbose: bool,
    /// None: every op (`prof_all`); else the op names of `prof_ops`.
    ops: Option<Vec<String>>,
    records: Mutex<CommsRecords>,
}

/// DeepSpeed's `calc_bw_log`: (algbw, busbw) in Gbps for `bytes` moved in `ms` over `n` ranks.
pub fn bandwidths(op: &str, bytes: u64, ms: f64, n: usize) -> (f64, f64) {
    let (size, n) = (bytes as f64, n.max(1) as f64);
    let ms = ms.max(1e-9);
    let (tput, busbw) = match op {
        "all_gather" | "reduce_scatter" => {
            let s = size * n;
            (s / ms, s / ms * (n - 1.0) / n)
        }
        "all_reduce" => (size * 2.0 / ms, size / ms * (2.0 * (n - 1.0) / n)),
        _ => (size / ms, size / ms),
    };
    // Bytes per ms to Gbps.
    (tput * 8.0 / 1e6, busbw * 8.0 / 1e6)
}

/// DeepSpeed's `convert_size`: "4.0 KB", "1.5 MB".
pub fn convert_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".into();
    }
    const NAMES: [&str; 9] = ["B", "KB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let i = ((bytes as f64).ln() / 1024f64.ln()).floor() as usize;
    let i = i.min(NAMES.len() - 1);
    let s = (bytes as f64 / 1024f64.powi(i as i32) * 100.0).round() / 100.0;
    format!("{s:?} {}", NAMES[i])
}

/// scipy's `trim_mean(data, 0.1)`: the mean without the lowest and highest tenth.
pub fn trim_mean(data: &[f64], proportion: f64) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut v = data.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let cut = (proportion * v.len() as f64) as usize;
    let kept = &v[cut..v.len() - cut];
    kept.iter().sum::<f64>() / kept.len() as f64
}

impl CommsLogger {
    /// `comm` with the collectives named in `ops` recorded (None: all of them, DeepSpeed's
    /// `prof_all`); `verbose` prints each as it completes. The config section's
    /// `CommsLoggerConfig::profiled_ops` gives `ops`.
    pub fn wrap(comm: Arc<dyn Communicator>, verbose: bool, ops: Option<Vec<String>>) -> Arc<Self> {
        Arc::new(Self {
            inner: comm,
            verbose,
            ops,
            records: Mutex::new(BTreeMap::new()),
        })
    }

    fn profiled(&self, op: &str) -> bool {
        self.ops.as_ref().is_none_or(|o| o.iter().any(|x| x == op))
    }

    /// Runs `f` and records it as `op` moving `bytes` over `n` ranks.
    fn timed<T>(
        &self,
        op: &str,
        bytes: usize,
        n: usize,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !self.profiled(op) {
            return f();
        }
        let t0 = Instant::now();
        let out = f()?;
        self.record(op, bytes, n, t0.elapsed().as_secs_f64() * 1e3);
        Ok(out)
    }

    /// Records `op` moving `bytes` over `n` ranks in `ms`.
    fn record(&self, op: &str, bytes: usize, n: usize, ms: f64) {
        let (algbw, busbw) = bandwidths(op, bytes as u64, ms, n);
        if self.verbose {
            eprintln!(
                "rank={} | comm op: {op} | time (ms): {ms:.2} | msg size: {} | algbw (Gbps): {algbw:.2} | busbw (Gbps): {busbw:.2}",
                self.inner.rank(),
                convert_size(bytes as u64)
            );
        }
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let rec = r
            .entry(op.to_string())
            .or_default()
            .entry(bytes as u64)
            .or_default();
        rec.count += 1;
        rec.latencies_ms.push(ms);
        rec.algbw.push(algbw);
        rec.busbw.push(busbw);
    }

    /// What was recorded so far.
    pub fn records(&self) -> CommsRecords {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// DeepSpeed's `log_summary` table: per op and message size, the count, total and (10%-trimmed)
    /// mean latency, and the trimmed mean throughput and bus bandwidth.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:<20}{:<20}{:<20}{:<20}{:<20}{:<20}{:<20}\n",
            "Comm. Op",
            "Message Size",
            "Count",
            "Total Latency(ms)",
            "Avg Latency(ms)",
            "tput_avg (Gbps)",
            "busbw_avg (Gbps)"
        );
        for (op, sizes) in self.records() {
            s += &format!("{op}\n");
            for (size, r) in sizes {
                s += &format!(
                    "{:<20}{:<20}{:<20}{:<20.2}{:<20.2}{:<20.2}{:<20.2}\n",
                    " ",
                    convert_size(size),
                    r.count,
                    r.latencies_ms.iter().sum::<f64>(),
                    trim_mean(&r.latencies_ms, 0.1),
                    trim_mean(&r.algbw, 0.1),
                    trim_mean(&r.busbw, 0.1)
                );
            }
        }
        s
    }
}

impl Communicator for CommsLogger {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn all_reduce_bytes(
        &self,
        group: &[usize],
        buf: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let n = buf.len();
        self.timed("all_reduce", n, group.len(), || {
            self.inner.all_reduce_bytes(group, buf, kind, op)
        })
    }
    fn all_gather_bytes(&self, group: &[usize], send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.timed("all_gather", send.len(), group.len(), || {
            self.inner.all_gather_bytes(group, send, recv)
        })
    }
    fn reduce_scatter_bytes(
        &self,
        group: &[usize],
        send: &[u8],
        recv: &mut [u8],
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<()> {
        let n = recv.len();
        self.timed("reduce_scatter", n, group.len(), || {
            self.inner.reduce_scatter_bytes(group, send, recv, kind, op)
        })
    }
    fn reduce_scatter_start(
        self: Arc<Self>,
        group: &[usize],
        send: Arc<dyn SendBuffer>,
        kind: ElemKind,
        op: ReduceOp,
    ) -> Result<Box<dyn Work>> {
        let t0 = Instant::now();
        let work = self
            .inner
            .clone()
            .reduce_scatter_start(group, send, kind, op)?;
        Ok(Box::new(LoggedWork {
            logger: self,
            work,
            n: group.len(),
            t0,
        }))
    }
    fn broadcast_bytes(&self, group: &[usize], buf: &mut [u8], root: usize) -> Result<()> {
        let n = buf.len();
        self.timed("broadcast", n, group.len(), || {
            self.inner.broadcast_bytes(group, buf, root)
        })
    }
    fn send_bytes(&self, dst: usize, tag: u64, buf: &[u8]) -> Result<()> {
        self.timed("send", buf.len(), 2, || {
            self.inner.send_bytes(dst, tag, buf)
        })
    }
    fn recv_bytes(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<()> {
        let n = buf.len();
        self.timed("recv", n, 2, || self.inner.recv_bytes(src, tag, buf))
    }
    fn barrier(&self, group: &[usize]) -> Result<()> {
        self.timed("barrier", 0, group.len(), || self.inner.barrier(group))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Option<&dyn super::CudaCollectives> {
        // Device collectives pass through unrecorded (their time is the stream's, not the call's).
        self.inner.cuda()
    }
}

/// A started reduce-scatter, recorded when waited for (its latency: from start to result).
struct LoggedWork {
    logger: Arc<CommsLogger>,
    work: Box<dyn Work>,
    n: usize,
    t0: Instant,
}

impl Work for LoggedWork {
    fn is_completed(&mut self) -> Result<bool> {
        self.work.is_completed()
    }
    fn wait(self: Box<Self>, recv: &mut [u8]) -> Result<()> {
        let bytes = recv.len();
        self.work.wait(recv)?;
        if self.logger.profiled("reduce_scatter") {
            let ms = self.t0.elapsed().as_secs_f64() * 1e3;
            self.logger.record("reduce_scatter", bytes, self.n, ms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_helpers() {
        assert_eq!(convert_size(4096), "4.0 KB");
        assert_eq!(convert_size(1536 * 1024), "1.5 MB");
        assert_eq!(convert_size(100), "100.0 B");
        assert_eq!(
            trim_mean(&[100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, -50.0], 0.1),
            4.5
        );
        // 1 MB all-reduce in 1 ms over 4 ranks: tput 16 Gbps, busbw 12 Gbps.
        let (t, b) = bandwidths("all_reduce", 1_000_000, 1.0, 4);
        assert!(
            (t - 16.0).abs() < 1e-9 && (b - 12.0).abs() < 1e-9,
            "{t} {b}"
        );
    }

    /// A started reduce-scatter goes through the logger: the same result, recorded once when
    /// waited for, under DeepSpeed's op name and the chunk's size.
    #[test]
    fn started_reduce_scatters_are_recorded() {
        use crate::comm::{InProcessWorld, ProcessGroup};
        let results = InProcessWorld::run(2, std::time::Duration::from_secs(20), |comm| {
            let logger = CommsLogger::wrap(comm, false, None);
            let g = ProcessGroup::new(logger.clone(), vec![0, 1])?;
            let r = logger.rank() as f32;
            let work = g.reduce_scatter_start(vec![r, r + 1.0, r + 2.0, r + 3.0], ReduceOp::Sum)?;
            let mut got = vec![0f32; 2];
            work.wait(&mut got)?;
            Ok((got, logger.records()))
        });
        for (rank, res) in results.into_iter().enumerate() {
            let (got, records) = res.unwrap();
            let want = if rank == 0 { [1.0, 3.0] } else { [5.0, 7.0] };
            assert_eq!(got, want);
            assert_eq!(records["reduce_scatter"][&8].count, 1, "{records:?}");
        }
    }
}
