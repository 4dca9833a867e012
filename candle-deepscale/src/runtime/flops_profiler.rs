//! DeepSpeed's flops profiler (`profiling/flops_profiler/profiler.py`): at `profile_step` the
//! engine records each layer's forward latency and multiply-accumulates (counted by the product
//! wrappers, [`crate::ops::flops`]), and prints DeepSpeed's report — the summary (parameters,
//! forward MACs/FLOPs/latency, backward and step latency as measured here, FLOPS), the top
//! modules per depth and the module tree (the model, then its layers) with parameters, MACs,
//! latency and FLOPS. Whole-model mode has no layer list: totals only.
use crate::runtime::config::FlopsProfilerConfig;
use std::fmt::Write;
use std::time::Instant;

/// The section's settings, DeepSpeed's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct FlopsProfilerSettings {
    /// Completed steps before the profiled one (DeepSpeed profiles when `global_steps` equals it).
    pub profile_step: u64,
    /// Deepest module level in the aggregated view (-1: all).
    pub module_depth: i64,
    pub top_modules: usize,
    pub detailed: bool,
    /// Where the report goes (None: stderr; stdout is the JSON line's).
    pub output_file: Option<std::path::PathBuf>,
    /// Forward passes recomputed in backward (activation checkpointing), for fwd+bwd FLOPS.
    pub recompute_fwd_factor: f64,
}

impl FlopsProfilerSettings {
    pub fn from_config(c: &FlopsProfilerConfig) -> Option<Self> {
        c.enabled.then(|| Self {
            profile_step: c.profile_step.unwrap_or(1),
            module_depth: c.module_depth.unwrap_or(-1),
            top_modules: c.top_modules.unwrap_or(1),
            detailed: c.detailed.unwrap_or(true),
            output_file: c.output_file.as_ref().map(std::path::PathBuf::from),
            recompute_fwd_factor: c.recompute_fwd_factor.unwrap_or(0.0),
        })
    }
}

/// One layer's forward time and MACs over the profiled step's micro-batches.
#[derive(Debug, Clone, Default)]
pub struct LayerStats {
    pub name: String,
    pub params: u64,
    pub fwd_ms: f64,
    pub macs: u64,
}

/// The profiled step's per-layer record, filled by the layer loop's hooks.
#[derive(Debug, Default)]
pub struct ForwardProfile {
    pub layers: Vec<LayerStats>,
    open: Option<(usize, Instant, u64)>,
}

impl ForwardProfile {
    pub fn new(layers: Vec<(String, u64)>) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|(name, params)| LayerStats {
                    name,
                    params,
                    ..Default::default()
                })
                .collect(),
            open: None,
        }
    }

    /// Layer `i`'s forward starts.
    pub fn begin(&mut self, i: usize) {
        self.open = Some((i, Instant::now(), crate::ops::flops::read()));
    }

    /// Layer `i`'s forward is done.
    pub fn end(&mut self, i: usize) {
        if let Some((j, t0, m0)) = self.open.take() {
            if let Some(l) = self.layers.get_mut(j).filter(|_| j == i) {
                l.fwd_ms += t0.elapsed().as_secs_f64() * 1e3;
                l.macs += crate::ops::flops::read().saturating_sub(m0);
            }
        }
    }
}

/// DeepSpeed's `number_to_string` family: 2 decimals with K/M/G/T/P.
fn scaled(v: f64) -> (f64, &'static str) {
    for (d, u) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")] {
        if v.abs() >= d {
            return (v / d, u);
        }
    }
    (v, "")
}

fn num(v: f64) -> String {
    let (x, u) = scaled(v);
    format!("{x:.2} {u}")
}

fn flops(v: f64) -> String {
    let (x, u) = scaled(v);
    format!("{x:.2} {u}FLOPS")
}

fn macs(v: f64) -> String {
    let (x, u) = scaled(v);
    format!("{x:.2} {u}MACs")
}

fn duration(ms: f64) -> String {
    if ms >= 1e3 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.2} us", ms * 1e3)
    }
}

/// What the report needs besides the layers.
pub struct StepFacts {
    pub step: u64,
    pub world_size: usize,
    pub dp: usize,
    pub mp: usize,
    /// Samples per rank in the step (micro-batch x accumulation).
    pub batch_per_rank: usize,
    pub model_name: String,
    /// This rank's parameters (its tensor-parallel slices).
    pub params: u64,
    /// Forward MACs when there is no layer record (whole-model mode).
    pub total_macs: u64,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub step_ms: f64,
}

