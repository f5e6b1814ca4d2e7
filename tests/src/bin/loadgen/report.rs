//! One result line per workload, percentiles, and the table / JSON output.

use serde::Serialize;
use std::time::Duration;

/// One workload's figures. `steps_per_s` holds the rate of what the row counts (`rate_unit`):
/// steps for the task workloads, messages, commits or requests for `floor` and `submit`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub workload: String,
    pub tasks: u64,
    pub steps: u64,
    pub wall_s: f64,
    pub steps_per_s: Option<f64>,
    pub rate_unit: &'static str,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Largest resident size of the orchestrator sampled during this workload.
    pub orchestrator_rss_mb: Option<f64>,
    pub orchestrator_cpu_s: Option<f64>,
    pub postgres_cpu_s: Option<f64>,
    pub rabbitmq_cpu_s: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    pub target: String,
    pub target_met: Option<bool>,
    pub note: String,
    /// `prune`: the tables' row counts over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<crate::workloads::TableRows>>,
    /// `console-*`: the finished tasks seeded before the pages were requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_seeded: Option<u64>,
}

impl Row {
    pub fn new(workload: impl Into<String>, rate_unit: &'static str) -> Self {
        Self {
            workload: workload.into(),
            rate_unit,
            ..Self::default()
        }
    }

    pub fn latencies(mut self, samples: &[Duration]) -> Self {
        if let Some(p) = Percentiles::of(samples) {
            self.p50_ms = Some(p.p50);
            self.p90_ms = Some(p.p90);
            self.p95_ms = Some(p.p95);
            self.p99_ms = Some(p.p99);
            self.max_ms = Some(p.max);
        }
        self
    }

    pub fn note(&mut self, text: impl AsRef<str>) {
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(text.as_ref());
    }

    pub fn target(&mut self, target: impl Into<String>, met: bool) {
        self.target = target.into();
        self.target_met = Some(met);
    }
}

/// Latency percentiles in milliseconds, nearest rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Self {
            p50: nearest_rank(&ms, 50.0),
            p90: nearest_rank(&ms, 90.0),
            p95: nearest_rank(&ms, 95.0),
            p99: nearest_rank(&ms, 99.0),
            max: ms[ms.len() - 1],
        })
    }
}

/// The smallest sample with at least `p`% of the samples at or below it.
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn rate(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// The readable table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "workload", "tasks", "steps", "wall_s", "rate", "unit", "p50", "p90", "p95", "p99",
        "max(ms)", "rss_mb", "cpu_s", "pg_cpu", "mq_cpu", "lg_cpu", "target", "note",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for r in rows {
        let target = match r.target_met {
            Some(true) => format!("ok {}", r.target),
            Some(false) => format!("MISSED {}", r.target),
            None => r.target.clone(),
        };
        cells.push(vec![
            r.workload.clone(),
            r.tasks.to_string(),
            r.steps.to_string(),
            format!("{:.2}", r.wall_s),
            rate(r.steps_per_s),
            r.rate_unit.to_owned(),
            num(r.p50_ms, 2),
            num(r.p90_ms, 2),
            num(r.p95_ms, 2),
            num(r.p99_ms, 2),
            num(r.max_ms, 2),
            num(r.orchestrator_rss_mb, 1),
            num(r.orchestrator_cpu_s, 2),
            num(r.postgres_cpu_s, 2),
            num(r.rabbitmq_cpu_s, 2),
            num(r.loadgen_cpu_s, 2),
            target,
            r.note.clone(),
        ]);
    }
    let columns = header.len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in cells.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == columns - 1 {
                line.push_str(cell);
            } else if c == 0 || c == 5 || c == 16 {
                line.push_str(&format!("{cell:<w$} | ", w = widths[c]));
            } else {
                line.push_str(&format!("{cell:>w$} | ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 3 * (columns - 1)));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!(
            (p.p50, p.p90, p.p95, p.p99, p.max),
            (50.0, 90.0, 95.0, 99.0, 100.0)
        );
        let one = Percentiles::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Percentiles::of(&[]).is_none());
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }

    #[test]
    fn table_has_every_row() {
        let mut r = Row::new("linear", "steps/s").latencies(&[Duration::from_millis(3)]);
        r.target("p50<=5ms", true);
        let t = table(&[r]);
        assert!(
            t.contains("linear") && t.contains("ok p50<=5ms") && t.contains("3.00"),
            "{t}"
        );
    }
}
