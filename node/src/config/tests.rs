//! Tests of loading as a whole: the layering order, where errors point, the
//! built-in profiles, the topic settings' TOML form, and that docs/config.md
//! documents exactly the keys the code has.

use std::path::{Path, PathBuf};

use rill_core::log::FsyncPolicy;

use super::*;

const MIB: u64 = 1 << 20;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A Raspberry Pi 4 with 4 GB, so tests that detect do not depend on the
/// machine running them.
fn pi4() -> MachineFacts {
    MachineFacts {
        cores: 4,
        memory_bytes: 3_884 * MIB,
        arch: "aarch64".into(),
        device_tree_model: Some("Raspberry Pi 4 Model B Rev 1.4".into()),
        disks: vec![DiskFact {
            name: "mmcblk0".into(),
            kind: DiskKind::SdOrEmmc,
            why: "name mmcblk*".into(),
        }],
    }
}

fn write_file(directory: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = directory.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn sets(arguments: &[&str]) -> Vec<String> {
    arguments
        .iter()
        .map(|argument| argument.to_string())
        .collect()
}

const LAYERED_FILE: &str = r#"profile = "rpi4-4g"

[limits]
connections_max = 100

[topic_defaults]
segment_bytes_max = 33_554_432
fsync_interval_ms = 2000
"#;

#[test]
fn layers_apply_in_order_profile_file_environment_set() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(directory.path(), "rill.toml", LAYERED_FILE)?;
    let environment = env(&[
        ("RILL_LIMITS__CONNECTIONS_MAX", "200"),
        ("RILL_TOPIC_DEFAULTS__FSYNC_INTERVAL_MS", "3000"),
        ("PATH", "/usr/bin"),
    ]);
    let overrides = sets(&["topic_defaults.fsync_interval_ms=4000"]);
    let loaded = load_with_report(Some(&file), &overrides, &environment, &pi4())?;
    let config = &loaded.config;
    assert_eq!(config.profile, "rpi4-4g");
    assert_eq!(loaded.detection, None, "a named profile is not detected");
    // Built-in default: nobody sets it.
    assert_eq!(config.limits.fetch_wait_ms_max, 30_000);
    // Profile over defaults.
    assert_eq!(config.node.memory_budget_bytes, 512 * MIB);
    assert_eq!(config.topic_defaults.fsync, FsyncSetting::IntervalMs);
    // File over profile (the profile says 64 MiB).
    assert_eq!(config.topic_defaults.segment_bytes_max, 32 * MIB);
    // Environment over file.
    assert_eq!(config.limits.connections_max, 200);
    // --set over environment over file over profile.
    assert_eq!(config.topic_defaults.fsync_interval_ms, 4000);
    assert_eq!(
        config.topic_defaults.log_config().fsync,
        FsyncPolicy::IntervalMs(4000)
    );
    assert_eq!(
        loaded.origins.get("topic_defaults.fsync_interval_ms"),
        Some(&Origin::Set {
            argument: "topic_defaults.fsync_interval_ms=4000".into()
        })
    );
    assert_eq!(
        loaded.origins.get("limits.connections_max"),
        Some(&Origin::Environment {
            variable: "RILL_LIMITS__CONNECTIONS_MAX".into()
        })
    );
    assert_eq!(
        loaded.origins.get("topic_defaults.segment_bytes_max"),
        Some(&Origin::File {
            path: file.clone(),
            line: Some(7),
            column: Some(1)
        })
    );

    // Peel the layers off one by one: each lower layer shows through.
    let without_set = load(Some(&file), &[], &environment, &pi4())?;
    assert_eq!(without_set.topic_defaults.fsync_interval_ms, 3000);
    let without_env = load(Some(&file), &[], &[], &pi4())?;
    assert_eq!(without_env.topic_defaults.fsync_interval_ms, 2000);
    assert_eq!(without_env.limits.connections_max, 100);
    let without_file = load(None, &sets(&["profile=rpi4-4g"]), &[], &pi4())?;
    assert_eq!(without_file.topic_defaults.fsync_interval_ms, 1000);
    assert_eq!(without_file.topic_defaults.segment_bytes_max, 64 * MIB);
    let defaults_only = load(None, &sets(&["profile=none"]), &[], &pi4())?;
    assert_eq!(defaults_only.topic_defaults, TopicSettings::default());
    assert_eq!(defaults_only.node.memory_budget_bytes, 256 * MIB);
    Ok(())
}

