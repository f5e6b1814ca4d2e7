//! Restarting the services: RabbitMQ (`rabbitmqctl stop_app` / `start_app`, or a command of
//! yours) and PostgreSQL (`pg_ctl restart` as the data directory's owner, or a command of yours).

use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Runs a command with a timeout, its output appended to `log`; fails on a non-zero exit.
pub async fn run_logged(
    program: &str,
    args: &[String],
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(f, "=== chaos: $ {program} {} ===", args.join(" "))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                bail!(
                    "{program} {} failed: {status} (log: {})",
                    args.join(" "),
                    log.display()
                );
            }
            Ok(())
        }
        Err(_) => {
            let _ = child.kill().await;
            bail!(
                "{program} {} did not finish within {timeout:?} (log: {})",
                args.join(" "),
                log.display()
            )
        }
    }
}

fn shell(cmd: &str) -> (String, Vec<String>) {
    ("sh".into(), vec!["-c".into(), cmd.into()])
}

/// How RabbitMQ is restarted.
#[derive(Clone, Debug)]
pub enum BrokerRestart {
    /// `<ctl> stop_app`, a pause, `<ctl> start_app`: the node stays up, every connection drops,
    /// durable queues and persistent messages survive.
    App { ctl: Vec<String> },
    /// A shell command that restarts the broker and returns once it is back.
    Command(String),
}

impl BrokerRestart {
    pub fn describe(&self) -> String {
        match self {
            Self::App { ctl } => format!(
                "{} stop_app; pause; {} start_app",
                ctl.join(" "),
                ctl.join(" ")
            ),
            Self::Command(c) => c.clone(),
        }
    }

    /// Checks that the control command works (before the run, so a typo fails fast).
    pub async fn check(&self, log: &Path) -> Result<()> {
        match self {
            Self::App { ctl } => {
                let mut args = ctl[1..].to_vec();
                args.extend(["-q".into(), "status".into()]);
                run_logged(&ctl[0], &args, log, Duration::from_secs(60))
                    .await
                    .context("rabbitmqctl cannot reach the broker (set --rabbitmqctl or --broker-restart-cmd)")
            }
            Self::Command(_) => Ok(()),
        }
    }

    pub async fn restart(&self, pause: Duration, log: &Path) -> Result<()> {
        match self {
            Self::App { ctl } => {
                let with = |verb: &str| {
                    let mut a = ctl[1..].to_vec();
                    a.push(verb.into());
                    a
                };
                run_logged(&ctl[0], &with("stop_app"), log, Duration::from_secs(120)).await?;
                tokio::time::sleep(pause).await;
                // The broker must come back whatever happens: retry start_app a few times.
                let mut last = None;
                for _ in 0..5 {
                    match run_logged(&ctl[0], &with("start_app"), log, Duration::from_secs(120))
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            eprintln!("[chaos] start_app failed: {e:#}; retrying");
                            last = Some(e);
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
                Err(last.expect("an error"))
            }
            Self::Command(c) => {
                let (p, a) = shell(c);
                run_logged(&p, &a, log, Duration::from_secs(300)).await
            }
        }
    }
}

/// How PostgreSQL is restarted.
#[derive(Clone, Debug)]
pub enum DbRestart {
    /// `pg_ctl restart -D <data> -m <mode> -w -l <server log>`, as the data directory's owner.
    PgCtl { program: String, args: Vec<String> },
    /// A shell command that restarts the server and returns once it is back.
    Command(String),
}

impl DbRestart {
    pub fn describe(&self) -> String {
        match self {
            Self::PgCtl { program, args } => format!("{program} {}", args.join(" ")),
            Self::Command(c) => c.clone(),
        }
    }

    /// Works out the `pg_ctl` command for the server behind `admin`.
    pub async fn discover(admin: &PgPool, mode: &str, server_log: Option<PathBuf>) -> Result<Self> {
        let data: String = sqlx::query_scalar("SHOW data_directory")
            .fetch_one(admin)
            .await
            .context("SHOW data_directory (the admin URL must be a superuser)")?;
        let data = PathBuf::from(data);
        let meta = std::fs::metadata(&data).with_context(|| {
            format!(
                "the data directory {} is not on this machine (use --db-restart-cmd)",
                data.display()
            )
        })?;
        let owner_uid = meta.uid();
        let my_uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(u32::MAX);
        // pg_ctl of the running server's version: next to the postgres binary in postmaster.opts.
        let pg_ctl = std::fs::read_to_string(data.join("postmaster.opts"))
            .ok()
            .and_then(|opts| {
                let bin = opts.split_whitespace().next()?.trim_matches('"').to_owned();
                let p = Path::new(&bin).with_file_name("pg_ctl");
                p.exists().then(|| p.display().to_string())
            })
            .unwrap_or_else(|| "pg_ctl".into());
        // Keep the server's log where it is (the postmaster's stderr), else a file in /tmp.
        let log = server_log.or_else(|| {
            let pid = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
            let pid = pid.lines().next()?.trim().to_owned();
            let target = std::fs::read_link(format!("/proc/{pid}/fd/2")).ok()?;
            (target.is_absolute() && target.is_file()).then_some(target)
        });
        let log = log.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("tasker-chaos-postgres-{owner_uid}.log"))
        });
        let pg_args = vec![
            "restart".to_owned(),
            "-D".into(),
            data.display().to_string(),
            "-m".into(),
            mode.to_owned(),
            "-w".into(),
            "-t".into(),
            "120".into(),
            "-l".into(),
            log.display().to_string(),
        ];
        if my_uid == owner_uid {
            return Ok(Self::PgCtl {
                program: pg_ctl,
                args: pg_args,
            });
        }
        let owner = owner_name(owner_uid)?;
        // From / : the owner may not be allowed into the harness's working directory.
        let line = std::iter::once(pg_ctl.as_str())
            .chain(pg_args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!("cd / && {line}");
        if my_uid == 0 {
            Ok(Self::PgCtl {
                program: "su".into(),
                args: vec!["-s".into(), "/bin/sh".into(), owner, "-c".into(), line],
            })
        } else {
            let mut args = vec!["-n".into(), "-u".into(), owner, pg_ctl];
            args.extend(pg_args);
            Ok(Self::PgCtl {
                program: "sudo".into(),
                args,
            })
        }
    }

    pub async fn restart(&self, log: &Path) -> Result<()> {
        match self {
            Self::PgCtl { program, args } => {
                run_logged(program, args, log, Duration::from_secs(300)).await
            }
            Self::Command(c) => {
                let (p, a) = shell(c);
                run_logged(&p, &a, log, Duration::from_secs(300)).await
            }
        }
    }
}

fn owner_name(uid: u32) -> Result<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_owned())
        })
        .with_context(|| format!("no user with uid {uid}"))
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.=:,".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
