//! What trains a model: the [`Engine`](engine::Engine) (DeepSpeed's `initialize` and engine), its
//! per-layer loop, DeepSpeed's JSON config and its translation into engine settings, ZeRO stages
//! 0-3 with offload, pipelines (the 1F1B schedule as data and its executor), activation
//! checkpointing, loss scaling, LR schedules, checkpoints, the process grid and its groups,
//! and the meters (wall clock, memory, MFU).
//!
//! Imports [`crate::layers`], [`crate::ops`] and [`crate::comm`]. Inside, the engine uses the
//! layer loop, `pipe` and `zero`; `pipe` and `zero` never import the engine.
pub mod activation_checkpointing;
pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod data_samplers;
pub mod dist_signal_handler;
pub mod engine;
pub mod engine_config;
pub mod flops_profiler;
pub mod initialize;
pub mod layer_loop;
pub mod loss_scaler;
pub mod lr_schedules;
pub mod meters;
pub mod monitor;
pub mod pipe;
pub mod topology;
pub mod zero;
