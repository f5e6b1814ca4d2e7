//! Where the load goes: a fresh database plus an orchestrator child process (`tasker serve`), or
//! a deployment that is already running. Also reads the CPU time and memory of processes from
//! `/proc` (Linux only; elsewhere those columns stay empty).

use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tasker_schemas::Names;
use tasker_tests::replace_database;

/// Orchestrator settings of the benchmark profile (each can be overridden with `--orch-env`).
/// They are the orchestrator's defaults except where noted; the report prints what was used.
pub const BENCH_SETTINGS: &[(&str, &str)] = &[
    ("TASKER_DB_POOL_SIZE", "16"),
    ("TASKER_RESULT_SHARDS", "1"),
    ("TASKER_RESULT_PREFETCH", "256"),
    ("TASKER_RESULT_BATCH_SIZE", "256"),
    ("TASKER_DISPATCH_BATCH_SIZE", "256"),
    ("TASKER_MAX_IN_FLIGHT_PER_QUEUE", "10000"),
    ("TASKER_POLL_INTERVAL_MS", "250"),
    ("RUST_LOG", "warn"),
];

/// A deployment under load.
pub struct Deployment {
    pub api_url: String,
    /// The deployment's own database (not the admin URL).
    pub database_url: String,
    pub amqp_url: String,
    pub prefix: String,
    /// The orchestrator process, when known (for its CPU time and memory).
    pub pid: Option<u32>,
    /// Orchestrator settings passed to the child (empty for an external deployment).
    pub settings: Vec<(String, String)>,
    owned: Option<Owned>,
}

/// What the loadgen created and must remove.
struct Owned {
    admin_url: String,
    database_name: String,
    child: tokio::process::Child,
    log_path: PathBuf,
}

/// How to start an own deployment.
pub struct StartOptions<'a> {
    pub admin_url: &'a str,
    pub amqp_url: &'a str,
    pub tasker_bin: Option<&'a Path>,
    pub overrides: &'a [(String, String)],
    pub run_id: &'a str,
}

impl Deployment {
    /// A deployment that is already running; the loadgen creates and removes nothing of it.
    pub fn external(
        api_url: &str,
        database_url: &str,
        amqp_url: &str,
        prefix: &str,
        pid: Option<u32>,
    ) -> Self {
        Self {
            api_url: api_url.trim_end_matches('/').to_owned(),
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            prefix: prefix.to_owned(),
            pid,
            settings: Vec::new(),
            owned: None,
        }
    }

    /// Creates a database from the admin URL and starts `tasker serve` on it with a unique prefix
    /// and a free port; returns once the orchestrator answers `/ready`.
    pub async fn start(opts: StartOptions<'_>) -> Result<Self> {
        let bin = tasker_tests::find_tasker(opts.tasker_bin).context(
            "the loadgen starts it: build it in the loadgen's profile (--release for real numbers)",
        )?;
        let database_name = format!("tasker_load_{}", opts.run_id);
        let admin = PgPool::connect(opts.admin_url)
            .await
            .with_context(|| format!("cannot connect to Postgres at {}", redact(opts.admin_url)))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database_name}\""
        )))
        .execute(&admin)
        .await
        .context(
            "cannot create the benchmark database (the URL needs the right to create databases)",
        )?;
        admin.close().await;
        let database_url = replace_database(opts.admin_url, &database_name)?;
        let prefix = format!("lg{}", opts.run_id);
        let mut settings: Vec<(String, String)> = BENCH_SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (k, v) in opts.overrides {
            match settings.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v.clone(),
                None => settings.push((k.clone(), v.clone())),
            }
        }
        let log_path =
            std::env::temp_dir().join(format!("loadgen-{}-orchestrator.log", opts.run_id));
        let spawned = spawn_orchestrator(
            &bin,
            &database_url,
            opts.amqp_url,
            &prefix,
            &settings,
            &log_path,
        )
        .await;
        let (child, api_url) = match spawned {
            Ok(s) => s,
            Err(e) => {
                drop_database(opts.admin_url, &database_name).await;
                return Err(e);
            }
        };
        Ok(Self {
            api_url,
            database_url,
            amqp_url: opts.amqp_url.to_owned(),
            prefix,
            pid: child.id(),
            settings,
            owned: Some(Owned {
                admin_url: opts.admin_url.to_owned(),
                database_name,
                child,
                log_path,
            }),
        })
    }

    /// True when the loadgen created the database (and may seed it).
    pub fn is_owned(&self) -> bool {
        self.owned.is_some()
    }

    pub fn database_name(&self) -> Option<&str> {
        self.owned.as_ref().map(|o| o.database_name.as_str())
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.owned.as_ref().map(|o| o.log_path.as_path())
    }

    /// Fails if the orchestrator child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(o) = &mut self.owned
            && let Some(status) = o.child.try_wait()?
        {
            bail!(
                "the orchestrator exited ({status}); its log: {}\n{}",
                o.log_path.display(),
                log_tail(&o.log_path)
            );
        }
        Ok(())
    }

    /// Stops the orchestrator (SIGTERM, then kill), deletes the prefix's queues and exchanges and
    /// drops the database. With `keep`, the database and the log stay for inspection.
    pub async fn finish(mut self, step_queues: &[&str], keep: bool) {
        let Some(mut owned) = self.owned.take() else {
            return;
        };
        if !tasker_tests::stop_child(&mut owned.child, Duration::from_secs(15)).await {
            eprintln!("loadgen: the orchestrator did not stop within 15 s; killed it");
        }
        // The load generator's templates are all in one namespace.
        let step_queues: Vec<String> = step_queues
            .iter()
            .map(|q| tasker_schemas::topology::step_routing_key(crate::bench::NAMESPACE, q))
            .collect();
        if let Err(e) = tasker_tests::delete_topology(
            &self.amqp_url,
            &Names::new(self.prefix.clone()),
            &step_queues,
        )
        .await
        {
            eprintln!(
                "loadgen: could not delete the queues of prefix {}: {e:#}",
                self.prefix
            );
        }
        if keep {
            eprintln!(
                "loadgen: kept database {} and log {}",
                owned.database_name,
                owned.log_path.display()
            );
        } else {
            drop_database(&owned.admin_url, &owned.database_name).await;
            let _ = std::fs::remove_file(&owned.log_path);
        }
    }
}

