//! Shared pieces of the commands' output: aligned tables, byte sizes and
//! durations written the way people read them.

use std::time::Duration;

/// How a table column lines up: text to the left, numbers to the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// An aligned table with a header row; columns are two spaces apart and
/// lines carry no trailing spaces.
pub(crate) fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|(name, _)| name.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    let mut text = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, ((_, align), cell)) in columns.iter().zip(row).enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            let padding = widths[index].saturating_sub(cell.chars().count());
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', padding));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', padding));
                    line.push_str(cell);
                }
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `1536` -> `1.5 KiB`; exact below one KiB.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `3725 s` -> `1h 2m 5s`; days when there are any.
pub fn format_duration(duration: Duration) -> String {
    let total_seconds = duration.as_secs();
    let (days, hours) = (total_seconds / 86_400, total_seconds / 3_600 % 24);
    let (minutes, seconds) = (total_seconds / 60 % 60, total_seconds % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m {seconds}s"),
        _ => format!("{days}d {hours}h {minutes}m {seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let text = table(
            &[("NAME", Align::Left), ("COUNT", Align::Right)],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "12345".into()],
            ],
        );
        assert_eq!(text, "NAME    COUNT\na           1\nlonger  12345\n");
    }

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_secs(3_725)), "1h 2m 5s");
        assert_eq!(format_duration(Duration::from_secs(90_061)), "1d 1h 1m 1s");
    }
}
