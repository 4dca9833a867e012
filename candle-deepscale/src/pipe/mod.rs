//! Pipeline parallelism: the 1F1B schedule as data and the partitioning of a layer list into stages.
pub mod p2p;
pub mod partition;
pub mod schedule;

pub use partition::{partition_layers, PartitionMethod};
pub use schedule::{Instruction, TrainSchedule};
