//! Hardware detection: the facts Rill reads about the machine (cores,
//! memory, architecture, board model, disks) and the deterministic rules that
//! pick a hardware profile from them, each pick explained in plain reasons so
//! `rill config` can show why a box got the settings it got.

use std::fs;
use std::path::Path;

use super::keys::readable_bytes;
use super::profile::{self, MatchHints};

/// What kind of storage a block device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// SD card or eMMC: slow syncs, wear from small writes.
    SdOrEmmc,
    Ssd,
    Rotational,
    Unknown,
}

/// One block device and why it was classed as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFact {
    /// Device name under /sys/block, e.g. `mmcblk0`, `nvme0n1`, `sda`.
    pub name: String,
    pub kind: DiskKind,
    pub why: String,
}

/// The facts detection works from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFacts {
    /// Cores this process may run on.
    pub cores: usize,
    /// Memory this process may use: the machine's, or a smaller cgroup limit.
    /// 0 when unknown.
    pub memory_bytes: u64,
    /// `std::env::consts::ARCH`: `x86_64`, `aarch64`, `arm`, ...
    pub arch: String,
    /// `/proc/device-tree/model`, e.g. `Raspberry Pi 4 Model B Rev 1.4`.
    pub device_tree_model: Option<String>,
    pub disks: Vec<DiskFact>,
}

impl MachineFacts {
    /// Reads this machine. Anything unreadable is left unknown rather than
    /// failing: detection then falls back to smaller, safer profiles.
    pub fn read() -> MachineFacts {
        let mut facts = Self::read_from(Path::new("/"));
        // available_parallelism honours CPU affinity and cgroup quotas, which
        // /proc/cpuinfo does not.
        if let Ok(cores) = std::thread::available_parallelism() {
            facts.cores = cores.get();
        }
        facts
    }

    /// Reads the facts from `/proc` and `/sys` under `root` (a test fixture,
    /// or `/`). Cores are counted from `proc/cpuinfo`.
    pub fn read_from(root: &Path) -> MachineFacts {
        let read = |relative: &str| fs::read_to_string(root.join(relative)).ok();
        let cores = read("proc/cpuinfo")
            .map(|text| {
                text.lines()
                    .filter(|line| line.starts_with("processor"))
                    .count()
            })
            .unwrap_or(0)
            .max(1);
        let machine_memory_bytes = read("proc/meminfo")
            .and_then(|text| mem_total_bytes(&text))
            .unwrap_or(0);
        // A container's limit is the memory Rill really has.
        let cgroup_limit_bytes = [
            "sys/fs/cgroup/memory.max",
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]
        .iter()
        .filter_map(|relative| read(relative)?.trim().parse::<u64>().ok())
        .min();
        let memory_bytes = match cgroup_limit_bytes {
            Some(limit) if machine_memory_bytes == 0 || limit < machine_memory_bytes => limit,
            _ => machine_memory_bytes,
        };
        let device_tree_model = fs::read(root.join("proc/device-tree/model"))
            .ok()
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_string()
            })
            .filter(|model| !model.is_empty());
        MachineFacts {
            cores,
            memory_bytes,
            arch: std::env::consts::ARCH.to_string(),
            device_tree_model,
            disks: read_disks(&root.join("sys/block")),
        }
    }
}

fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kibibytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kibibytes.checked_mul(1024)
}

fn read_disks(block: &Path) -> Vec<DiskFact> {
    let Ok(entries) = fs::read_dir(block) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !is_virtual_or_auxiliary(name))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let rotational = fs::read_to_string(block.join(&name).join("queue/rotational"))
                .ok()
                .map(|text| text.trim().to_string());
            classify_disk(name, rotational.as_deref())
        })
        .collect()
}

/// Devices that hold no data directory: loop, RAM and compressed-swap
/// devices, and an eMMC's boot and replay-protected areas.
fn is_virtual_or_auxiliary(name: &str) -> bool {
    ["loop", "ram", "zram"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || (name.starts_with("mmcblk") && (name.contains("boot") || name.contains("rpmb")))
}

fn classify_disk(name: String, rotational: Option<&str>) -> DiskFact {
    // The name goes first: SD/eMMC and NVMe drivers report rotational = 0,
    // which alone would class an SD card as an SSD.
    let (kind, why) = if name.starts_with("mmcblk") {
        (
            DiskKind::SdOrEmmc,
            "name mmcblk*: SD card or eMMC".to_string(),
        )
    } else if name.starts_with("nvme") {
        (DiskKind::Ssd, "name nvme*: NVMe SSD".to_string())
    } else {
        match rotational {
            Some("0") => (DiskKind::Ssd, "queue/rotational = 0".to_string()),
            Some("1") => (DiskKind::Rotational, "queue/rotational = 1".to_string()),
            Some(other) => (
                DiskKind::Unknown,
                format!("queue/rotational = {other:?}, not 0 or 1"),
            ),
            None => (DiskKind::Unknown, "queue/rotational unreadable".to_string()),
        }
    };
    DiskFact { name, kind, why }
}

/// The profile detection picked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub profile: String,
    pub reasons: Vec<String>,
}

