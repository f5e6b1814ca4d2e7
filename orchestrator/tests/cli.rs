//! The `tasker` CLI, run as the real binary (`CARGO_BIN_EXE_tasker`, which cargo builds before
//! this test) against an orchestrator started in this process on a fresh database and a broker
//! prefix of its own, as `tasker-tests`' harness does (this package cannot use that harness: it
//! depends on this one).
//!
//! Services come from `TASKER_TEST_DATABASE_URL` (an admin URL: each test creates and drops its
//! database) and `TASKER_TEST_AMQP_URL`; `deploy/local/services.sh up` writes both to
//! `.tasker/env`.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tasker_orchestrator::{App, Config};
use tasker_schemas::Names;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TASKER: &str = env!("CARGO_BIN_EXE_tasker");

/// The admin Postgres URL and the broker URL of the test services.
fn services() -> (String, String) {
    match (
        std::env::var("TASKER_TEST_DATABASE_URL"),
        std::env::var("TASKER_TEST_AMQP_URL"),
    ) {
        (Ok(db), Ok(amqp)) => (db, amqp),
        _ => panic!(
            "set TASKER_TEST_DATABASE_URL and TASKER_TEST_AMQP_URL (run deploy/local/services.sh \
             up and source .tasker/env)"
        ),
    }
}

/// A short unique suffix for database names and prefixes.
fn unique() -> String {
    let id = Uuid::now_v7().simple().to_string();
    id[id.len() - 12..].to_owned()
}

/// Points a Postgres URL at another database (the query string is kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").expect("a URL") + 3;
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn admin() -> sqlx::PgPool {
    sqlx::PgPool::connect(&services().0)
        .await
        .expect("cannot connect to TASKER_TEST_DATABASE_URL")
}

async fn database_exists(name: &str) -> bool {
    let admin = admin().await;
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&admin)
        .await
        .expect("query pg_database");
    admin.close().await;
    found.is_some()
}

async fn drop_database(name: &str) {
    let admin = admin().await;
    // Names made by these tests only: a quoted identifier without quotes in it.
    assert!(!name.contains('"'));
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    admin.close().await;
}

/// What one run of the CLI did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "tasker failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    fn failed(&self) -> &Self {
        assert!(
            !self.status.success(),
            "tasker should have failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
}

/// The CLI with a clean environment: nothing from the caller's `TASKER_*` variables.
fn tasker() -> Command {
    let mut cmd = Command::new(TASKER);
    for (key, _) in std::env::vars() {
        if key.starts_with("TASKER_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Run {
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("tasker did not finish within 120 s")
        .expect("cannot run tasker");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

async fn tasker_run(args: &[&str]) -> Run {
    let mut cmd = tasker();
    cmd.args(args);
    run(cmd).await
}

/// An orchestrator running in this process on its own database and prefix, and a scratch
/// directory for template files.
struct Server {
    url: String,
    amqp_url: String,
    database: String,
    prefix: String,
    dir: PathBuf,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<tasker_orchestrator::Result<()>>>,
    cleaned_up: bool,
}

impl Server {
    async fn start() -> Server {
        let (admin_url, amqp_url) = services();
        let id = unique();
        let database = format!("tasker_cli_{id}");
        let admin = admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database}\""
        )))
        .execute(&admin)
        .await
        .expect("create the test database");
        admin.close().await;
        let prefix = format!("tcli{id}");
        let config = Config {
            database_url: with_database(&admin_url, &database),
            amqp_url: amqp_url.clone(),
            http_addr: "127.0.0.1:0".parse().expect("address"),
            prefix: prefix.clone(),
            db_pool_size: 4,
            poll_interval_ms: 100,
            relay_after_ms: 1_000,
            shutdown_grace_ms: 3_000,
            ..Config::default()
        };
        let app = App::build(config).await.expect("start the orchestrator");
        let url = format!("http://{}", app.http_addr());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let dir = std::env::temp_dir().join(format!("tasker-cli-{id}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Server {
            url,
            amqp_url,
            database,
            prefix,
            dir,
            shutdown,
            handle: Some(handle),
            cleaned_up: false,
        }
    }

    /// `tasker` pointed at this orchestrator.
    fn tasker(&self) -> Command {
        let mut cmd = tasker();
        cmd.env("TASKER_API_URL", &self.url);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Run {
        let mut cmd = self.tasker();
        cmd.args(args);
        run(cmd).await
    }

    /// Writes a template file in the scratch directory.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write a template file");
        path.to_string_lossy().into_owned()
    }

    /// Stops the orchestrator, deletes its queues and exchanges, its database and the files.
    async fn finish(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
        cleanup(&self.amqp_url, &self.prefix, &self.database).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.cleaned_up = true;
    }
}

