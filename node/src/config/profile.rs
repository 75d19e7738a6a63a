//! Built-in hardware profiles: the TOML files of `hw-profiles/`, compiled
//! into the binary so a box needs nothing besides `rill` to start well.
//! Each file has a `[profile]` table (description and the hints detection
//! matches against) and partial configuration sections in the same schema as
//! the configuration file, applied between the built-in defaults and the file.

use serde::Deserialize;

/// The profile name that applies no profile (built-in defaults only).
pub const NONE: &str = "none";

/// The profile sources, in detection order (most specific first; see
/// `detect.rs`).
const SOURCES: &[(&str, &str)] = &[
    (
        "tiny-512m",
        include_str!("../../../hw-profiles/tiny-512m.toml"),
    ),
    (
        "jetson-orin-nano",
        include_str!("../../../hw-profiles/jetson-orin-nano.toml"),
    ),
    ("rpi5-8g", include_str!("../../../hw-profiles/rpi5-8g.toml")),
    ("rpi4-4g", include_str!("../../../hw-profiles/rpi4-4g.toml")),
    (
        "x86-gateway",
        include_str!("../../../hw-profiles/x86-gateway.toml"),
    ),
];

/// What a machine must have for detection to pick a profile. Absent hints
/// do not constrain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MatchHints {
    pub memory_bytes_min: Option<u64>,
    pub memory_bytes_max: Option<u64>,
    pub cores_min: Option<usize>,
    /// `aarch64`, `x86_64`, ... or `any`.
    pub arch: String,
    /// A substring of `/proc/device-tree/model`, e.g. `Raspberry Pi 4`.
    pub device_tree_model_contains: Option<String>,
}

fn any_arch() -> String {
    "any".into()
}

/// The `[profile]` table of a profile file. The hints are repeated rather
/// than flattened because serde cannot deny unknown fields through a flatten,
/// and a misspelt hint must not silently match every machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    description: String,
    memory_bytes_min: Option<u64>,
    memory_bytes_max: Option<u64>,
    cores_min: Option<usize>,
    #[serde(default = "any_arch")]
    arch: String,
    device_tree_model_contains: Option<String>,
}

/// A built-in hardware profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub description: String,
    /// The whole file, `[profile]` table included.
    pub raw_toml: &'static str,
    /// `None` when the `[profile]` table does not parse; such a profile is
    /// never detected, and loading it reports the error.
    pub hints: Option<MatchHints>,
}

#[derive(Deserialize)]
struct HeaderOnly {
    profile: Header,
}

fn parse(name: &'static str, raw_toml: &'static str) -> Profile {
    // Only `[profile]` matters here; the configuration sections are checked
    // when the profile is loaded, against the configuration schema.
    let header = toml::from_str::<toml::Table>(raw_toml)
        .map_err(|error| error.message().to_string())
        .and_then(|mut table| {
            let mut only = toml::Table::new();
            if let Some(profile) = table.remove("profile") {
                only.insert("profile".into(), profile);
            }
            only.try_into::<HeaderOnly>()
                .map_err(|error| error.message().to_string())
        });
    match header {
        Ok(HeaderOnly { profile }) => Profile {
            name,
            description: profile.description,
            raw_toml,
            hints: Some(MatchHints {
                memory_bytes_min: profile.memory_bytes_min,
                memory_bytes_max: profile.memory_bytes_max,
                cores_min: profile.cores_min,
                arch: profile.arch,
                device_tree_model_contains: profile.device_tree_model_contains,
            }),
        },
        Err(error) => Profile {
            name,
            description: format!("(the [profile] table does not parse: {error})"),
            raw_toml,
            hints: None,
        },
    }
}

/// Every built-in profile, in detection order.
pub fn builtin_profiles() -> Vec<Profile> {
    SOURCES
        .iter()
        .map(|(name, raw_toml)| parse(name, raw_toml))
        .collect()
}

/// The built-in profile of that name.
pub fn find(name: &str) -> Option<Profile> {
    SOURCES
        .iter()
        .find(|(candidate, _)| *candidate == name)
        .map(|(name, raw_toml)| parse(name, raw_toml))
}
