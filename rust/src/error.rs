//! Error type of the pure-Rust core.
//!
//! Every error is a bad-input error: the Python bindings raise it as `ValueError`
//! with the message unchanged, so messages name the argument and say what was
//! expected and what was received.

use std::fmt;

/// A bad-input error with a user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