#[test]
fn the_profile_comes_from_set_then_environment_then_file_then_detection() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(directory.path(), "rill.toml", "profile = \"rpi5-8g\"\n")?;
    let from_file = load(Some(&file), &[], &[], &pi4())?;
    assert_eq!(from_file.profile, "rpi5-8g");
    let from_env = load(
        Some(&file),
        &[],
        &env(&[("RILL_PROFILE", "tiny-512m")]),
        &pi4(),
    )?;
    assert_eq!(from_env.profile, "tiny-512m");
    assert_eq!(from_env.node.shards, 1);
    let from_set = load(
        Some(&file),
        &sets(&["profile=x86-gateway"]),
        &env(&[("RILL_PROFILE", "tiny-512m")]),
        &pi4(),
    )?;
    assert_eq!(from_set.profile, "x86-gateway");
    // `auto` anywhere means detect, here from the synthetic Pi 4.
    let detected = load_with_report(Some(&file), &sets(&["profile=auto"]), &[], &pi4())?;
    assert_eq!(detected.config.profile, "rpi4-4g");
    let detection = detected.detection.ok_or("auto must detect")?;
    assert!(
        detection
            .reasons
            .iter()
            .any(|reason| reason.ends_with("→ rpi4-4g")),
        "{:#?}",
        detection.reasons
    );
    assert_eq!(detected.origins.get("profile"), Some(&Origin::Machine));
    // No file at all: detection.
    assert_eq!(load(None, &[], &[], &pi4())?.profile, "rpi4-4g");

    let error =
        load(Some(&file), &sets(&["profile=rpi9"]), &[], &pi4()).expect_err("no such profile");
    assert_eq!(error.key.as_deref(), Some("profile"));
    let text = error.to_string();
    assert!(
        text.starts_with("--set profile=rpi9: key `profile`: unknown value `rpi9`"),
        "{text}"
    );
    assert!(text.contains("rpi4-4g") && text.contains("auto"), "{text}");
    Ok(())
}

#[test]
fn shards_zero_takes_the_profile_then_one_per_core() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(directory.path(), "rill.toml", "[node]\nshards = 0\n")?;
    let with_pi_profile = load_with_report(Some(&file), &sets(&["profile=rpi4-4g"]), &[], &pi4())?;
    assert_eq!(with_pi_profile.config.node.shards, 4);
    assert_eq!(
        with_pi_profile.origins.get("node.shards"),
        Some(&Origin::Profile {
            name: "rpi4-4g".into()
        })
    );
    let machine = MachineFacts { cores: 12, ..pi4() };
    let per_core = load_with_report(Some(&file), &sets(&["profile=x86-gateway"]), &[], &machine)?;
    assert_eq!(per_core.config.node.shards, 12);
    assert_eq!(per_core.origins.get("node.shards"), Some(&Origin::Machine));
    let huge = MachineFacts {
        cores: 1000,
        ..pi4()
    };
    assert_eq!(
        load(None, &sets(&["profile=none"]), &[], &huge)?
            .node
            .shards,
        SHARDS_MAX
    );
    let explicit = load(Some(&file), &sets(&["node.shards=3"]), &[], &pi4())?;
    assert_eq!(explicit.node.shards, 3);
    let error = load(None, &sets(&["node.shards=300"]), &[], &pi4()).expect_err("too many");
    assert_eq!(
        error.to_string(),
        "--set node.shards=300: key `node.shards`: 300 is out of range: at most 256; 0 means one per core"
    );
    Ok(())
}

