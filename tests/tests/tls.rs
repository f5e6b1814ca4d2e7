//! TLS end to end: the HTTP API over HTTPS with a certificate made here (rcgen), and a task run by
//! an orchestrator and a worker that reach RabbitMQ over `amqps://` and PostgreSQL with
//! `sslmode=verify-full`, against the TLS listeners `deploy/local/services.sh up` configures
//! (`TASKER_TEST_AMQPS_URL`, `TASKER_TEST_DATABASE_TLS_URL`, `TASKER_TEST_TLS_CA` in
//! `.tasker/env`). Without those variables the broker/database test fails when `CI` is set and is
//! skipped, saying so, otherwise.

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tasker_orchestrator::{App, Config};
use tasker_schemas::TaskState;
use tasker_schemas::api::SubmitTask;
use tasker_tests::Harness;
use tasker_tests::tasker_worker::{Client, ClientError, Worker};

const TEMPLATE: &str =
    "namespace: tls\nname: hello\nversion: 1\nsteps:\n  - { name: greet, handler: greet }\n";

/// A CA and a server certificate for `localhost` and `127.0.0.1` signed by it, as PEM files in a
/// directory of their own (deleted on drop).
struct TestCerts {
    dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCerts {
    fn generate() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tasker-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Tasker TLS test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&server_key, &issuer)?;
        let certs = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        };
        std::fs::write(&certs.ca, ca_cert.pem())?;
        std::fs::write(&certs.cert, cert.pem())?;
        std::fs::write(&certs.key, server_key.serialize_pem())?;
        Ok(certs)
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every cause of an error on one line, as the CLI prints it.
fn chain(e: impl Into<anyhow::Error>) -> String {
    format!("{:#}", e.into())
}

fn hello() -> SubmitTask {
    SubmitTask {
        namespace: "tls".into(),
        template: "hello".into(),
        version: None,
        context: json!({"name": "Ada"}),
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_to_clients_that_trust_its_ca() -> Result<()> {
    let h = Harness::start().await?;
    let certs = TestCerts::generate()?;
    let mut config = h.config();
    config.http_tls_cert = Some(certs.cert.clone());
    config.http_tls_key = Some(certs.key.clone());
    let url = h.start_orchestrator_with(config).await?;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // Everything through HTTPS: register, submit, long-poll until done.
    let client = Client::builder(&url).ca_cert(&certs.ca).build()?;
    let template = tasker_orchestrator::service::templates::parse_template(TEMPLATE)
        .map_err(anyhow::Error::msg)?;
    assert!(client.register_template(&template).await?.created);
    h.spawn_worker(h.worker("tls").handler_fn("greet", |ctx| async move {
        Ok(json!({ "hello": ctx.input::<serde_json::Value>()?["name"] }))
    }))
    .await?;
    let submitted = client.submit(&hello()).await?;
    let task = client
        .wait(submitted.task_id, Duration::from_secs(60))
        .await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(task.output, Some(json!({"greet": {"hello": "Ada"}})));
    // `localhost` is in the certificate too.
    let port = url.rsplit(':').next().context("port")?;
    let by_name = Client::builder(format!("https://localhost:{port}"))
        .ca_cert(&certs.ca)
        .build()?;
    assert_eq!(by_name.task(task.id).await?.state, TaskState::Completed);

    // A client that does not trust the CA is refused, and says why.
    let err = Client::new(&url).task(task.id).await.unwrap_err();
    assert!(matches!(err, ClientError::Http(_)), "{err:?}");
    let why = chain(err);
    assert!(
        why.contains("certificate") && why.contains("UnknownIssuer"),
        "not a clear certificate error: {why}"
    );
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = Client::new(url.replacen("https://", "http://", 1));
    let err = plain.task(task.id).await.unwrap_err();
    assert!(matches!(err, ClientError::Http(_)), "{err:?}");

    // A client that connects and never says hello holds up nobody: handshakes do not run in
    // the accept loop.
    let addr = url.trim_start_matches("https://").to_owned();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&addr).await?);
    }
    let answered = tokio::time::timeout(Duration::from_secs(5), client.task(task.id)).await;
    assert_eq!(
        answered
            .context("a silent TLS client held up the server")??
            .state,
        TaskState::Completed
    );
    drop(silent);

    // The failed handshakes above left the server serving.
    assert_eq!(client.task(task.id).await?.state, TaskState::Completed);
    h.finish().await;
    Ok(())
}

