//! A workflow's DAG laid out on the server and drawn as SVG: layered by depth (the longest path
//! from a root), left to right, each layer ordered by its parents' positions (one barycentre
//! pass, which keeps most edges short and uncrossed). Pure: no I/O, unit-tested below.
//!
//! Every node is `<g id="node-{step}" class="node st-{state}">` with `.name` and `.sub` texts,
//! so the live page's script can recolour and relabel it (docs/console.md).

use maud::{Markup, html};

/// Node box size and spacing (SVG user units, which are CSS pixels at scale 1).
const W: f64 = 170.0;
const H: f64 = 46.0;
const GAP_X: f64 = 60.0;
const GAP_Y: f64 = 18.0;
const PAD: f64 = 8.0;

/// One step to draw.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// The step name (also its element id `node-{name}`).
    pub name: String,
    /// Indexes of its parents in the node list.
    pub parents: Vec<usize>,
    /// The state class suffix (`succeeded` → `st-succeeded`); empty for a template's picture.
    pub state: String,
    /// The second line: handler, attempt, a mapped step's counts.
    pub sub: String,
    /// Where the node links to (a child workflow's task).
    pub href: Option<String>,
    /// A tooltip.
    pub title: String,
}

/// Positions: (layer, row) per node.
pub fn layout(nodes: &[Node]) -> Vec<(usize, usize)> {
    let n = nodes.len();
    // Longest path from a root; parents are resolved in a loop (templates are acyclic; a
    // cycle or a dangling index would stop at n rounds rather than loop forever).
    let mut depth = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for (i, node) in nodes.iter().enumerate() {
            let d = node
                .parents
                .iter()
                .filter(|&&p| p < n)
                .map(|&p| depth[p] + 1)
                .max()
                .unwrap_or(0);
            if d != depth[i] && d < n {
                depth[i] = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let layers = depth.iter().copied().max().map_or(0, |d| d + 1);
    let mut row = vec![0usize; n];
    for layer in 0..layers {
        let mut members: Vec<(f64, usize)> = (0..n)
            .filter(|&i| depth[i] == layer)
            .map(|i| {
                let ps: Vec<f64> = nodes[i]
                    .parents
                    .iter()
                    .filter(|&&p| p < n)
                    .map(|&p| row[p] as f64)
                    .collect();
                let key = if ps.is_empty() {
                    i as f64
                } else {
                    ps.iter().sum::<f64>() / ps.len() as f64
                };
                (key, i)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, (_, i)) in members.into_iter().enumerate() {
            row[i] = r;
        }
    }
    depth.into_iter().zip(row).collect()
}

fn at(pos: (usize, usize)) -> (f64, f64) {
    (
        PAD + pos.0 as f64 * (W + GAP_X),
        PAD + pos.1 as f64 * (H + GAP_Y),
    )
}

/// The SVG picture of `nodes`.
pub fn svg(nodes: &[Node]) -> Markup {
    let pos = layout(nodes);
    let width = pos
        .iter()
        .map(|p| at(*p).0 + W + PAD)
        .fold(2.0 * PAD, f64::max);
    let height = pos
        .iter()
        .map(|p| at(*p).1 + H + PAD)
        .fold(2.0 * PAD, f64::max);
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" role="img" aria-label="workflow graph"
            width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7"
                    markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" {}
                }
            }
            @for (i, node) in nodes.iter().enumerate() {
                @for &p in node.parents.iter().filter(|&&p| p < nodes.len()) {
                    @let (px, py) = at(pos[p]);
                    @let (cx, cy) = at(pos[i]);
                    @let (x1, y1, x2, y2) = (px + W, py + H / 2.0, cx, cy + H / 2.0);
                    @let mid = (x1 + x2) / 2.0;
                    path.edge id={"edge-" (nodes[p].name) "-" (node.name)}
                        data-from=(nodes[p].name) data-to=(node.name)
                        d={"M " (x1) " " (y1) " C " (mid) " " (y1) ", " (mid) " " (y2) ", " (x2) " " (y2)}
                        marker-end="url(#arrow)" {}
                }
            }
            @for (i, node) in nodes.iter().enumerate() {
                @let (x, y) = at(pos[i]);
                @let class = if node.state.is_empty() { "node".to_owned() } else { format!("node st-{}", node.state) };
                @let body = html! {
                    g id={"node-" (node.name)} class=(class) data-step=(node.name)
                        transform={"translate(" (x) " " (y) ")"} {
                        title { (node.title) }
                        rect width=(W) height=(H) rx="6" {}
                        text.name x="10" y="19" { (truncate(&node.name, 22)) }
                        text.sub x="10" y="36" { (truncate(&node.sub, 26)) }
                    }
                };
                @if let Some(href) = &node.href {
                    a href=(href) { (body) }
                } @else {
                    (body)
                }
            }
        }
    }
}

/// At most `max` characters, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, parents: &[usize]) -> Node {
        Node {
            name: name.into(),
            parents: parents.to_vec(),
            state: "waiting".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_diamond_is_three_layers_with_the_branches_side_by_side() {
        let nodes = [
            node("a", &[]),
            node("b", &[0]),
            node("c", &[0]),
            node("d", &[1, 2]),
        ];
        let pos = layout(&nodes);
        assert_eq!(pos, vec![(0, 0), (1, 0), (1, 1), (2, 0)]);
    }

    #[test]
    fn depth_is_the_longest_path_whatever_the_order() {
        // d depends on a and c; c on b; b on a — listed out of order.
        let nodes = [
            node("d", &[3, 2]),
            node("b", &[3]),
            node("c", &[1]),
            node("a", &[]),
        ];
        let pos = layout(&nodes);
        assert_eq!(pos[3].0, 0);
        assert_eq!(pos[1].0, 1);
        assert_eq!(pos[2].0, 2);
        assert_eq!(pos[0].0, 3);
    }

    #[test]
    fn a_cycle_or_a_bad_index_ends() {
        let nodes = [node("a", &[1]), node("b", &[0]), node("c", &[7])];
        let pos = layout(&nodes);
        assert_eq!(pos.len(), 3);
        assert_eq!(pos[2].0, 0);
    }

    #[test]
    fn the_svg_has_a_group_per_node_with_its_state_and_links_children() {
        let mut nodes = vec![node("fetch", &[]), node("ship<x>", &[0])];
        nodes[0].state = "succeeded".into();
        nodes[1].href = Some("/ui/tasks/abc".into());
        let out = svg(&nodes).into_string();
        assert!(
            out.contains(r#"id="node-fetch" class="node st-succeeded""#),
            "{out}"
        );
        assert!(out.contains(r#"id="node-ship&lt;x&gt;""#), "{out}");
        assert!(out.contains(r#"<a href="/ui/tasks/abc">"#), "{out}");
        assert!(out.contains(r#"id="edge-fetch-ship&lt;x&gt;""#), "{out}");
        assert_eq!(out.matches("<rect").count(), 2);
    }

    #[test]
    fn long_names_are_cut_with_an_ellipsis() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