#[test]
fn an_environment_typo_is_rejected_with_the_variable_named() {
    let typo = env(&[("RILL_LIMITS__FRAME_BYTE_MAX", "1048576")]);
    let error = load(None, &[], &typo, &pi4()).expect_err("typo");
    assert_eq!(
        error.origin,
        Origin::Environment {
            variable: "RILL_LIMITS__FRAME_BYTE_MAX".into()
        }
    );
    let text = error.to_string();
    assert!(
        text.contains("`RILL_LIMITS__FRAME_BYTE_MAX` matches no configuration key"),
        "{text}"
    );
    assert!(
        text.contains("Did you mean RILL_LIMITS__FRAME_BYTES_MAX?"),
        "{text}"
    );

    let single_underscore = env(&[("RILL_LIMITS_FRAME_BYTES_MAX", "1048576")]);
    let text = load(None, &[], &single_underscore, &pi4())
        .expect_err("single underscore")
        .to_string();
    assert!(
        text.contains("Did you mean RILL_LIMITS__FRAME_BYTES_MAX?"),
        "{text}"
    );

    let lower_case = env(&[("RILL_limits__frame_bytes_max", "1048576")]);
    assert!(load(None, &[], &lower_case, &pi4()).is_err());

    // Rill's own non-configuration variables and foreign ones pass.
    let mut allowed: Vec<(String, String)> = NON_CONFIG_VARIABLES
        .iter()
        .map(|name| (name.to_string(), "1".to_string()))
        .collect();
    allowed.push(("HOME".into(), "/root".into()));
    allowed.push(("RILLX".into(), "not ours".into()));
    assert!(load(None, &[], &allowed, &pi4()).is_ok());
}

#[test]
fn environment_and_set_values_are_typed_and_errors_name_the_override() -> TestResult {
    let environment = env(&[
        ("RILL_LISTENERS__NATIVE", "127.0.0.1:9000"),
        ("RILL_DATA_DIR", "/var/lib/rill"),
        ("RILL_TOPIC_DEFAULTS__FSYNC", "never"),
        ("RILL_NODE__PIN_THREADS", "true"),
        ("RILL_TOPIC_DEFAULTS__EVICTION_PRIORITY", "-5"),
    ]);
    let config = load(
        None,
        &sets(&["limits.frame_bytes_max=1_048_576"]),
        &environment,
        &pi4(),
    )?;
    assert_eq!(config.listeners.native, "127.0.0.1:9000".parse()?);
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/rill"));
    assert_eq!(config.topic_defaults.fsync, FsyncSetting::Never);
    assert!(config.node.pin_threads);
    assert_eq!(config.topic_defaults.eviction_priority, -5);
    assert_eq!(config.limits.frame_bytes_max, 1 << 20);
    let numeric_directory = load(None, &sets(&["data_dir=1234"]), &[], &pi4())?;
    assert_eq!(numeric_directory.data_dir, PathBuf::from("1234"));

    let bad_env = env(&[("RILL_TOPIC_DEFAULTS__FSYNC", "sometimes")]);
    assert_eq!(
        load(None, &[], &bad_env, &pi4())
            .expect_err("bad fsync")
            .to_string(),
        "environment variable RILL_TOPIC_DEFAULTS__FSYNC: key `topic_defaults.fsync`: \
         unknown value `sometimes`; expected every-batch, interval-ms or never"
    );
    assert_eq!(
        load(None, &sets(&["limits.frame_bytes_max=lots"]), &[], &pi4())
            .expect_err("not a number")
            .to_string(),
        "--set limits.frame_bytes_max=lots: key `limits.frame_bytes_max`: invalid value \"lots\"; \
         expected a whole number of bytes from 0 to 4294967295"
    );
    assert_eq!(
        load(
            None,
            &sets(&["listeners.admin=localhost:7471"]),
            &[],
            &pi4()
        )
        .expect_err("host names are not resolved")
        .key
        .as_deref(),
        Some("listeners.admin")
    );
    let unknown = load(None, &sets(&["limits.frame_byte_max=10"]), &[], &pi4())
        .expect_err("unknown key")
        .to_string();
    assert!(
        unknown.starts_with("--set limits.frame_byte_max=10: key `limits.frame_byte_max`: unknown key; did you mean `limits.frame_bytes_max`?"),
        "{unknown}"
    );
    let no_equals = load(None, &sets(&["limits.frame_bytes_max"]), &[], &pi4())
        .expect_err("no value")
        .to_string();
    assert!(
        no_equals.contains("expected section.key=value"),
        "{no_equals}"
    );
    let section = load(None, &sets(&["node=3"]), &[], &pi4())
        .expect_err("a section is not a value")
        .to_string();
    assert!(section.contains("`node` is a section"), "{section}");
    // The last --set of a key wins.
    let twice = load(
        None,
        &sets(&["topics.default_partitions=2", "topics.default_partitions=5"]),
        &[],
        &pi4(),
    )?;
    assert_eq!(twice.topics.default_partitions, 5);
    Ok(())
}

