//! What `/metrics` shows, in the Prometheus text format: counters, gauges and histograms,
//! recorded with the `metrics` crate into a recorder of this orchestrator's own
//! (`metrics-exporter-prometheus`, never installed globally: several orchestrators in one process
//! — tests, embedding — keep their figures apart). Labels are bounded: namespaces, templates,
//! queues, outcomes and states, never task or step ids.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// Histogram buckets (seconds): 1 ms to 10 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];
/// Buckets of `tasker_apply_batch_size`.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Counters without labels, as handles (cheap to bump from any task).
        pub struct Counters {
            $(pub $name: Counter,)*
        }

        impl Counters {
            fn register(r: &PrometheusRecorder) -> Self {
                $(
                    r.describe_counter(
                        KeyName::from(concat!("tasker_", stringify!($name))),
                        None,
                        $help.into(),
                    );
                )*
                Self {
                    $($name: r.register_counter(
                        &Key::from_static_name(concat!("tasker_", stringify!($name))),
                        &META,
                    ),)*
                }
            }
        }
    };
}

counters! {
    steps_dispatched_total: "Step attempts admitted and published.",
    results_stale_total: "Outcomes dropped as stale or duplicate.",
    results_applied_twice_total: "Outcomes refused by the attempts primary key (must stay 0).",
    retries_scheduled_total: "Attempts that failed and were scheduled again.",
    timeouts_total: "Attempts whose lease expired.",
    dead_lettered_total: "Messages sent to the dead-letter exchange.",
    outbox_relayed_total: "Outbox entries republished by the relay.",
    batch_splits_total: "Result batches split to isolate a bad message.",
    db_retries_total: "Transactions retried after a transient database error.",
    tasks_pruned_total: "Finished tasks deleted after their retention period.",
    reconciler_repairs_total: "Live tasks the reconciler found without a live owner and repaired.",
}

/// Labelled metrics: name and help. Counters end in `_total`; histograms measure seconds unless
/// named otherwise.
const DESCRIBED: &[(&str, &str)] = &[
    (
        "tasker_tasks_submitted_total",
        "Tasks created, per namespace.",
    ),
    (
        "tasker_tasks_completed_total",
        "Tasks that completed, per namespace.",
    ),
    (
        "tasker_tasks_failed_total",
        "Tasks that failed, per namespace.",
    ),
    (
        "tasker_tasks_cancelled_total",
        "Tasks that were cancelled, per namespace.",
    ),
    (
        "tasker_results_applied_total",
        "Attempt outcomes applied, per namespace and outcome.",
    ),
    (
        "tasker_queue_ready_steps",
        "Steps ready to run and waiting in PostgreSQL for room in their queue.",
    ),
    (
        "tasker_queue_in_flight_steps",
        "Steps dispatched to their queue and not finished.",
    ),
    (
        "tasker_queue_oldest_ready_age_seconds",
        "How long the oldest ready step of the queue has waited for room.",
    ),
    (
        "tasker_steps_retrying",
        "Steps waiting for the backoff of their next attempt.",
    ),
    (
        "tasker_dead_letters",
        "Messages waiting in a dead-letter queue.",
    ),
    ("tasker_tasks_running", "Live tasks (pending or running)."),
    (
        "tasker_workers_live",
        "Workers that announced themselves within 3 of their intervals, per queue they consume.",
    ),
    (
        "tasker_ready",
        "1 while this replica reaches its database and its broker link is up, else 0.",
    ),
    (
        "tasker_step_queue_wait_seconds",
        "Admitted to started: the attempt's time in the broker and in the worker's prefetch.",
    ),
    (
        "tasker_step_execution_seconds",
        "Started to result: the handler's run time as the worker reported it.",
    ),
    (
        "tasker_step_end_to_end_seconds",
        "Admitted to result applied.",
    ),
    (
        "tasker_task_duration_seconds",
        "Created to finished, per template and final state.",
    ),
    (
        "tasker_apply_batch_seconds",
        "One result batch applied: its transaction, commit included.",
    ),
    ("tasker_apply_batch_size", "Results in one applied batch."),
    (
        "tasker_publish_confirm_seconds",
        "A step message's publish until the broker confirmed it.",
    ),
];

