//! The HTTP edge: every error answer is JSON with a documented code, lists are summaries with a
//! page cap, and the server is bounded (request and idle timeouts, connection and long-poll
//! caps).

use reqwest::header::{ALLOW, CONTENT_TYPE};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tasker_schemas::TaskState;
use tasker_schemas::api::{ErrorBody, SubmitTask, TaskView};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::ListTasks;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A template whose only step has no worker: its tasks stay `running`.
const TEMPLATE: &str =
    "namespace: edge\nname: stuck\nversion: 1\nsteps:\n  - { name: s, handler: nobody }\n";

fn stuck(context: Value) -> SubmitTask {
    SubmitTask {
        namespace: "edge".into(),
        template: "stuck".into(),
        version: None,
        context,
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    }
}

/// The status, code and message of an error answer, which must be a JSON error body.
async fn json_error(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("a body");
    assert!(
        content_type.starts_with("application/json"),
        "{status} answered with Content-Type {content_type:?}: {text}"
    );
    let body: ErrorBody = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} is not a JSON error body ({e}): {text}"));
    (status, body.error.code, body.error.message)
}

/// Reads from `stream` until what was read contains `needle`, the peer closes, or `within`
/// passes; returns what was read.
async fn read_until(stream: &mut TcpStream, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// How long until the server closes `stream` (reading and dropping what it sends), or `None`
/// when it is still open after `within`.
async fn closed_after(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A raw connection with a request in flight: a POST whose body never finishes arriving.
async fn slow_upload(base: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .expect("write");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_with_a_documented_code() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.max_request_bytes = 64 * 1024).await?;
    h.register_yaml(TEMPLATE).await?;
    let task = h.client().submit(&stuck(json!({}))).await?.task_id;
    let base = h.client().base_url().to_owned();
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{base}{path}");
    let expect = |status: u16, code: &'static str| (status, code);

    // Unknown paths and wrong methods.
    for (method, path, want) in [
        (reqwest::Method::GET, "/nope", expect(404, "not_found")),
        (reqwest::Method::GET, "/v1/nope", expect(404, "not_found")),
        (
            reqwest::Method::GET,
            "/v1/tasks/x/y/z",
            expect(404, "not_found"),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/tasks",
            expect(405, "method_not_allowed"),
        ),
        (
            reqwest::Method::PUT,
            &format!("/v1/tasks/{task}"),
            expect(405, "method_not_allowed"),
        ),
        (
            reqwest::Method::POST,
            "/health",
            expect(405, "method_not_allowed"),
        ),
    ] {
        let response = http.request(method.clone(), url(path)).send().await?;
        let allow = response.headers().get(ALLOW).cloned();
        let (status, code, message) = json_error(response).await;
        assert_eq!((status, code.as_str()), want, "{method} {path}: {message}");
        if status == 405 {
            assert!(
                allow.is_some(),
                "{method} {path}: 405 without an Allow header"
            );
        }
    }

    // Query strings the framework cannot read.
    for path in [
        "/v1/tasks?limit=abc".to_owned(),
        "/v1/tasks?limit=1000".to_owned(),
        "/v1/tasks?limit=0".to_owned(),
        format!("/v1/tasks/{task}?wait_ms=soon"),
        "/v1/templates/edge/stuck?version=x".to_owned(),
        format!("/v1/tasks/{task}/steps/s/instances?after=-1"),
        "/v1/tasks/not-a-task-id".to_owned(),
        // Not UTF-8 once percent-decoded.
        "/v1/templates/%FF/stuck".to_owned(),
    ] {
        let (status, code, message) = json_error(http.get(url(&path)).send().await?).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "{path}: {message}"
        );
    }

    // Bodies: malformed, of the wrong shape, of another type, missing, too large.
    let post = |path: &str| http.post(url(path));
    const JSON: &str = "application/json";
    let cancel = format!("/v1/tasks/{task}/cancel");
    let too_large = format!(
        "{{\"namespace\": \"edge\", \"template\": \"stuck\", \"context\": {{\"x\": \"{}\"}}}}",
        "x".repeat(100_000)
    );
    for (request, want, what) in [
        (
            post("/v1/tasks").header(CONTENT_TYPE, JSON).body("{"),
            expect(400, "invalid_request"),
            "malformed JSON",
        ),
        (
            post("/v1/tasks").json(&json!({"namespace": 5})),
            expect(400, "invalid_request"),
            "wrong shape",
        ),
        (
            post("/v1/tasks").json(&json!({"namespace": "edge", "template": "stuck", "nope": 1})),
            expect(400, "invalid_request"),
            "unknown field",
        ),
        (
            post("/v1/tasks").header(CONTENT_TYPE, JSON),
            expect(400, "invalid_request"),
            "empty JSON body",
        ),
        (
            post("/v1/tasks")
                .header(CONTENT_TYPE, "text/plain")
                .body("{}"),
            expect(415, "unsupported_media_type"),
            "text body",
        ),
        (
            post("/v1/tasks"),
            expect(415, "unsupported_media_type"),
            "no body, no type",
        ),
        (
            post("/v1/templates")
                .header(CONTENT_TYPE, "application/yaml")
                .body(TEMPLATE),
            expect(415, "unsupported_media_type"),
            "YAML template",
        ),
        (
            post("/v1/tasks").header(CONTENT_TYPE, JSON).body(too_large),
            expect(413, "payload_too_large"),
            "over max_request_bytes",
        ),
        (
            post(&cancel).header(CONTENT_TYPE, JSON).body("nope"),
            expect(400, "invalid_request"),
            "malformed cancel body",
        ),
        (
            post(&cancel).json(&json!({"reason": 5})),
            expect(400, "invalid_request"),
            "cancel body of the wrong shape",
        ),
        (
            post(&cancel)
                .header(CONTENT_TYPE, "text/plain")
                .body("because"),
            expect(415, "unsupported_media_type"),
            "text cancel body",
        ),
    ] {
        let (status, code, message) = json_error(request.send().await?).await;
        assert_eq!((status, code.as_str()), want, "{what}: {message}");
    }
    // None of the refused requests reached the task.
    assert_eq!(h.client().task(task).await?.state, TaskState::Running);
    // A cancel without a body (and without a Content-Type) is still fine.
    let r = post(&cancel).send().await?;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_summaries_in_pages_of_at_most_500() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let c = h.client();
    let mut ids = Vec::new();
    for i in 0..3 {
        let blob = "x".repeat(20_000);
        ids.push(
            c.submit(&stuck(json!({"i": i, "blob": blob})))
                .await?
                .task_id,
        );
    }
    let base = c.base_url().to_owned();
    let http = reqwest::Client::new();

    let page: Value = http
        .get(format!("{base}/v1/tasks?limit=500"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let tasks = page["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 3);
    for t in tasks {
        for absent in ["context", "output", "steps", "events"] {
            assert!(t.get(absent).is_none(), "a list item has {absent}: {t}");
        }
        for present in [
            "id",
            "namespace",
            "template",
            "template_version",
            "state",
            "created_at",
        ] {
            assert!(t.get(present).is_some(), "a list item lacks {present}: {t}");
        }
    }
    assert!(page.to_string().len() < 5_000, "{page}");

    let r = http
        .get(format!("{base}/v1/tasks?limit=501"))
        .send()
        .await?;
    let (status, code, message) = json_error(r).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("500"), "{message}");

    // The client pages through the summaries.
    let first = c
        .list(&ListTasks {
            limit: Some(2),
            ..ListTasks::default()
        })
        .await?;
    let got: Vec<_> = first.tasks.iter().map(|t| t.id).collect();
    assert_eq!(got, vec![ids[2], ids[1]]);
    assert_eq!(first.next, Some(ids[1]));
    let second = c
        .list(&ListTasks {
            limit: Some(2),
            after: first.next,
            ..ListTasks::default()
        })
        .await?;
    assert_eq!(second.tasks.len(), 1);
    assert_eq!(second.tasks[0].id, ids[0]);
    assert_eq!(second.tasks[0].state, TaskState::Running);
    assert_eq!(second.next, None);
    // The task itself still has its context.
    let full: TaskView = c.task(ids[0]).await?;
    assert_eq!(full.context["i"], 0);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_time_is_answered_503_timeout_but_long_polls_get_their_wait()
-> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.http_request_timeout_ms = 500).await?;
    h.register_yaml(TEMPLATE).await?;
    let task = h.client().submit(&stuck(json!({}))).await?.task_id;
    let base = h.client().base_url().to_owned();

    // A body that never finishes arriving.
    let started = Instant::now();
    let mut stream = slow_upload(&base).await;
    let answer = read_until(&mut stream, "\"timeout\"", Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"timeout""#), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A long-poll waits for as long as it asked, beyond the request timeout.
    let started = Instant::now();
    let r = reqwest::get(format!("{base}/v1/tasks/{task}?wait_ms=1500")).await?;
    let took = started.elapsed();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    let view: TaskView = r.json().await?;
    assert_eq!(view.state, TaskState::Running);
    assert!(took >= Duration::from_millis(1_400), "{took:?}");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_over_the_cap_answer_at_once() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.http_max_long_polls = 1).await?;
    h.register_yaml(TEMPLATE).await?;
    let task = h.client().submit(&stuck(json!({}))).await?.task_id;
    let url = format!("{}/v1/tasks/{task}", h.client().base_url());

    let poll = |wait_ms: u64| {
        let url = format!("{url}?wait_ms={wait_ms}");
        async move {
            let started = Instant::now();
            let view: TaskView = reqwest::get(url).await?.error_for_status()?.json().await?;
            anyhow::Ok((view.state, started.elapsed()))
        }
    };
    let first = tokio::spawn(poll(3_000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The cap is taken: this one answers at once with the task as it is.
    let (state, took) = poll(3_000).await?;
    assert_eq!(state, TaskState::Running);
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    let (state, took) = first.await??;
    assert_eq!(state, TaskState::Running);
    assert!(took >= Duration::from_millis(2_900), "{took:?}");
    // Released: the next long-poll waits again.
    let (_, took) = poll(600).await?;
    assert!(took >= Duration::from_millis(550), "{took:?}");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_are_closed_after_the_idle_timeout() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.http_idle_timeout_ms = 500).await?;
    h.register_yaml(TEMPLATE).await?;
    let task = h.client().submit(&stuck(json!({}))).await?.task_id;
    let base = h.client().base_url().to_owned();
    let addr = base.trim_start_matches("http://").to_owned();
    let within = Duration::from_secs(5);

    // Silent from the start.
    let (mut read, _write) = TcpStream::connect(&addr).await?.into_split();
    let took = closed_after(&mut read, within)
        .await
        .expect("a silent connection stays open");
    assert!(took >= Duration::from_millis(400), "{took:?}");

    // Headers sent a line at a time, each in time, never finished (slowloris).
    let (mut read, mut write) = TcpStream::connect(&addr).await?.into_split();
    let trickle = tokio::spawn(async move {
        let _ = write
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await;
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if write
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let took = closed_after(&mut read, within)
        .await
        .expect("a trickling request stays open");
    assert!(took < Duration::from_secs(3), "{took:?}");
    trickle.abort();

    // Kept alive after an answer.
    let mut stream = TcpStream::connect(&addr).await?;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answer = read_until(&mut stream, "\r\n\r\nok", within).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (mut read, _write) = stream.into_split();
    let took = closed_after(&mut read, within)
        .await
        .expect("a kept-alive connection stays open");
    assert!(took >= Duration::from_millis(300), "{took:?}");

    // A request being handled is not idle: a long-poll outlasts the idle timeout.
    let started = Instant::now();
    let r = reqwest::get(format!("{base}/v1/tasks/{task}?wait_ms=1500")).await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_for_one_to_close() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| {
        c.http_max_connections = 2;
        // Closes the harness client's kept-alive connection before the test takes the slots.
        c.http_idle_timeout_ms = 300;
    })
    .await?;
    let base = h.client().base_url().to_owned();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let health = |timeout: Duration| {
        let url = format!("{base}/health");
        async move {
            // A fresh client: no kept-alive connection to reuse.
            reqwest::Client::new()
                .get(url)
                .timeout(timeout)
                .send()
                .await
        }
    };
    assert_eq!(health(Duration::from_secs(5)).await?.text().await?, "ok");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Two connections, each busy with a request (so the idle timeout leaves them be).
    let busy_a = slow_upload(&base).await;
    let _busy_b = slow_upload(&base).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = health(Duration::from_millis(1_000))
        .await
        .expect_err("a third connection was served");
    assert!(err.is_timeout(), "{err}");

    // One closes: the next connection is served.
    drop(busy_a);
    let r = health(Duration::from_secs(5)).await?;
    assert_eq!(r.text().await?, "ok");
    h.finish().await;
    Ok(())
}