/// DeepSpeed's `print_model_profile` text.
pub fn report(s: &FlopsProfilerSettings, f: &StepFacts, layers: &[LayerStats]) -> String {
    let total_macs = if layers.is_empty() {
        f.total_macs as f64
    } else {
        layers.iter().map(|l| l.macs as f64).sum()
    };
    let fwd_flops = 2.0 * total_macs;
    let fwd_s = (f.fwd_ms / 1e3).max(1e-12);
    let bwd_s = (f.bwd_ms / 1e3).max(1e-12);
    let iter_ms = f.fwd_ms + f.bwd_ms + f.step_ms;
    let mut o = String::new();
    let line = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{k:<62}{v}");
    };
    let _ = writeln!(
        o,
        "\n-------------------------- DeepSpeed Flops Profiler --------------------------"
    );
    let _ = writeln!(o, "Profile Summary at step {}:", f.step);
    let _ = writeln!(
        o,
        "Notations:\ndata parallel size (dp_size), model parallel size(mp_size),\nnumber of parameters (params), number of multiply-accumulate operations(MACs),\nnumber of floating-point operations (flops), floating-point operations per second (FLOPS),\nfwd latency (forward propagation latency), bwd latency (backward propagation latency),\nstep (weights update latency), iter latency (sum of fwd, bwd and step latency)\n"
    );
    line(&mut o, "world size: ", f.world_size.to_string());
    line(&mut o, "data parallel size: ", f.dp.to_string());
    line(&mut o, "model parallel size: ", f.mp.to_string());
    line(&mut o, "batch size per GPU: ", f.batch_per_rank.to_string());
    line(&mut o, "params per GPU: ", num(f.params as f64));
    line(
        &mut o,
        "params of model = params per GPU * mp_size: ",
        num((f.params * f.mp as u64) as f64),
    );
    line(&mut o, "fwd MACs per GPU: ", macs(total_macs));
    line(&mut o, "fwd flops per GPU: ", num(fwd_flops));
    line(
        &mut o,
        "fwd flops of model = fwd flops per GPU * mp_size: ",
        num(fwd_flops * f.mp as f64),
    );
    line(&mut o, "fwd latency: ", duration(f.fwd_ms));
    line(
        &mut o,
        "fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ",
        flops(fwd_flops / fwd_s),
    );
    line(&mut o, "bwd latency: ", duration(f.bwd_ms));
    line(
        &mut o,
        "bwd FLOPS per GPU = 2 * fwd flops per GPU / bwd latency: ",
        flops(2.0 * fwd_flops / bwd_s),
    );
    line(
        &mut o,
        "fwd+bwd FLOPS per GPU = 3 * fwd flops per GPU / (fwd+bwd latency): ",
        flops((3.0 + s.recompute_fwd_factor) * fwd_flops / (fwd_s + bwd_s)),
    );
    line(&mut o, "step latency: ", duration(f.step_ms));
    line(&mut o, "iter latency: ", duration(iter_ms));
    line(
        &mut o,
        "FLOPS per GPU = 3 * fwd flops per GPU / iter latency: ",
        flops((3.0 + s.recompute_fwd_factor) * fwd_flops / (iter_ms / 1e3).max(1e-12)),
    );
    line(
        &mut o,
        "samples/second: ",
        format!(
            "{:.2}",
            f.batch_per_rank as f64 / (iter_ms / 1e3).max(1e-12)
        ),
    );
    if layers.is_empty() {
        let _ = writeln!(
            o,
            "\n(whole-model mode: no layer list, so no per-module profile)\n------------------------------------------------------------------------------"
        );
        return o;
    }
    let total_params: f64 = f.params as f64;
    let total_ms: f64 = layers.iter().map(|l| l.fwd_ms).sum();
    let _ = writeln!(
        o,
        "\n----------------------------- Aggregated Profile per GPU -----------------------------"
    );
    let _ = writeln!(
        o,
        "Top {} modules in terms of params, MACs or fwd latency at different model depths:",
        s.top_modules
    );
    let top = |key: &dyn Fn(&LayerStats) -> f64, fmt: &dyn Fn(f64) -> String| -> String {
        let mut v: Vec<&LayerStats> = layers.iter().collect();
        v.sort_by(|a, b| key(b).total_cmp(&key(a)));
        let items: Vec<String> = v
            .iter()
            .take(s.top_modules)
            .map(|l| format!("'{}': '{}'", l.name, fmt(key(l))))
            .collect();
        format!("{{{}}}", items.join(", "))
    };
    let _ = writeln!(o, "depth 0:");
    let _ = writeln!(
        o,
        "    params      - {{'{}': '{}'}}",
        f.model_name,
        num(total_params)
    );
    let _ = writeln!(
        o,
        "    MACs        - {{'{}': '{}'}}",
        f.model_name,
        macs(total_macs)
    );
    let _ = writeln!(
        o,
        "    fwd latency - {{'{}': '{}'}}",
        f.model_name,
        duration(total_ms)
    );
    if s.module_depth != 0 {
        let _ = writeln!(o, "depth 1:");
        let _ = writeln!(o, "    params      - {}", top(&|l| l.params as f64, &num));
        let _ = writeln!(o, "    MACs        - {}", top(&|l| l.macs as f64, &macs));
        let _ = writeln!(o, "    fwd latency - {}", top(&|l| l.fwd_ms, &duration));
    }
    if s.detailed {
        let _ = writeln!(
            o,
            "\n------------------------------ Detailed Profile per GPU ------------------------------\nEach module profile is listed after its name in the following order:\nparams, percentage of total params, MACs, percentage of total MACs, fwd latency, percentage of total fwd latency, fwd FLOPS\n"
        );
        let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
        let entry = |params: f64, m: f64, ms: f64| {
            format!(
                "{}, {:.2}% Params, {}, {:.2}% MACs, {}, {:.2}% latency, {}",
                num(params),
                pct(params, total_params),
                macs(m),
                pct(m, total_macs),
                duration(ms),
                pct(ms, total_ms),
                flops(2.0 * m / (ms / 1e3).max(1e-12))
            )
        };
        let _ = writeln!(
            o,
            "{}(\n  {},",
            f.model_name,
            entry(total_params, total_macs, total_ms)
        );
        for l in layers {
            let _ = writeln!(
                o,
                "  ({}): {}",
                l.name,
                entry(l.params as f64, l.macs as f64, l.fwd_ms)
            );
        }
        let _ = writeln!(o, ")");
    }
    let _ = writeln!(
        o,
        "------------------------------------------------------------------------------"
    );
    o
}