/// Every metric of one orchestrator.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub counters: Counters,
    /// The label sets each gauge family was last set for: a set that is gone reads 0.
    gauge_sets: Mutex<HashMap<&'static str, Vec<Vec<Label>>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "tasker_apply_batch_size".to_owned(),
                    ),
                    SIZE_BUCKETS,
                )
            })
            .expect("static, non-empty buckets")
            .build_recorder();
        for (name, help) in DESCRIBED {
            let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
            recorder.describe_gauge(KeyName::from(*name), unit, (*help).into());
        }
        let counters = Counters::register(&recorder);
        Self {
            handle: recorder.handle(),
            recorder,
            counters,
            gauge_sets: Mutex::default(),
        }
    }

    /// Adds `n` to a counter without labels.
    pub fn add(counter: &Counter, n: usize) {
        counter.increment(n as u64);
    }

    /// A counter of a labelled family.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// A histogram of a labelled family.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &META)
    }

    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], d: Duration) {
        self.histogram(name, labels).record(d.as_secs_f64());
    }

    /// Sets a gauge family to `values` (label values in the order of `label_names`): the label
    /// sets it had before and lacks now are set to 0.
    pub fn set_gauges(
        &self,
        name: &'static str,
        label_names: &[&'static str],
        values: &[(Vec<String>, f64)],
    ) {
        let mut sets = self.gauge_sets.lock().unwrap_or_else(|p| p.into_inner());
        let now: Vec<Vec<Label>> = values
            .iter()
            .map(|(vals, _)| {
                label_names
                    .iter()
                    .zip(vals)
                    .map(|(k, v)| Label::new(*k, v.clone()))
                    .collect()
            })
            .collect();
        for old in sets.get(name).into_iter().flatten() {
            if !now.contains(old) {
                self.gauge(name, old.clone()).set(0.0);
            }
        }
        for (labels, (_, v)) in now.iter().zip(values) {
            self.gauge(name, labels.clone()).set(*v);
        }
        sets.insert(name, now);
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &META)
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains the histograms' pending samples; call now and then (the gauge timer does).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The sum of every sample of `name` (all label sets), as `/metrics` shows it; 0 when it
    /// has none. For tests and tools.
    pub fn value(&self, name: &str) -> f64 {
        sum_of(&self.render(), name)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, (*v).to_owned()))
            .collect::<Vec<_>>(),
    )
}

/// The sum of the samples of metric `name` in a Prometheus text exposition (every label set).
pub fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                ' ' => rest.trim(),
                '{' => rest.rsplit_once('}')?.1.trim(),
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::new();
        Metrics::add(&m.counters.results_stale_total, 3);
        m.counter("tasker_tasks_submitted_total", &[("namespace", "shop")])
            .increment(2);
        m.observe(
            "tasker_step_execution_seconds",
            &[("namespace", "shop")],
            Duration::from_millis(20),
        );
        m.set_gauges(
            "tasker_queue_ready_steps",
            &["namespace", "queue"],
            &[(vec!["shop".into(), "default".into()], 7.0)],
        );
        let text = m.render();
        assert!(text.contains("tasker_results_stale_total 3\n"), "{text}");
        assert!(
            text.contains("tasker_tasks_submitted_total{namespace=\"shop\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tasker_step_execution_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "tasker_step_execution_seconds_bucket{namespace=\"shop\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert_eq!(sum_of(&text, "tasker_queue_ready_steps"), 7.0);
        assert_eq!(m.value("tasker_results_stale_total"), 3.0);
        // A label set that is gone reads 0.
        m.set_gauges("tasker_queue_ready_steps", &["namespace", "queue"], &[]);
        assert_eq!(m.value("tasker_queue_ready_steps"), 0.0);
    }

    #[test]
    fn sums_every_label_set_and_ignores_longer_names() {
        let text =
            "# HELP x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\nx_total_more 9\nx_total 1\n";
        assert_eq!(sum_of(text, "x_total"), 6.5);
    }
}