/// `23.5 GiB`, `2 GiB`, `512 MiB`: GiB with one decimal from 1 GiB up (a
/// Pi's "3884 MiB" reads worse than "3.8 GiB"), exact sizes below.
fn memory_text(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        if bytes.is_multiple_of(GIB) {
            format!("{} GiB", bytes / GIB)
        } else {
            format!("{:.1} GiB", bytes as f64 / GIB as f64)
        }
    } else {
        readable_bytes(bytes).unwrap_or_else(|| format!("{bytes} bytes"))
    }
}

/// Picks a profile: the first built-in profile (in detection order: most
/// specific first) whose `[profile]` hints all hold, else a fallback by
/// memory and storage. Deterministic: the same facts always give the same
/// pick and reasons.
pub fn detect(facts: &MachineFacts) -> Detection {
    let mut reasons = vec![describe(facts)];
    for candidate in profile::builtin_profiles() {
        let Some(hints) = &candidate.hints else {
            reasons.push(format!(
                "not {}: its [profile] table does not parse",
                candidate.name
            ));
            continue;
        };
        match check_hints(hints, facts) {
            Ok(held) => {
                reasons.push(format!("{} → {}", held.join(" and "), candidate.name));
                return Detection {
                    profile: candidate.name.to_string(),
                    reasons,
                };
            }
            Err(failed) => reasons.push(format!("not {}: {failed}", candidate.name)),
        }
    }
    let (profile, reason) = fallback(facts);
    reasons.push(reason);
    Detection {
        profile: profile.to_string(),
        reasons,
    }
}

fn describe(facts: &MachineFacts) -> String {
    let memory = if facts.memory_bytes == 0 {
        "unknown memory".to_string()
    } else {
        format!("{} memory", memory_text(facts.memory_bytes))
    };
    let model = facts
        .device_tree_model
        .as_deref()
        .map(|model| format!("board \"{model}\""))
        .unwrap_or_else(|| "no device-tree model".to_string());
    let disks = if facts.disks.is_empty() {
        "no disks found".to_string()
    } else {
        let listed: Vec<String> = facts
            .disks
            .iter()
            .map(|disk| format!("{} {:?} ({})", disk.name, disk.kind, disk.why))
            .collect();
        format!("disks {}", listed.join(", "))
    };
    format!(
        "machine: {} cores, {memory}, arch {}, {model}, {disks}",
        facts.cores, facts.arch
    )
}

/// The hints that held, or the first that did not.
fn check_hints(hints: &MatchHints, facts: &MachineFacts) -> Result<Vec<String>, String> {
    let memory = memory_text(facts.memory_bytes);
    let mut held = Vec::new();
    if let Some(model_part) = &hints.device_tree_model_contains {
        match &facts.device_tree_model {
            Some(model) if model.to_lowercase().contains(&model_part.to_lowercase()) => {
                held.push(format!("board \"{model}\" contains \"{model_part}\""));
            }
            Some(model) => {
                return Err(format!(
                    "board \"{model}\" does not contain \"{model_part}\""
                ));
            }
            None => {
                return Err(format!(
                    "no device-tree model (needs one containing \"{model_part}\")"
                ));
            }
        }
    }
    if hints.arch != "any" {
        if facts.arch != hints.arch {
            return Err(format!("arch {} is not {}", facts.arch, hints.arch));
        }
        held.push(format!("arch {}", facts.arch));
    }
    if let Some(minimum) = hints.memory_bytes_min {
        if facts.memory_bytes < minimum {
            return Err(format!("memory {memory} < {}", memory_text(minimum)));
        }
        held.push(format!("memory {memory} >= {}", memory_text(minimum)));
    }
    if let Some(maximum) = hints.memory_bytes_max {
        // Maxima are written as "1 GiB - 1"; say "< 1 GiB" rather than a
        // rounded "<= 1.0 GiB".
        let bound = match maximum.checked_add(1).and_then(readable_bytes) {
            Some(exclusive) => format!("< {exclusive}"),
            None => format!("<= {}", memory_text(maximum)),
        };
        if facts.memory_bytes > maximum {
            return Err(format!("memory {memory} is not {bound}"));
        }
        held.push(format!("memory {memory} {bound}"));
    }
    if let Some(minimum) = hints.cores_min {
        if facts.cores < minimum {
            return Err(format!("{} cores < {minimum}", facts.cores));
        }
        held.push(format!("{} cores >= {minimum}", facts.cores));
    }
    if held.is_empty() {
        held.push("no hints to check".to_string());
    }
    Ok(held)
}

