//! Property tests (proptest) of the message decoders and the template parser: on any input they
//! return an error or a value, never panic, and they refuse what the contract (`CONTRACT.md` §3)
//! says they must refuse: bodies that are not one MessagePack map, truncated and trailing bytes,
//! malformed or foreign-major `schema_version`s, missing required fields, nesting past the limit,
//! unknown template fields. A few hundred cases per property, deterministic (no failure files).
//!
//! The bad-input suite (`tests/src/bin/bad-inputs.rs`) sends inputs like these to a running
//! orchestrator; these tests check the decoders alone, fast.

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};
use tasker_schemas::message::peek_kind;
use tasker_schemas::template::parse_duration;
use tasker_schemas::{
    Cancel, DecodeError, Heartbeat, LifecycleEvent, ResultBatch, Started, StepMessage, StepResult,
    TaskRequest, Template, WorkerMessage, decode,
};

/// Few enough cases to keep the whole file within a few seconds in a debug build.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// The valid vectors of `test-vectors.json`: (kind, message as JSON, bytes).
fn vectors() -> Vec<(String, Value, Vec<u8>)> {
    let all: Value =
        serde_json::from_str(include_str!("../test-vectors.json")).expect("test-vectors.json");
    all["valid"]
        .as_array()
        .expect("valid[]")
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().expect("kind").to_owned(),
                v["message"].clone(),
                hex::decode(v["hex"].as_str().expect("hex")).expect("hex bytes"),
            )
        })
        .collect()
}

/// Every decoder on `bytes`: `Ok(())` or the error, per decoder. None may panic.
fn decode_all(bytes: &[u8]) -> Vec<Result<(), DecodeError>> {
    vec![
        decode::<TaskRequest>(bytes).map(drop),
        decode::<StepMessage>(bytes).map(drop),
        decode::<StepResult>(bytes).map(drop),
        decode::<ResultBatch>(bytes).map(drop),
        decode::<Started>(bytes).map(drop),
        decode::<Heartbeat>(bytes).map(drop),
        decode::<Cancel>(bytes).map(drop),
        decode::<LifecycleEvent>(bytes).map(drop),
        WorkerMessage::decode(bytes).map(drop),
        peek_kind(bytes).map(drop),
    ]
}

fn msgpack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("JSON packs as MessagePack")
}

/// The required fields of a kind's payload (§5), which a reader must miss.
fn required(kind: &str) -> &'static [&'static str] {
    match kind {
        "task_request" => &["request_id", "namespace", "template"],
        "step" => &[
            "task_id",
            "step_id",
            "namespace",
            "template",
            "step",
            "handler",
            "queue",
            "attempt",
            "idempotency_key",
            "context",
            "timeout_ms",
            "result_routing_key",
        ],
        "result" => &["task_id", "step_id", "attempt", "worker", "outcome"],
        "result_batch" => &["results"],
        "started" | "heartbeat" => &["task_id", "step_id", "attempt", "worker", "lease_ms"],
        "cancel" => &["task_id"],
        "lifecycle_event" => &["task_id", "namespace", "template", "seq", "state", "at"],
        "worker_heartbeat" => &["worker_id", "worker", "interval_ms"],
        "signal" => &["task_id", "name", "signal_id"],
        _ => &[],
    }
}

