//! What machine a run was on, and the OS counters figures are computed from.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

/// The machine, as BENCHMARKS.md reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub data_directory: String,
    pub filesystem: String,
    pub device: String,
    pub io_uring: String,
}

fn first_line_with(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.split_once(':'))
        .map(|(_, value)| value.trim().to_string())
}

impl Machine {
    pub fn describe(data_directory: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = first_line_with(&meminfo, "MemTotal")
            .and_then(|value| {
                value
                    .split_whitespace()
                    .next()
                    .and_then(|kib| kib.parse().ok())
            })
            .unwrap_or(0.0);
        let (filesystem, device) =
            mount_of(data_directory).unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        Self {
            cpu_model: first_line_with(&cpuinfo, "model name")
                .or_else(|| first_line_with(&cpuinfo, "CPU part"))
                .unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|release| release.trim().to_string())
                .unwrap_or_default(),
            data_directory: data_directory.display().to_string(),
            filesystem,
            device,
            io_uring: rill_node::io::io_uring_unavailable_reason()
                .unwrap_or_else(|| "available".into()),
        }
    }
}

/// Filesystem type and source device of the mount holding `path`.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let mount_point = fields.next()?;
            let filesystem = fields.next()?;
            path.starts_with(mount_point).then(|| {
                (
                    mount_point.len(),
                    filesystem.to_string(),
                    device.to_string(),
                )
            })
        })
        .max_by_key(|(length, _, _)| *length)
        .map(|(_, filesystem, device)| (filesystem, device))
}

/// Bytes this process has caused to be sent to the block layer (`/proc/self/io`).
pub fn process_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|text| first_line_with(&text, "write_bytes"))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds every process on the machine has used since boot, summed
/// over cores (`/proc/stat`): with this process's and the broker's taken
/// away, what the rest of a shared machine took during a measurement.
pub fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal ...
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|value| value.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&index| ticks.get(index))
        .sum();
    // SAFETY: sysconf with a valid name.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / ticks_per_second
}

/// The device's sectors-written counter, to count what really reached it.
pub struct DiskCounters {
    stat_path: String,
    sectors_before: u64,
}

fn sectors_written(stat_path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    text.split_whitespace().nth(6)?.parse().ok()
}

impl DiskCounters {
    pub fn for_path(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let device = metadata.dev();
        let stat_path = format!(
            "/sys/dev/block/{}:{}/stat",
            libc::major(device),
            libc::minor(device)
        );
        let sectors_before = sectors_written(&stat_path)?;
        Some(Self {
            stat_path,
            sectors_before,
        })
    }

    /// Bytes the device wrote since this was created (all processes).
    pub fn written_bytes_since(&self) -> Option<u64> {
        sectors_written(&self.stat_path)
            .map(|sectors| sectors.saturating_sub(self.sectors_before) * 512)
    }
}

/// Syncs and drops the page cache so reads come from the disk. Needs root;
/// returns whether it happened.
pub fn drop_page_cache() -> bool {
    // SAFETY: sync() has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok()
}