/// Machines no profile describes: the small profile when memory is short,
/// the SD-card-friendly one on SD/eMMC-only boxes, else no profile: the
/// built-in defaults are meant for an unknown, middling machine.
fn fallback(facts: &MachineFacts) -> (&'static str, String) {
    const SMALL_MEMORY_BYTES: u64 = 2 << 30;
    if facts.memory_bytes < SMALL_MEMORY_BYTES {
        return (
            "tiny-512m",
            format!(
                "no profile matched; memory {} < 2 GiB → tiny-512m, the smallest",
                memory_text(facts.memory_bytes)
            ),
        );
    }
    let sd_cards: Vec<&str> = facts
        .disks
        .iter()
        .filter(|disk| disk.kind == DiskKind::SdOrEmmc)
        .map(|disk| disk.name.as_str())
        .collect();
    let only_sd = !sd_cards.is_empty()
        && facts
            .disks
            .iter()
            .all(|disk| matches!(disk.kind, DiskKind::SdOrEmmc | DiskKind::Unknown));
    if only_sd {
        return (
            "rpi4-4g",
            format!(
                "no profile matched; storage is SD/eMMC only ({}) → rpi4-4g, which syncs on an interval",
                sd_cards.join(", ")
            ),
        );
    }
    (
        profile::NONE,
        "no profile matched; memory >= 2 GiB and not SD/eMMC-only storage → none: the built-in \
         defaults (one shard per core, 256 MiB budget, every-batch sync)"
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn disk(name: &str, kind: DiskKind) -> DiskFact {
        DiskFact {
            name: name.into(),
            kind,
            why: "test".into(),
        }
    }

    fn facts(cores: usize, memory_bytes: u64, arch: &str, model: Option<&str>) -> MachineFacts {
        MachineFacts {
            cores,
            memory_bytes,
            arch: arch.into(),
            device_tree_model: model.map(str::to_string),
            disks: Vec::new(),
        }
    }

    #[test]
    fn a_raspberry_pi_4_with_4_gib_and_an_sd_card_gets_rpi4() {
        let mut pi = facts(
            4,
            3_884 * 1024 * 1024, // MemTotal of a 4 GB Pi 4: the GPU keeps some
            "aarch64",
            Some("Raspberry Pi 4 Model B Rev 1.4"),
        );
        pi.disks.push(disk("mmcblk0", DiskKind::SdOrEmmc));
        let detection = detect(&pi);
        assert_eq!(detection.profile, "rpi4-4g", "{:#?}", detection.reasons);
        let last = detection.reasons.last().expect("a reason for the pick");
        assert!(
            last.contains("Raspberry Pi") && last.ends_with("→ rpi4-4g"),
            "{last}"
        );
        assert!(
            detection.reasons[0].contains("mmcblk0"),
            "{:?}",
            detection.reasons
        );
    }

    #[test]
    fn a_512_mib_box_gets_tiny_whatever_the_board() {
        for model in [
            Some("Raspberry Pi Zero 2 W Rev 1.0"),
            Some("Raspberry Pi 4 Model B"),
            None,
        ] {
            for arch in ["aarch64", "x86_64", "arm"] {
                let detection = detect(&facts(4, 512 << 20, arch, model));
                assert_eq!(detection.profile, "tiny-512m", "{:#?}", detection.reasons);
                let last = detection.reasons.last().expect("a reason");
                assert!(last.contains("memory 512 MiB < 1 GiB"), "{last}");
            }
        }
    }

    #[test]
    fn this_kind_of_x86_machine_gets_x86_gateway() {
        let mut machine = facts(2, 24_684_084 * 1024, "x86_64", None);
        machine.disks.push(disk("vda", DiskKind::Rotational));
        let detection = detect(&machine);
        assert_eq!(detection.profile, "x86-gateway", "{:#?}", detection.reasons);
        let last = detection.reasons.last().expect("a reason");
        assert_eq!(
            last,
            "arch x86_64 and memory 23.5 GiB >= 6 GiB → x86-gateway"
        );
    }

    #[test]
    fn a_jetson_orin_nano_gets_its_profile() {
        let jetson = facts(
            6,
            7_620 * 1024 * 1024,
            "aarch64",
            Some("NVIDIA Jetson Orin Nano Developer Kit"),
        );
        let detection = detect(&jetson);
        assert_eq!(
            detection.profile, "jetson-orin-nano",
            "{:#?}",
            detection.reasons
        );
        // An older 4-core Jetson does not get 6 shards.
        let old = facts(
            4,
            3_964 * 1024 * 1024,
            "aarch64",
            Some("NVIDIA Jetson Nano Developer Kit"),
        );
        assert_ne!(detect(&old).profile, "jetson-orin-nano");
    }

    #[test]
    fn a_raspberry_pi_5_with_8_gib_gets_rpi5_and_with_2_gib_rpi4() {
        let big = facts(
            4,
            8_052 * 1024 * 1024,
            "aarch64",
            Some("Raspberry Pi 5 Model B Rev 1.0"),
        );
        assert_eq!(detect(&big).profile, "rpi5-8g");
        let small = facts(
            4,
            2_010 * 1024 * 1024,
            "aarch64",
            Some("Raspberry Pi 5 Model B Rev 1.0"),
        );
        assert_eq!(detect(&small).profile, "rpi4-4g");
    }

    #[test]
    fn unknown_boards_fall_back_by_memory_and_storage() {
        let mut sd_board = facts(4, 4 * GIB, "aarch64", Some("Radxa ROCK 4"));
        sd_board.disks.push(disk("mmcblk1", DiskKind::SdOrEmmc));
        let detection = detect(&sd_board);
        assert_eq!(detection.profile, "rpi4-4g");
        assert!(
            detection
                .reasons
                .last()
                .is_some_and(|reason| reason.contains("SD/eMMC only (mmcblk1)")),
            "{:#?}",
            detection.reasons
        );
        let mut server = facts(64, 128 * GIB, "aarch64", None);
        server.disks.push(disk("nvme0n1", DiskKind::Ssd));
        assert_eq!(detect(&server).profile, profile::NONE);
        let small_x86_with_ssd = MachineFacts {
            disks: vec![disk("sda", DiskKind::Ssd)],
            ..facts(4, 4 * GIB, "x86_64", None)
        };
        assert_eq!(detect(&small_x86_with_ssd).profile, profile::NONE);
        let small_x86 = facts(2, 1536 << 20, "x86_64", None);
        assert_eq!(detect(&small_x86).profile, "tiny-512m");
        assert_eq!(detect(&facts(1, 0, "riscv64", None)).profile, "tiny-512m");
    }

    #[test]
    fn every_builtin_profile_can_be_detected_and_every_fallback_exists() {
        for profile in profile::builtin_profiles() {
            assert!(
                profile.hints.is_some(),
                "{}: {}",
                profile.name,
                profile.description
            );
        }
        for name in ["tiny-512m", "rpi4-4g"] {
            assert!(
                profile::find(name).is_some(),
                "fallback {name} is not built in"
            );
        }
    }

    #[test]
    fn reading_a_fake_machine_classifies_its_disks() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        let write = |relative: &str, text: &[u8]| -> std::io::Result<()> {
            let path = root.path().join(relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, text)
        };
        write("proc/cpuinfo", b"processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\n\nprocessor\t: 2\n\nprocessor\t: 3\n")?;
        write(
            "proc/meminfo",
            b"MemTotal:        3978148 kB\nMemFree:          100 kB\n",
        )?;
        write(
            "proc/device-tree/model",
            b"Raspberry Pi 4 Model B Rev 1.4\0",
        )?;
        write("sys/block/mmcblk0/queue/rotational", b"0\n")?;
        write("sys/block/mmcblk0boot0/queue/rotational", b"0\n")?;
        write("sys/block/sda/queue/rotational", b"1\n")?;
        write("sys/block/sdb/queue/rotational", b"0\n")?;
        write("sys/block/nvme0n1/queue/rotational", b"0\n")?;
        write("sys/block/loop0/queue/rotational", b"0\n")?;
        write("sys/block/zram0/queue/rotational", b"0\n")?;
        write("sys/block/ram0/queue/rotational", b"0\n")?;
        let facts = MachineFacts::read_from(root.path());
        assert_eq!(facts.cores, 4);
        assert_eq!(facts.memory_bytes, 3_978_148 * 1024);
        assert_eq!(
            facts.device_tree_model.as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        let kinds: Vec<(&str, DiskKind)> = facts
            .disks
            .iter()
            .map(|disk| (disk.name.as_str(), disk.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("mmcblk0", DiskKind::SdOrEmmc),
                ("nvme0n1", DiskKind::Ssd),
                ("sda", DiskKind::Rotational),
                ("sdb", DiskKind::Ssd),
            ]
        );
        // A container limit below the machine's memory is what counts.
        write("sys/fs/cgroup/memory.max", b"536870912\n")?;
        assert_eq!(MachineFacts::read_from(root.path()).memory_bytes, 512 << 20);
        write("sys/fs/cgroup/memory.max", b"max\n")?;
        assert_eq!(
            MachineFacts::read_from(root.path()).memory_bytes,
            3_978_148 * 1024
        );
        Ok(())
    }

    #[test]
    fn reading_this_machine_finds_at_least_one_core() {
        let facts = MachineFacts::read();
        assert!(facts.cores >= 1);
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(
            facts
                .disks
                .iter()
                .all(|disk| !disk.name.starts_with("loop"))
        );
    }
}