/// `fsync` is on line 12, the brief's example.
const BAD_FSYNC_FILE: &str = r#"# Rill on the line-3 gateway
data_dir = "/var/lib/rill"

[node]
shards = 2

[limits]
connections_max = 64

[topic_defaults]
segment_bytes_max = 67_108_864
fsync = "sometimes"
"#;

#[test]
fn a_bad_value_in_a_file_reports_its_line_and_key() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(directory.path(), "rill.toml", BAD_FSYNC_FILE)?;
    let error = check_file(&file).expect_err("bad fsync");
    assert_eq!(error.line(), Some(12));
    assert_eq!(error.key.as_deref(), Some("topic_defaults.fsync"));
    assert_eq!(
        error.to_string(),
        format!(
            "{}:12:1: key `topic_defaults.fsync`: unknown value `sometimes`; expected every-batch, interval-ms or never",
            file.display()
        )
    );
    // The same through load, which also layers a profile under the file.
    let error = load(Some(&file), &[], &[], &pi4()).expect_err("bad fsync");
    assert_eq!(
        (error.line(), error.key.as_deref()),
        (Some(12), Some("topic_defaults.fsync"))
    );

    // A wrong type, in a dotted key at the top level.
    let text = "data_dir = \"d\"\n\nlimits.connections_max = \"many\"\n";
    let file = write_file(directory.path(), "typed.toml", text)?;
    let error = check_file(&file).expect_err("a string is not a count");
    assert_eq!(error.key.as_deref(), Some("limits.connections_max"));
    assert_eq!(error.line(), Some(3));
    assert!(error.message.contains("expected a whole number"), "{error}");
    Ok(())
}

#[test]
fn out_of_range_values_point_at_the_line_that_set_them() -> TestResult {
    let directory = tempfile::tempdir()?;
    let text = "[node]\nshards = 2\n\n[limits]\nconnections_max = 10\n    frame_bytes_max = 512\n";
    let file = write_file(directory.path(), "rill.toml", text)?;
    let error = check_file(&file).expect_err("frame too small");
    assert_eq!(
        error.to_string(),
        format!(
            "{}:6:5: key `limits.frame_bytes_max`: 512 is out of range: must be between 1024 (1 KiB) and 268435456 (256 MiB)",
            file.display()
        )
    );

    // rill-core's own check of the topic settings, reported with the key.
    let text = "[topic_defaults]\n\nsegment_bytes_max = 8_589_934_592\n";
    let file = write_file(directory.path(), "segment.toml", text)?;
    let error = check_file(&file).expect_err("segment too large");
    assert_eq!(
        error.key.as_deref(),
        Some("topic_defaults.segment_bytes_max")
    );
    assert_eq!(error.line(), Some(3));
    assert!(error.message.contains("32-bit"), "{error}");

    let text = "[topic_defaults]\nfsync = \"interval-ms\"\nfsync_interval_ms = 0\n";
    let file = write_file(directory.path(), "interval.toml", text)?;
    let error = check_file(&file).expect_err("interval 0");
    assert_eq!(
        (error.key.as_deref(), error.line()),
        (Some("topic_defaults.fsync_interval_ms"), Some(3))
    );

    // Cross-checks name the key that must change.
    let error = load(
        None,
        &sets(&[
            "topic_defaults.batch_bytes_max=2097152",
            "limits.frame_bytes_max=1048576",
        ]),
        &[],
        &pi4(),
    )
    .expect_err("batch larger than a frame");
    assert_eq!(error.key.as_deref(), Some("topic_defaults.batch_bytes_max"));
    let error = load(
        None,
        &sets(&["listeners.admin=127.0.0.1:7470"]),
        &[],
        &pi4(),
    )
    .expect_err("same port twice");
    assert_eq!(error.key.as_deref(), Some("listeners.admin"));
    let error = load(None, &sets(&["limits.connections_max=0"]), &[], &pi4()).expect_err("zero");
    assert_eq!(error.key.as_deref(), Some("limits.connections_max"));

    // Cross-checks see the merged values and blame the layer that set the
    // key to change: here the profile's buffers are too small for frames
    // raised by --set.
    let error = load(
        None,
        &sets(&["profile=tiny-512m", "limits.frame_bytes_max=33554432"]),
        &[],
        &pi4(),
    )
    .expect_err("frames larger than all buffers");
    assert!(
        error.to_string().starts_with(
            "hardware profile `tiny-512m`: key `limits.buffer_memory_bytes_max`: 16777216 is smaller than limits.frame_bytes_max (33554432)"
        ),
        "{error}"
    );
    Ok(())
}

