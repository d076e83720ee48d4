//! The crate's one error: input that breaks the contract (an unknown tap, a bad
//! selection), carried as a one-line message naming what was wrong.

/// A refusal of bad input; the main crate maps it to its input error (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