impl Drop for Server {
    /// A test that failed before [`Server::finish`]: stops the orchestrator at once and cleans up
    /// on a thread with its own runtime (Drop cannot await; the test's runtime may be unwinding).
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let (amqp_url, prefix, database) = (
            self.amqp_url.clone(),
            self.prefix.clone(),
            self.database.clone(),
        );
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let work = cleanup(&amqp_url, &prefix, &database);
                    let _ = tokio::time::timeout(Duration::from_secs(15), work).await;
                });
            }
        });
        let _ = cleaner.join();
    }
}

/// Deletes the topology of a prefix and a database (best effort).
async fn cleanup(amqp_url: &str, prefix: &str, database: &str) {
    // The step queues of the namespaces these tests register templates in.
    let queues: Vec<String> = ["cli", "s", "shop", "tl", "a_namespace_longer_than_twelve"]
        .iter()
        .map(|ns| format!("{ns}.default"))
        .collect();
    let _ = tasker_orchestrator::broker::delete_topology(
        amqp_url,
        &Names::new(prefix.to_owned()),
        &queues,
    )
    .await;
    drop_database(database).await;
}

/// A description without clap's own notes (`[default: ..]`, `[env: ..]`, `[aliases: ..]`).
fn own_words(description: &str) -> String {
    let mut words = String::new();
    let mut depth = 0;
    for c in description.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            c if depth == 0 => words.push(c),
            _ => {}
        }
    }
    words.trim().to_owned()
}

/// The entries of a help section (`Commands:`, `Arguments:`, `Options:`): each entry's first
/// line and the description that follows it, on the same line or on the indented next lines.
fn help_entries(help: &str, section: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line.trim_end() == section;
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent <= 6 {
            // "  -h, --help  Print help", "      --wait", "  <ID>  Task id", "  serve  Run ..."
            let text = line.trim();
            let (name, description) = text
                .split_once("  ")
                .map_or((text, ""), |(n, d)| (n, d.trim()));
            entries.push((name.to_owned(), description.to_owned()));
        } else if let Some(last) = entries.last_mut() {
            // A description on the lines below its entry (clap's layout for long entries).
            last.1.push(' ');
            last.1.push_str(line.trim());
        }
    }
    entries
}