#[tokio::test]
async fn unusable_tls_settings_fail_the_start_and_name_the_file() -> Result<()> {
    let certs = TestCerts::generate()?;
    // Certificates are read before any connection: these fail without services.
    let build = |config: Config| async move {
        match App::build(config).await {
            Ok(_) => bail!("the orchestrator started"),
            Err(e) => Ok(e.to_string()),
        }
    };
    let with = |cert: Option<&Path>, key: Option<&Path>| Config {
        http_tls_cert: cert.map(Path::to_owned),
        http_tls_key: key.map(Path::to_owned),
        database_url: "postgres://nobody@127.0.0.1:1/none".into(),
        ..Config::default()
    };

    let err = build(with(Some(&certs.cert), None)).await?;
    assert!(err.contains("TASKER_HTTP_TLS_KEY"), "{err}");
    let err = build(with(None, Some(&certs.key))).await?;
    assert!(err.contains("TASKER_HTTP_TLS_CERT"), "{err}");

    let missing = certs.dir.join("missing.pem");
    let err = build(with(Some(&missing), Some(&certs.key))).await?;
    assert!(
        err.contains("TASKER_HTTP_TLS_CERT") && err.contains("missing.pem"),
        "{err}"
    );
    // A key file given as the certificate, and the other way round.
    let err = build(with(Some(&certs.key), Some(&certs.key))).await?;
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = build(with(Some(&certs.cert), Some(&certs.cert))).await?;
    assert!(
        err.contains("TASKER_HTTP_TLS_KEY") && err.contains("no PEM private key"),
        "{err}"
    );
    // A key that is not the certificate's.
    let other = certs.dir.join("other.key");
    std::fs::write(&other, KeyPair::generate()?.serialize_pem())?;
    let err = build(with(Some(&certs.cert), Some(&other))).await?;
    assert!(err.contains("cannot be used together"), "{err}");

    let err = build(Config {
        amqp_ca_cert: Some(missing.clone()),
        ..with(None, None)
    })
    .await?;
    assert!(
        err.contains("TASKER_AMQP_CA_CERT") && err.contains("missing.pem"),
        "{err}"
    );

    // The client and the worker refuse an unreadable CA file the same way.
    let err = Client::builder("https://localhost:1")
        .ca_cert(&missing)
        .build()
        .unwrap_err();
    assert!(chain(err).contains("missing.pem"));
    let err = Worker::builder("amqps://localhost:1/%2f")
        .namespace("tls")
        .amqp_ca_cert(&certs.key)
        .build()
        .run(Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
    Ok(())
}

/// The TLS endpoints of the test services, from `.tasker/env`.
struct TlsServices {
    amqps_url: String,
    database_url: String,
    ca: PathBuf,
}

const TLS_VARS: [&str; 3] = [
    "TASKER_TEST_AMQPS_URL",
    "TASKER_TEST_DATABASE_TLS_URL",
    "TASKER_TEST_TLS_CA",
];

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The TLS services, or `None` (the test is skipped, with a line saying why) when their
/// variables are missing. With `CI` set, missing variables fail the test instead.
fn tls_services() -> Result<Option<TlsServices>> {
    let missing: Vec<&str> = TLS_VARS
        .into_iter()
        .filter(|name| var(name).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(Some(TlsServices {
            amqps_url: var(TLS_VARS[0]).context("amqps URL")?,
            database_url: var(TLS_VARS[1]).context("database URL")?,
            ca: PathBuf::from(var(TLS_VARS[2]).context("CA")?),
        }));
    }
    let why = format!(
        "{} not set: run deploy/local/services.sh up, then . .tasker/env",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        bail!("{why} (required when CI is set)");
    }
    eprintln!("SKIPPED (TLS services): {why}");
    Ok(None)
}

/// Points the harness's orchestrators at the TLS endpoints: `amqps://` with the test CA, and the
/// test's own database through the `sslmode=verify-full` URL.
fn use_tls_services(c: &mut Config) {
    let tls = tls_services()
        .ok()
        .flatten()
        .expect("checked by the test before the harness starts");
    let database = tasker_orchestrator::startup::database_name(&c.database_url)
        .expect("the harness names a database");
    c.database_url =
        tasker_tests::replace_database(&tls.database_url, &database).expect("a database URL");
    c.amqp_url = tls.amqps_url;
    c.amqp_ca_cert = Some(tls.ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_over_amqps_and_verify_full_postgres() -> Result<()> {
    let Some(tls) = tls_services()? else {
        return Ok(());
    };
    assert!(tls.amqps_url.starts_with("amqps://"), "{}", tls.amqps_url);
    assert!(
        tls.database_url.contains("sslmode=verify-full"),
        "{}",
        tls.database_url
    );
    let h = Harness::start_with(use_tls_services).await?;
    let shared = h.shared(0);
    assert!(shared.config.amqp_url.starts_with("amqps://"));

    // The orchestrator's database connections are encrypted.
    let (ssl, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&shared.db)
            .await?;
    assert!(ssl, "the orchestrator's PostgreSQL connection is not TLS");
    eprintln!(
        "orchestrator -> PostgreSQL: {}",
        version.unwrap_or_default()
    );

    // A worker on amqps:// trusting the test CA runs the task end to end.
    h.register_yaml(TEMPLATE).await?;
    h.spawn_worker(
        Worker::builder(tls.amqps_url.clone())
            .prefix(h.prefix.clone())
            .namespace("tls")
            .amqp_ca_cert(&tls.ca)
            .grace_period(Duration::from_secs(5))
            .handler_fn("greet", |ctx| async move {
                Ok(json!({ "hello": ctx.input::<serde_json::Value>()?["name"] }))
            }),
    )
    .await?;
    let task = h.run("tls", "hello", json!({"name": "Ada"})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(task.output, Some(json!({"greet": {"hello": "Ada"}})));
    assert!(shared.publisher.is_connected());

    // That port speaks TLS only: plain AMQP gets no broker there.
    let plain = tls.amqps_url.replacen("amqps://", "amqp://", 1);
    let connect = lapin::Connection::connect(&plain, Default::default());
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), connect).await {
        bail!("plain AMQP was accepted on the TLS port");
    }
    // And the broker's certificate is really checked: without the test CA it is refused.
    let platform_roots_only = lapin::tcp::OwnedTLSConfig::default();
    let untrusted = tasker_tests::tasker_worker::client::tls::amqp_connect(
        &tls.amqps_url,
        Default::default(),
        &platform_roots_only,
    );
    match tokio::time::timeout(Duration::from_secs(10), untrusted).await {
        Ok(Ok(_)) => bail!("amqps:// was accepted without trusting the test CA"),
        Ok(Err(e)) => {
            let why = chain(e);
            assert!(why.contains("certificate"), "{why}");
        }
        Err(_) => bail!("amqps:// without the test CA neither failed nor connected"),
    }
    // PostgreSQL too: verify-full without the test CA is refused.
    let no_ca = tls
        .database_url
        .split('&')
        .filter(|p| !p.starts_with("sslrootcert="))
        .collect::<Vec<_>>()
        .join("&");
    assert!(!no_ca.contains("sslrootcert"), "{no_ca}");
    let refused = sqlx::PgPool::connect(&no_ca).await;
    assert!(
        refused.is_err(),
        "verify-full succeeded without the test CA"
    );
    h.finish().await;
    Ok(())
}
