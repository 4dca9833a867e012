//! Preemption, as Megatron's `DistributedSignalHandler`: a signal (SIGTERM from a scheduler,
//! SIGINT from Ctrl-C) is only noted when it arrives; the training loop asks after each iteration
//! whether any rank received one ([`crate::runtime::engine::Engine::max_over_ranks`] of
//! [`received`]), so every rank stops at the same iteration, saves and exits. A second signal
//! exits at once (swap files removed, nothing else).
//!
//! The handler is process-wide (signals are), installed once; in-process ranks share it.
use candle_core::Result;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

pub use signal_hook::consts::signal::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

/// A signal's name (`SIGTERM`), or its number.
pub fn signal_name(sig: i32) -> String {
    match sig {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        SIGUSR1 => "SIGUSR1".into(),
        SIGUSR2 => "SIGUSR2".into(),
        n => format!("signal {n}"),
    }
}

/// A signal by its name (`SIGTERM`, `TERM`, or a number), as Megatron's `--exit-signal` takes it.
pub fn parse_signal(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    match n {
        "INT" => Some(SIGINT),
        "TERM" => Some(SIGTERM),
        "USR1" => Some(SIGUSR1),
        "USR2" => Some(SIGUSR2),
        other => other.parse().ok(),
    }
}

/// Starts noting `signals` (once per process; later calls add nothing). The first one is kept for
/// [`received`]; a second one exits the process at once with status 128 + its number, after
/// removing the live NVMe swap files.
pub fn install(signals: &[i32]) -> Result<()> {
    let signals = signals.to_vec();
    INSTALLED
        .get_or_init(|| {
            let mut it = signal_hook::iterator::Signals::new(&signals)
                .map_err(|e| format!("cannot install the signal handler: {e}"))?;
            std::thread::Builder::new()
                .name("deepscale-signals".into())
                .spawn(move || {
                    for sig in it.forever() {
                        if RECEIVED
                            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                        {
                            eprintln!(
                                "\n{} again: exiting now, without a checkpoint",
                                signal_name(sig)
                            );
                            crate::runtime::zero::swap_tensor::remove_live_swap_files();
                            std::process::exit(128 + sig);
                        }
                        eprintln!(
                            "\n{} received: finishing this iteration, then saving and exiting \
                             (send it again to exit at once)",
                            signal_name(sig)
                        );
                    }
                })
                .map_err(|e| format!("cannot start the signal thread: {e}"))?;
            Ok(())
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// The first signal received since [`install`], if any (this process only: ask the other ranks
/// through a collective).
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        for s in [SIGINT, SIGTERM, SIGUSR1, SIGUSR2] {
            assert_eq!(parse_signal(&signal_name(s)), Some(s));
        }
        assert_eq!(parse_signal("term"), Some(SIGTERM));
        assert_eq!(parse_signal("15"), Some(15));
        assert_eq!(parse_signal("SIGBOGUS"), None);
    }
}
