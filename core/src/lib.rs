//! dsv4-core: everything about DeepSeek-V4 that is not hardware: config parsing, checkpoint
//! loading, the backend trait, and the model graph written once against that trait.

#![deny(unsafe_code)]

pub mod act_quant;
pub mod backend;
pub mod backend_checks;
pub mod builtin;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod precision;
pub mod primitives_only;
pub mod profile;
pub mod quant;
pub mod sampling;
pub mod speculative;
pub mod tensor;
pub mod test_data;
pub mod tokenizer;
pub mod weight_forms;

pub use backend::{Backend, DeviceTensor};
pub use checkpoint::{Checkpoint, WeightMemory};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use model::batch::Batch;
pub use model::Model;
pub use precision::Precision;