async fn spawn_orchestrator(
    bin: &Path,
    database_url: &str,
    amqp_url: &str,
    prefix: &str,
    settings: &[(String, String)],
    log_path: &Path,
) -> Result<(tokio::process::Child, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("TASKER_DATABASE_URL".into(), database_url.into()),
        ("TASKER_AMQP_URL".into(), amqp_url.into()),
        ("TASKER_PREFIX".into(), prefix.into()),
    ];
    env.extend(settings.iter().cloned());
    tasker_tests::spawn_serve(bin, &env, log_path).await
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn drop_database(admin_url: &str, name: &str) {
    match PgPool::connect(admin_url).await {
        Ok(admin) => {
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&admin)
            .await
            {
                eprintln!("loadgen: could not drop database {name}: {e}");
            }
            admin.close().await;
        }
        Err(e) => eprintln!("loadgen: could not drop database {name}: {e}"),
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    tasker_orchestrator::config::redact_url(url)
}

// ---------------------------------------------------------------------------------------------
// Process statistics from /proc.

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// (comm, utime + stime, cutime + cstime) of a process, in seconds.
fn proc_times(pid: &str) -> Option<(String, f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may hold spaces: split after the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split(' ').collect();
    // Fields after comm start at field 3 (state); utime is field 14.
    let get = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = clock_ticks();
    Some((
        comm,
        (get(14)? + get(15)?) / ticks,
        (get(16)? + get(17)?) / ticks,
    ))
}

/// CPU seconds (user + system) of one process so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    proc_times(&pid.to_string()).map(|(_, own, _)| own)
}

/// A `/proc/<pid>/status` size field (`VmRSS`, `VmHWM`) in MiB.
pub fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: f64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The TCP port of a service URL (`scheme://user:pw@host:port/...`), or `default`.
pub fn url_port(url: &str, default: u16) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.ends_with(']') {
        return default;
    }
    host.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// The process listening on a local TCP port, found through `/proc/net/tcp{,6}` and the socket
/// links in `/proc/<pid>/fd` (needs the right to read those: same user or root).
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Which processes are Postgres and RabbitMQ: the ones listening on the services' ports and
/// their children (so other clusters or brokers on this machine are not counted). Of Postgres,
/// only the backends of the benchmark database count, with the shared background processes (WAL
/// writer, checkpointer, ...): other databases' backends on a shared server are someone else's
/// load. When a listener cannot be found, every `postgres` / `beam.smp` process counts.
#[derive(Clone, Debug, Default)]
pub struct ServicePids {
    pub postgres: Option<u32>,
    pub rabbitmq: Option<u32>,
    pub database: String,
}

impl ServicePids {
    pub fn find(database_url: &str, amqp_url: &str) -> Self {
        let path = database_url.split_once("://").map_or("", |(_, r)| r);
        let database = path
            .split_once('/')
            .map_or("", |(_, d)| d)
            .split('?')
            .next()
            .unwrap_or("");
        Self {
            postgres: listener_pid(url_port(database_url, 5432)),
            rabbitmq: listener_pid(url_port(amqp_url, 5672)),
            database: database.to_owned(),
        }
    }

    /// Whether a child of the postmaster works for the benchmark database (or for everyone).
    fn counts_postgres_child(&self, pid: &str) -> bool {
        let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let title = String::from_utf8_lossy(&title).replace('\0', " ");
        if title.split_whitespace().any(|w| w == self.database) {
            return true;
        }
        // A client backend or autovacuum worker of another database.
        !(title.contains('(') || title.contains("[local]") || title.contains("autovacuum worker"))
    }
}

