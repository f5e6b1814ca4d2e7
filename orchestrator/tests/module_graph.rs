//! The orchestrator's modules form no import cycle, and the layers point one way: the pure rules
//! ([`transition`], [`slots`]) use no I/O layer, the store uses no service, edge or loop, and
//! services use no edge or loop. Read from the source, so a new `use` that breaks this fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path of a source file under `src/` (`service/apply.rs` → `service::apply`).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Splits `a, b::{c, d}, e` at top-level commas.
fn split_items(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(s[start..].trim());
    items
}

/// Every path named after `crate::`, `super::` or `self::` in code (not in comments),
/// expanded over one level of braces, as absolute segment lists.
fn referenced(text: &str, module: &str) -> Vec<Vec<String>> {
    let parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (prefix, base) in [
            ("crate::", Vec::new()),
            ("super::", parent[..parent.len().saturating_sub(1)].to_vec()),
            ("self::", parent.clone()),
        ] {
            let mut rest = code;
            while let Some(i) = rest.find(prefix) {
                let before = rest[..i].chars().last();
                let tail = &rest[i + prefix.len()..];
                rest = tail;
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let path: String = tail
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut segs: Vec<String> = base.iter().map(|s| s.to_string()).collect();
                segs.extend(
                    path.split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
                let after = &tail[path.len()..];
                if path.ends_with("::")
                    && let Some(body) = after.strip_prefix('{')
                {
                    let inner = body.split('}').next().unwrap_or("");
                    for item in split_items(inner) {
                        let first = item.split("::").next().unwrap_or("").trim();
                        let mut s = segs.clone();
                        if !first.is_empty() && first != "self" {
                            s.push(first.to_owned());
                        }
                        out.push(s);
                    }
                } else {
                    out.push(segs);
                }
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .filter(|f| !f.ends_with("lib.rs") && !f.ends_with("main.rs"))
        .map(|f| {
            (
                module_of(f.strip_prefix(&src).expect("under src")),
                f.clone(),
            )
        })
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read module");
        let deps = edges.entry(module.clone()).or_default();
        for segs in referenced(&text, module) {
            // The longest prefix that is a module.
            let target = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| modules.contains_key(m));
            if let Some(t) = target
                && t != *module
                && !module.starts_with(&format!("{t}::"))
            {
                deps.insert(t);
            }
        }
    }
    edges
}

#[test]
fn the_modules_form_no_import_cycle() {
    let g = graph();
    assert!(
        g.contains_key("transition") && g.contains_key("service::apply"),
        "the source was not read: {:?}",
        g.keys()
    );
    // Depth-first search for a back edge; report the cycle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let cycle = visit(n, &g, &mut state, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "import cycle: {}",
                cycle.unwrap().join(" -> ")
            );
        }
    }
}

#[test]
fn layers_point_one_way() {
    let g = graph();
    let uses = |from: &str, layer: &str| -> Vec<String> {
        g.iter()
            .filter(|(m, _)| *m == from || m.starts_with(&format!("{from}::")))
            .flat_map(|(m, deps)| {
                deps.iter()
                    .filter(|d| *d == layer || d.starts_with(&format!("{layer}::")))
                    .map(move |d| format!("{m} -> {d}"))
            })
            .collect()
    };
    for pure in ["transition", "slots"] {
        for io in ["store", "service", "edge", "loops", "broker", "startup"] {
            assert!(uses(pure, io).is_empty(), "{:?}", uses(pure, io));
        }
    }
    for upper in ["service", "edge", "loops", "startup"] {
        assert!(
            uses("store", upper).is_empty(),
            "{:?}",
            uses("store", upper)
        );
    }
    for upper in ["edge", "loops", "startup"] {
        assert!(
            uses("service", upper).is_empty(),
            "{:?}",
            uses("service", upper)
        );
    }
    // The parser sees real dependencies (so the checks above can fail).
    assert!(!uses("service", "store").is_empty());
    assert!(!uses("store", "transition").is_empty());
}
