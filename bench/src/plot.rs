//! A picture of a run: every figure that has a limit drawn as a bar of its
//! ratio to that limit, with the target (when it is a ratio) as a mark, and
//! the other figures listed beside their values. Plain SVG, no dependency, so
//! a reader looks at one image instead of reading the table.

use std::fmt::Write;

use crate::report::Row;

const WIDTH: f64 = 1100.0;
const LABEL_WIDTH: f64 = 560.0;
const BAR_HEIGHT: f64 = 22.0;
const ROW_HEIGHT: f64 = 30.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A target such as `>= 70%` as a ratio (0.7), when it is one.
fn target_ratio(target: &str) -> Option<f64> {
    let number = target
        .trim_start_matches(['>', '<', '=', ' '])
        .strip_suffix('%')?;
    number
        .trim()
        .parse::<f64>()
        .ok()
        .map(|percent| percent / 100.0)
}

/// Renders the rows of one run as an SVG document.
pub fn svg(title: &str, rows: &[Row]) -> String {
    let ratio_rows: Vec<&Row> = rows.iter().filter(|row| row.ratio.is_some()).collect();
    let other_rows: Vec<&Row> = rows.iter().filter(|row| row.ratio.is_none()).collect();
    let scale_max = ratio_rows
        .iter()
        .filter_map(|row| row.ratio)
        .fold(1.0f64, f64::max)
        .min(3.0);
    let bar_space = WIDTH - LABEL_WIDTH - 80.0;
    let height = 70.0 + ROW_HEIGHT * (ratio_rows.len() + other_rows.len() + 2) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="44" fill="#555">Bars: each figure as a share of its limit measured in the same run; black marks: targets.</text>"##
    );
    let mut y = 60.0;
    for row in &ratio_rows {
        let ratio = row.ratio.unwrap_or(0.0);
        let met = row.target.as_deref().and_then(target_ratio).map(|target| {
            if row
                .target
                .as_deref()
                .is_some_and(|text| text.starts_with('<'))
            {
                ratio <= target
            } else {
                ratio >= target
            }
        });
        let colour = match met {
            Some(true) => "#3a8f3a",
            Some(false) => "#c0392b",
            None => "#4a78b5",
        };
        let label = format!("{} ({})", row.scenario, row.driver);
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}" >{}</text>"#,
            y + BAR_HEIGHT * 0.7,
            escape(&label.chars().take(90).collect::<String>())
        );
        let bar = bar_space * (ratio.min(scale_max) / scale_max);
        let _ = writeln!(
            out,
            r#"<rect x="{LABEL_WIDTH}" y="{y}" width="{bar:.1}" height="{BAR_HEIGHT}" fill="{colour}"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}">{:.0}%</text>"#,
            LABEL_WIDTH + bar + 4.0,
            y + BAR_HEIGHT * 0.7,
            ratio * 100.0
        );
        if let Some(target) = row.target.as_deref().and_then(target_ratio) {
            let x = LABEL_WIDTH + bar_space * (target.min(scale_max) / scale_max);
            let _ = writeln!(
                out,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="black" stroke-width="2"/>"#,
                y - 3.0,
                y + BAR_HEIGHT + 3.0
            );
        }
        y += ROW_HEIGHT;
    }
    y += 10.0;
    for row in &other_rows {
        let value = match row.unit.as_str() {
            "us" => format!("{:.0} µs", row.value),
            "msg/s" => format!("{:.0} msg/s", row.value),
            unit => format!("{:.3} {unit}", row.value),
        };
        let target = row
            .target
            .as_deref()
            .map(|target| format!("  (target {target})"))
            .unwrap_or_default();
        let line = format!("{} ({}): {value}{target}", row.scenario, row.driver);
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}">{}</text>"#,
            y + 14.0,
            escape(&line)
        );
        y += ROW_HEIGHT * 0.8;
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_show_ratios_and_targets() {
        let rows = vec![
            Row::new("append", "io-uring", 1.9, "GiB/s")
                .against("direct write", 2.0)
                .target(">= 70%"),
            Row::new("consume", "broker", 0.5, "GiB/s")
                .against("loopback", 4.0)
                .target(">= 70%"),
            Row::new("recovery", "io-uring", 0.8, "s").target("<= 2 s"),
        ];
        let picture = svg("storage <run>", &rows);
        assert!(picture.starts_with("<svg"));
        assert!(picture.contains("storage &lt;run&gt;"));
        assert!(picture.contains(">95%<"), "{picture}");
        assert!(
            picture.contains("#3a8f3a") && picture.contains("#c0392b"),
            "met and missed targets are coloured"
        );
        assert!(picture.contains("recovery (io-uring): 0.800 s  (target &lt;= 2 s)"));
        assert_eq!(target_ratio(">= 70%"), Some(0.7));
        assert_eq!(target_ratio("<= 2 s"), None);
    }
}
