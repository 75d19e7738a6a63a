//! How individual setting values are written in TOML: the named choices
//! (`"every-batch"`, `"evict-oldest"`), `0` for "none" in optional limits,
//! socket addresses and the I/O driver. Each parser's error names the value
//! and lists what is accepted, because that text reaches the operator as is.

use std::net::SocketAddr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

use crate::io::IoDriverSetting;

/// `a, b or c`, for "expected ..." messages.
pub(crate) fn one_of(values: &[&str]) -> String {
    match values {
        [] => String::new(),
        [only] => (*only).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

pub(crate) fn unknown_value(value: &str, allowed: &[&str]) -> String {
    format!("unknown value `{value}`; expected {}", one_of(allowed))
}

/// Declares a setting that takes one of a few names, with `FromStr`,
/// `Display` and serde by those names.
macro_rules! named_choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// Every accepted name, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(value: &str) -> Result<Self, String> {
                match value {
                    $($text => Ok(Self::$variant),)+
                    other => Err($crate::config::values::unknown_value(other, Self::NAMES)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use named_choice;

/// `Option<u64>` written as a plain number where `0` means none: TOML has no
/// null, and 0 is never a useful limit for these keys.
pub(crate) mod zero_is_none {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.unwrap_or(0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        let value = u64::deserialize(deserializer)?;
        Ok((value != 0).then_some(value))
    }
}

/// `IP:PORT` as a string; host names are refused because resolving them at
/// start would make the listener depend on DNS, which edge boxes often lack.
pub(crate) mod socket_address {
    use super::*;

    pub fn serialize<S: Serializer>(value: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| {
            D::Error::custom(format!(
                "`{text}` is not a socket address; expected IP:PORT such as 127.0.0.1:7470, \
                 0.0.0.0:7470 or [::]:7470 (host names are not resolved)"
            ))
        })
    }
}

/// The I/O driver setting by the names `io::IoDriverSetting` parses.
pub(crate) mod io_driver {
    use super::*;

    pub const NAMES: &[&str] = &["auto", "io-uring", "portable"];

    pub fn name(value: IoDriverSetting) -> &'static str {
        match value {
            IoDriverSetting::Auto => "auto",
            IoDriverSetting::IoUring => "io-uring",
            IoDriverSetting::Portable => "portable",
        }
    }

    pub fn serialize<S: Serializer>(
        value: &IoDriverSetting,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<IoDriverSetting, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|_| D::Error::custom(unknown_value(&text, NAMES)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_of_reads_as_english() {
        assert_eq!(one_of(&["a"]), "a");
        assert_eq!(one_of(&["a", "b"]), "a or b");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
    }
}