#[test]
fn an_unknown_key_is_reported_with_its_line() -> TestResult {
    let directory = tempfile::tempdir()?;
    let text = "[node]\nshards = 2\n\n[limits]\nconnections_max = 10\nframe_byte_max = 4096\n";
    let file = write_file(directory.path(), "rill.toml", text)?;
    let error = check_file(&file).expect_err("unknown key");
    assert_eq!(
        error.to_string(),
        format!(
            "{}:6:1: key `limits.frame_byte_max`: unknown key; did you mean `limits.frame_bytes_max`? (docs/config.md lists every key)",
            file.display()
        )
    );
    let text = "[node]\nshards = 2\n\n[lmits]\nconnections_max = 10\n";
    let file = write_file(directory.path(), "section.toml", text)?;
    let error = check_file(&file).expect_err("unknown section");
    assert_eq!(error.line(), Some(5));
    assert_eq!(error.key.as_deref(), Some("lmits.connections_max"));
    assert!(
        error
            .message
            .contains("did you mean `limits.connections_max`?"),
        "{error}"
    );
    let text = "[node]\nshards = 2\n[lmits]\n[storage]\n";
    let file = write_file(directory.path(), "empty.toml", text)?;
    let error = check_file(&file).expect_err("an empty unknown section");
    assert_eq!(
        (error.line(), error.key.as_deref()),
        (Some(3), Some("lmits"))
    );
    assert!(error.message.contains("did you mean `limits`?"), "{error}");
    Ok(())
}

#[test]
fn invalid_toml_reports_its_line() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(
        directory.path(),
        "rill.toml",
        "[node]\nshards = 2\npin_threads = \n",
    )?;
    let error = check_file(&file).expect_err("no value");
    assert_eq!(error.line(), Some(3));
    assert!(error.message.starts_with("invalid TOML"), "{error}");
    // A bare word is almost always missing quotes; the parser alone talks of floats.
    let file = write_file(
        directory.path(),
        "bare.toml",
        "[topic_defaults]\nfsync = never # no quotes\n",
    )?;
    let error = check_file(&file).expect_err("unquoted text");
    assert_eq!(error.line(), Some(2));
    assert!(
        error
            .message
            .ends_with("text values need quotes: fsync = \"never\""),
        "{error}"
    );
    let missing = directory.path().join("absent.toml");
    let error = check_file(&missing).expect_err("no file");
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{error}"
    );
    Ok(())
}

const GOOD_FILE: &str = r#"data_dir = "/var/lib/rill"

[node]
shards = 2
io_driver = "portable"

[listeners]
native = "0.0.0.0:7470"
admin = "127.0.0.1:7471"

[storage]
disk_quota_bytes = 10_737_418_240 # 10 GiB

[topic_defaults]
retention_ms = 0
disk_full_policy = "evict-oldest"
"#;

