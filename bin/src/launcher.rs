//! `deepscale launch`: DeepSpeed's launcher (`launcher/runner.py`) for this binary. It reads a
//! DeepSpeed hostfile (`host slots=N`), applies `--num_nodes`, `--num_gpus`, `--include` and
//! `--exclude` as DeepSpeed does, and starts the job through `mpirun` (DeepSpeed's openmpi
//! launcher path: the processes are then one MPI job), printing the command it runs.
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct LaunchArgs {
    /// DeepSpeed hostfile: one `hostname slots=N` per line, `#` comments (default: this host
    /// with --num_gpus slots, or /job/hostfile when it exists, as DeepSpeed).
    #[arg(long, short = 'H')]
    pub hostfile: Option<PathBuf>,
    /// Use the first N hosts of the hostfile.
    #[arg(long = "num_nodes", alias = "num-nodes")]
    pub num_nodes: Option<usize>,
    /// Ranks (slots) per host: the first N of each host's.
    #[arg(long = "num_gpus", alias = "num-gpus", alias = "num_accelerators")]
    pub num_gpus: Option<usize>,
    /// Only these hosts/slots: `host1@host2:0,2` (DeepSpeed's syntax).
    #[arg(long, default_value = "")]
    pub include: String,
    /// All but these hosts/slots: `host1:1@host3`.
    #[arg(long, default_value = "")]
    pub exclude: String,
    /// Exported to every rank as MASTER_ADDR (default: the first host).
    #[arg(long = "master_addr", alias = "master-addr")]
    pub master_addr: Option<String>,
    /// Exported to every rank as MASTER_PORT.
    #[arg(long = "master_port", alias = "master-port", default_value_t = 29500)]
    pub master_port: u16,
    /// Print the mpirun command and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// The deepscale command and its arguments (`pretrain-gpt2 --deepspeed ...`).
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Hosts in file order with their slot indices.
pub type Resources = Vec<(String, Vec<usize>)>;

/// DeepSpeed's `fetch_hostfile`: `host slots=N` lines, blank lines and `#` comments skipped.
pub fn parse_hostfile(text: &str, origin: &str) -> Result<Resources> {
    let mut out: Resources = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let host = parts.next().unwrap_or_default().to_string();
        let slots = parts
            .next()
            .and_then(|s| s.strip_prefix("slots="))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .with_context(|| {
                format!(
                    "{origin} line {}: `{line}` is not `hostname slots=N` (N at least 1)",
                    i + 1
                )
            })?;
        if parts.next().is_some() {
            bail!(
                "{origin} line {}: `{line}`: expected `hostname slots=N`",
                i + 1
            )
        }
        if out.iter().any(|(h, _)| *h == host) {
            bail!("{origin} line {}: host {host} is listed twice", i + 1)
        }
        out.push((host, (0..slots).collect()));
    }
    if out.is_empty() {
        bail!("{origin}: no hosts")
    }
    Ok(out)
}

