//! `browser`: the console's real-browser suite. It starts a real orchestrator (`tasker serve`, a
//! child process with API keys configured, on a database and queue prefix of its own), a Rust
//! worker in-process, and Debian's `chromium` driven through `chromedriver` (WebDriver, headless,
//! `--no-sandbox`), then uses the console under `/ui` as an operator would:
//!
//! - `sign_in`: a wrong key is refused, the admin key signs in and lands on the task list;
//! - `task_dag`: a finished task's page shows its DAG (an SVG node per step, coloured by state);
//! - `live_step`: a step that waits on a gate the suite holds turns green on an open page once the
//!   gate is released, without a reload (a marker set in the page survives);
//! - `filter_list`: the task list filtered by state, by template and by a context field;
//! - `cancel`: cancelling a running task from its page (with the confirmation) cancels it;
//! - `retry_step`: a failed step retried from the page runs again and the task completes;
//! - `replay_dead_letter`: a dead-lettered task request replayed from the dead-letter page
//!   becomes a task;
//! - `pages`: the queues (with a step in flight), workers and templates pages, and a template's
//!   DAG;
//! - `read_key`: a `read` key sees tasks and dead letters but no action (and cannot open one).
//!
//! The driver is `fantoccini` (WebDriver over plain HTTP on loopback) with Debian's
//! `chromium-driver`: far lighter to build than a DevTools client (`chromiumoxide` generates the
//! whole protocol), and the WebDriver calls the suite needs (find, click, type, run a script,
//! screenshot, cookies) are all there.
//!
//! A screenshot of each page is written under `target/console-screenshots/` (and one of the
//! page where a test failed). It prints one JSON line on stdout: `{"config": "browser",
//! "browser_tests": N, "passed": N, "failed": 0, "skipped": 0}`, and exits non-zero when a test
//! failed. A missing `chromium` or `chromedriver` fails the run (`deploy/local/browser.sh`
//! installs them): it never skips.
//!
//! ```text
//! bash deploy/local/browser.sh   # apt-get install chromium chromium-driver, when missing
//! . .tasker/env                  # TASKER_TEST_DATABASE_URL (admin URL) and TASKER_TEST_AMQP_URL
//! cargo build -p tasker-orchestrator -p tasker-tests --bins
//! target/debug/browser                       # what CI runs (about a minute)
//! target/debug/browser --only live_step      # one test
//! ```

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use fantoccini::elements::Element;
use fantoccini::{Client as WebDriver, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tasker_schemas::{TaskId, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

#[derive(Parser, Debug)]
#[command(name = "browser", about = "The console's real-browser suite")]
struct Args {
    /// The `tasker` binary (default: next to this executable).
    #[arg(long)]
    tasker_bin: Option<PathBuf>,
    /// The Chromium binary (default: `chromium` on the PATH).
    #[arg(long, env = "TASKER_CHROMIUM")]
    chromium: Option<PathBuf>,
    /// The ChromeDriver binary (default: `chromedriver` on the PATH).
    #[arg(long, env = "TASKER_CHROMEDRIVER")]
    chromedriver: Option<PathBuf>,
    /// Where screenshots go (default: `target/console-screenshots` of the workspace).
    #[arg(long)]
    screenshots: Option<PathBuf>,
    /// Run only these tests (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// How long one wait for the page may take, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    wait_ms: u64,
}

/// The bootstrap admin key the orchestrator is started with (`TASKER_API_KEYS`).
const ADMIN_KEY: &str = "browser-suite-admin-key-0123456789";
/// A `read` key the suite stores (by its SHA-256, as the orchestrator does).
const READ_KEY: &str = "browser-suite-read-key-0123456789";

const NAMESPACE: &str = "console";
const QUEUE: &str = "console_browser";
/// The suite's worker's name (the workers page lists it).
const WORKER: &str = "browser-suite-worker";

/// `fetch → gate → publish`: `gate` waits until the suite releases the task's gate.
const GATED: &str = "namespace: console\nname: gated\nversion: 1\nsteps:\n  - { name: fetch, handler: work, queue: console_browser }\n  - { name: gate, handler: gate, queue: console_browser, depends_on: [fetch] }\n  - { name: publish, handler: work, queue: console_browser, depends_on: [gate] }\n";
/// A diamond of fast steps, for the DAG picture and the list.
const DIAMOND: &str = "namespace: console\nname: diamond\nversion: 1\nsteps:\n  - { name: a, handler: work, queue: console_browser }\n  - { name: b, handler: work, queue: console_browser, depends_on: [a] }\n  - { name: c, handler: work, queue: console_browser, depends_on: [a] }\n  - { name: d, handler: work, queue: console_browser, depends_on: [b, c] }\n";
/// `load → flaky`: `flaky` fails (no retry) until the suite fixes it.
const FLAKY: &str = "namespace: console\nname: flaky\nversion: 1\nsteps:\n  - { name: load, handler: work, queue: console_browser }\n  - { name: flaky, handler: flaky, queue: console_browser, depends_on: [load], retry: { max_attempts: 1 } }\n";

/// What the worker's handlers share with the suite.
#[derive(Default)]
struct Gates {
    /// Gates (the task context's `gate`) the suite released.
    released: Mutex<HashSet<String>>,
    /// `flaky` succeeds once this is set.
    fixed: std::sync::atomic::AtomicBool,
    /// Everything is released: the suite is ending.
    all: std::sync::atomic::AtomicBool,
}

impl Gates {
    fn release(&self, gate: &str) {
        self.released
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(gate.to_owned());
    }

    fn is_open(&self, gate: &str) -> bool {
        self.all.load(std::sync::atomic::Ordering::SeqCst)
            || self
                .released
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(gate)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    tasker_tests::tasker_worker::client::tls::install_crypto_provider();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[browser] FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One test's outcome.
struct Outcome {
    name: &'static str,
    error: Option<String>,
    elapsed: Duration,
}

async fn run(args: Args) -> Result<bool> {
    let t0 = Instant::now();
    // A missing browser fails the run, before anything else starts.
    let chromium = find_program(args.chromium.as_deref(), &["chromium", "chromium-browser"])
        .context("no chromium: run deploy/local/browser.sh (apt-get install chromium)")?;
    let chromedriver = find_program(args.chromedriver.as_deref(), &["chromedriver"]).context(
        "no chromedriver: run deploy/local/browser.sh (apt-get install chromium-driver)",
    )?;
    let tasker = tasker_tests::find_tasker(args.tasker_bin.as_deref())?;
    let shots = args.screenshots.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
    });
    std::fs::create_dir_all(&shots)
        .with_context(|| format!("cannot create {}", shots.display()))?;
    let shots = shots.canonicalize()?;
    // Screenshots of failures from an earlier run would mislead.
    for entry in std::fs::read_dir(&shots)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("failed-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    let h = Harness::start().await?;
    let outcome = suite(&args, &h, &chromium, &chromedriver, &tasker, &shots).await;
    h.finish().await;
    let outcomes = outcome?;
    let passed = outcomes.iter().filter(|o| o.error.is_none()).count();
    let failed = outcomes.len() - passed;
    for o in &outcomes {
        match &o.error {
            None => eprintln!(
                "[browser] ok   {} ({:.1} s)",
                o.name,
                o.elapsed.as_secs_f64()
            ),
            Some(e) => eprintln!(
                "[browser] FAIL {} ({:.1} s): {e}",
                o.name,
                o.elapsed.as_secs_f64()
            ),
        }
    }
    eprintln!(
        "[browser] {passed} passed, {failed} failed in {:.0} s; screenshots in {}",
        t0.elapsed().as_secs_f64(),
        shots.display()
    );
    println!(
        "{}",
        json!({
            "config": "browser",
            "browser_tests": outcomes.len(),
            "passed": passed,
            "failed": failed,
            "skipped": 0,
        })
    );
    Ok(failed == 0 && !outcomes.is_empty())
}

/// Everything a test needs.
struct World<'a> {
    h: &'a Harness,
    web: Web,
    /// The orchestrator's URL.
    url: String,
    gates: Arc<Gates>,
    http: reqwest::Client,
}

type TestFn = for<'w> fn(
    &'w World<'w>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'w>>;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|w| Box::pin($name(w))) as TestFn)),*]
    };
}

