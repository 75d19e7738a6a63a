//! Figures, their limits and ratios: the table people read and the JSON
//! machines read.

use std::time::Duration;

use serde::Serialize;

/// A latency distribution summary.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_samples(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let micros = |duration: Duration| duration.as_secs_f64() * 1e6;
        let at = |quantile: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
            micros(samples[index])
        };
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(|sample| micros(*sample)).sum::<f64>() / samples.len() as f64
        };
        Self {
            samples: samples.len(),
            mean_us: mean,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: samples.last().map_or(0.0, |sample| micros(*sample)),
        }
    }
}

/// One row of results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub driver: String,
    pub value: f64,
    pub unit: String,
    /// What the value is compared with, and the ratio.
    pub limit_name: Option<String>,
    pub limit_value: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Option<String>,
    pub note: String,
}

impl Row {
    pub fn new(scenario: &str, driver: &str, value: f64, unit: &str) -> Self {
        Self {
            scenario: scenario.into(),
            driver: driver.into(),
            value,
            unit: unit.into(),
            limit_name: None,
            limit_value: None,
            ratio: None,
            target: None,
            note: String::new(),
        }
    }

    pub fn against(mut self, limit_name: &str, limit_value: f64) -> Self {
        self.limit_name = Some(limit_name.into());
        self.limit_value = Some(limit_value);
        self.ratio = (limit_value > 0.0).then(|| self.value / limit_value);
        self
    }

    pub fn target(mut self, target: &str) -> Self {
        self.target = Some(target.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

pub fn gib_per_second(bytes_per_second: f64) -> f64 {
    bytes_per_second / (1024.0 * 1024.0 * 1024.0)
}

/// Prints rows as a Markdown table (pasteable into BENCHMARKS.md).
pub fn print_table(rows: &[Row]) {
    println!("| scenario | driver | value | limit | ratio | target | note |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let limit = match (&row.limit_name, row.limit_value) {
            (Some(name), Some(value)) => format!("{name} {}", format_value(value, &row.unit)),
            _ => String::new(),
        };
        let ratio = row
            .ratio
            .map_or(String::new(), |ratio| format!("{:.0}%", ratio * 100.0));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.driver,
            format_value(row.value, &row.unit),
            limit,
            ratio,
            row.target.as_deref().unwrap_or(""),
            row.note
        );
    }
}

fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "GiB/s" => format!("{value:.3} GiB/s"),
        "s" => format!("{value:.3} s"),
        "us" => format!("{value:.0} µs"),
        "msg/s" => format!("{value:.0} msg/s"),
        "x" => format!("{value:.3}"),
        other => format!("{value:.3} {other}"),
    }
}
