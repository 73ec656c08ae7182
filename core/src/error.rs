//! One error type for the whole engine. Every variant names the thing that is wrong
//! (field, tensor, file) so that a user can act on the message without a debugger.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: field `{field}`: {msg}")]
    Config { field: String, msg: String },

    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{file}: invalid safetensors file: {msg}")]
    Safetensors { file: PathBuf, msg: String },

    #[error("checkpoint: {msg}")]
    Checkpoint { msg: String },

    #[error("tensor `{name}` is missing from the checkpoint (expected shape {expected:?}); {hint}")]
    MissingTensor { name: String, expected: Vec<usize>, hint: String },

    /// `note` is empty or starts with a separator (see [`Error::with_config_note`]).
    #[error("tensor `{name}` in {file}: shape {actual:?} does not match the config, expected {expected:?}{note}")]
    Shape { name: String, file: String, expected: Vec<usize>, actual: Vec<usize>, note: String },

    #[error("tensor `{name}` in {file}: {msg}")]
    Tensor { name: String, file: String, msg: String },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("backend `{backend}`: {msg}")]
    Backend { backend: String, msg: String },

    /// A collective between ranks failed (`crate::parallel::comm`).
    #[error("communicator (rank {rank} of {size}): {msg}")]
    Comm { rank: usize, size: usize, msg: String },

    /// The processes of a multi-node run could not meet or lost each other
    /// (`crate::parallel::nodes`).
    #[error("node {node} of {nnodes}: {msg}")]
    Nodes { node: usize, nnodes: usize, msg: String },
}

impl Error {
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }

    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), msg: msg.into() }
    }

    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }

    /// Adds `note` (what the config assumed, e.g. a default for a field config.json lacks) to a
    /// tensor shape or missing-tensor error, the errors a wrong config shows up as; any other
    /// error is returned as it is.
    pub fn with_config_note(self, note: &str) -> Self {
        match self {
            Error::Shape { name, file, expected, actual, note: old } => {
                Error::Shape { name, file, expected, actual, note: format!("{old} ({note})") }
            }
            Error::MissingTensor { name, expected, hint } => {
                Error::MissingTensor { name, expected, hint: format!("{hint} ({note})") }
            }
            other => other,
        }
    }
}
