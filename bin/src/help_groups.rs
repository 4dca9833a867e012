//! `--help` of the pretrain commands grouped as Megatron's argparse groups (model, regularization,
//! training, initialization, learning rate, checkpointing, mixed precision, distributed,
//! validation, data, logging, DeepSpeed), instead of one flat list of a hundred options.

/// Heading, then the options (clap ids) under it. An option of a pretrain command missing here is
/// a test failure (`every_pretrain_option_has_a_group_and_text`).
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "Model",
        &[
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "seq_length",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
            "bert_no_binary_head",
            "hf_dir",
            "hf_repo",
            "use_flash_attn",
        ],
    ),
    (
        "Regularization",
        &[
            "hidden_dropout",
            "attention_dropout",
            "weight_decay",
            "clip_grad",
            "adam_beta1",
            "adam_beta2",
            "adam_eps",
        ],
    ),
    (
        "Training",
        &[
            "batch_size",
            "gas",
            "global_batch_size",
            "train_iters",
            "train_samples",
            "checkpoint_activations",
            "checkpoint_num_layers",
            "recompute_activations",
            "recompute_granularity",
            "recompute_method",
            "recompute_num_layers",
            "exit_signal_handler",
            "exit_signal",
            "exit_interval",
            "exit_duration_in_mins",
        ],
    ),
    ("Initialization", &["seed", "init_method_std"]),
    (
        "Learning rate",
        &[
            "lr",
            "min_lr",
            "lr_decay_style",
            "lr_decay_iters",
            "lr_decay_samples",
            "warmup",
            "lr_warmup_iters",
            "lr_warmup_samples",
        ],
    ),
    (
        "Checkpointing",
        &[
            "save",
            "save_interval",
            "keep_last",
            "load",
            "no_load_optim",
            "no_load_rng",
            "finetune",
            "save_hf",
        ],
    ),
    (
        "Mixed precision",
        &[
            "fp16",
            "bf16",
            "loss_scale",
            "initial_loss_scale",
            "min_loss_scale",
            "loss_scale_window",
            "hysteresis",
        ],
    ),
    (
        "Distributed",
        &[
            "world_size",
            "model_parallel_size",
            "pipe_parallel_size",
            "partition_method",
            "local_rank",
            "comm_timeout",
            "device",
            "comm_file",
            "distributed_backend",
        ],
    ),
    ("Validation", &["eval_interval", "eval_iters"]),
    (
        "Data and tokenizer",
        &[
            "data_path",
            "text_key",
            "split",
            "vocab_file",
            "merge_file",
            "tokenizer_type",
            "data_impl",
            "lazy_loader",
            "loose_json",
            "mask_prob",
            "short_seq_prob",
        ],
    ),
    (
        "Logging",
        &[
            "log_interval",
            "metrics_file",
            "overwrite",
            "json",
            "tensorboard_dir",
            "tensorboard_log_interval",
            "tensorboard_queue_size",
            "log_timers_to_tensorboard",
            "no_log_learning_rate_to_tensorboard",
            "no_log_loss_scale_to_tensorboard",
            "log_validation_ppl_to_tensorboard",
            "sample_prompt",
            "sample_length",
        ],
    ),
    (
        "DeepSpeed",
        &[
            "deepscale",
            "deepscale_config",
            "zero_stage",
            "zero_reduce_bucket_size",
            "zero_allgather_bucket_size",
            "zero_contigious_gradients",
            "zero_reduce_scatter",
            "deepspeed_activation_checkpointing",
            "partition_activations",
            "checkpoint_in_cpu",
            "contigious_checkpointing",
            "synchronize_each_layer",
            "cpu_optimizer",
            "scattered_embeddings",
            "split_transformers",
            "memory_centric_tiled_linear",
            "tile_factor",
        ],
    ),
];

/// The pretrain subcommands, each option under its group's heading.
pub fn group(cmd: clap::Command) -> clap::Command {
    cmd.mut_subcommands(|sub| {
        if !sub.get_name().starts_with("pretrain-") {
            return sub;
        }
        let mut sub = sub;
        for (heading, ids) in GROUPS {
            for id in *ids {
                if sub.get_arguments().any(|a| a.get_id() == id) {
                    sub = sub.mut_arg(*id, |a| a.help_heading(*heading));
                }
            }
        }
        sub
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_pretrain_option_has_a_group_and_text() {
        let cmd = group(crate::Cli::command());
        for sub in cmd
            .get_subcommands()
            .filter(|s| s.get_name().starts_with("pretrain-"))
        {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "debug" {
                    continue;
                }
                assert!(
                    a.get_help_heading().is_some(),
                    "{} --{id}: no group in help_groups.rs",
                    sub.get_name()
                );
                assert!(
                    a.get_help().is_some(),
                    "{} --{id}: no help text",
                    sub.get_name()
                );
            }
        }
    }
}
