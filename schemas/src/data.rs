//! Task data: JSON with string keys, no binary, no NUL, under configurable size caps.

use serde_json::Value;

/// Deepest nesting of arrays and objects in one piece of task data (`1` is a flat `{}` or `[]`).
/// Kept under serde_json's own limit (127) so data written anywhere can be read back as JSON.
pub const MAX_DEPTH: usize = 100;

/// Size caps for task data (defaults: context and each output 256 KiB, an assembled step
/// message 4 MiB, a task's output 4 MiB; `CONTRACT.md` lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLimits {
    /// A task's context, serialized as JSON.
    pub max_context_bytes: usize,
    /// One step output, serialized as JSON.
    pub max_output_bytes: usize,
    /// One assembled step message (context plus parent outputs), encoded.
    pub max_step_message_bytes: usize,
    /// A completed task's output (the outputs of its leaf steps together), serialized as JSON.
    pub max_task_output_bytes: usize,
}

impl Default for DataLimits {
    fn default() -> Self {
        Self {
            max_context_bytes: 256 * 1024,
            max_output_bytes: 256 * 1024,
            max_step_message_bytes: 4 * 1024 * 1024,
            max_task_output_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Why a piece of task data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: String,
        size: usize,
        limit: usize,
    },
    #[error("{what} contains a NUL character, which is not allowed")]
    ContainsNul { what: String },
    #[error("{what} nests arrays and objects more than {limit} levels deep")]
    TooDeep { what: String, limit: usize },
}

/// Checks that `value` has no NUL characters, nests at most [`MAX_DEPTH`] levels and serializes
/// to at most `limit` bytes of JSON. Returns the serialized size.
pub fn check_value(what: &str, value: &Value, limit: usize) -> Result<usize, DataError> {
    if depth(value) > MAX_DEPTH {
        return Err(DataError::TooDeep {
            what: what.to_owned(),
            limit: MAX_DEPTH,
        });
    }
    if contains_nul(value) {
        return Err(DataError::ContainsNul {
            what: what.to_owned(),
        });
    }
    let size = json_size(value);
    if size > limit {
        return Err(DataError::TooLarge {
            what: what.to_owned(),
            size,
            limit,
        });
    }
    Ok(size)
}

/// Serialized JSON size in bytes, without allocating the text.
pub fn json_size(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}

/// Nesting depth of arrays and objects: 0 for a scalar, 1 for a flat array or object.
pub fn depth(value: &Value) -> usize {
    // Iterative walk: a deeply nested value must not overflow the stack.
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                deepest = deepest.max(d + 1);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            Value::Object(o) => {
                deepest = deepest.max(d + 1);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

fn contains_nul(value: &Value) -> bool {
    // Iterative walk: a deeply nested value must not overflow the stack.
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(o) => {
                for (k, v) in o {
                    if k.contains('\0') {
                        return true;
                    }
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refuses_oversized_and_nul() {
        let v = json!({"a": "x".repeat(100)});
        assert_eq!(check_value("context", &v, 1_000), Ok(json_size(&v)));
        let err = check_value("context", &v, 10).unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 10 bytes"),
            "{err}"
        );
        assert_eq!(
            check_value("output", &json!({"k": ["a\0b"]}), 1_000),
            Err(DataError::ContainsNul {
                what: "output".into()
            })
        );
    }

    #[test]
    fn refuses_too_deep() {
        let nest = |n: usize| (0..n).fold(json!(1), |v, _| json!([v]));
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({"a": [], "b": [[{}]]})), 4);
        assert_eq!(depth(&nest(MAX_DEPTH)), MAX_DEPTH);
        assert!(check_value("context", &nest(MAX_DEPTH), 1_000_000).is_ok());
        assert_eq!(
            check_value("context", &nest(MAX_DEPTH + 1), 1_000_000),
            Err(DataError::TooDeep {
                what: "context".into(),
                limit: MAX_DEPTH
            })
        );
        // What passes the check can be read back as JSON.
        let text = serde_json::to_string(&nest(MAX_DEPTH)).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn size_matches_serialized_length() {
        let v = json!({"a": [1, 2, {"b": "é"}]});
        assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len());
    }
}