#[tokio::test]
async fn every_flag_and_argument_of_every_command_has_help() {
    let top = tasker_run(&["--help"]).await;
    top.ok();
    let commands = help_entries(&top.stdout, "Commands:");
    assert!(commands.len() >= 8, "{}", top.stdout);
    let mut todo: Vec<Vec<String>> = commands
        .iter()
        .filter(|(name, _)| name != "help")
        .map(|(name, _)| vec![name.clone()])
        .collect();
    let mut checked = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("-h");
        let r = tasker_run(&args).await;
        r.ok();
        // Nested commands (`template register`).
        for (name, description) in help_entries(&r.stdout, "Commands:") {
            assert!(
                !own_words(&description).is_empty(),
                "{path:?} {name} has no help"
            );
            if name != "help" {
                todo.push([path.clone(), vec![name]].concat());
            }
        }
        for section in ["Arguments:", "Options:"] {
            for (name, description) in help_entries(&r.stdout, section) {
                assert!(
                    !own_words(&description).is_empty(),
                    "tasker {}: {name} has no help text:\n{}",
                    path.join(" "),
                    r.stdout
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} options seen");
}

#[tokio::test]
async fn serve_help_lists_every_setting_the_config_reads() {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs"))
        .expect("read config.rs");
    // Every "TASKER_..." string literal in config.rs is a variable it reads.
    let vars: Vec<&str> = source
        .split('"')
        .filter(|s| {
            s.len() > "TASKER_".len()
                && s.starts_with("TASKER_")
                && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .collect();
    assert!(vars.len() >= 23, "{vars:?}");
    let help = tasker_run(&["serve", "--help"]).await;
    help.ok();
    for var in &vars {
        let at = help.stdout.find(&format!("  {var}\n")).unwrap_or_else(|| {
            panic!(
                "`tasker serve --help` does not list {var}:\n{}",
                help.stdout
            )
        });
        let entry = &help.stdout[at..];
        let entry = &entry[..entry.find("]\n").expect("a default")];
        assert!(
            entry.contains("[default: "),
            "{var} has no default: {entry}"
        );
    }
    assert!(help.stdout.contains(
        "TASKER_DB_POOL_SIZE\n          Connections in the PostgreSQL pool\n          [default: 16]"
    ));
    assert!(help.stdout.contains("[default: 127.0.0.1:8080]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_every_command_quietly() {
    let server = Server::start().await;
    let file = server.file(
        "quiet.yaml",
        "namespace: cli\nname: quiet\nversion: 1\nsteps:\n  - { name: a, handler: a }\n",
    );
    server.run(&["template", "register", &file]).await.ok();
    let submitted = server.run(&["submit", "cli", "quiet"]).await;
    let id = submitted.ok().stdout.trim().to_owned();
    for args in [
        vec!["list"],
        vec!["show", id.as_str()],
        vec!["show", id.as_str(), "--json"],
        vec!["schedule", "list"],
        vec!["--help"],
        vec!["serve", "--help"],
    ] {
        let mut cmd = server.tasker();
        cmd.args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run tasker");
        // The reader goes away before the command prints anything (as `| head -0` would).
        drop(child.stdout.take());
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("tasker hung")
            .expect("tasker output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "tasker {args:?} with a closed stdout:\n{stderr}"
        );
        assert!(
            out.status.success(),
            "tasker {args:?}: {}\n{stderr}",
            out.status
        );
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_aligns_its_header_with_its_rows() {
    let server = Server::start().await;
    // Longer than the old fixed columns (namespace 12, template 28).
    let namespace = "a_namespace_longer_than_twelve";
    let template = "a_template_name_much_longer_than_twenty_eight";
    let file = server.file(
        "long.yaml",
        &format!("namespace: {namespace}\nname: {template}\nversion: 1\nsteps:\n  - {{ name: a, handler: a }}\n"),
    );
    server.run(&["template", "register", &file]).await.ok();
    let short = server.file(
        "short.yaml",
        "namespace: s\nname: t\nversion: 1\nsteps:\n  - { name: a, handler: a }\n",
    );
    server.run(&["template", "register", &short]).await.ok();
    let mut ids = Vec::new();
    for (ns, name) in [(namespace, template), ("s", "t"), (namespace, template)] {
        let r = server.run(&["submit", ns, name]).await;
        ids.push(r.ok().stdout.trim().to_owned());
    }
    let r = server.run(&["list"]).await;
    r.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    let header = lines[0];
    let column = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {header}"))
    };
    let (ns_at, template_at, state_at, created_at) = (
        column("NAMESPACE"),
        column("TEMPLATE"),
        column("STATE"),
        column("CREATED"),
    );
    assert!(header.starts_with("TASK "), "{header}");
    for row in &lines[1..] {
        let id = ids
            .iter()
            .find(|id| row.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("row of an unknown task: {row}"));
        let (ns, name) = if ids[1] == *id {
            ("s", "t")
        } else {
            (namespace, template)
        };
        for (at, value) in [
            (ns_at, ns.to_owned()),
            (template_at, format!("{name} v1")),
            (state_at, "running".to_owned()),
        ] {
            assert!(
                row[at..].starts_with(&format!("{value} ")) && row[..at].ends_with(' '),
                "{value:?} is not under its header:\n{header}\n{row}"
            );
        }
        assert!(
            row[created_at..].starts_with("20") && row[..created_at].ends_with(' '),
            "CREATED is not under its header:\n{header}\n{row}"
        );
    }

    // An unknown state names the valid ones.
    let r = server.run(&["list", "--state", "finished"]).await;
    r.failed();
    for state in ["pending", "running", "completed", "failed", "cancelled"] {
        assert!(r.stderr.contains(state), "{state} not listed: {}", r.stderr);
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_with_the_after_hint_it_prints() {
    let server = Server::start().await;
    let file = server.file(
        "page.yaml",
        "namespace: cli\nname: page\nversion: 1\nsteps:\n  - { name: a, handler: a }\n",
    );
    server.run(&["template", "register", &file]).await.ok();
    let mut ids = Vec::new();
    for i in 0..3 {
        let context = format!("{{\"i\": {i}}}");
        let r = server
            .run(&["submit", "cli", "page", "--context", &context])
            .await;
        ids.push(r.ok().stdout.trim().to_owned());
    }
    // Newest first; the last line says how to get the next page.
    let r = server.run(&["list", "--limit", "2"]).await;
    r.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert!(
        lines[1].starts_with(&ids[2]) && lines[2].starts_with(&ids[1]),
        "{}",
        r.stdout
    );
    let next = lines[3]
        .strip_prefix("(more: --after ")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no --after hint: {}", r.stdout));
    assert_eq!(next, ids[1]);
    // The hint works as printed.
    let r = server.run(&["list", "--limit", "2", "--after", next]).await;
    r.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(lines[1].starts_with(&ids[0]), "{}", r.stdout);
    assert!(!r.stdout.contains("more"), "{}", r.stdout);
    // --after names a task.
    server.run(&["list", "--after", "yesterday"]).await.failed();
    // A page is at most 500 tasks.
    let r = server.run(&["list", "--limit", "501"]).await;
    r.failed();
    assert!(r.stderr.contains("500"), "{}", r.stderr);
    // JSON lists summaries: no context.
    let r = server.run(&["list", "--json"]).await;
    r.ok();
    let page: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    let tasks = page["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 3, "{}", r.stdout);
    assert!(
        tasks.iter().all(|t| t.get("context").is_none()),
        "{}",
        r.stdout
    );
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_list_shows_every_registered_version() {
    let server = Server::start().await;
    let help = server.run(&["template", "--help"]).await;
    help.ok();
    let commands: Vec<String> = help_entries(&help.stdout, "Commands:")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(commands.iter().any(|c| c == "list"), "{}", help.stdout);
    for (name, text) in [
        (
            "alpha1.yaml",
            "namespace: tl_a\nname: alpha\nversion: 1\nsteps:\n  - { name: a, handler: a }\n",
        ),
        (
            "alpha2.yaml",
            "namespace: tl_a\nname: alpha\nversion: 2\nsteps:\n  - { name: a, handler: a }\n  - { name: b, handler: b, depends_on: [a] }\n",
        ),
        (
            "beta.yaml",
            "namespace: tl_b\nname: beta\nversion: 1\ndescription: Ships the order\nsteps:\n  - { name: a, handler: a }\n",
        ),
    ] {
        let file = server.file(name, text);
        server.run(&["template", "register", &file]).await.ok();
    }
    let rows = |stdout: &str| -> Vec<Vec<String>> {
        stdout
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let r = server.run(&["template", "list"]).await;
    r.ok();
    assert!(
        r.stdout
            .starts_with("NAMESPACE  NAME   VERSION  STEPS  CREATED"),
        "{}",
        r.stdout
    );
    let mut seen: Vec<(String, String, String, String)> = rows(&r.stdout)
        .into_iter()
        .map(|cells| {
            (
                cells[0].clone(),
                cells[1].clone(),
                cells[2].clone(),
                cells[3].clone(),
            )
        })
        .collect();
    seen.sort();
    let want = [
        ("tl_a", "alpha", "1", "1"),
        ("tl_a", "alpha", "2", "2"),
        ("tl_b", "beta", "1", "1"),
    ]
    .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c.to_owned(), d.to_owned()));
    assert_eq!(seen, want, "{}", r.stdout);
    assert!(r.stdout.contains("Ships the order"), "{}", r.stdout);

    let r = server
        .run(&["template", "list", "--namespace", "tl_b"])
        .await;
    r.ok();
    let only = rows(&r.stdout);
    assert_eq!(only.len(), 1, "{}", r.stdout);
    assert_eq!(only[0][..2], ["tl_b", "beta"]);

    let r = server.run(&["template", "list", "--json"]).await;
    r.ok();
    let all: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{}", r.stdout);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_content_under_a_registered_version_suggests_the_next_version() {
    let server = Server::start().await;
    let template = |version: u32, handler: &str| {
        format!(
            "namespace: shop\nname: refund\nversion: {version}\nsteps:\n  - {{ name: pay, handler: {handler} }}\n"
        )
    };
    let v1 = server.file("v1.yaml", &template(1, "pay"));
    let r = server.run(&["template", "register", &v1]).await;
    assert!(
        r.ok().stdout.contains("shop/refund version 1: registered"),
        "{}",
        r.stdout
    );
    let r = server.run(&["template", "register", &v1]).await;
    assert!(
        r.ok().stdout.contains("already registered (unchanged)"),
        "{}",
        r.stdout
    );

    let changed = server.file("v1-changed.yaml", &template(1, "pay_v2"));
    let r = server.run(&["template", "register", &changed]).await;
    r.failed();
    assert!(
        r.stderr.contains(
            "template shop/refund version 1 is already registered with different content; bump \
             `version:` to 2 to register the change"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&changed),
        "the file is not named: {}",
        r.stderr
    );

    // With version 2 registered too, the next free version is 3.
    let v2 = server.file("v2.yaml", &template(2, "pay_v2"));
    server.run(&["template", "register", &v2]).await.ok();
    let changed = server.file("v1-again.yaml", &template(1, "pay_v3"));
    let r = server.run(&["template", "register", &changed]).await;
    r.failed();
    assert!(r.stderr.contains("bump `version:` to 3"), "{}", r.stderr);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_template_suggests_the_closest_registered_name() {
    let server = Server::start().await;
    for (i, name) in ["order_fulfilment", "order_refund", "invoice"]
        .iter()
        .enumerate()
    {
        let file = server.file(
            &format!("t{i}.yaml"),
            &format!(
                "namespace: shop\nname: {name}\nversion: 1\nsteps:\n  - {{ name: a, handler: a }}\n"
            ),
        );
        server.run(&["template", "register", &file]).await.ok();
    }
    let r = server.run(&["submit", "shop", "order_fulfillment"]).await;
    r.failed();
    assert!(
        r.stderr
            .contains("template shop/order_fulfillment not found; did you mean order_fulfilment?"),
        "{}",
        r.stderr
    );
    // Nothing close: no suggestion.
    let r = server.run(&["submit", "shop", "shipping_label"]).await;
    r.failed();
    assert!(
        r.stderr.contains("template shop/shipping_label not found"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("did you mean"), "{}", r.stderr);
    // A version that does not exist: the registered ones.
    let r = server
        .run(&["submit", "shop", "invoice", "--version", "4"])
        .await;
    r.failed();
    assert!(
        r.stderr
            .contains("template shop/invoice version 4 not found; registered versions: 1"),
        "{}",
        r.stderr
    );
    // A namespace without templates: the closest one that has some.
    let r = server.run(&["submit", "shops", "invoice"]).await;
    r.failed();
    assert!(
        r.stderr.contains(
            "template shops/invoice not found; namespace shops has no templates; did you mean shop?"
        ),
        "{}",
        r.stderr
    );
    let r = server.run(&["submit", "warehouse", "invoice"]).await;
    r.failed();
    assert!(
        r.stderr.contains("namespace warehouse has no templates"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("did you mean"), "{}", r.stderr);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_every_failed_attempt_with_its_error() {
    let server = Server::start().await;
    // No worker takes the step: each attempt times out once its short lease runs out.
    let file = server.file(
        "flaky.yaml",
        "namespace: cli\nname: flaky\nversion: 1\nsteps:\n  - name: call\n    handler: call\n    queue_wait_timeout: 150ms\n    execution_timeout: 150ms\n    retry: { max_attempts: 2, initial_delay: 50ms, max_delay: 50ms }\n",
    );
    server.run(&["template", "register", &file]).await.ok();
    let r = server.run(&["submit", "cli", "flaky"]).await;
    let id = r.ok().stdout.trim().to_owned();
    let r = server
        .run(&["show", &id, "--wait", "--timeout", "60"])
        .await;
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("state     failed"), "{}", r.stdout);
    let attempts: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("  attempt "))
        .collect();
    assert_eq!(attempts.len(), 2, "{}", r.stdout);
    for (n, line) in attempts.iter().enumerate() {
        let n = n + 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[1..3], ["timed_out", n.to_string().as_str()], "{line}");
        assert!(
            line.contains(&format!(
                "attempt {n} timed out: no result within queue-wait (150 ms) plus execution (150 ms)"
            )),
            "{line}"
        );
    }
    // The attempt rows sit in the step table's columns.
    let header = r
        .stdout
        .lines()
        .find(|l| l.starts_with("STEP"))
        .expect("the step table");
    let detail_at = header.find("OUTPUT").expect("detail column");
    for line in &attempts {
        assert!(
            line[detail_at..].starts_with("attempt "),
            "{header}\n{line}"
        );
    }
    server.finish().await;
}

#[tokio::test]
async fn migrate_creates_a_missing_database_at_once() {
    let (admin_url, _) = services();
    let database = format!("tasker_cli_new_{}", unique());
    assert!(!database_exists(&database).await);
    let mut cmd = tasker();
    cmd.env("TASKER_DATABASE_URL", with_database(&admin_url, &database))
        .env("RUST_LOG", "info")
        .arg("migrate");
    let r = run(cmd).await;
    let created = database_exists(&database).await;
    let migrated = if created {
        let db = sqlx::PgPool::connect(&with_database(&admin_url, &database))
            .await
            .expect("connect to the new database");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&db)
            .await
            .unwrap_or(0);
        db.close().await;
        n
    } else {
        0
    };
    drop_database(&database).await;
    r.ok();
    assert!(r.stdout.contains("migrations applied"), "{}", r.stdout);
    assert!(
        created,
        "database {database} was not created:\n{}",
        r.stderr
    );
    assert!(migrated > 0, "no migration applied in {database}");
    assert!(
        r.stderr.contains("created it"),
        "the creation is not logged: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("not reachable yet"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(10), "took {:?}", r.took);
}

#[tokio::test]
async fn migrate_names_a_missing_database_it_will_not_create_at_once() {
    let (admin_url, _) = services();
    // Not a plain identifier: never created automatically.
    let database = format!("tasker-cli-{}", unique());
    let mut cmd = tasker();
    cmd.env("TASKER_DATABASE_URL", with_database(&admin_url, &database))
        .arg("migrate");
    let r = run(cmd).await;
    let created = database_exists(&database).await;
    drop_database(&database).await;
    r.failed();
    assert!(!created, "{database} was created");
    assert!(
        r.stderr.contains(&format!(
            "database {database} does not exist and could not be created"
        )) && r.stderr.contains(&format!("createdb {database}")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("not reachable yet"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(10), "took {:?}", r.took);
}

#[tokio::test]
async fn log_lines_are_json_objects_when_asked() {
    let (admin_url, _) = services();
    let database = format!("tasker_cli_{}", unique());
    let mut cmd = tasker();
    cmd.env("TASKER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("TASKER_DATABASE_URL", with_database(&admin_url, &database))
        .arg("migrate");
    let r = run(cmd).await;
    r.ok();
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "migrate logs what it did");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        assert!(v["fields"]["message"].is_string(), "{v}");
    }
    drop_database(&database).await;

    let mut bad = tasker();
    bad.env("TASKER_LOG_FORMAT", "xml").arg("migrate");
    let r = run(bad).await;
    r.failed();
    assert!(
        r.stderr
            .contains(r#"TASKER_LOG_FORMAT="xml" is not a log format: text (the default) or json"#),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_commands_create_list_show_pause_resume_and_delete() {
    let server = Server::start().await;
    let file = server.file(
        "report.yaml",
        "namespace: cron\nname: report\nversion: 1\nsteps:\n  - { name: a, handler: a }\n",
    );
    server.run(&["template", "register", &file]).await.ok();
    let created = server
        .run(&[
            "schedule",
            "create",
            "cron/report",
            "--cron",
            "30 2 * * *",
            "--timezone",
            "Europe/Paris",
            "--context",
            r#"{"k": 1}"#,
            "--catch-up",
            "all",
            "--name",
            "nightly",
            "--json",
        ])
        .await;
    let s: serde_json::Value = serde_json::from_str(&created.ok().stdout).expect("JSON");
    assert_eq!(s["name"], "nightly");
    assert_eq!(s["catch_up"], "all");
    assert_eq!(s["context"], serde_json::json!({"k": 1}));
    assert_eq!(s["next_runs"].as_array().map(Vec::len), Some(5));
    let id = s["id"].as_str().expect("an id").to_owned();

    // Text: the next five runs with their local times (02:30 in Paris, +01:00 or +02:00).
    let shown = server.run(&["schedule", "show", &id]).await;
    let out = &shown.ok().stdout;
    assert!(out.contains("next runs"), "{out}");
    assert_eq!(out.matches("T02:30:00+0").count(), 5, "{out}");
    let listed = server.run(&["schedule", "list"]).await;
    let out = &listed.ok().stdout;
    assert!(
        out.contains(&id) && out.contains("Europe/Paris") && out.contains("active"),
        "{out}"
    );

    let paused = server.run(&["schedule", "pause", &id]).await;
    assert!(paused.ok().stdout.contains("paused"), "{}", paused.stdout);
    let listed = server.run(&["schedule", "list", "--json"]).await;
    let list: serde_json::Value = serde_json::from_str(&listed.ok().stdout).expect("JSON");
    assert_eq!(list["schedules"][0]["paused"], true);
    assert_eq!(list["schedules"][0]["next_tick"], serde_json::Value::Null);
    let resumed = server.run(&["schedule", "resume", &id]).await;
    assert!(
        resumed.ok().stdout.contains("resumed; next tick 20"),
        "{}",
        resumed.stdout
    );
    let deleted = server.run(&["schedule", "delete", &id]).await;
    assert!(
        deleted.ok().stdout.contains("deleted"),
        "{}",
        deleted.stdout
    );

    // Errors: exit status 1 with the server's or the parser's message.
    let r = server.run(&["schedule", "show", &id]).await;
    assert!(
        r.failed().stderr.contains("schedule_not_found"),
        "{}",
        r.stderr
    );
    let r = server
        .run(&["schedule", "create", "cron/report", "--cron", "0 25 * * *"])
        .await;
    assert!(
        r.failed().stderr.contains("invalid cron expression"),
        "{}",
        r.stderr
    );
    let r = server
        .run(&["schedule", "create", "report", "--cron", "0 2 * * *"])
        .await;
    assert!(
        r.failed().stderr.contains("NAMESPACE/TEMPLATE"),
        "{}",
        r.stderr
    );
    let r = server
        .run(&[
            "schedule",
            "create",
            "cron/report",
            "--cron",
            "0 2 * * *",
            "--catch-up",
            "some",
        ])
        .await;
    assert!(
        r.failed().stderr.contains("skip, latest or all"),
        "{}",
        r.stderr
    );
    server.finish().await;
}
