//! Child processes: orchestrators (`tasker serve`) and workers (`chaos-worker`), each in a slot
//! that can be killed with SIGKILL and restarted, with its output appended to a log file.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Orchestrator,
    Worker,
}

/// How to start one process.
#[derive(Clone, Debug)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A process that exited without being killed by the harness.
#[derive(Clone, Debug)]
pub struct UnexpectedExit {
    pub slot: String,
    pub pid: u32,
    pub status: String,
    pub at_s: f64,
}

pub struct Slot {
    pub name: String,
    pub kind: Kind,
    spec: Spec,
    log_path: PathBuf,
    child: Option<Child>,
    pub pid: Option<u32>,
    /// Starts so far (1 after the first start).
    pub incarnation: u32,
    /// Base URL of an orchestrator's HTTP API.
    pub http_url: Option<String>,
    /// Down on purpose (between a kill and its restart): the supervisor leaves it alone.
    pub held: bool,
    last_start: Option<Instant>,
}

impl Slot {
    pub fn new(
        name: String,
        kind: Kind,
        spec: Spec,
        log_dir: &Path,
        http_url: Option<String>,
    ) -> Self {
        let log_path = log_dir.join(format!("{name}.log"));
        Self {
            name,
            kind,
            spec,
            log_path,
            child: None,
            pid: None,
            incarnation: 0,
            http_url,
            held: false,
            last_start: None,
        }
    }

    async fn note(&self, line: &str) {
        if let Ok(mut f) = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .await
        {
            let _ = f
                .write_all(format!("=== chaos: {line} ===\n").as_bytes())
                .await;
        }
    }

    /// Starts the process (its output is appended to `<name>.log`).
    pub async fn start(&mut self, t0: Instant) -> Result<u32> {
        self.incarnation += 1;
        self.note(&format!(
            "start #{} at t={:.1}s",
            self.incarnation,
            t0.elapsed().as_secs_f64()
        ))
        .await;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.spec.program.display()))?;
        let pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.pid = Some(pid);
        self.held = false;
        self.last_start = Some(Instant::now());
        Ok(pid)
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap. Returns the pid it killed.
    pub async fn kill(&mut self, t0: Instant, why: &str) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = self.pid.take().unwrap_or(0);
        let _ = child.kill().await;
        self.note(&format!(
            "SIGKILL pid {pid} ({why}) at t={:.1}s",
            t0.elapsed().as_secs_f64()
        ))
        .await;
        Some(pid)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status if the process ended by itself.
    fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }
}

pub type SharedSlot = Arc<Mutex<Slot>>;

/// All slots, with a supervisor that restarts processes that exit on their own.
#[derive(Clone)]
pub struct Procs {
    pub orchestrators: Vec<SharedSlot>,
    pub workers: Vec<SharedSlot>,
    pub unexpected: Arc<std::sync::Mutex<Vec<UnexpectedExit>>>,
    pub t0: Instant,
}

impl Procs {
    pub fn all(&self) -> impl Iterator<Item = &SharedSlot> {
        self.orchestrators.iter().chain(self.workers.iter())
    }

    /// Every 500 ms: a process that exited without the harness killing it is recorded and
    /// restarted (at most once per 2 s per slot).
    pub async fn supervise(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            for slot in self.all() {
                let mut s = slot.lock().await;
                if s.held {
                    continue;
                }
                if let Some(status) = s.exited() {
                    let pid = s.pid.take().unwrap_or(0);
                    let e = UnexpectedExit {
                        slot: s.name.clone(),
                        pid,
                        status: status.to_string(),
                        at_s: self.t0.elapsed().as_secs_f64(),
                    };
                    eprintln!(
                        "[chaos] {} (pid {pid}) exited by itself: {status}; restarting",
                        s.name
                    );
                    s.note(&format!("exited by itself: {status}")).await;
                    self.unexpected.lock().expect("lock").push(e);
                }
                if !s.is_running() {
                    let recent = s
                        .last_start
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(2));
                    if !recent && let Err(e) = s.start(self.t0).await {
                        eprintln!("[chaos] cannot restart {}: {e:#}", s.name);
                    }
                }
            }
        }
    }

    /// Kills every process (end of the run).
    pub async fn kill_all(&self) {
        for slot in self.all() {
            let mut s = slot.lock().await;
            s.held = true;
            s.kill(self.t0, "end of run").await;
        }
    }
}

/// An orchestrator process: its slot name and incarnation.
type ProcessKey = (String, u32);
/// Counter name (without `tasker_`) to value.
type Counters = BTreeMap<String, u64>;

/// Counters scraped from `/metrics`, per orchestrator process (slot, incarnation): the last
/// value seen. Summing over processes gives the run's totals.
#[derive(Clone, Default)]
pub struct MetricsBook {
    inner: Arc<std::sync::Mutex<BTreeMap<ProcessKey, Counters>>>,
}

impl MetricsBook {
    fn record(&self, key: (String, u32), values: BTreeMap<String, u64>) {
        let mut book = self.inner.lock().expect("lock");
        let entry = book.entry(key).or_default();
        for (k, v) in values {
            let e = entry.entry(k).or_default();
            *e = (*e).max(v);
        }
    }

    /// Sum of each counter over every orchestrator process.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for values in self.inner.lock().expect("lock").values() {
            for (k, v) in values {
                *totals.entry(k.clone()).or_default() += v;
            }
        }
        totals
    }

    pub fn processes(&self) -> usize {
        self.inner.lock().expect("lock").len()
    }
}

/// Scrapes one orchestrator's `/metrics` into the book.
pub async fn scrape(http: &reqwest::Client, book: &MetricsBook, slot: &Slot) -> bool {
    let (Some(url), true) = (&slot.http_url, slot.is_running()) else {
        return false;
    };
    let res = http
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    let Ok(res) = res else { return false };
    let Ok(text) = res.text().await else {
        return false;
    };
    // Counters only, each summed over its labels (namespace, outcome).
    let values: BTreeMap<String, u64> = tasker_tests::counter_totals(&text)
        .into_iter()
        .filter_map(|(name, v)| Some((name.strip_prefix("tasker_")?.to_owned(), v as u64)))
        .collect();
    if values.is_empty() {
        return false;
    }
    book.record((slot.name.clone(), slot.incarnation), values);
    true
}

/// Scrapes every orchestrator each second until `stop`.
pub async fn scrape_loop(
    procs: Procs,
    http: reqwest::Client,
    book: MetricsBook,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        for slot in &procs.orchestrators {
            let s = slot.lock().await;
            scrape(&http, &book, &s).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Waits until an orchestrator answers `/ready` with 200.
pub async fn wait_ready(http: &reqwest::Client, url: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = http
            .get(format!("{url}/ready"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
