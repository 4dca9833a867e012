//! Multiply-accumulates counted as the products run, for the flops profiler (DeepSpeed's profiler
//! counts them by patching `torch.nn.functional`; here the product wrappers report theirs). One
//! counter per thread — a rank's forward runs on its own thread — and off unless [`start`]ed.
use std::cell::Cell;

thread_local! {
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Starts (or restarts) counting on this thread.
pub fn start() {
    MACS.with(|m| m.set(Some(0)));
}

/// Stops counting; returns the total.
pub fn stop() -> u64 {
    MACS.with(|m| m.take().unwrap_or(0))
}

/// The count so far (0 when not counting).
pub fn read() -> u64 {
    MACS.with(|m| m.get().unwrap_or(0))
}

/// Adds `macs` when counting.
pub fn add(macs: u64) {
    MACS.with(|m| {
        if let Some(c) = m.get() {
            m.set(Some(c + macs));
        }
    });
}

/// `a [.., m, k] @ b [.., k, n]`: batch x m x n x k.
pub fn add_matmul(a: &[usize], b: &[usize]) {
    if a.len() < 2 || b.len() < 2 || MACS.with(|m| m.get().is_none()) {
        return;
    }
    let batch: usize = a[..a.len() - 2].iter().product();
    let (m, k, n) = (a[a.len() - 2], a[a.len() - 1], b[b.len() - 1]);
    add((batch * m * n * k) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_while_started() {
        add_matmul(&[2, 3, 4], &[2, 4, 5]);
        assert_eq!(read(), 0);
        start();
        add_matmul(&[2, 3, 4], &[2, 4, 5]);
        assert_eq!(read(), 2 * 3 * 4 * 5);
        assert_eq!(stop(), 120);
        assert_eq!(read(), 0);
    }
}
