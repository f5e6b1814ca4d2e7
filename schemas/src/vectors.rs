//! The test vectors of `test-vectors.json` (bytes and meaning, for workers in other languages),
//! checked against this crate, plus round-trip and robustness tests of the decoder.
//!
//! To rebuild the `hex` fields after editing a vector's `message` (a deliberate contract change):
//! `TASKER_WRITE_VECTORS=1 cargo test -p tasker-schemas regenerate_vectors -- --ignored`.

use crate::message::{MAX_MESSAGE_DEPTH, peek_kind};
use crate::*;
use serde::de::{self, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};
use std::fmt;

const VECTORS: &str = include_str!("../test-vectors.json");

/// A JSON/MessagePack value that keeps map keys in the order written and can hold binary data:
/// converting a vector's `message` through it gives the wire bytes exactly.
#[derive(Clone, Debug, PartialEq)]
enum Ordered {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<Ordered>),
    Map(Vec<(String, Ordered)>),
}

impl Serialize for Ordered {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ordered::Null => s.serialize_unit(),
            Ordered::Bool(b) => s.serialize_bool(*b),
            Ordered::U64(n) => s.serialize_u64(*n),
            Ordered::I64(n) => s.serialize_i64(*n),
            Ordered::F64(f) => s.serialize_f64(*f),
            Ordered::Str(t) => s.serialize_str(t),
            Ordered::Bin(b) => s.serialize_bytes(b),
            Ordered::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Ordered::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Ordered, E> {
                Ok(Ordered::Bool(b))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Ordered, E> {
                Ok(Ordered::U64(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Ordered, E> {
                Ok(u64::try_from(n).map_or(Ordered::I64(n), Ordered::U64))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Ordered, E> {
                Ok(Ordered::F64(f))
            }
            fn visit_str<E: de::Error>(self, t: &str) -> Result<Ordered, E> {
                Ok(Ordered::Str(t.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Ordered::Arr(items))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Ordered::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

impl Ordered {
    fn entries(&mut self) -> &mut Vec<(String, Ordered)> {
        match self {
            Ordered::Map(entries) => entries,
            other => panic!("not a map: {other:?}"),
        }
    }

    fn get(&mut self, key: &str) -> &mut Ordered {
        self.entries()
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no field {key:?}"))
    }

    /// Replaces a field in place, or appends it.
    fn set(&mut self, key: &str, value: Ordered) -> &mut Self {
        let entries = self.entries();
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => entries.push((key.to_owned(), value)),
        }
        self
    }

    fn remove(&mut self, key: &str) -> &mut Self {
        self.entries().retain(|(k, _)| k != key);
        self
    }

    fn payload(&mut self) -> &mut Ordered {
        self.get("payload")
    }

    fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("encodes")
    }

    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("JSON")
    }

    fn strings(&self, out: &mut Vec<String>) {
        match self {
            Ordered::Str(s) => out.push(s.clone()),
            Ordered::Arr(items) => items.iter().for_each(|i| i.strings(out)),
            Ordered::Map(entries) => entries.iter().for_each(|(_, v)| v.strings(out)),
            _ => {}
        }
    }
}

fn str(s: &str) -> Ordered {
    Ordered::Str(s.to_owned())
}

#[derive(Serialize, Deserialize)]
struct VectorFile {
    about: Vec<String>,
    schema_version: String,
    valid: Vec<Valid>,
    invalid: Vec<Invalid>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Valid {
    name: String,
    kind: String,
    canonical: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    message: Ordered,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decoded: Option<Ordered>,
    hex: String,
}

impl Valid {
    fn bytes(&self) -> Vec<u8> {
        hex::decode(&self.hex).unwrap_or_else(|e| panic!("{}: bad hex: {e}", self.name))
    }

    fn meaning(&self) -> Value {
        self.decoded.as_ref().unwrap_or(&self.message).to_json()
    }
}

#[derive(Serialize, Deserialize)]
struct Invalid {
    name: String,
    decode_as: String,
    error: String,
    description: String,
    hex: String,
}

fn vectors() -> VectorFile {
    serde_json::from_str(VECTORS).expect("test-vectors.json parses")
}

fn vector(name: &str) -> Valid {
    vectors()
        .valid
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vector {name:?}"))
}

/// The class of a decode error, as named in `test-vectors.json`.
fn class(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Malformed(_) => "malformed",
        DecodeError::InvalidVersion(_) => "invalid_version",
        DecodeError::UnknownMajor { .. } => "unknown_major",
        DecodeError::WrongKind { .. } => "wrong_kind",
        DecodeError::InvalidPayload { .. } => "invalid_payload",
    }
}

/// Checks one valid vector against payload type `T`.
fn check_valid<T: Payload + fmt::Debug + PartialEq>(v: &Valid) {
    let bytes = v.bytes();
    let expected: Envelope<T> = serde_json::from_value(v.meaning())
        .unwrap_or_else(|e| panic!("{}: meaning does not fit the type: {e}", v.name));
    // (a) the bytes decode to the meaning.
    let got = decode::<T>(&bytes).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    assert_eq!(got, expected, "{}: decoded value", v.name);
    assert_eq!(
        serde_json::to_value(&got).unwrap(),
        v.meaning(),
        "{}: decoded as JSON",
        v.name
    );
    // The message, converted generically, is exactly the bytes.
    assert_eq!(
        hex::encode(v.message.to_msgpack()),
        v.hex,
        "{}: message -> bytes",
        v.name
    );
    // (b) this crate's encoder writes the canonical vectors byte for byte.
    if v.canonical {
        assert_eq!(
            hex::encode(encode(&expected).unwrap()),
            v.hex,
            "{}: encode",
            v.name
        );
    }
}

/// Decodes `bytes` as the payload type named by `kind`.
fn decode_kind(kind: &str, bytes: &[u8]) -> Result<Value, DecodeError> {
    fn dec<T: Payload>(bytes: &[u8]) -> Result<Value, DecodeError> {
        decode::<T>(bytes).map(|e| serde_json::to_value(e).expect("JSON"))
    }
    match kind {
        "task_request" => dec::<TaskRequest>(bytes),
        "step" => dec::<StepMessage>(bytes),
        "result" => dec::<StepResult>(bytes),
        "result_batch" => dec::<ResultBatch>(bytes),
        "started" => dec::<Started>(bytes),
        "heartbeat" => dec::<Heartbeat>(bytes),
        "cancel" => dec::<Cancel>(bytes),
        "lifecycle_event" => dec::<LifecycleEvent>(bytes),
        "worker_heartbeat" => dec::<WorkerHeartbeat>(bytes),
        "signal" => dec::<Signal>(bytes),
        other => panic!("unknown kind {other:?} in the vectors"),
    }
}

const KINDS: [&str; 10] = [
    "task_request",
    "step",
    "result",
    "result_batch",
    "started",
    "heartbeat",
    "cancel",
    "lifecycle_event",
    "worker_heartbeat",
    "signal",
];

/// The bytes of each invalid vector, built from the valid ones as its description says.
fn invalid_bytes(name: &str, file: &VectorFile) -> Vec<u8> {
    let valid = |n: &str| {
        file.valid
            .iter()
            .find(|v| v.name == n)
            .expect("vector")
            .clone()
    };
    let cancel = valid("cancel").message;
    let step = valid("step").message;
    match name {
        "empty" => Vec::new(),
        "garbage" => b"hello, world".to_vec(),
        "not_a_map" => Ordered::Arr(vec![str("cancel"), str("1.0")]).to_msgpack(),
        "truncated" => {
            let b = step.to_msgpack();
            b[..b.len() - 1].to_vec()
        }
        "trailing_bytes" => {
            let mut b = cancel.to_msgpack();
            b.push(0xc0);
            b
        }
        "unknown_major" => cancel
            .clone()
            .set("schema_version", str("2.0"))
            .to_msgpack(),
        "invalid_version" => cancel.clone().set("schema_version", str("1")).to_msgpack(),
        "wrong_kind" => cancel.to_msgpack(),
        "unknown_kind" => cancel.clone().set("kind", str("reboot")).to_msgpack(),
        "missing_field" => {
            let mut m = step.clone();
            m.payload().remove("handler");
            m.to_msgpack()
        }
        "binary_id" => {
            let mut m = cancel.clone();
            let id: TaskId = "0193a3f2-6c1e-7b4d-9a2f-1e2d3c4b5a69".parse().unwrap();
            m.payload()
                .set("task_id", Ordered::Bin(id.0.as_bytes().to_vec()));
            m.to_msgpack()
        }
        "binary_context" => {
            let mut m = step.clone();
            m.payload()
                .set("context", Ordered::Bin(b"{\"order_id\":1042}".to_vec()));
            m.to_msgpack()
        }
        "integer_key" => {
            // A map with an integer key cannot be written through `Ordered`: patch the bytes.
            let mut m = step.clone();
            m.payload()
                .set("context", Ordered::Map(vec![("~".into(), Ordered::U64(1))]));
            let b = m.to_msgpack();
            let hole = [0x81, 0xa1, b'~', 0x01]; // {"~": 1}
            replace_once(&b, &hole, &[0x81, 0x07, 0x01]) // {7: 1}
        }
        "negative_attempt" => {
            let mut m = step.clone();
            m.payload().set("attempt", Ordered::I64(-1));
            m.to_msgpack()
        }
        "unknown_status" => {
            let mut m = valid("result").message;
            m.payload().get("outcome").set("status", str("exploded"));
            m.to_msgpack()
        }
        "too_deep" => {
            let mut m = valid("lifecycle_event").message;
            m.payload().set("output", str("__HOLE__"));
            let mut deep = vec![0x91; 120];
            deep.push(0x01);
            replace_once(&m.to_msgpack(), &[&[0xa8][..], b"__HOLE__"].concat(), &deep)
        }
        "bad_message_id" => cancel
            .clone()
            .set("message_id", str("not-a-uuid"))
            .to_msgpack(),
        "missing_kind" => cancel.clone().remove("kind").to_msgpack(),
        "missing_schema_version" => cancel.clone().remove("schema_version").to_msgpack(),
        "batch_entry_invalid" => {
            let mut m = valid("result_batch").message;
            match m.payload().get("results") {
                Ordered::Arr(results) => {
                    results[0].remove("attempt");
                }
                other => panic!("results is not an array: {other:?}"),
            }
            m.to_msgpack()
        }
        "too_deep_by_one" => nested_output(&valid("lifecycle_event").message, 107),
        "branches_not_a_list" => {
            let mut m = valid("result_decision").message;
            m.payload().get("outcome").set("branches", str("express"));
            m.to_msgpack()
        }
        "negative_map_index" => {
            let mut m = valid("step_map_instance").message;
            m.payload().set("map_index", Ordered::I64(-1));
            m.to_msgpack()
        }
        other => panic!("no recipe for invalid vector {other:?}"),
    }
}

/// A lifecycle event whose `output` is `arrays` nested arrays around `1`: the envelope and the
/// payload add two levels.
fn nested_output(lifecycle_event: &Ordered, arrays: usize) -> Vec<u8> {
    let mut m = lifecycle_event.clone();
    m.payload().set("output", str("__HOLE__"));
    let mut deep = vec![0x91; arrays];
    deep.push(0x01);
    replace_once(&m.to_msgpack(), &[&[0xa8][..], b"__HOLE__"].concat(), &deep)
}

fn replace_once(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    assert!(
        bytes[at + 1..].windows(from.len()).all(|w| w != from),
        "pattern is unique"
    );
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

/// Rewrites the `hex` fields of `test-vectors.json` from the messages and recipes.
#[test]
#[ignore = "rewrites test-vectors.json; run on purpose when the contract changes"]
fn regenerate_vectors() {
    let mut file = vectors();
    for v in &mut file.valid {
        v.hex = hex::encode(v.message.to_msgpack());
    }
    let invalid: Vec<String> = file
        .invalid
        .iter()
        .map(|i| hex::encode(invalid_bytes(&i.name, &file)))
        .collect();
    for (i, h) in file.invalid.iter_mut().zip(invalid) {
        i.hex = h;
    }
    let text = serde_json::to_string_pretty(&file).unwrap() + "\n";
    if std::env::var_os("TASKER_WRITE_VECTORS").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/test-vectors.json");
        std::fs::write(path, text).unwrap();
    } else {
        println!("{text}");
    }
}

#[test]
fn the_file_covers_every_kind() {
    let file = vectors();
    assert_eq!(file.schema_version, message::SCHEMA_VERSION);
    for kind in KINDS {
        assert!(
            file.valid.iter().any(|v| v.kind == kind && v.canonical),
            "no canonical vector for {kind}"
        );
    }
    for v in &file.valid {
        assert!(!v.hex.is_empty(), "{}: hex not generated", v.name);
        assert_eq!(
            v.canonical,
            v.decoded.is_none(),
            "{}: only non-canonical vectors need `decoded`",
            v.name
        );
    }
}

/// Schema 1.1: what the new fields decode to, that a message without them is what 1.0 wrote, and
/// that 1.0 messages are still read.
#[test]
fn schema_1_1_fields_and_1_0_messages() {
    let step = |name: &str| decode::<StepMessage>(&vector(name).bytes()).unwrap();
    let result = |name: &str| decode::<StepResult>(&vector(name).bytes()).unwrap();

    // A step written by 1.0 still decodes: not an instance of a mapped step.
    let old = step("step_from_1_0");
    assert_eq!(old.schema_version, "1.0");
    assert_eq!(
        (old.payload.map_index, &old.payload.map_item),
        (None, &None)
    );
    assert_eq!(old.payload, step("step").payload);
    // Every 1.0 vector is read (minor versions are compatible), and the file keeps some.
    let file = vectors();
    let older: Vec<&Valid> = file
        .valid
        .iter()
        .filter(|v| v.message.clone().get("schema_version").to_json() == json!("1.0"))
        .collect();
    assert!(older.iter().any(|v| v.kind == "step"), "no 1.0 step vector");
    for v in older {
        decode_kind(&v.kind, &v.bytes()).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
    // A step that is no map instance, and a success that is no decision, carry no 1.1 field:
    // their payloads have exactly the fields 1.0 wrote.
    let fields = |name: &str| -> Vec<String> {
        vector(name)
            .message
            .payload()
            .entries()
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    };
    assert_eq!(fields("step"), fields("step_from_1_0"));
    assert_eq!(
        vector("result")
            .message
            .payload()
            .get("outcome")
            .entries()
            .len(),
        2
    );
    assert!(!vector("result").hex.contains(&hex::encode("branches")));

    // A map instance: index, element, and the idempotency key with the index.
    let m = step("step_map_instance").payload;
    assert_eq!(m.map_index, Some(2));
    assert_eq!(m.map_item, Some(json!({"key": "c.jpg", "rotate": 90})));
    assert_eq!(m.idempotency_key, format!("{}:{}:2", m.task_id, m.step));
    // A null element is written as nil and read like an absent map_item (index present).
    let v = vector("step_map_instance_null_item");
    let n = decode::<StepMessage>(&v.bytes()).unwrap();
    assert_eq!((n.payload.map_index, &n.payload.map_item), (Some(0), &None));
    let mut written = n.clone();
    written.payload.map_item = Some(Value::Null);
    assert_eq!(hex::encode(encode(&written).unwrap()), v.hex);

    // Decisions: the chosen branches, possibly none; other successes have none.
    let branches = |name: &str| match result(name).payload.outcome {
        Outcome::Succeeded { branches, .. } => branches,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        branches("result_decision"),
        Some(vec!["express".to_owned()])
    );
    assert_eq!(branches("result_decision_none"), Some(Vec::new()));
    assert_eq!(branches("result"), None);
    assert_eq!(
        result("result").payload.outcome,
        Outcome::succeeded(json!({"amount_cents": 1250, "balance": -12, "charge_id": "ch_1"}))
    );
}

/// (a), (b): every valid vector decodes to its meaning; the canonical ones re-encode byte for byte.
#[test]
fn valid_vectors_decode_and_encode() {
    for v in &vectors().valid {
        match v.kind.as_str() {
            "task_request" => check_valid::<TaskRequest>(v),
            "step" => check_valid::<StepMessage>(v),
            "result" => check_valid::<StepResult>(v),
            "result_batch" => check_valid::<ResultBatch>(v),
            "started" => check_valid::<Started>(v),
            "heartbeat" => check_valid::<Heartbeat>(v),
            "cancel" => check_valid::<Cancel>(v),
            "lifecycle_event" => check_valid::<LifecycleEvent>(v),
            "worker_heartbeat" => check_valid::<WorkerHeartbeat>(v),
            "signal" => check_valid::<Signal>(v),
            other => panic!("unknown kind {other:?}"),
        }
    }
}

#[test]
fn worker_messages_decode_from_the_vectors() {
    let file = vectors();
    for v in &file.valid {
        let got = WorkerMessage::decode(&v.bytes());
        let id: MessageId = v
            .message
            .clone()
            .get("message_id")
            .to_json()
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        match v.kind.as_str() {
            "result" => {
                let expected: Envelope<StepResult> = serde_json::from_value(v.meaning()).unwrap();
                assert_eq!(
                    got.unwrap(),
                    (id, WorkerMessage::Results(vec![expected.payload])),
                    "{}",
                    v.name
                );
            }
            "result_batch" => {
                let expected: Envelope<ResultBatch> = serde_json::from_value(v.meaning()).unwrap();
                assert_eq!(
                    got.unwrap(),
                    (id, WorkerMessage::Results(expected.payload.results)),
                    "{}",
                    v.name
                );
            }
            "started" => {
                let expected: Envelope<Started> = serde_json::from_value(v.meaning()).unwrap();
                assert_eq!(got.unwrap(), (id, WorkerMessage::Started(expected.payload)));
            }
            "heartbeat" => {
                let expected: Envelope<Heartbeat> = serde_json::from_value(v.meaning()).unwrap();
                assert_eq!(
                    got.unwrap(),
                    (id, WorkerMessage::Heartbeat(expected.payload))
                );
            }
            "worker_heartbeat" => {
                let expected: Envelope<WorkerHeartbeat> =
                    serde_json::from_value(v.meaning()).unwrap();
                assert_eq!(
                    got.unwrap(),
                    (id, WorkerMessage::WorkerHeartbeat(expected.payload))
                );
            }
            _ => assert!(
                matches!(got, Err(DecodeError::WrongKind { .. })),
                "{}: {got:?}",
                v.name
            ),
        }
    }
}

/// The invalid vectors are refused with the class they name, and match their descriptions.
#[test]
fn invalid_vectors_are_refused() {
    let file = vectors();
    for i in &file.invalid {
        let bytes = hex::decode(&i.hex).unwrap();
        assert_eq!(
            bytes,
            invalid_bytes(&i.name, &file),
            "{}: hex does not match its recipe",
            i.name
        );
        match decode_kind(&i.decode_as, &bytes) {
            Ok(v) => panic!("{}: decoded to {v}", i.name),
            Err(e) => assert_eq!(class(&e), i.error, "{}: {e}", i.name),
        }
        assert!(WorkerMessage::decode(&bytes).is_err(), "{}", i.name);
    }
}

/// The error classes CONTRACT.md names for a bad `message_id`, a missing `kind` or
/// `schema_version`, a bad entry in a batch, and nesting past the message limit; a worker
/// message reader refuses each too.
#[test]
fn documented_error_classes() {
    let file = vectors();
    let refused = |name: &str| {
        let bytes = invalid_bytes(name, &file);
        let kind = &file
            .invalid
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no invalid vector {name:?}"))
            .decode_as;
        (decode_kind(kind, &bytes).unwrap_err(), bytes)
    };
    // The header (kind, schema_version) is read first: a bad id is a payload error.
    let (e, _) = refused("bad_message_id");
    assert!(matches!(e, DecodeError::InvalidPayload { .. }), "{e}");
    assert!(e.to_string().starts_with("invalid cancel payload: "), "{e}");
    for name in ["missing_kind", "missing_schema_version"] {
        let (e, bytes) = refused(name);
        assert!(matches!(e, DecodeError::Malformed(_)), "{name}: {e}");
        assert!(
            e.to_string().starts_with("not a MessagePack envelope: "),
            "{e}"
        );
        assert!(
            matches!(
                WorkerMessage::decode(&bytes),
                Err(DecodeError::Malformed(_))
            ),
            "{name}"
        );
    }
    // The same faults in a worker message: a bad id in a result is a payload error.
    let mut r = vector("result").message;
    r.set("message_id", str("not-a-uuid"));
    assert!(matches!(
        WorkerMessage::decode(&r.to_msgpack()),
        Err(DecodeError::InvalidPayload { .. })
    ));
    let (e, bytes) = refused("batch_entry_invalid");
    assert!(matches!(e, DecodeError::InvalidPayload { .. }), "{e}");
    assert!(matches!(
        WorkerMessage::decode(&bytes),
        Err(DecodeError::InvalidPayload { .. })
    ));
    let (e, bytes) = refused("too_deep_by_one");
    assert!(matches!(e, DecodeError::Malformed(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "not a MessagePack envelope: depth limit exceeded"
    );
    assert!(matches!(
        WorkerMessage::decode(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

/// The message limit is exact: 108 levels in all (envelope included) decode, 109 do not. Data
/// nested past [`data::MAX_DEPTH`] but within the message limit decodes, and the data check
/// (which the orchestrator applies to a context and to a step output) refuses it.
#[test]
fn nesting_limits_are_exact() {
    assert_eq!(MAX_MESSAGE_DEPTH, 108);
    let event = vector("lifecycle_event").message;
    assert!(decode::<LifecycleEvent>(&nested_output(&event, 106)).is_ok());
    assert!(matches!(
        decode::<LifecycleEvent>(&nested_output(&event, 107)),
        Err(DecodeError::Malformed(_))
    ));
    // A result's output sits one level deeper (envelope, payload, outcome).
    let mut m = vector("result").message;
    m.payload().get("outcome").set("output", str("__HOLE__"));
    let result_with = |arrays: usize| {
        let mut deep = vec![0x91; arrays];
        deep.push(0x01);
        replace_once(&m.to_msgpack(), &[&[0xa8][..], b"__HOLE__"].concat(), &deep)
    };
    assert!(WorkerMessage::decode(&result_with(105)).is_ok());
    assert!(matches!(
        WorkerMessage::decode(&result_with(106)),
        Err(DecodeError::Malformed(_))
    ));
    // Past the data limit, within the message limit: read, then refused by the data check.
    let (_, msg) = WorkerMessage::decode(&result_with(data::MAX_DEPTH + 1)).unwrap();
    let WorkerMessage::Results(results) = msg else {
        panic!("a result")
    };
    let Outcome::Succeeded { output, .. } = &results[0].outcome else {
        panic!("a success")
    };
    assert_eq!(
        data::check_value("output", output, usize::MAX)
            .unwrap_err()
            .to_string(),
        "output nests arrays and objects more than 100 levels deep"
    );
    let nest = |n: usize| (0..n).fold(json!(1), |v, _| json!([v]));
    let mut request: Envelope<TaskRequest> =
        serde_json::from_value(vector("task_request").meaning()).unwrap();
    request.payload.context = nest(data::MAX_DEPTH + 1);
    let got = decode::<TaskRequest>(&encode(&request).unwrap()).unwrap();
    assert_eq!(
        data::check_value("context", &got.payload.context, usize::MAX)
            .unwrap_err()
            .to_string(),
        "context nests arrays and objects more than 100 levels deep"
    );
}

/// (c) Unknown fields anywhere are ignored, and key order does not matter.
#[test]
fn unknown_fields_and_key_order_are_ignored() {
    for v in vectors().valid.iter().filter(|v| v.canonical) {
        let expected = decode_kind(&v.kind, &v.bytes()).unwrap();
        let extra = Ordered::Map(vec![(
            "nested".into(),
            Ordered::Arr(vec![Ordered::U64(1), str("x")]),
        )]);

        let mut m = v.message.clone();
        m.set("zz_future", extra.clone());
        m.payload().set("zz_future", Ordered::Bin(vec![0, 1, 2]));
        assert_eq!(
            decode_kind(&v.kind, &m.to_msgpack()).unwrap(),
            expected,
            "{}: appended",
            v.name
        );

        let mut m = v.message.clone();
        m.entries().insert(0, ("aa_future".into(), extra.clone()));
        m.payload()
            .entries()
            .insert(0, ("aa_future".into(), Ordered::Null));
        m.entries().reverse();
        m.payload().entries().reverse();
        assert_eq!(
            decode_kind(&v.kind, &m.to_msgpack()).unwrap(),
            expected,
            "{}: reordered",
            v.name
        );
    }
    // Inside an outcome and inside each result of a batch too.
    let v = vector("result_batch");
    let expected = decode_kind("result_batch", &v.bytes()).unwrap();
    let mut m = v.message.clone();
    if let Ordered::Arr(results) = m.payload().get("results") {
        for r in results {
            r.set("zz_future", Ordered::U64(1));
            r.get("outcome").set("zz_future", str("x"));
        }
    }
    assert_eq!(
        decode_kind("result_batch", &m.to_msgpack()).unwrap(),
        expected
    );
}

/// (d) Versions: any 1.x is read, any other major is refused by number, nonsense is refused.
#[test]
fn schema_versions() {
    let v = vector("cancel");
    let with = |version: &str| {
        v.message
            .clone()
            .set("schema_version", str(version))
            .to_msgpack()
    };

    let got = decode::<Cancel>(&with("1.7")).unwrap();
    assert_eq!(got.schema_version, "1.7");
    assert_eq!(got.payload, decode::<Cancel>(&v.bytes()).unwrap().payload);
    assert!(decode::<Cancel>(&with("1.12345")).is_ok());

    for (version, major) in [("2.0", 2), ("0.9", 0), ("17.3", 17)] {
        match decode::<Cancel>(&with(version)) {
            Err(DecodeError::UnknownMajor { major: m }) => assert_eq!(m, major, "{version}"),
            other => panic!("{version}: {other:?}"),
        }
    }
    for bad in [
        "",
        "1",
        "1.",
        ".0",
        "1.0.0",
        "+1.0",
        "1.-0",
        "one.zero",
        " 1.0",
        "1.0 ",
        "99999999999.0",
    ] {
        assert!(
            matches!(
                decode::<Cancel>(&with(bad)),
                Err(DecodeError::InvalidVersion(_))
            ),
            "{bad:?} accepted"
        );
    }
    // A worker message with an unknown major is refused before its kind is looked at.
    let r = vector("result")
        .message
        .clone()
        .set("schema_version", str("2.0"))
        .to_msgpack();
    assert!(matches!(
        WorkerMessage::decode(&r),
        Err(DecodeError::UnknownMajor { major: 2 })
    ));
    // The version must be a string.
    let n = v
        .message
        .clone()
        .set("schema_version", Ordered::F64(1.0))
        .to_msgpack();
    assert!(matches!(
        decode::<Cancel>(&n),
        Err(DecodeError::Malformed(_))
    ));
}

/// (e) Garbage, empty input, every truncation, wrong kinds: errors, never panics.
#[test]
fn bad_bytes_are_errors() {
    for garbage in [
        &b""[..],
        b"\xc0",
        b"\xc1",
        b"\xff\xff\xff",
        b"{\"kind\":\"step\"}",
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
    ] {
        for kind in KINDS {
            assert!(decode_kind(kind, garbage).is_err(), "{garbage:?} as {kind}");
        }
        assert!(WorkerMessage::decode(garbage).is_err());
        assert!(peek_kind(garbage).is_err());
    }
    for v in &vectors().valid {
        let bytes = v.bytes();
        for len in 0..bytes.len() {
            assert!(
                decode_kind(&v.kind, &bytes[..len]).is_err(),
                "{} cut at {len}",
                v.name
            );
            assert!(
                WorkerMessage::decode(&bytes[..len]).is_err(),
                "{} cut at {len}",
                v.name
            );
        }
        for kind in KINDS.into_iter().filter(|k| *k != v.kind) {
            match decode_kind(kind, &bytes) {
                Err(DecodeError::WrongKind { found, expected }) => {
                    assert_eq!((found.as_str(), expected.as_str()), (v.kind.as_str(), kind));
                }
                other => panic!("{} read as {kind}: {other:?}", v.name),
            }
        }
    }
}

/// (e) Binary data where JSON is expected is refused, in every data field.
#[test]
fn binary_data_is_refused() {
    let bin = || Ordered::Bin(vec![0xde, 0xad, 0xbe, 0xef]);
    let mut cases = Vec::new();
    let mut m = vector("task_request").message;
    m.payload().set("context", bin());
    cases.push(("task_request", m));
    let mut m = vector("step").message;
    m.payload()
        .set("context", Ordered::Map(vec![("blob".into(), bin())]));
    cases.push(("step", m));
    let mut m = vector("step").message;
    m.payload().get("parent_outputs").set("validate", bin());
    cases.push(("step", m));
    let mut m = vector("result").message;
    m.payload()
        .get("outcome")
        .set("output", Ordered::Arr(vec![bin()]));
    cases.push(("result", m));
    let mut m = vector("lifecycle_event").message;
    m.payload().set("output", bin());
    cases.push(("lifecycle_event", m));
    let mut m = vector("step").message;
    m.payload().set("handler", bin());
    cases.push(("step", m));
    for (kind, m) in cases {
        match decode_kind(kind, &m.to_msgpack()) {
            Err(DecodeError::InvalidPayload { .. }) => {}
            other => panic!("{kind}: {other:?}"),
        }
    }
    // MessagePack extension types (timestamps included) are not JSON either.
    let mut m = vector("step").message;
    m.payload().set("context", str("__HOLE__"));
    let timestamp = [0xd6, 0xff, 0, 0, 0, 1]; // fixext 4, type -1
    let b = replace_once(
        &m.to_msgpack(),
        &[&[0xa8][..], b"__HOLE__"].concat(),
        &timestamp,
    );
    assert!(matches!(
        decode::<StepMessage>(&b),
        Err(DecodeError::InvalidPayload { .. })
    ));
}

/// (e) Nesting: data up to `data::MAX_DEPTH` decodes in every position; absurd nesting is an
/// error, not a stack overflow.
#[test]
fn nesting_is_bounded() {
    let nest = |n: usize| (0..n).fold(json!("leaf"), |v, _| json!([v]));
    let deep = nest(data::MAX_DEPTH);

    let mut step: Envelope<StepMessage> = serde_json::from_value(vector("step").meaning()).unwrap();
    step.payload.context = deep.clone();
    step.payload
        .parent_outputs
        .insert("deep".into(), deep.clone());
    assert_eq!(
        decode::<StepMessage>(&encode(&step).unwrap()).unwrap(),
        step
    );

    let mut batch: Envelope<ResultBatch> =
        serde_json::from_value(vector("result_batch").meaning()).unwrap();
    batch.payload.results[0].outcome = Outcome::succeeded(deep.clone());
    assert_eq!(
        decode::<ResultBatch>(&encode(&batch).unwrap()).unwrap(),
        batch
    );
    assert!(WorkerMessage::decode(&encode(&batch).unwrap()).is_ok());

    let mut request: Envelope<TaskRequest> =
        serde_json::from_value(vector("task_request").meaning()).unwrap();
    request.payload.context = json!({ "a": deep });
    assert_eq!(
        decode::<TaskRequest>(&encode(&request).unwrap()).unwrap(),
        request
    );

    // Far too deep, built by hand so that nothing here recurses.
    for depth in [MAX_MESSAGE_DEPTH, 10_000, 1_000_000] {
        for (name, field) in [
            ("step", "context"),
            ("result", "duration_ms"),
            ("cancel", "reason"),
        ] {
            let v = vector(name);
            let mut m = v.message.clone();
            m.payload().set(field, str("__HOLE__"));
            let mut nested = vec![0x91; depth];
            nested.push(0xc0);
            let b = replace_once(
                &m.to_msgpack(),
                &[&[0xa8][..], b"__HOLE__"].concat(),
                &nested,
            );
            assert!(decode_kind(&v.kind, &b).is_err(), "{name} nested {depth}");
            assert!(WorkerMessage::decode(&b).is_err());
        }
    }
}

/// (e) Random corruption of every vector never panics.
#[test]
fn corrupted_bytes_never_panic() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for v in &vectors().valid {
        let bytes = v.bytes();
        for _ in 0..2_000 {
            let mut b = bytes.clone();
            for _ in 0..=(next() % 3) {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            let _ = decode_kind(&v.kind, &b);
            let _ = WorkerMessage::decode(&b);
        }
    }
    for len in 0..200 {
        let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        for kind in KINDS {
            let _ = decode_kind(kind, &b);
        }
    }
}

/// (f) Ids travel as 36-character strings (`str 8`), never as 16-byte binaries.
#[test]
fn ids_are_strings() {
    for v in vectors().valid.iter().filter(|v| v.canonical) {
        let bytes = v.bytes();
        let mut strings = Vec::new();
        v.message.strings(&mut strings);
        let ids: Vec<uuid::Uuid> = strings
            .iter()
            .filter_map(|s| uuid::Uuid::parse_str(s).ok())
            .collect();
        assert!(ids.len() >= 2, "{}: expected ids", v.name);
        for id in ids {
            let text = id.hyphenated().to_string();
            let needle = [&[0xd9, 0x24][..], text.as_bytes()].concat();
            assert!(
                bytes.windows(needle.len()).any(|w| w == needle),
                "{}: {text} not a str 8",
                v.name
            );
            assert!(
                !bytes.windows(16).any(|w| w == id.as_bytes()),
                "{}: raw bytes of {text}",
                v.name
            );
        }
    }
    let id = TaskId::new();
    let bytes = rmp_serde::to_vec_named(&id).unwrap();
    assert_eq!(bytes[..2], [0xd9, 0x24]);
    assert_eq!(&bytes[2..], id.to_string().as_bytes());
    assert_eq!(id.to_string(), id.to_string().to_lowercase());
    assert_eq!(rmp_serde::from_slice::<TaskId>(&bytes).unwrap(), id);
    // Readers accept the same UUID in upper case; writers always write lower case.
    let upper = rmp_serde::to_vec_named(&id.to_string().to_uppercase()).unwrap();
    assert_eq!(rmp_serde::from_slice::<TaskId>(&upper).unwrap(), id);
    assert!(
        rmp_serde::from_slice::<TaskId>(&rmp_serde::to_vec_named("not-a-uuid").unwrap()).is_err()
    );
}

#[test]
fn kind_names_match_their_serde_names() {
    let kinds = [
        Kind::TaskRequest,
        Kind::Step,
        Kind::Result,
        Kind::ResultBatch,
        Kind::Started,
        Kind::Heartbeat,
        Kind::Cancel,
        Kind::LifecycleEvent,
        Kind::WorkerHeartbeat,
        Kind::Signal,
    ];
    for (kind, name) in kinds.into_iter().zip(KINDS) {
        assert_eq!(kind.as_str(), name);
        assert_eq!(serde_json::to_value(kind).unwrap(), json!(name));
        assert_eq!(
            rmp_serde::to_vec_named(&kind).unwrap(),
            rmp_serde::to_vec_named(name).unwrap()
        );
    }
}

#[test]
fn names_match_the_contract() {
    let n = Names::default();
    assert_eq!(n.tasks_exchange(), "tasker.tasks");
    assert_eq!(n.task_requests_queue(), "tasker.task_requests");
    assert_eq!(n.steps_exchange(), "tasker.steps");
    assert_eq!(
        n.step_queue("shop", "payments"),
        "tasker.step.shop.payments"
    );
    assert_eq!(
        topology::step_routing_key("shop", "payments"),
        "shop.payments"
    );
    assert_eq!(
        topology::split_step_routing_key("shop.payments"),
        Some(("shop", "payments"))
    );
    assert_eq!(
        Names::new("p.1").step_queue_pattern("shop"),
        "^p\\.1\\.step\\.shop\\."
    );
    assert_eq!(n.results_exchange(), "tasker.results");
    assert_eq!(n.results_queue(3), "tasker.results.3");
    assert_eq!(n.events_exchange(), "tasker.events");
    assert_eq!(n.cancel_exchange(), "tasker.cancel");
    assert_eq!(n.dead_letter_exchange(), "tasker.dlx");
    assert_eq!(n.dead_letter_queue(), "tasker.dead_letters");
    assert_eq!(topology::result_routing_key("shop", 3), "shop.3");
    assert_eq!(
        topology::event_routing_key("shop", "completed"),
        "shop.task.completed"
    );
    let task: TaskId = "0193a3f2-6c1e-7b4d-9a2f-1e2d3c4b5a69".parse().unwrap();
    assert_eq!(topology::shard_of(&task, 1), 0);
    assert_eq!(topology::shard_of(&task, 8), 0x5a69 % 8);
}

// Round trips with fresh ids, through MessagePack and through JSON.

fn round_trip<T: Payload + fmt::Debug + PartialEq + Clone>(payload: T) {
    let bytes = encode_payload(payload.clone()).unwrap();
    let got = decode::<T>(&bytes).unwrap();
    assert_eq!(got.kind, T::KIND);
    assert_eq!(got.schema_version, message::SCHEMA_VERSION);
    assert_eq!(got.payload, payload);
    assert_eq!(peek_kind(&bytes).unwrap(), T::KIND.as_str());
    // Re-encoding a decoded message changes nothing.
    assert_eq!(encode(&got).unwrap(), bytes);
    let json: Envelope<T> = serde_json::from_value(serde_json::to_value(&got).unwrap()).unwrap();
    assert_eq!(json, got);
    assert_no_byte_arrays(&serde_json::to_value(&got).unwrap());
}

fn assert_no_byte_arrays(v: &Value) {
    // Every id in a JSON rendering is a UUID string, never an array of bytes.
    if let Value::Array(items) = v {
        assert!(
            !(items.len() == 16 && items.iter().all(Value::is_u64)),
            "bytes in {v}"
        );
    }
    match v {
        Value::Array(items) => items.iter().for_each(assert_no_byte_arrays),
        Value::Object(map) => map.values().for_each(assert_no_byte_arrays),
        _ => {}
    }
}

fn sample_result(outcome: Outcome) -> StepResult {
    StepResult {
        task_id: TaskId::new(),
        step_id: StepId::new(),
        attempt: 7,
        worker: "host-1:99".into(),
        duration_ms: u64::MAX,
        outcome,
        traceparent: None,
    }
}

#[test]
fn round_trip_task_request() {
    round_trip(TaskRequest {
        request_id: RequestId::new(),
        namespace: "ns".into(),
        template: "t".into(),
        version: Some(u32::MAX),
        context: json!({"a": [1, -2, 3.25, "é\u{1F600}", null, true, {}], "big": u64::MAX, "neg": i64::MIN}),
        idempotency_key: Some("k".into()),
        priority: i16::MIN,
        task_id: Some(TaskId::new()),
        run_at: Some("2026-12-24T06:00:00Z".into()),
        delay_ms: Some(u64::MAX),
        deadline_ms: Some(3_600_000),
    });
    round_trip(TaskRequest {
        request_id: RequestId::new(),
        namespace: "ns".into(),
        template: "t".into(),
        version: None,
        context: json!({}),
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay_ms: None,
        deadline_ms: None,
    });
}

#[test]
fn round_trip_signal() {
    round_trip(Signal {
        task_id: TaskId::new(),
        name: "approval".into(),
        signal_id: "s-1".into(),
        payload: json!({"approved": true, "n": [1, 2.5, null]}),
    });
}

#[test]
fn round_trip_step() {
    let task_id = TaskId::new();
    let mut parents = serde_json::Map::new();
    parents.insert("a".into(), json!({"x": 1}));
    parents.insert("b".into(), Value::Null);
    let plain = StepMessage {
        task_id,
        step_id: StepId::new(),
        namespace: "ns".into(),
        template: "t".into(),
        step: "s".into(),
        handler: "h".into(),
        queue: "q".into(),
        attempt: 1,
        idempotency_key: format!("{task_id}:s"),
        context: json!("a bare string is valid JSON too"),
        parent_outputs: parents,
        timeout_ms: 1,
        result_routing_key: "ns.0".into(),
        map_index: None,
        map_item: None,
        failure: None,
    };
    round_trip(plain.clone());
    // Instances of a mapped step, down to the largest index.
    for (index, item) in [
        (0, json!({"key": "a.jpg"})),
        (7, json!([1, "two", null])),
        (u32::MAX, json!(false)),
    ] {
        round_trip(StepMessage {
            idempotency_key: format!("{task_id}:s:{index}"),
            map_index: Some(index),
            map_item: Some(item),
            failure: None,
            ..plain.clone()
        });
    }
}

#[test]
fn round_trip_results() {
    let outcomes = [
        Outcome::succeeded(json!({"ok": true})),
        Outcome::succeeded(Value::Null),
        Outcome::Succeeded {
            output: json!(1),
            branches: Some(vec!["express".into()]),
        },
        Outcome::Succeeded {
            output: Value::Null,
            branches: Some(Vec::new()),
        },
        Outcome::Failed {
            message: "boom".into(),
            retryable: true,
            retry_after_ms: Some(0),
        },
        Outcome::Failed {
            message: String::new(),
            retryable: false,
            retry_after_ms: None,
        },
        Outcome::HandlerMissing {
            handler: "h".into(),
        },
    ];
    for outcome in outcomes.clone() {
        let result = sample_result(outcome);
        round_trip(result.clone());
        let (_, msg) = WorkerMessage::decode(&encode_payload(result.clone()).unwrap()).unwrap();
        assert_eq!(msg, WorkerMessage::Results(vec![result]));
    }
    let batch = ResultBatch {
        results: outcomes.into_iter().map(sample_result).collect(),
    };
    round_trip(batch.clone());
    let (_, msg) = WorkerMessage::decode(&encode_payload(batch.clone()).unwrap()).unwrap();
    assert_eq!(msg, WorkerMessage::Results(batch.results));
    round_trip(ResultBatch {
        results: Vec::new(),
    });
}

#[test]
fn round_trip_started_and_heartbeat() {
    let started = Started {
        task_id: TaskId::new(),
        step_id: StepId::new(),
        attempt: 2,
        worker: "w".into(),
        lease_ms: 60_000,
    };
    round_trip(started.clone());
    let (_, msg) = WorkerMessage::decode(&encode_payload(started.clone()).unwrap()).unwrap();
    assert_eq!(msg, WorkerMessage::Started(started));
    let heartbeat = Heartbeat {
        task_id: TaskId::new(),
        step_id: StepId::new(),
        attempt: 2,
        worker: "w".into(),
        lease_ms: 60_000,
    };
    round_trip(heartbeat.clone());
    let (id, msg) = WorkerMessage::decode(&encode_payload(heartbeat.clone()).unwrap()).unwrap();
    assert_eq!(msg, WorkerMessage::Heartbeat(heartbeat));
    assert_eq!(id.0.get_version_num(), 7);
}

#[test]
fn round_trip_cancel_and_lifecycle_event() {
    round_trip(Cancel {
        task_id: TaskId::new(),
        reason: Some("why".into()),
    });
    round_trip(Cancel {
        task_id: TaskId::new(),
        reason: None,
    });
    for (state, output, error) in [
        ("running", None, None),
        ("completed", Some(json!([1, 2])), None),
        ("failed", None, Some("step charge failed".to_owned())),
        ("cancelled", None, None),
    ] {
        round_trip(LifecycleEvent {
            task_id: TaskId::new(),
            namespace: "ns".into(),
            template: "t".into(),
            seq: 1,
            state: state.into(),
            at: "2025-01-15T10:30:00.000001Z".into(),
            output,
            error,
        });
    }
}