#[test]
fn check_file_accepts_a_good_file_on_its_own() -> TestResult {
    let directory = tempfile::tempdir()?;
    let file = write_file(directory.path(), "rill.toml", GOOD_FILE)?;
    let config = check_file(&file)?;
    assert_eq!(config.profile, "auto", "check_file does not detect");
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/rill"));
    assert_eq!(config.node.shards, 2);
    assert_eq!(config.node.io_driver, crate::io::IoDriverSetting::Portable);
    assert_eq!(config.listeners.native, "0.0.0.0:7470".parse()?);
    assert_eq!(config.storage.disk_quota_bytes, Some(10 << 30));
    assert_eq!(config.topic_defaults.retention_ms, None);
    assert_eq!(
        config.topic_defaults.eviction().disk_full,
        rill_core::logset::DiskFullPolicy::EvictOldest
    );
    // Everything else is the built-in default.
    assert_eq!(config.limits, LimitsSection::default());
    assert_eq!(config.topics, TopicsSection::default());
    Ok(())
}

#[test]
fn every_builtin_profile_parses_validates_and_takes_effect() -> TestResult {
    let profiles = builtin_profiles();
    let names: Vec<&str> = profiles.iter().map(|profile| profile.name).collect();
    assert_eq!(
        names,
        [
            "tiny-512m",
            "jetson-orin-nano",
            "rpi5-8g",
            "rpi4-4g",
            "x86-gateway"
        ]
    );
    for profile in &profiles {
        let hints = profile
            .hints
            .as_ref()
            .ok_or(format!("{}: {}", profile.name, profile.description))?;
        assert!(!profile.description.is_empty());
        assert!(
            ["any", "aarch64", "x86_64"].contains(&hints.arch.as_str()),
            "{}: arch {}",
            profile.name,
            hints.arch
        );
        let loaded = load_with_report(None, &[format!("profile={}", profile.name)], &[], &pi4())
            .map_err(|error| format!("profile {}: {error}", profile.name))?;
        assert_eq!(loaded.config.profile, profile.name);
        // Each profile sets something, and every key it sets is in force.
        let table: toml::Table = profile.raw_toml.parse()?;
        let effective = toml::Table::try_from(&loaded.config)?;
        let mut checked = 0;
        for (section, values) in table.iter().filter(|(section, _)| *section != "profile") {
            let values = values
                .as_table()
                .ok_or(format!("{}: [{section}]", profile.name))?;
            for (key, value) in values {
                let dotted = format!("{section}.{key}");
                if dotted == "node.shards" && value.as_integer() == Some(0) {
                    assert_eq!(loaded.config.node.shards, pi4().cores);
                } else {
                    assert_eq!(
                        keys::lookup(&effective, &dotted),
                        Some(value),
                        "{}: {dotted}",
                        profile.name
                    );
                }
                assert_eq!(
                    loaded
                        .origins
                        .get(&dotted)
                        .map(|origin| matches!(origin, Origin::Profile { .. } | Origin::Machine)),
                    Some(true),
                    "{}: {dotted}",
                    profile.name
                );
                checked += 1;
            }
        }
        assert!(checked >= 5, "{} sets only {checked} keys", profile.name);
        assert_eq!(profile::find(profile.name).as_ref(), Some(profile));
    }
    assert_eq!(profile::find("rpi9"), None);
    let tiny = load(None, &sets(&["profile=tiny-512m"]), &[], &pi4())?;
    assert_eq!(
        (
            tiny.node.shards,
            tiny.node.memory_budget_bytes,
            tiny.topic_defaults.write_buffer_bytes
        ),
        (1, 48 * MIB, 64 << 10)
    );
    Ok(())
}