/// `host1@host2:0,2` as {host: slots (None: all)}.
fn parse_filter(s: &str, what: &str) -> Result<BTreeMap<String, Option<Vec<usize>>>> {
    let mut m = BTreeMap::new();
    for part in s.split('@').filter(|p| !p.is_empty()) {
        match part.split_once(':') {
            None => {
                m.insert(part.to_string(), None);
            }
            Some((host, slots)) => {
                let v = slots
                    .split(',')
                    .map(|x| x.trim().parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .with_context(|| format!("--{what} `{part}`: slots must be numbers"))?;
                m.insert(host.to_string(), Some(v));
            }
        }
    }
    Ok(m)
}

/// DeepSpeed's `parse_resource_filter`: `--include` keeps only what it names, `--exclude`
/// drops it; naming a host or slot the hostfile lacks is an error.
pub fn filter(hosts: Resources, include: &str, exclude: &str) -> Result<Resources> {
    if !include.is_empty() && !exclude.is_empty() {
        bail!("give --include or --exclude, not both")
    }
    let check = |m: &BTreeMap<String, Option<Vec<usize>>>, what: &str| -> Result<()> {
        for (h, slots) in m {
            let Some((_, have)) = hosts.iter().find(|(x, _)| x == h) else {
                bail!("--{what}: host {h} is not in the hostfile")
            };
            for s in slots.iter().flatten() {
                if !have.contains(s) {
                    bail!("--{what}: host {h} has no slot {s}")
                }
            }
        }
        Ok(())
    };
    if !include.is_empty() {
        let m = parse_filter(include, "include")?;
        check(&m, "include")?;
        return Ok(hosts
            .into_iter()
            .filter_map(|(h, slots)| match m.get(&h) {
                None => None,
                Some(None) => Some((h, slots)),
                Some(Some(keep)) => Some((h, keep.clone())),
            })
            .collect());
    }
    if !exclude.is_empty() {
        let m = parse_filter(exclude, "exclude")?;
        check(&m, "exclude")?;
        return Ok(hosts
            .into_iter()
            .filter_map(|(h, slots)| match m.get(&h) {
                Some(None) => None,
                Some(Some(drop)) => {
                    let left: Vec<usize> =
                        slots.into_iter().filter(|s| !drop.contains(s)).collect();
                    (!left.is_empty()).then_some((h, left))
                }
                None => Some((h, slots)),
            })
            .collect());
    }
    Ok(hosts)
}

/// The hosts and slots of a launch, after every option.
pub fn resources(a: &LaunchArgs) -> Result<Resources> {
    let default = PathBuf::from("/job/hostfile");
    let file = a
        .hostfile
        .clone()
        .or_else(|| default.is_file().then_some(default));
    let mut hosts = match &file {
        Some(p) => parse_hostfile(
            &std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --hostfile {}", p.display()))?,
            &p.display().to_string(),
        )?,
        None => vec![(
            "localhost".to_string(),
            (0..a.num_gpus.unwrap_or(1)).collect(),
        )],
    };
    hosts = filter(hosts, &a.include, &a.exclude)?;
    if let Some(n) = a.num_nodes {
        if n == 0 || n > hosts.len() {
            bail!("--num_nodes {n}: the hostfile has {} host(s)", hosts.len())
        }
        hosts.truncate(n);
    }
    if let Some(g) = a.num_gpus {
        if g == 0 {
            bail!("--num_gpus 0: expected at least 1")
        }
        for (h, slots) in &mut hosts {
            if slots.len() < g {
                bail!("--num_gpus {g}: host {h} has {} slot(s)", slots.len())
            }
            slots.truncate(g);
        }
    }
    if hosts.is_empty() {
        bail!("no host left after --include/--exclude")
    }
    Ok(hosts)
}

/// The mpirun command line for `hosts` running this binary with `command`.
pub fn mpirun_command(a: &LaunchArgs, hosts: &Resources, exe: &str) -> Result<Vec<String>> {
    let np: usize = hosts.iter().map(|(_, s)| s.len()).sum();
    let mut cmd = vec![
        "mpirun".to_string(),
        "-np".into(),
        np.to_string(),
        "-H".into(),
        hosts
            .iter()
            .map(|(h, s)| format!("{h}:{}", s.len()))
            .collect::<Vec<_>>()
            .join(","),
        "--bind-to".into(),
        "none".into(),
    ];
    // GPU slots other than 0..n are the devices to use; one list for every host (mpirun's -x
    // carries one value).
    let lists: Vec<&Vec<usize>> = hosts.iter().map(|(_, s)| s).collect();
    let prefix = |s: &Vec<usize>| s.iter().enumerate().all(|(i, x)| i == *x);
    if !lists.iter().all(|s| prefix(s)) {
        if lists.windows(2).any(|w| w[0] != w[1]) {
            bail!(
                "not supported: different slot lists per host ({}), because mpirun sets one \
                 CUDA_VISIBLE_DEVICES for every host; use the same slots on each",
                hosts
                    .iter()
                    .map(|(h, s)| format!("{h}:{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
        let list = lists[0]
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",");
        cmd.extend(["-x".into(), format!("CUDA_VISIBLE_DEVICES={list}")]);
    }
    let master = a.master_addr.clone().unwrap_or_else(|| hosts[0].0.clone());
    cmd.extend([
        "-x".into(),
        format!("MASTER_ADDR={master}"),
        "-x".into(),
        format!("MASTER_PORT={}", a.master_port),
    ]);
    for var in [
        "DEEPSCALE_ASSETS",
        "DEEPSCALE_COMM_TIMEOUT",
        "OMPI_ALLOW_RUN_AS_ROOT",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
    ] {
        if std::env::var_os(var).is_some() {
            cmd.extend(["-x".into(), var.into()]);
        }
    }
    cmd.push(exe.into());
    cmd.extend(a.command.iter().cloned());
    Ok(cmd)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

pub fn run(a: LaunchArgs) -> Result<()> {
    if a.command.first().is_some_and(|c| c == "launch") {
        bail!("deepscale launch launches a deepscale command, not itself")
    }
    let hosts = resources(&a)?;
    let exe = std::env::current_exe()
        .context("cannot find this deepscale binary")?
        .display()
        .to_string();
    let cmd = mpirun_command(&a, &hosts, &exe)?;
    eprintln!(
        "launch: {}",
        cmd.iter()
            .map(|s| shell_quote(s))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if a.dry_run {
        return Ok(());
    }
    if !cfg!(feature = "mpi") {
        bail!(
            "this deepscale was built without the `mpi` feature, so the ranks mpirun starts could \
             not talk (cargo build --release -p deepscale --features mpi)"
        )
    }
    let status = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .context("cannot start mpirun (install Open MPI: scripts/install-system-deps.sh)")?;
    if !status.success() {
        bail!("the job failed: mpirun exited with {status}")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Resources {
        parse_hostfile(
            "# a comment\nworker-0 slots=4\n\nworker-1 slots=4 # two\nworker-2 slots=2\n",
            "hf",
        )
        .unwrap()
    }

    #[test]
    fn hostfile_and_filters_as_deepspeed() {
        assert_eq!(hosts().len(), 3);
        let f = filter(hosts(), "worker-0@worker-1:0,2", "").unwrap();
        assert_eq!(
            f,
            vec![
                ("worker-0".to_string(), vec![0, 1, 2, 3]),
                ("worker-1".to_string(), vec![0, 2])
            ]
        );
        let f = filter(hosts(), "", "worker-1@worker-0:3").unwrap();
        assert_eq!(
            f,
            vec![
                ("worker-0".to_string(), vec![0, 1, 2]),
                ("worker-2".to_string(), vec![0, 1])
            ]
        );
        assert!(filter(hosts(), "worker-9", "").is_err());
        assert!(filter(hosts(), "worker-0:7", "").is_err());
        assert!(filter(hosts(), "worker-0", "worker-1").is_err());
        assert!(parse_hostfile("worker-0 slots=x", "hf").is_err());
        assert!(parse_hostfile("a slots=1\na slots=2", "hf").is_err());
    }
}