/// CPU seconds used so far by the orchestrator, Postgres (reaped backends included), RabbitMQ
/// and the loadgen itself, per process.
#[derive(Clone, Debug, Default)]
pub struct CpuSnapshot {
    orchestrator: Option<f64>,
    loadgen: Option<f64>,
    postgres: std::collections::HashMap<u32, f64>,
    rabbitmq: std::collections::HashMap<u32, f64>,
}

/// CPU seconds used in a period.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUsed {
    pub orchestrator: Option<f64>,
    pub postgres: Option<f64>,
    pub rabbitmq: Option<f64>,
    pub loadgen: Option<f64>,
}

fn parent_pid(pid: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

impl CpuSnapshot {
    pub fn take(orchestrator_pid: Option<u32>, services: &ServicePids) -> Self {
        let mut snap = Self {
            orchestrator: orchestrator_pid.and_then(cpu_seconds),
            loadgen: cpu_seconds(std::process::id()),
            ..Self::default()
        };
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return snap;
        };
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(pid) = name.parse::<u32>() else {
                continue;
            };
            let Some((comm, own, children)) = proc_times(&name) else {
                continue;
            };
            let pg = match services.postgres {
                // The postmaster's own time: its children's (reaped) time is every database's.
                Some(root) if pid == root => Some(own),
                Some(root) if parent_pid(&name) == Some(root) => services
                    .counts_postgres_child(&name)
                    .then_some(own + children),
                Some(_) => None,
                None => (comm == "postgres").then_some(own + children),
            };
            let mq = match services.rabbitmq {
                Some(root) => {
                    (pid == root || parent_pid(&name) == Some(root)).then_some(own + children)
                }
                None => (comm == "beam.smp").then_some(own + children),
            };
            if let Some(t) = pg {
                snap.postgres.insert(pid, t);
            } else if let Some(t) = mq {
                snap.rabbitmq.insert(pid, t);
            }
        }
        snap
    }

    /// CPU used between `earlier` and `self`: per process, what it used since `earlier` (all of
    /// it for a process that is new).
    pub fn since(&self, earlier: &Self) -> CpuUsed {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        let group = |now: &std::collections::HashMap<u32, f64>,
                     then: &std::collections::HashMap<u32, f64>| {
            (!now.is_empty()).then(|| {
                now.iter()
                    .map(|(pid, t)| (t - then.get(pid).copied().unwrap_or(0.0)).max(0.0))
                    .sum::<f64>()
            })
        };
        CpuUsed {
            orchestrator: d(self.orchestrator, earlier.orchestrator),
            postgres: group(&self.postgres, &earlier.postgres),
            rabbitmq: group(&self.rabbitmq, &earlier.rabbitmq),
            loadgen: d(self.loadgen, earlier.loadgen),
        }
    }
}

/// Samples the orchestrator's resident memory (`VmRSS`) every 50 ms and keeps the largest value
/// since the last [`RssSampler::take_max_mb`]: the peak of one workload, whereas `VmHWM` is the
/// peak of the whole process.
pub struct RssSampler {
    pid: u32,
    max_kb: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let max_kb = Arc::new(AtomicU64::new(0));
        let max = max_kb.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if let Some(mb) = status_mb(pid, "VmRSS") {
                    max.fetch_max((mb * 1024.0) as u64, Ordering::Relaxed);
                }
            }
        });
        Self { pid, max_kb, task }
    }

    /// The largest sample of the current period, without starting a new one.
    pub fn peek_max_mb(&self) -> Option<f64> {
        let max = self.max_kb.load(Ordering::Relaxed);
        (max > 0).then(|| max as f64 / 1024.0)
    }

    /// The largest sample since the last call, and starts a new period (seeded with the current
    /// value, so a period always has one).
    pub fn take_max_mb(&self) -> Option<f64> {
        let now = status_mb(self.pid, "VmRSS")
            .map(|mb| (mb * 1024.0) as u64)
            .unwrap_or(0);
        let max = self.max_kb.swap(now, Ordering::Relaxed).max(now);
        (max > 0).then(|| max as f64 / 1024.0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_proc() {
        assert_eq!(
            url_port("amqp://guest:guest@127.0.0.1:5673/%2f", 5672),
            5673
        );
        assert_eq!(
            url_port("postgres://postgres@127.0.0.1/postgres", 5432),
            5432
        );
        assert_eq!(
            url_port("postgres://u:p@h:6543?sslmode=disable", 5432),
            6543
        );
        if Path::new("/proc/self/stat").exists() {
            assert!(cpu_seconds(std::process::id()).is_some());
            assert!(status_mb(std::process::id(), "VmRSS").unwrap() > 0.0);
        }
    }
}