/// Decodes `bytes` as the kind named.
fn decode_as(kind: &str, bytes: &[u8]) -> Result<(), DecodeError> {
    match kind {
        "task_request" => decode::<TaskRequest>(bytes).map(drop),
        "step" => decode::<StepMessage>(bytes).map(drop),
        "result" => decode::<StepResult>(bytes).map(drop),
        "result_batch" => decode::<ResultBatch>(bytes).map(drop),
        "started" => decode::<Started>(bytes).map(drop),
        "heartbeat" => decode::<Heartbeat>(bytes).map(drop),
        "cancel" => decode::<Cancel>(bytes).map(drop),
        "lifecycle_event" => decode::<LifecycleEvent>(bytes).map(drop),
        "worker_heartbeat" => decode::<tasker_schemas::WorkerHeartbeat>(bytes).map(drop),
        "signal" => decode::<tasker_schemas::Signal>(bytes).map(drop),
        other => panic!("no decoder for {other}"),
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Whether a `schema_version` is readable by this major-1 reader (§3 checks 3 and 4).
fn readable_version(v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match v.split_once('.') {
        Some((major, minor)) if digits(major) && digits(minor) => {
            major.parse::<u32>() == Ok(1) && minor.parse::<u32>().is_ok()
        }
        _ => false,
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes: every decoder answers; a body that does not start with a map is
    /// `malformed` for all of them.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let starts_with_map = matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf));
        for r in decode_all(&bytes) {
            if !starts_with_map {
                prop_assert!(matches!(r, Err(DecodeError::Malformed(_))), "{r:?}");
            }
        }
    }

    /// Bytes that start like an envelope (a map header) and go on at random.
    #[test]
    fn map_headers_followed_by_noise_never_panic(
        header in prop_oneof![Just(vec![0x84u8]), Just(vec![0xde, 0x00, 0x04]), Just(vec![0xdf, 0xff, 0xff, 0xff, 0xff])],
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = header;
        bytes.extend(noise);
        let _ = decode_all(&bytes);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Every strict prefix of a valid message is refused by every decoder.
    #[test]
    fn truncated_messages_are_refused(index in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let all = vectors();
        let (_, _, bytes) = &all[index.index(all.len())];
        let cut = cut.index(bytes.len());
        for r in decode_all(&bytes[..cut]) {
            prop_assert!(r.is_err(), "a prefix of {cut} bytes decoded");
        }
    }

    /// Trailing bytes after a valid message make it malformed.
    #[test]
    fn trailing_bytes_are_refused(index in any::<prop::sample::Index>(), extra in prop::collection::vec(any::<u8>(), 1..16)) {
        let all = vectors();
        let (kind, _, bytes) = &all[index.index(all.len())];
        let mut bytes = bytes.clone();
        bytes.extend(extra);
        let r = decode_as(kind, &bytes);
        prop_assert!(matches!(r, Err(DecodeError::Malformed(_))), "{r:?}");
    }

    /// Flipped bits and replaced bytes in a valid message: never a panic; what still decodes
    /// decodes as its own kind only.
    #[test]
    fn mutated_messages_never_panic(
        index in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let all = vectors();
        let (_, _, bytes) = &all[index.index(all.len())];
        let mut bytes = bytes.clone();
        for (at, value, flip) in edits {
            let i = at.index(bytes.len());
            if flip { bytes[i] ^= 1 << (value % 8) } else { bytes[i] = value }
        }
        let results = decode_all(&bytes);
        // At most one of the eight typed decoders can accept a body (its `kind` picks one).
        prop_assert!(results[..8].iter().filter(|r| r.is_ok()).count() <= 1);
    }

    /// `schema_version`: readable exactly when it is `"1.{minor}"` in ASCII digits; otherwise
    /// refused as `invalid_version` or `unknown_major`, before the payload is looked at.
    #[test]
    fn schema_versions_are_checked(index in any::<prop::sample::Index>(), version in prop_oneof![
        "[0-9]{1,3}\\.[0-9]{1,3}",
        "[0-9+.-]{0,6}",
        ".{0,12}",
        Just("1.99999999999".to_owned()),
        Just("01.1".to_owned()),
    ]) {
        let all = vectors();
        let (kind, message, _) = &all[index.index(all.len())];
        let mut message = message.clone();
        message["schema_version"] = json!(version);
        let r = decode_as(kind, &msgpack(&message));
        if readable_version(&version) {
            prop_assert!(r.is_ok(), "{version:?}: {r:?}");
        } else {
            prop_assert!(
                matches!(r, Err(DecodeError::InvalidVersion(_) | DecodeError::UnknownMajor { .. })),
                "{version:?}: {r:?}"
            );
        }
    }

    /// A required field removed, from the envelope or the payload: refused.
    #[test]
    fn missing_required_fields_are_refused(index in any::<prop::sample::Index>(), field in any::<prop::sample::Index>(), in_envelope in any::<bool>()) {
        let all = vectors();
        let (kind, message, _) = &all[index.index(all.len())];
        let mut message = message.clone();
        let removed = if in_envelope {
            let names = ["kind", "schema_version", "message_id", "payload"];
            let name = names[field.index(names.len())];
            message.as_object_mut().expect("map").remove(name);
            name
        } else {
            let names = required(kind);
            let name = names[field.index(names.len())];
            message["payload"].as_object_mut().expect("payload map").remove(name);
            name
        };
        let r = decode_as(kind, &msgpack(&message));
        prop_assert!(r.is_err(), "{kind} without {removed} decoded");
    }

    /// A field of the envelope or the payload replaced by any value: never a panic; a value of
    /// the wrong type for a required id or counter is refused.
    #[test]
    fn wrong_types_never_panic(index in any::<prop::sample::Index>(), field in any::<prop::sample::Index>(), value in any_json()) {
        let all = vectors();
        let (kind, message, _) = &all[index.index(all.len())];
        let mut message = message.clone();
        let payload = message["payload"].as_object_mut().expect("payload map");
        let names: Vec<String> = payload.keys().cloned().collect();
        let name = names[field.index(names.len())].clone();
        payload.insert(name.clone(), value.clone());
        let bytes = msgpack(&message);
        let _ = decode_all(&bytes);
        let r = decode_as(kind, &bytes);
        let id = ["task_id", "step_id", "request_id"].contains(&name.as_str());
        let counter = ["attempt", "seq", "lease_ms", "timeout_ms"].contains(&name.as_str());
        if (id && !value.is_string()) || (counter && !value.is_u64()) {
            prop_assert!(r.is_err(), "{kind}.{name} = {value} decoded");
        }
        if counter && value.as_u64().is_some_and(|n| n > u64::from(u32::MAX)) && name == "attempt" {
            prop_assert!(r.is_err(), "{kind}.attempt = {value} decoded");
        }
    }

    /// A `message_id` that is not a UUID is refused as an invalid payload.
    #[test]
    fn bad_message_ids_are_refused(index in any::<prop::sample::Index>(), id in "[0-9a-zA-Z-]{0,40}") {
        prop_assume!(uuid::Uuid::parse_str(&id).is_err());
        let all = vectors();
        let (kind, message, _) = &all[index.index(all.len())];
        let mut message = message.clone();
        message["message_id"] = json!(id);
        let r = decode_as(kind, &msgpack(&message));
        prop_assert!(matches!(r, Err(DecodeError::InvalidPayload { .. })), "{id:?}: {r:?}");
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Nesting: a task request whose context nests `depth` arrays decodes up to the message's
    /// depth limit (108 in all, the envelope and payload maps included) and is refused past
    /// it, also far past it (no stack overflow).
    #[test]
    fn nesting_is_bounded(depth in prop_oneof![90usize..120, 1_000usize..20_000]) {
        // Written by hand: a `serde_json::Value` this deep would overflow the stack itself.
        let s = |text: &str| msgpack(&json!(text));
        let mut bytes = vec![0x84];
        for part in ["kind", "task_request", "schema_version", "1.1", "message_id"] {
            bytes.extend(s(part));
        }
        bytes.extend(s("0193a3f2-7000-7000-8000-000000000001"));
        bytes.extend(s("payload"));
        bytes.push(0x84);
        for part in ["request_id", "0193a3f2-6b00-7a1b-8c2d-3e4f5a6b7c8d", "namespace", "shop", "template", "t", "context"] {
            bytes.extend(s(part));
        }
        bytes.extend(std::iter::repeat_n(0x91u8, depth - 1));
        bytes.push(0x90);
        let r = decode::<TaskRequest>(&bytes);
        // The envelope map, the payload map and `depth` arrays.
        if depth + 2 <= tasker_schemas::message::MAX_MESSAGE_DEPTH {
            prop_assert!(r.is_ok(), "depth {depth}: {r:?}");
        } else {
            prop_assert!(matches!(r, Err(DecodeError::Malformed(_))), "depth {depth}: {r:?}");
        }
    }
}

/// A valid template as JSON, to mutate.
fn valid_template() -> Value {
    json!({
        "namespace": "shop",
        "name": "orders",
        "version": 1,
        "description": "a valid template",
        "steps": [
            {"name": "a", "handler": "h_a", "retry": {"max_attempts": 3, "initial_delay": "100ms"}},
            {"name": "b", "handler": "h_b", "depends_on": ["a"], "queue": "q1", "execution_timeout": "30s"},
            {"name": "c", "handler": "h_c", "depends_on": ["a"], "decides": [], "join": "any"},
            {"name": "d", "handler": "h_d", "depends_on": ["b", "c"], "join": "any"}
        ],
        "on_failure": {"handler": "undo"}
    })
}

/// Names: mostly valid, sometimes empty, too long or with characters outside `[A-Za-z0-9_-]`.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-c]{1,2}",
        1 => "[A-Za-z0-9_-]{1,10}",
        1 => ".{0,6}",
        1 => "[a-z]{129,140}",
    ]
}

/// A template built from parts that are often wrong: bad names, unknown or cyclic
/// dependencies, out-of-range numbers.
fn any_template() -> impl Strategy<Value = Value> {
    let step = (
        name(),
        name(),
        prop::collection::vec(name(), 0..3),
        prop_oneof![Just(Value::Null), (0u64..2_000).prop_map(|n| json!(n))],
        prop_oneof![Just(Value::Null), any::<u64>().prop_map(|n| json!(n)), "[0-9]{1,4}(ms|s|m|h|x)?".prop_map(Value::String)],
        prop_oneof![3 => Just(Value::Null), 1 => prop::collection::vec(name(), 0..3).prop_map(|v| json!(v))],
    )
        .prop_map(|(name, handler, deps, attempts, timeout, decides)| {
            let mut s = json!({"name": name, "handler": handler, "depends_on": deps});
            if !attempts.is_null() {
                s["retry"] = json!({"max_attempts": attempts});
            }
            if !timeout.is_null() {
                s["execution_timeout"] = timeout;
            }
            if !decides.is_null() {
                s["decides"] = decides;
            }
            s
        });
    (name(), name(), any::<u32>(), prop::collection::vec(step, 0..6)).prop_map(
        |(namespace, name, version, steps)| {
            json!({"namespace": namespace, "name": name, "version": version % 4, "steps": steps})
        },
    )
}

/// Replaces the value at a random path of `v` (objects and arrays) with `with`.
fn replace_somewhere(v: &mut Value, mut choice: usize, with: Value) {
    let children = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if children == 0 || choice.is_multiple_of(3) {
        *v = with;
        return;
    }
    let i = (choice / 3) % children;
    choice /= 3 * children.max(1);
    let child = match v {
        Value::Object(m) => m.values_mut().nth(i),
        Value::Array(a) => a.get_mut(i),
        _ => None,
    };
    if let Some(child) = child {
        replace_somewhere(child, choice + 1, with);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary bytes as JSON, arbitrary text as YAML: parsed or refused, never a panic, and
    /// what parses can be validated.
    #[test]
    fn template_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), text in ".{0,200}") {
        if let Ok(t) = Template::from_json(&bytes) {
            let _ = t.validate();
        }
        if let Ok(t) = serde_saphyr::from_str::<Template>(&text) {
            let _ = t.validate();
        }
    }

    /// Mutated valid templates (any value at any place, JSON and the same as YAML text):
    /// parsed or refused, never a panic; what parses validates or not, never a panic.
    #[test]
    fn mutated_templates_never_panic(choice in any::<usize>(), value in any_json()) {
        let mut t = valid_template();
        replace_somewhere(&mut t, choice, value);
        let text = serde_json::to_string(&t).expect("JSON");
        if let Ok(parsed) = Template::from_json(text.as_bytes()) {
            let _ = parsed.validate();
        }
        // JSON is YAML: the YAML reader must take the same text without panicking.
        if let Ok(parsed) = serde_saphyr::from_str::<Template>(&text) {
            let _ = parsed.validate();
        }
    }

    /// Templates built from wrong parts: validation answers; what it accepts has valid names,
    /// known dependencies and no step depending on itself.
    #[test]
    fn generated_templates_validate_or_explain(t in any_template()) {
        let Ok(parsed) = Template::from_json(t.to_string().as_bytes()) else { return Ok(()) };
        match parsed.validate() {
            Ok(()) => {
                let ok = |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                prop_assert!(ok(&parsed.namespace) && ok(&parsed.name));
                prop_assert!(parsed.version > 0);
                for s in &parsed.steps {
                    prop_assert!(ok(&s.name));
                    for d in &s.depends_on {
                        prop_assert!(d != &s.name, "step {} depends on itself", s.name);
                        prop_assert!(parsed.steps.iter().any(|p| &p.name == d), "unknown dependency {d}");
                    }
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// An unknown field, at the top or in a step, is refused (templates deny unknown fields).
    #[test]
    fn unknown_template_fields_are_refused(field in "[a-z_]{1,12}", in_step in any::<bool>(), value in any_json()) {
        let mut t = valid_template();
        let known = [
            "namespace", "name", "version", "description", "steps", "on_failure", "handler",
            "queue", "depends_on", "retry", "queue_wait_timeout", "execution_timeout", "decides",
            "join", "map", "workflow",
        ];
        prop_assume!(!known.contains(&field.as_str()));
        if in_step {
            t["steps"][0][&field] = value;
        } else {
            t[&field] = value;
        }
        prop_assert!(Template::from_json(t.to_string().as_bytes()).is_err());
    }

    /// Durations: any text is parsed or refused; `"{n}ms"` is `n`.
    #[test]
    fn durations_parse_or_refuse(text in ".{0,24}", n in 0u64..(1 << 52)) {
        let _ = parse_duration(&text);
        prop_assert_eq!(parse_duration(&format!("{n}ms")).map(|m| m.0), Ok(n));
    }
}
