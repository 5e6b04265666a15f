//! Error type of the pure-Rust core.
//!
//! Two kinds: bad input (the Python bindings raise `ValueError`) and working memory
//! that could not be allocated (`MemoryError`). Messages are one line and reach the
//! user unchanged: they name the argument and say what was expected and what was
//! received, or how much memory was needed for what.

use std::fmt;

/// What went wrong, for the bindings to pick the Python exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An argument is invalid (`ValueError`).
    BadInput,
    /// A working buffer could not be allocated (`MemoryError`).
    OutOfMemory,
}

/// An error with a user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    /// A bad-input error.
    pub fn new(msg: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::BadInput,
            message: msg.into(),
        }
    }

    /// `"{what} needs {bytes, e.g. 12.3 GB} {of_what}; it could not be allocated"`.
    pub fn out_of_memory(what: &str, bytes: u128, of_what: &str) -> Self {
        Error {
            kind: ErrorKind::OutOfMemory,
            message: format!(
                "{what} needs {} {of_what}; it could not be allocated",
                human_bytes(bytes)
            ),
        }
    }
}

/// Decimal units with one decimal: `"812 bytes"`, `"1.4 kB"`, `"56.0 MB"`, `"12.3 GB"`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut u = 0;
    while v >= 999.95 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `1600000000` as `"1,600,000,000"`.
pub fn thousands(x: u128) -> String {
    let d = x.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_well() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(1_400), "1.4 kB");
        assert_eq!(human_bytes(56_000_000), "56.0 MB");
        assert_eq!(human_bytes(999_990_000), "1.0 GB");
        assert_eq!(human_bytes(12_345_678_901), "12.3 GB");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_600_000_000), "1,600,000,000");
        let e = Error::out_of_memory(
            "calibration",
            12_300_000_000,
            "of working memory for 1,600,000,000 scores",
        );
        assert_eq!(e.kind, ErrorKind::OutOfMemory);
        assert_eq!(e.to_string(), "calibration needs 12.3 GB of working memory for 1,600,000,000 scores; it could not be allocated");
    }
}