/// The tests, in the order they run (`sign_in` first: the others use its session).
const TESTS: &[(&str, TestFn)] = tests![
    sign_in,
    task_dag,
    live_step,
    filter_list,
    cancel,
    retry_step,
    replay_dead_letter,
    pages,
    read_key,
];

async fn suite(
    args: &Args,
    h: &Harness,
    chromium: &Path,
    chromedriver: &Path,
    tasker: &Path,
    shots: &Path,
) -> Result<Vec<Outcome>> {
    for t in [GATED, DIAMOND, FLAKY] {
        h.register_yaml(t).await?;
    }
    // The suite talks to a child process only: the harness's in-process orchestrator migrated
    // the database and declared the topology.
    h.take_orchestrator(0).stop().await;
    sqlx::query(
        "INSERT INTO api_keys (id, name, token_hash, role, created_by)
         VALUES ($1, 'browser-read', sha256(convert_to($2, 'UTF8')), 'read', 'browser-suite')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(READ_KEY)
    .execute(&h.db)
    .await
    .context("storing the read key")?;

    let log = std::env::temp_dir().join(format!("browser-{}-orchestrator.log", h.prefix));
    let env: Vec<(String, String)> = [
        ("TASKER_DATABASE_URL", h.database_url.as_str()),
        ("TASKER_AMQP_URL", h.services.amqp_url.as_str()),
        ("TASKER_PREFIX", h.prefix.as_str()),
        ("TASKER_API_KEYS", ADMIN_KEY),
        ("TASKER_POLL_INTERVAL_MS", "100"),
        ("TASKER_METRICS_INTERVAL_MS", "1000"),
        ("TASKER_RELAY_AFTER_MS", "1000"),
        ("TASKER_SHUTDOWN_GRACE_MS", "3000"),
        ("TASKER_DB_POOL_SIZE", "8"),
        ("NO_COLOR", "1"),
        ("RUST_LOG", "warn,sqlx=error"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let (mut orch, url) = tasker_tests::spawn_serve(tasker, &env, &log).await?;
    eprintln!(
        "[browser] orchestrator at {url} (log {}), prefix {}",
        log.display(),
        h.prefix
    );

    let gates = Arc::new(Gates::default());
    let (g1, g2) = (gates.clone(), gates.clone());
    h.spawn_worker(
        h.worker(NAMESPACE)
            .queue(QUEUE)
            .name(WORKER)
            .concurrency(16)
            .handler_fn("work", |ctx| async move {
                Ok(json!({"ok": true, "step": ctx.step()}))
            })
            .handler_fn("gate", move |ctx| {
                let gates = g1.clone();
                async move {
                    let gate = ctx.context()["gate"].as_str().unwrap_or("").to_owned();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !gates.is_open(&gate) && !ctx.is_cancelled() {
                        if Instant::now() > deadline {
                            return Err(StepError::permanent("the gate was never released"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(json!({"gate": gate, "released": true}))
                }
            })
            .handler_fn("flaky", move |_ctx| {
                let gates = g2.clone();
                async move {
                    if gates.fixed.load(std::sync::atomic::Ordering::SeqCst) {
                        Ok(json!({"fixed": true}))
                    } else {
                        Err(StepError::permanent("flaky: not fixed yet"))
                    }
                }
            }),
    )
    .await?;

    let web = Web::start(
        chromium,
        chromedriver,
        &url,
        shots,
        Duration::from_millis(args.wait_ms),
    )
    .await?;
    let world = World {
        h,
        web,
        url: url.clone(),
        gates: gates.clone(),
        http: reqwest::Client::new(),
    };
    let mut outcomes = Vec::new();
    for (name, test) in TESTS {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        let started = Instant::now();
        eprintln!("[browser] {name} ...");
        // Every test but the first starts signed in as the admin (even when an earlier one
        // failed halfway).
        let ready = if *name == "sign_in" {
            Ok(())
        } else {
            world.ensure_admin().await
        };
        let run = async {
            ready?;
            test(&world).await
        };
        let result = match tokio::time::timeout(Duration::from_secs(60), run).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("timed out after 60 s")),
        };
        let error = match result {
            Ok(()) => None,
            Err(e) => {
                let _ = world.web.screenshot(&format!("failed-{name}")).await;
                let at = world
                    .web
                    .client
                    .current_url()
                    .await
                    .map_or_else(|_| "?".into(), |u| u.to_string());
                Some(format!("{e:#} (page {at})"))
            }
        };
        outcomes.push(Outcome {
            name,
            error,
            elapsed: started.elapsed(),
        });
    }
    gates.all.store(true, std::sync::atomic::Ordering::SeqCst);
    world.web.stop().await;
    tasker_tests::stop_child(&mut orch, Duration::from_secs(10)).await;
    let panics: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_owned)
        .collect();
    if !panics.is_empty() {
        outcomes.push(Outcome {
            name: "no_panic",
            error: Some(format!("the orchestrator panicked: {}", panics.join(" | "))),
            elapsed: Duration::ZERO,
        });
    }
    Ok(outcomes)
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// A headless Chromium behind a ChromeDriver child process.
struct Web {
    client: WebDriver,
    driver: tokio::process::Child,
    base: String,
    shots: PathBuf,
    wait: Duration,
}

impl Web {
    async fn start(
        chromium: &Path,
        chromedriver: &Path,
        base: &str,
        shots: &Path,
        wait: Duration,
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::env::temp_dir().join(format!("browser-chromedriver-{port}.log"));
        let mut driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", chromedriver.display()))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=1400,900",
                ],
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&endpoint)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    if let Some(status) = driver.try_wait()? {
                        bail!("chromedriver exited ({status}): {e}; log {}", log.display());
                    }
                    if Instant::now() > deadline {
                        let _ = driver.kill().await;
                        bail!(
                            "no browser session within 30 s: {e}; chromedriver log {}",
                            log.display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Ok(Self {
            client,
            driver,
            base: base.trim_end_matches('/').to_owned(),
            shots: shots.to_owned(),
            wait,
        })
    }

    async fn stop(self) {
        let _ = self.client.close().await;
        let mut driver = self.driver;
        tasker_tests::stop_child(&mut driver, Duration::from_secs(5)).await;
    }

    /// Opens a console path (`/ui/...`).
    async fn open(&self, path: &str) -> Result<()> {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .with_context(|| format!("opening {path}"))
    }

    /// The first element matching `css`, waiting for it to appear.
    async fn find(&self, css: &str) -> Result<Element> {
        self.client
            .wait()
            .at_most(self.wait)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("no element {css:?} within {:?}", self.wait))
    }

    /// Every element matching `css` now.
    async fn all(&self, css: &str) -> Result<Vec<Element>> {
        Ok(self.client.find_all(Locator::Css(css)).await?)
    }

    /// Whether an element matches `css` now.
    async fn has(&self, css: &str) -> Result<bool> {
        Ok(!self.all(css).await?.is_empty())
    }

    /// Waits until `check` holds (polled), or fails with `what`.
    async fn until<F, Fut>(&self, what: &str, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + self.wait;
        let mut last = None;
        loop {
            match check().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                return Err(match last {
                    Some(e) => e.context(format!("waiting for {what}")),
                    None => anyhow!("{what}: not within {:?}", self.wait),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `check` finds something (polled), or fails with `what`.
    async fn until_found<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + self.wait;
        let mut last = None;
        loop {
            match check().await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                return Err(match last {
                    Some(e) => e.context(format!("waiting for {what}")),
                    None => anyhow!("{what}: not within {:?}", self.wait),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes a PNG of the window to `<shots>/<name>.png`.
    async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers over the API and the database.

impl World<'_> {
    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Registers a template (YAML) through the API, as the admin key.
    async fn register(&self, yaml: &str) -> Result<()> {
        let template = tasker_orchestrator::service::templates::parse_template(yaml)
            .map_err(anyhow::Error::msg)?;
        self.api(
            reqwest::Method::POST,
            "/v1/templates",
            Some(serde_json::to_value(&template)?),
        )
        .await?;
        Ok(())
    }

    async fn submit(&self, template: &str, context: Value) -> Result<TaskId> {
        let v = self
            .api(
                reqwest::Method::POST,
                "/v1/tasks",
                Some(json!({"namespace": NAMESPACE, "template": template, "context": context})),
            )
            .await?;
        serde_json::from_value(v["task_id"].clone()).with_context(|| format!("submit answered {v}"))
    }

    async fn state(&self, id: TaskId) -> Result<TaskState> {
        let v = self
            .api(reqwest::Method::GET, &format!("/v1/tasks/{id}"), None)
            .await?;
        Ok(serde_json::from_value(v["state"].clone())?)
    }

    async fn wait_state(&self, id: TaskId, want: TaskState) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state(id).await?;
            if s == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("task {id} is {s:?}, not {want:?}, after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until step `name` of task `id` is in state `want` (the API's word).
    async fn wait_step(&self, id: TaskId, name: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self
                .api(reqwest::Method::GET, &format!("/v1/tasks/{id}"), None)
                .await?;
            let state = v["steps"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == name))
                .map(|s| s["state"].clone());
            if state.as_ref().and_then(Value::as_str) == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("step {name} of task {id} is {state:?}, not {want}, after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sign_in_with(&self, key: &str) -> Result<()> {
        let web = &self.web;
        web.open("/ui/login").await?;
        let input = web.find("#login-form input[name=key]").await?;
        input.clear().await?;
        input.send_keys(key).await?;
        web.find("#login-form button[type=submit]")
            .await?
            .click()
            .await?;
        Ok(())
    }

    /// Signs in with the admin key unless a session of it is open.
    async fn ensure_admin(&self) -> Result<()> {
        self.web.open("/ui/tasks").await?;
        let signed_in = self.web.client.current_url().await?.path() == "/ui/tasks"
            && self.web.find("#role").await?.text().await?.trim() == "admin";
        if !signed_in {
            self.web.client.delete_all_cookies().await?;
            self.signed_in_as(ADMIN_KEY).await?;
        }
        Ok(())
    }

    /// Signs in as `key` and waits for the task list.
    async fn signed_in_as(&self, key: &str) -> Result<()> {
        self.sign_in_with(key).await?;
        self.web
            .until("the task list after signing in", || async {
                let url = self.web.client.current_url().await?;
                Ok(!url.path().starts_with("/ui/login"))
            })
            .await?;
        self.web.find("#filters").await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The console's pages (docs/console.md; orchestrator/src/console).

/// A row of the task list (`data-id` is the task id).
const TASK_ROWS: &str = "#tasks tr.task[data-id]";

/// A row of the dead-letter list.
const DEAD_LETTER_ROWS: &str = "#dead-letters tr.dead-letter";

/// The state of a DAG node (`<g id="node-{step}" class="node st-{state}">`).
async fn node_state(web: &Web, step: &str) -> Result<String> {
    let el = web.find(&format!("svg g#node-{step}")).await?;
    let class = el.attr("class").await?.unwrap_or_default();
    Ok(class
        .split_whitespace()
        .find_map(|c| c.strip_prefix("st-"))
        .unwrap_or("")
        .to_owned())
}

/// The task state the task page shows (`#task[data-state]`, updated live).
async fn page_task_state(web: &Web) -> Result<String> {
    let el = web.find("#task[data-state]").await?;
    Ok(el.attr("data-state").await?.unwrap_or_default())
}

/// The task ids the list shows now.
async fn listed_ids(web: &Web) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for row in web.all(TASK_ROWS).await? {
        if let Some(id) = row.attr("data-id").await? {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Clicks the link or button `css`, then the confirmation page's `#confirm`.
async fn act(web: &Web, css: &str) -> Result<()> {
    web.find(css).await?.click().await?;
    web.find("#confirm-form").await?;
    web.screenshot("confirm").await?;
    web.find("#confirm").await?.click().await?;
    Ok(())
}

/// `from` for a list filter: an hour ago (UTC, as the form's datetime-local field takes it).
fn an_hour_ago() -> String {
    (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// The tests.

async fn sign_in(w: &World<'_>) -> Result<()> {
    // A console page without a session leads to the sign-in page.
    w.web.open("/ui/tasks").await?;
    w.web
        .until("the redirect to /ui/login", || async {
            Ok(w.web.client.current_url().await?.path() == "/ui/login")
        })
        .await?;
    w.web.find("#login-form").await?;
    w.web.screenshot("login").await?;
    // A wrong key is refused, on the sign-in page, with a message.
    w.sign_in_with("not-a-key").await?;
    let error = w.web.find("#login-error").await?.text().await?;
    if error.trim().is_empty() {
        bail!("the sign-in error is empty");
    }
    if w.web.client.current_url().await?.path() != "/ui/login" {
        bail!("a wrong key left the sign-in page");
    }
    let first = w.submit("diamond", json!({"order": "o-1"})).await?;
    w.wait_state(first, TaskState::Completed).await?;
    w.signed_in_as(ADMIN_KEY).await?;
    // The session cookie is HttpOnly: the page's script cannot read it.
    let cookies = w.web.client.get_all_cookies().await?;
    if cookies.is_empty() {
        bail!("no session cookie after signing in");
    }
    let visible = w
        .web
        .client
        .execute("return document.cookie", vec![])
        .await?;
    for c in &cookies {
        if visible.as_str().unwrap_or("").contains(c.name()) {
            bail!(
                "cookie {} is readable from scripts (not HttpOnly)",
                c.name()
            );
        }
    }
    let role = w.web.find("#role").await?.text().await?;
    if role.trim() != "admin" {
        bail!("signed in with the admin key, the header says role {role:?}");
    }
    w.web.screenshot("tasks").await?;
    Ok(())
}

async fn task_dag(w: &World<'_>) -> Result<()> {
    let id = w.submit("diamond", json!({"order": "o-dag"})).await?;
    w.wait_state(id, TaskState::Completed).await?;
    w.web.open(&format!("/ui/tasks/{id}")).await?;
    w.web.find("#dag svg").await?;
    for step in ["a", "b", "c", "d"] {
        let state = node_state(&w.web, step).await?;
        if state != "succeeded" {
            bail!("node {step} is {state:?}, not succeeded");
        }
    }
    // A diamond has four edges: a→b, a→c, b→d, c→d.
    let mut edges = Vec::new();
    for e in w.web.all("#dag svg .edge").await? {
        edges.push(format!(
            "{}->{}",
            e.attr("data-from").await?.unwrap_or_default(),
            e.attr("data-to").await?.unwrap_or_default()
        ));
    }
    edges.sort();
    if edges != ["a->b", "a->c", "b->d", "c->d"] {
        bail!("the diamond's edges are {edges:?}");
    }
    if page_task_state(&w.web).await? != "completed" {
        bail!("the task page does not say completed");
    }
    w.web.screenshot("task").await?;
    Ok(())
}

async fn live_step(w: &World<'_>) -> Result<()> {
    let gate = format!("live-{}", uuid::Uuid::now_v7().simple());
    let id = w.submit("gated", json!({"gate": gate})).await?;
    w.wait_step(id, "gate", "dispatched").await?;
    w.web.open(&format!("/ui/tasks/{id}")).await?;
    let before = node_state(&w.web, "gate").await?;
    if before != "dispatched" {
        bail!("the gate step shows {before:?} before the release, not dispatched");
    }
    // A marker in the page: a reload would lose it.
    w.web
        .client
        .execute("window.__browserSuiteMarker = 42; return true", vec![])
        .await?;
    w.web.screenshot("task-live-waiting").await?;
    w.gates.release(&gate);
    w.web
        .until("the gate node turning succeeded", || async {
            Ok(node_state(&w.web, "gate").await? == "succeeded")
        })
        .await?;
    w.web
        .until("the task turning completed", || async {
            Ok(node_state(&w.web, "publish").await? == "succeeded"
                && page_task_state(&w.web).await? == "completed")
        })
        .await?;
    let marker = w
        .web
        .client
        .execute("return window.__browserSuiteMarker || null", vec![])
        .await?;
    if marker != json!(42) {
        bail!("the page was reloaded (marker {marker})");
    }
    w.web.screenshot("task-live-done").await?;
    Ok(())
}

async fn filter_list(w: &World<'_>) -> Result<()> {
    let region = format!("r-{}", uuid::Uuid::now_v7().simple());
    let mut ours = Vec::new();
    for i in 0..3 {
        let id = w
            .submit("diamond", json!({"region": region, "n": i}))
            .await?;
        ours.push(id.to_string());
    }
    let other = w
        .submit("diamond", json!({"region": "elsewhere"}))
        .await?
        .to_string();
    for id in &ours {
        w.wait_state(id.parse()?, TaskState::Completed).await?;
    }
    ours.sort();
    // Context field = value within a time range.
    let from = an_hour_ago();
    w.web
        .open(&format!(
            "/ui/tasks?namespace={NAMESPACE}&from={from}&field=region&value={region}"
        ))
        .await?;
    w.web.find("#tasks").await?;
    let mut ids = listed_ids(&w.web).await?;
    ids.sort();
    if ids != ours {
        bail!("filtered by region, the list shows {ids:?}, not {ours:?}");
    }
    if ids.contains(&other) {
        bail!("a task of another region is listed");
    }
    w.web.screenshot("tasks-filtered").await?;
    // A context filter without a time range is refused with a message.
    w.web
        .open(&format!("/ui/tasks?field=region&value={region}"))
        .await?;
    let error = w.web.find("#filter-error").await?.text().await?;
    if !error.contains("time range") {
        bail!("a context filter without a time range says {error:?}");
    }
    // By state: failed tasks only (none of ours).
    w.web.open("/ui/tasks?state=failed").await?;
    w.web.find("#filters").await?;
    let failed = listed_ids(&w.web).await?;
    if ours.iter().any(|id| failed.contains(id)) {
        bail!("completed tasks are listed under state=failed");
    }
    // By template, through the form on the page.
    w.web.open("/ui/tasks").await?;
    let field = w.web.find("#f-template").await?;
    field.send_keys("flaky").await?;
    w.web
        .find("#filters button[type=submit]")
        .await?
        .click()
        .await?;
    w.web
        .until("the list filtered by template", || async {
            let url = w.web.client.current_url().await?;
            Ok(url.query().unwrap_or("").contains("template=flaky"))
        })
        .await?;
    w.web.find("#filters").await?;
    for row in w.web.all(TASK_ROWS).await? {
        let text = row.text().await?;
        if !text.contains("flaky") {
            bail!("filtered by template flaky, the list shows {text:?}");
        }
    }
    Ok(())
}

async fn cancel(w: &World<'_>) -> Result<()> {
    let gate = format!("cancel-{}", uuid::Uuid::now_v7().simple());
    let id = w.submit("gated", json!({"gate": gate})).await?;
    w.wait_step(id, "gate", "dispatched").await?;
    w.web.open(&format!("/ui/tasks/{id}")).await?;
    act(&w.web, "#action-cancel").await?;
    w.web
        .until("the page showing the task cancelled", || async {
            Ok(page_task_state(&w.web).await? == "cancelled")
        })
        .await?;
    let state = w.state(id).await?;
    if state != TaskState::Cancelled {
        bail!("the page says cancelled, the API says {state:?}");
    }
    // Who acted is in the history (after a reload: the audit entry is not pushed live).
    w.web.client.refresh().await?;
    let mut audit = Vec::new();
    for row in w.web.all("#history tr.audit").await? {
        audit.push(row.text().await?);
    }
    if !audit
        .iter()
        .any(|a| a.contains("cancel") && a.contains("bootstrap"))
    {
        bail!("the history has no cancel by the bootstrap key: {audit:?}");
    }
    w.web.screenshot("task-cancelled").await?;
    Ok(())
}

async fn retry_step(w: &World<'_>) -> Result<()> {
    w.gates
        .fixed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let id = w.submit("flaky", json!({"case": "retry"})).await?;
    w.wait_state(id, TaskState::Failed).await?;
    w.gates
        .fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    w.web.open(&format!("/ui/tasks/{id}")).await?;
    if node_state(&w.web, "flaky").await? != "failed" {
        bail!("the flaky node is not shown failed");
    }
    w.web.screenshot("task-failed").await?;
    act(&w.web, "#action-retry-step-flaky").await?;
    w.wait_state(id, TaskState::Completed).await?;
    w.web.open(&format!("/ui/tasks/{id}")).await?;
    if node_state(&w.web, "flaky").await? != "succeeded" {
        bail!("after the retry the flaky node is not succeeded");
    }
    w.web.screenshot("task-retried").await?;
    Ok(())
}

async fn replay_dead_letter(w: &World<'_>) -> Result<()> {
    // A task request for a template that does not exist yet is dead-lettered; once the template
    // exists, replaying the dead letter submits the task.
    let name = format!("late{}", &uuid::Uuid::now_v7().simple().to_string()[24..]);
    let request = tasker_schemas::TaskRequest {
        request_id: tasker_schemas::RequestId::new(),
        namespace: NAMESPACE.into(),
        template: name.clone(),
        version: None,
        context: json!({"replayed": true}),
        idempotency_key: Some(format!("replay-{name}")),
        priority: 0,
        task_id: None,
        run_at: None,
        delay_ms: None,
        deadline_ms: None,
    };
    publish_task_request(w.h, &request).await?;
    // Its row on the dead-letter page (the page lists the newest first).
    let row = w
        .web
        .until_found("the dead letter listed", || async {
            w.web.open("/ui/dead-letters").await?;
            for r in w.web.all(DEAD_LETTER_ROWS).await? {
                if r.text().await?.contains(&name) {
                    return Ok(Some(r));
                }
            }
            Ok(None)
        })
        .await?;
    w.web.screenshot("dead-letters").await?;
    w.register(&format!(
        "namespace: console\nname: {name}\nversion: 1\nsteps:\n  - {{ name: only, handler: work, queue: console_browser }}\n"
    ))
    .await?;
    // Its page, then replay (confirmed).
    row.find(Locator::Css("a[href^='/ui/dead-letters/']"))
        .await
        .context("no link to the dead letter's page")?
        .click()
        .await?;
    let reason = w.web.find("#dl-reason-text").await?.text().await?;
    if reason.trim().is_empty() {
        bail!("the dead letter's page shows no reason");
    }
    w.web.screenshot("dead-letter").await?;
    act(&w.web, "#dl-replay").await?;
    let outcome = w.web.find("#dl-outcomes td.outcome").await?.text().await?;
    w.web.screenshot("dead-letter-replayed").await?;
    let found: Option<TaskId> = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let id: Option<uuid::Uuid> =
                sqlx::query_scalar("SELECT id FROM tasks WHERE template_name = $1")
                    .bind(&name)
                    .fetch_optional(&w.h.db)
                    .await?;
            if let Some(id) = id {
                break Some(TaskId::from(id));
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let id =
        found.ok_or_else(|| anyhow!("no task of {name} after the replay (outcome {outcome:?})"))?;
    w.wait_state(id, TaskState::Completed).await?;
    Ok(())
}

async fn publish_task_request(h: &Harness, request: &tasker_schemas::TaskRequest) -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::ShortString;
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let names = h.names();
    let body = tasker_schemas::encode_payload(request.clone())?;
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/msgpack"))
        .with_message_id(ShortString::from(format!("browser-{}", request.request_id)));
    channel
        .basic_publish(
            names.tasks_exchange().as_str().into(),
            request.namespace.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props,
        )
        .await?
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn pages(w: &World<'_>) -> Result<()> {
    // A step in flight on the suite's queue, for the queues page.
    let gate = format!("pages-{}", uuid::Uuid::now_v7().simple());
    let held = w.submit("gated", json!({"gate": gate})).await?;
    w.wait_step(held, "gate", "dispatched").await?;
    for (path, shot, table, expect) in [
        ("/ui/queues", "queues", "#queues", QUEUE),
        ("/ui/workers", "workers", "#workers", WORKER),
        ("/ui/templates", "templates", "#templates", "diamond"),
    ] {
        w.web
            .until(&format!("{path} showing {expect}"), || async {
                // The queues page reads the gauges' snapshot, refreshed every second here.
                w.web.open(path).await?;
                Ok(w.web.find(table).await?.text().await?.contains(expect))
            })
            .await?;
        w.web.screenshot(shot).await?;
    }
    // A template's page draws its DAG.
    w.web.open("/ui/templates/console/diamond").await?;
    if w.web.all("#dag svg g.node").await?.len() != 4 {
        bail!("the diamond template's DAG does not have 4 nodes");
    }
    w.web.screenshot("template").await?;
    w.gates.release(&gate);
    w.wait_state(held, TaskState::Completed).await?;
    Ok(())
}

async fn read_key(w: &World<'_>) -> Result<()> {
    let gate = format!("read-{}", uuid::Uuid::now_v7().simple());
    let id = w.submit("gated", json!({"gate": gate})).await?;
    w.wait_step(id, "gate", "dispatched").await?;
    w.gates
        .fixed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let failed = w.submit("flaky", json!({"case": "read"})).await?;
    w.wait_state(failed, TaskState::Failed).await?;
    // Sign out, then in with the read key.
    w.web
        .find("#logout button[type=submit]")
        .await?
        .click()
        .await?;
    w.web
        .until("the sign-in page after signing out", || async {
            Ok(w.web.client.current_url().await?.path() == "/ui/login")
        })
        .await?;
    w.signed_in_as(READ_KEY).await?;
    let role = w.web.find("#role").await?.text().await?;
    if role.trim() != "read" {
        bail!("signed in with the read key, the header says role {role:?}");
    }
    if w.web.has("#bulk").await? {
        bail!("a read key sees the bulk actions on the task list");
    }
    // Neither a live task (cancel) nor a failed one (retry, retry step, mark succeeded) offers
    // an action.
    for task in [id, failed] {
        w.web.open(&format!("/ui/tasks/{task}")).await?;
        w.web.find("#dag svg").await?;
        let actions = w
            .web
            .all("#task-actions, [id^=action-], form[action*='/actions/']")
            .await?
            .len();
        if actions > 0 {
            bail!("a read key sees {actions} actions on task {task}");
        }
    }
    w.web.screenshot("task-read-key").await?;
    // And acting anyway (the confirmation page's URL) is forbidden.
    w.web
        .open(&format!("/ui/tasks/{id}/actions/cancel"))
        .await?;
    if w.web.has("#confirm").await? {
        bail!("a read key gets the cancel confirmation");
    }
    // Nor a dead letter: one is listed, without actions.
    publish_task_request(
        w.h,
        &tasker_schemas::TaskRequest {
            request_id: tasker_schemas::RequestId::new(),
            namespace: NAMESPACE.into(),
            template: "never-registered".into(),
            version: None,
            context: json!({}),
            idempotency_key: None,
            priority: 0,
            task_id: None,
            run_at: None,
            delay_ms: None,
            deadline_ms: None,
        },
    )
    .await?;
    w.web
        .until("a dead letter listed for the read key", || async {
            w.web.open("/ui/dead-letters").await?;
            w.web.has(DEAD_LETTER_ROWS).await
        })
        .await?;
    if w.web
        .has("#dl-replay, #dl-discard, #dl-bulk input[type=checkbox]")
        .await?
    {
        bail!("a read key sees dead-letter actions");
    }
    w.gates.release(&gate);
    w.wait_state(id, TaskState::Completed).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// `explicit`, or the first of `names` on the PATH.
fn find_program(explicit: Option<&Path>, names: &[&str]) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("{} does not exist", p.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("none of {names:?} on the PATH")
}
