#!/usr/bin/env python3
"""Checks the Grafana dashboard and the alert rules against docs/observability.md.

    check_metrics.py DOCS DASHBOARD_JSON ALERTS_YML [DASHBOARD_RULES_OUT]

- the dashboard is valid JSON, with panels, a `datasource` template variable that every panel and
  query uses (no hard-coded data source), and the `namespace` and `queue` variables;
- every PromQL query of the dashboard (targets' `expr`, template variables' queries) and of the
  alert rules (`expr`) names only metrics that docs/observability.md documents (a backticked
  name in the first cell of a table row); a histogram (documented under a "Histograms" heading)
  only through its `_bucket`, `_sum` or `_count` series, any other metric only by its own name;
- every alert rule has a `severity` label and `summary` and `description` annotations.

With DASHBOARD_RULES_OUT, it also writes the dashboard's queries (Grafana variables replaced by
plain values) as recording rules there, for `promtool check rules` to parse their PromQL.

Only the standard library: the rules file is read line by line (it is checked as YAML by
`promtool check rules`).
"""

import json
import re
import sys

# Metrics being added in the same change as the dashboard: accepted while docs/observability.md
# does not describe them yet, with a warning. Drop a name once it is documented.
PENDING_DOCS: set[str] = set()

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}

errors = []
warnings = set()
dashboard_exprs = []  # (panel title, expr) of the dashboard, for DASHBOARD_RULES_OUT


def documented(docs_path):
    """{metric: is_histogram} for the metrics in the first cell of the docs' table rows."""
    metrics = {}
    histograms = False
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                histograms = "histogram" in line.lower()
                continue
            if not line.startswith("|"):
                continue
            cells = line.split("|")
            if len(cells) < 3:
                continue
            for name in re.findall(r"`(tasker_[a-z0-9_]+)`", cells[1]):
                metrics[name] = histograms
    return metrics


def metric_names(expr):
    """The metric names a PromQL expression selects (good enough for our queries)."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e
    )  # label lists
    e = re.sub(r"(?<![\w:.])(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[smhdwy]*", " ", e)  # numbers
    names = []
    for m in re.finditer(r"(?<![\w:])[A-Za-z_:][\w:]*", e):
        name = m.group(0)
        if name.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", e[m.end():]):  # a function
            continue
        names.append(name)
    return names


def check_expr(where, expr, docs):
    if not expr.strip():
        errors.append(f"{where}: empty query")
        return
    names = metric_names(expr)
    # label_values(metric, label) in template variables: only its metric is one.
    for m in re.finditer(r"label_values\s*\(\s*([A-Za-z_:][\w:]*)?\s*(\{[^}]*\})?\s*,?\s*(\w+)?", expr):
        if m.group(3):
            names = [n for n in names if n != m.group(3)]
    for name in names:
        base, suffix = name, ""
        for s in HISTOGRAM_SUFFIXES:
            if name.endswith(s) and docs.get(name[: -len(s)]):
                base, suffix = name[: -len(s)], s
        if base in docs:
            if docs[base] and not suffix:
                errors.append(f"{where}: histogram {base} used without _bucket/_sum/_count")
        elif base in PENDING_DOCS:
            warnings.add(f"{base} is not documented in docs/observability.md yet (accepted: PENDING_DOCS)")
        else:
            errors.append(f"{where}: metric {name} is not documented in docs/observability.md")


def walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def check_dashboard(path, docs):
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        errors.append(f"{path}: not valid JSON: {e}")
        return 0
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{path}: needs a `datasource` template variable of type prometheus")
    for name in ("namespace", "queue"):
        if name not in variables:
            errors.append(f"{path}: needs a `{name}` template variable")
    panels = dash.get("panels") or []
    if not panels:
        errors.append(f"{path}: no panels")
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        errors.append(f"{path}: panel ids are not unique")
    queries = 0
    for where, node in walk(dash):
        if "datasource" in node and isinstance(node["datasource"], dict):
            uid = node["datasource"].get("uid")
            if uid not in ("${datasource}", "$datasource", "-- Grafana --", "grafana"):
                errors.append(f"{path}{where}: data source {uid!r} instead of ${{datasource}}")
        if "expr" in node:
            queries += 1
            check_expr(f"{path}{where}", str(node["expr"]), docs)
            dashboard_exprs.append((where, str(node["expr"])))
        if node.get("type") == "query" and "query" in node:
            q = node["query"]
            q = q.get("query", "") if isinstance(q, dict) else q
            queries += 1
            check_expr(f"{path}{where}", str(q), docs)
            m = re.match(r"\s*label_values\s*\(\s*([^,]+?)\s*,", str(q))
            if m:
                dashboard_exprs.append((where, m.group(1)))
    for p in panels:
        if p.get("type") != "row" and not p.get("targets"):
            errors.append(f"{path}: panel {p.get('title')!r} has no query")
    return queries


def check_rules(path, docs):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    exprs = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest in ("|", "|-", ">", ">-", "|+", ">+"):
            body = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            rest = "\n".join(body)
        elif rest[:1] in "'\"":
            rest = rest[1:-1]
        exprs.append((i, rest))
    for line, expr in exprs:
        check_expr(f"{path}:{line}", expr, docs)
    text = "\n".join(lines)
    alerts = re.split(r"^\s*- alert:", text, flags=re.M)[1:]
    for block in alerts:
        name = block.split()[0]
        block = re.split(r"^\s*- (?:alert|record):", block, flags=re.M)[0]
        for key in ("severity:", "summary:", "description:"):
            if not re.search(rf"^\s*{key}\s*\S", block, flags=re.M):
                errors.append(f"{path}: alert {name} has no {key[:-1]}")
    return len(exprs), len(alerts)


def write_dashboard_rules(out):
    """The dashboard's queries as recording rules (PromQL with Grafana's variables filled in)."""
    values = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

    def plain(expr):
        expr = re.sub(r"\[\$\{?(\w+)\}?\]", lambda m: "[" + values.get(m.group(1), "5m") + "]", expr)
        return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", lambda m: values.get(m.group(1), ".*"), expr)

    with open(out, "w", encoding="utf-8") as f:
        f.write("# Generated by check_metrics.py from grafana-dashboard.json: only for promtool.\n")
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for i, (where, expr) in enumerate(dashboard_exprs):
            f.write(f"      # {where}\n")
            f.write(f"      - record: dashboard:query_{i}\n")
            f.write(f"        expr: {json.dumps(plain(expr))}\n")


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    docs_path, dash_path, rules_path = sys.argv[1:4]
    docs = documented(docs_path)
    if len(docs) < 10:
        errors.append(f"{docs_path}: found only {len(docs)} documented metrics")
    queries = check_dashboard(dash_path, docs)
    exprs, alerts = check_rules(rules_path, docs)
    if len(sys.argv) == 5:
        write_dashboard_rules(sys.argv[4])
    for w in sorted(warnings):
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(
        f"{len(docs)} documented metrics; dashboard: {queries} queries; "
        f"rules: {exprs} expressions, {alerts} alerts with severity, summary and description"
    )


if __name__ == "__main__":
    main()
