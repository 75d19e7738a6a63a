//! The configuration error: what is wrong, with which key, and where the bad
//! value came from (file line, environment variable, `--set` argument,
//! hardware profile), so an operator can go straight to the line to fix.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value (or a problem) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A built-in default.
    Default,
    /// Worked out from the machine (detected profile, one shard per core).
    Machine,
    /// A built-in hardware profile.
    Profile { name: String },
    /// A configuration file; line and column (1-based) when known.
    File {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
    },
    /// A `RILL_*` environment variable.
    Environment { variable: String },
    /// A `--set section.key=value` argument, as given.
    Set { argument: String },
    /// A per-topic `key=value` override, as given.
    Override { argument: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => formatter.write_str("built-in default"),
            Self::Machine => formatter.write_str("detected from this machine"),
            Self::Profile { name } => write!(formatter, "hardware profile `{name}`"),
            Self::File { path, line, column } => {
                write!(formatter, "{}", path.display())?;
                if let Some(line) = line {
                    write!(formatter, ":{line}")?;
                    if let Some(column) = column {
                        write!(formatter, ":{column}")?;
                    }
                }
                Ok(())
            }
            Self::Environment { variable } => write!(formatter, "environment variable {variable}"),
            Self::Set { argument } => write!(formatter, "--set {argument}"),
            Self::Override { argument } => write!(formatter, "topic setting `{argument}`"),
        }
    }
}

/// A configuration problem. Displays as
/// `rill.toml:12:1: key `topic_defaults.fsync`: unknown value `sometimes`; expected every-batch, interval-ms or never`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending value (or text) came from.
    pub origin: Origin,
    /// The dotted key, e.g. `limits.frame_bytes_max`, when the problem is one key's.
    pub key: Option<String>,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(origin: Origin, key: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            origin,
            key: key.map(str::to_string),
            message: message.into(),
        }
    }

    /// The file line of the problem, when it came from a file.
    pub fn line(&self) -> Option<usize> {
        match &self.origin {
            Origin::File { line, .. } => *line,
            _ => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: ", self.origin)?;
        if let Some(key) = &self.key {
            write!(formatter, "key `{key}`: ")?;
        }
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}