#[test]
fn topic_settings_round_trip_through_toml_and_map_to_a_checked_log_config() -> TestResult {
    let settings = TopicSettings {
        segment_bytes_max: 16 * MIB,
        segment_age_ms_max: None,
        index_interval_bytes: 8192,
        batch_bytes_max: 512 << 10,
        fsync: FsyncSetting::IntervalMs,
        fsync_interval_ms: 250,
        timestamp_type: TimestampTypeSetting::LogAppendTime,
        retention_ms: Some(3_600_000),
        retention_bytes: None,
        direct_io: false,
        preallocate: true,
        write_buffer_bytes: 64 << 10,
        disk_full_policy: DiskFullPolicySetting::EvictOldest,
        eviction_priority: -3,
    };
    let text = toml::to_string(&settings)?;
    assert!(text.contains("fsync = \"interval-ms\""), "{text}");
    assert!(text.contains("retention_bytes = 0"), "{text}");
    let back: TopicSettings = toml::from_str(&text)?;
    assert_eq!(back, settings);
    let default_back: TopicSettings = toml::from_str(&toml::to_string(&TopicSettings::default())?)?;
    assert_eq!(default_back, TopicSettings::default());

    let log = settings.log_config();
    assert_eq!(log.check(), Ok(()));
    assert_eq!(log.fsync, FsyncPolicy::IntervalMs(250));
    assert_eq!(
        log.timestamp_type,
        rill_core::log::TimestampType::LogAppendTime
    );
    assert_eq!(
        (log.retention_ms, log.retention_bytes),
        (Some(3_600_000), None)
    );
    assert_eq!(log.write_buffer_bytes, 64 << 10);
    assert_eq!(settings.eviction().eviction_priority, -3);
    assert_eq!(
        TopicSettings::default().log_config(),
        rill_core::log::LogConfig::default()
    );

    let unknown = toml::from_str::<TopicSettings>("segment_bytes_maxx = 1");
    assert!(unknown.is_err(), "persisted settings deny unknown fields");
    Ok(())
}

#[test]
fn topic_overrides_apply_all_or_nothing_and_name_the_key() -> TestResult {
    let mut settings = TopicSettings::default();
    let overrides = [
        ("retention_ms".to_string(), "60000".to_string()),
        ("fsync".to_string(), "never".to_string()),
        ("retention_bytes".to_string(), "0".to_string()),
    ];
    settings.apply_overrides(&overrides)?;
    assert_eq!(settings.retention_ms, Some(60_000));
    assert_eq!(settings.fsync, FsyncSetting::Never);
    assert_eq!(settings.retention_bytes, None);

    let before = settings.clone();
    let bad = [
        ("segment_bytes_max".to_string(), "2048".to_string()),
        ("fsync".to_string(), "sometimes".to_string()),
    ];
    let error = settings.apply_overrides(&bad).expect_err("bad fsync");
    assert_eq!(
        error.to_string(),
        "topic setting `fsync=sometimes`: key `fsync`: unknown value `sometimes`; expected every-batch, interval-ms or never"
    );
    assert_eq!(settings, before, "nothing applied on error");

    let error = settings
        .apply_overrides(&[("retention.ms".to_string(), "1".to_string())])
        .expect_err("Kafka spelling");
    assert!(
        error.to_string().contains("did you mean `retention_ms`?"),
        "{error}"
    );
    let error = settings
        .apply_overrides(&[("segment_bytes_max".to_string(), "10".to_string())])
        .expect_err("core's check");
    assert_eq!(error.key.as_deref(), Some("segment_bytes_max"));
    assert!(error.message.contains("out of range"), "{error}");
    Ok(())
}

#[test]
fn the_effective_configuration_writes_out_and_loads_back_the_same() -> TestResult {
    let directory = tempfile::tempdir()?;
    let config = load(
        None,
        &sets(&["profile=rpi4-4g", "storage.disk_quota_bytes=0"]),
        &[],
        &pi4(),
    )?;
    let text = config.to_toml()?;
    let file = write_file(directory.path(), "effective.toml", &text)?;
    assert_eq!(check_file(&file)?, config, "{text}");
    Ok(())
}

#[test]
fn documented_keys_cover_exactly_the_configuration() -> TestResult {
    let documented: Vec<&str> = documented_keys().iter().map(|doc| doc.key).collect();
    let mut leaves = Vec::new();
    let defaults = toml::Table::try_from(Config::default())?;
    // Sections hold keys and sub-sections (`[mqtt.bridge]`).
    fn walk(table: &toml::Table, prefix: &str, leaves: &mut Vec<String>) {
        for (key, value) in table {
            let dotted = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value.as_table() {
                Some(inner) => walk(inner, &dotted, leaves),
                None => leaves.push(dotted),
            }
        }
    }
    walk(&defaults, "", &mut leaves);
    let mut sorted_documented = documented.clone();
    sorted_documented.sort_unstable();
    leaves.sort_unstable();
    assert_eq!(sorted_documented, leaves);
    let frame = documented_keys()
        .into_iter()
        .find(|doc| doc.key == "limits.frame_bytes_max")
        .ok_or("frame_bytes_max documented")?;
    assert_eq!(
        (frame.default.as_str(), frame.unit),
        ("4194304 (4 MiB)", "bytes")
    );
    Ok(())
}

