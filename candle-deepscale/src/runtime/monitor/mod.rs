//! DeepSpeed's monitors (`deepspeed/monitor/`): events `(tag, value, step)` written by global rank
//! 0 to TensorBoard event files, CSV files, and — having no Rust client — the `wandb` and `comet`
//! sections as TensorBoard files their tools upload (`wandb sync --sync-tensorboard`), with the
//! command printed. The engine writes DeepSpeed's `Train/Samples/*` events itself; training loops
//! add their own through [`MonitorMaster::write_events`].
pub mod csv_monitor;
pub mod tensorboard;

use crate::runtime::config::DeepSpeedConfig;
use candle_core::Result;
use std::path::{Path, PathBuf};

/// One scalar: DeepSpeed's `(log_name, value, step)` tuple.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub tag: String,
    pub value: f64,
    pub step: u64,
}

impl Event {
    pub fn new(tag: impl Into<String>, value: f64, step: u64) -> Self {
        Self {
            tag: tag.into(),
            value,
            step,
        }
    }
}

/// A sink for events (DeepSpeed's `Monitor`).
pub trait Monitor: Send {
    fn write_events(&mut self, events: &[Event]) -> Result<()>;
}

/// Where each enabled section writes, from the config alone (no file touched).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitorConfig {
    pub tensorboard: Option<PathBuf>,
    pub csv: Option<PathBuf>,
    /// `wandb`: the TensorBoard folder `wandb sync` uploads, and the section's team/project/group.
    pub wandb: Option<(PathBuf, String)>,
    /// `comet`: the TensorBoard folder and how to upload it.
    pub comet: Option<(PathBuf, String)>,
}

/// DeepSpeed's folder for a section: `output_path/job_name` (output_path "" is the current folder,
/// job_name defaults to `DeepSpeedJobName`).
fn job_dir(output_path: &Option<String>, job_name: &Option<String>) -> PathBuf {
    Path::new(output_path.as_deref().unwrap_or(""))
        .join(job_name.as_deref().unwrap_or("DeepSpeedJobName"))
}

impl MonitorConfig {
    pub fn from_deepspeed(ds: &DeepSpeedConfig) -> Self {
        let mut m = Self::default();
        if let Some(t) = ds.tensorboard.as_ref().filter(|t| t.enabled) {
            m.tensorboard = Some(job_dir(&t.output_path, &t.job_name));
        }
        if let Some(c) = ds.csv_monitor.as_ref().filter(|c| c.enabled) {
            m.csv = Some(job_dir(&c.output_path, &c.job_name));
        }
        if let Some(w) = ds.wandb.as_ref().filter(|w| w.enabled) {
            let project = w.project.clone().unwrap_or_else(|| "deepspeed".into());
            let mut cmd = String::new();
            if let Some(group) = &w.group {
                cmd += &format!("WANDB_RUN_GROUP={group} ");
            }
            cmd += &format!("wandb sync --sync-tensorboard --project {project}");
            if let Some(team) = &w.team {
                cmd += &format!(" --entity {team}");
            }
            m.wandb = Some((Path::new("wandb_tensorboard").join(&project), cmd));
        }
        if let Some(c) = ds.comet.as_ref().filter(|c| c.enabled) {
            let project = c.project.clone().unwrap_or_else(|| "deepspeed".into());
            let mut cmd = format!(
                "Python with comet_ml — an Experiment(project_name=\"{project}\"{}) and, for each \
                 (tag, step, value) tensorboard's EventAccumulator reads from the folder, \
                 experiment.log_metric(tag, value, step=step); the folder:",
                c.workspace
                    .as_ref()
                    .map_or(String::new(), |w| format!(", workspace=\"{w}\""))
            );
            if let Some(n) = &c.experiment_name {
                cmd = cmd.replace("Experiment(", &format!("Experiment(experiment name {n}; "));
            }
            m.comet = Some((Path::new("comet_tensorboard").join(&project), cmd));
        }
        m
    }

    pub fn enabled(&self) -> bool {
        self.tensorboard.is_some()
            || self.csv.is_some()
            || self.wandb.is_some()
            || self.comet.is_some()
    }
}

/// DeepSpeed's `MonitorMaster`: every enabled monitor, fed by global rank 0 only.
pub struct MonitorMaster {
    monitors: Vec<Box<dyn Monitor>>,
}

impl MonitorMaster {
    /// Opens the enabled monitors (on global rank 0; elsewhere none) and says where each writes.
    pub fn new(config: &MonitorConfig, global_rank_0: bool) -> Result<Self> {
        let mut monitors: Vec<Box<dyn Monitor>> = Vec::new();
        if !global_rank_0 {
            return Ok(Self { monitors });
        }
        if let Some(d) = &config.tensorboard {
            monitors.push(Box::new(tensorboard::TensorBoardMonitor::new(d)?));
            eprintln!("monitor: TensorBoard events in {}", d.display());
        }
        if let Some(d) = &config.csv {
            monitors.push(Box::new(csv_monitor::CsvMonitor::new(d)?));
            eprintln!("monitor: CSV files in {}", d.display());
        }
        for (what, section) in [("wandb", &config.wandb), ("comet", &config.comet)] {
            if let Some((d, how)) = section {
                monitors.push(Box::new(tensorboard::TensorBoardMonitor::new(d)?));
                eprintln!(
                    "monitor: `{what}` has no Rust client; its events are TensorBoard files in {} — \
                     upload them with: {how} {}",
                    d.display(),
                    d.display()
                );
            }
        }
        Ok(Self { monitors })
    }

    /// No monitor (what ranks other than 0 hold).
    pub fn none() -> Self {
        Self {
            monitors: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.monitors.is_empty()
    }

    pub fn write_events(&mut self, events: &[Event]) -> Result<()> {
        for m in &mut self.monitors {
            m.write_events(events)?;
        }
        Ok(())
    }
}
