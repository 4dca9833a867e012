//! Memory estimates for model states: DeepSpeed 0.19.8's `estimate_zero2_model_states_mem_needs`
//! and `estimate_zero3_model_states_mem_needs` (same arguments, same integer results), and the
//! bytes this engine's own layout holds per rank, which a run measures (`Engine::state_bytes`).

/// DeepSpeed's ZeRO-2 estimate: (per-CPU bytes, per-GPU bytes).
pub fn deepspeed_zero2(
    total_params: u64,
    gpus_per_node: u64,
    nodes: u64,
    cpu_offload: bool,
    additional_buffer_factor: f64,
) -> (u64, u64) {
    // In f64: any node and GPU counts give an estimate, never an integer overflow.
    let total_gpus = nodes as f64 * gpus_per_node as f64;
    let t = total_params as f64;
    let (cpu, gpu) = if cpu_offload {
        (
            t * (4.0 * total_gpus).max(16.0) * additional_buffer_factor,
            2.0 * t,
        )
    } else {
        (
            t * 4.0 * gpus_per_node as f64 * additional_buffer_factor,
            2.0 * t + (18.0 * t / total_gpus).trunc(),
        )
    };
    (cpu as u64, gpu as u64)
}

/// DeepSpeed's ZeRO-3 estimate: (per-CPU bytes, per-GPU bytes, largest layer bytes).
#[allow(clippy::too_many_arguments)]
pub fn deepspeed_zero3(
    total_params: u64,
    largest_layer_params: u64,
    gpus_per_node: u64,
    nodes: u64,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
    additional_buffer_factor: f64,
) -> (u64, u64, u64) {
    let total_gpus = nodes as f64 * gpus_per_node as f64;
    let gpus_factor = 1.0 / nodes as f64;
    let largest = largest_layer_params.saturating_mul(4);
    let (t, b) = (total_params as f64, additional_buffer_factor);
    let per_node = gpus_per_node as f64;
    let (cpu, gpu) = if cpu_offload {
        if cpu_offload_params {
            let cpu = if zero_init {
                t * 18.0 * gpus_factor * b
            } else {
                t * (4.0 * per_node).max(18.0 * gpus_factor) * b
            };
            (cpu, largest as f64)
        } else {
            let cpu = if zero_init {
                t * 16.0 * gpus_factor * b
            } else {
                t * (4.0 * per_node).max(16.0 * gpus_factor) * b
            };
            (cpu, largest as f64 + (2.0 * t / total_gpus).trunc())
        }
    } else {
        let cpu = if zero_init {
            largest_layer_params as f64 * 4.0 * per_node * b
        } else {
            t * 4.0 * per_node * b
        };
        (cpu, largest as f64 + (18.0 * t / total_gpus).trunc())
    };
    (cpu as u64, gpu as u64, largest)
}

/// This engine's model-state bytes per rank for `psi` parameters over `n` data-parallel ranks
/// at ZeRO `stage`, with parameters of `param_bytes` (4: fp32 updated in place; 2: fp16/bf16 with
/// an fp32 master). Stage 3 adds the persistent parameters (whole on every rank) and
/// `live_params` gathered at once (the largest layer, or the live cap).
pub fn engine_bytes(
    stage: u8,
    psi: u64,
    n: u64,
    param_bytes: u64,
    persistent_params: u64,
    live_params: u64,
) -> super::StateBytes {
    let (p, n) = (psi as f64, n.max(1) as f64);
    let master = if param_bytes == 4 { 0.0 } else { 4.0 };
    let (params, grads, optim) = match stage {
        0 => (param_bytes as f64 * p, 4.0 * p, (8.0 + master) * p),
        1 => (param_bytes as f64 * p, 4.0 * p, (8.0 + master) * p / n),
        2 => (param_bytes as f64 * p, 4.0 * p / n, (8.0 + master) * p / n),
        _ => (
            4.0 * p / n + param_bytes as f64 * (persistent_params as f64 + live_params as f64),
            4.0 * p / n,
            8.0 * p / n,
        ),
    };
    super::StateBytes {
        parameters: params as u64,
        gradients: grads as u64,
        optimizer: optim as u64,
        buffers: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by DeepSpeed 0.19.8 itself for a 10B-parameter model whose largest layer
    /// holds 206,045,184 parameters.
    #[test]
    fn deepspeed_estimates_match_deepspeed() {
        let (t, l) = (10_000_000_000u64, 206_045_184u64);
        assert_eq!(
            deepspeed_zero2(t, 8, 1, true, 1.5),
            (480000000000, 20000000000)
        );
        assert_eq!(
            deepspeed_zero2(t, 8, 1, false, 1.5),
            (480000000000, 42500000000)
        );
        assert_eq!(
            deepspeed_zero2(t, 4, 2, false, 1.5),
            (240000000000, 42500000000)
        );
        let z3 = |n, m, co, cp, zi| deepspeed_zero3(t, l, n, m, co, cp, zi, 1.5);
        assert_eq!(
            z3(8, 1, true, true, true),
            (270000000000, 824180736, 824180736)
        );
        assert_eq!(
            z3(8, 1, true, true, false),
            (480000000000, 824180736, 824180736)
        );
        assert_eq!(
            z3(8, 1, true, false, true),
            (240000000000, 3324180736, 824180736)
        );
        assert_eq!(
            z3(8, 1, false, false, true),
            (9890168832, 23324180736, 824180736)
        );
        assert_eq!(
            z3(8, 1, false, false, false),
            (480000000000, 23324180736, 824180736)
        );
        assert_eq!(
            z3(4, 2, true, true, true),
            (135000000000, 824180736, 824180736)
        );
        assert_eq!(
            z3(4, 2, false, false, true),
            (4945084416, 23324180736, 824180736)
        );
    }

    #[test]
    fn engine_layouts_follow_the_zero_formula() {
        let s = |stage| engine_bytes(stage, 1000, 4, 4, 0, 0).total();
        assert_eq!([s(0), s(1), s(2), s(3)], [16000, 10000, 7000, 4000]);
        // fp16 with an fp32 master: 2Ψ + 2Ψ... here gradients are fp32 partitions.
        assert_eq!(
            engine_bytes(2, 1000, 4, 2, 0, 0).total(),
            2000 + 1000 + 3000
        );
    }
}