/// The key table of docs/config.md, as the code documents the keys.
fn key_table() -> String {
    let mut table = String::from("| Key | Default | Unit | Meaning |\n|---|---|---|---|\n");
    for doc in documented_keys() {
        table.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            doc.key,
            doc.default.replace('|', "\\|"),
            doc.unit.replace('|', "\\|"),
            doc.meaning.replace('|', "\\|")
        ));
    }
    table
}

fn docs_text() -> std::io::Result<String> {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md"))
}

#[test]
fn docs_config_md_lists_every_key_with_its_default() -> TestResult {
    let docs = docs_text()?;
    let expected = key_table();
    assert!(
        docs.contains(&expected),
        "docs/config.md's key table is out of date; replace it with:\n\n{expected}"
    );
    for profile in builtin_profiles() {
        assert!(
            docs.contains(&format!("### `{}`", profile.name)),
            "docs/config.md has no section for profile {}",
            profile.name
        );
    }
    for doc in documented_keys() {
        assert!(
            docs.contains(&environment_variable(doc.key)) || doc.key.contains('.'),
            "{}",
            doc.key
        );
    }
    Ok(())
}

#[test]
fn the_example_in_docs_config_md_is_a_valid_file() -> TestResult {
    let docs = docs_text()?;
    let start = docs
        .find("```toml\n")
        .ok_or("docs/config.md has a ```toml example")?
        + "```toml\n".len();
    let length = docs[start..].find("```").ok_or("the example ends")?;
    let directory = tempfile::tempdir()?;
    let file = write_file(
        directory.path(),
        "example.toml",
        &docs[start..start + length],
    )?;
    let config = check_file(&file)?;
    assert_eq!(config.profile, "rpi4-4g");
    Ok(())
}

#[test]
fn kafka_sasl_settings_are_checked_at_load() -> TestResult {
    let unknown = load(
        None,
        &sets(&["kafka.sasl_mechanisms=PLAIN,GSSAPI"]),
        &[],
        &pi4(),
    )
    .expect_err("GSSAPI is not served");
    assert_eq!(unknown.key.as_deref(), Some("kafka.sasl_mechanisms"));
    assert!(
        unknown
            .to_string()
            .contains("\"GSSAPI\" is not a mechanism Rill serves")
    );

    let missing = load(
        None,
        &sets(&["kafka.sasl_users_file=/nonexistent/rill-users"]),
        &[],
        &pi4(),
    )
    .expect_err("the users file must be readable");
    assert_eq!(missing.key.as_deref(), Some("kafka.sasl_users_file"));

    let directory = tempfile::tempdir()?;
    let users = directory.path().join("users");
    std::fs::write(&users, "edge:not-a-hash\n")?;
    let malformed = load(
        None,
        &sets(&[&format!("kafka.sasl_users_file={}", users.display())]),
        &[],
        &pi4(),
    )
    .expect_err("a malformed users file");
    assert!(malformed.to_string().contains("line 1"), "{malformed}");

    let line = rill_edge_bridge::mqtt::auth::hash_password(b"pw", b"12345678", 4096);
    std::fs::write(&users, format!("edge:{line}\n"))?;
    let setting = format!("kafka.sasl_users_file={}", users.display());
    let empty = load(
        None,
        &sets(&[&setting, "kafka.sasl_mechanisms="]),
        &[],
        &pi4(),
    )
    .expect_err("no mechanism");
    assert_eq!(empty.key.as_deref(), Some("kafka.sasl_mechanisms"));
    let config = load(None, &sets(&[&setting]), &[], &pi4())?;
    assert_eq!(
        config.kafka.sasl_mechanism_list(),
        ["PLAIN", "SCRAM-SHA-256"]
    );
    Ok(())
}
