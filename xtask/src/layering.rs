//! `cargo xtask test`'s layering check: no import cycles among the agent's
//! modules. A module may use its parent's items and re-export its
//! children; any other cycle (two siblings using each other, a lower
//! module taking a type of a higher one) fails the check, naming it.
//!
//! It reads `agent/src` as text: every `crate::`, `super::` and `self::`
//! path outside comments and `#[cfg(test)]` code, resolved to the longest
//! module it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, bail};

/// Module path (`ebpf::attach`) → its source.
fn modules(src: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Some(rel) = path
                .strip_prefix(src)
                .ok()
                .and_then(|r| r.to_str())
                .and_then(|r| r.strip_suffix(".rs"))
            else {
                continue;
            };
            let name = match rel {
                "lib" => "crate".to_owned(),
                "main" => "main".to_owned(),
                r if r.ends_with("tests") => continue,
                r => r.replace('/', "::"),
            };
            out.insert(name, fs::read_to_string(&path)?);
        }
    }
    Ok(out)
}

/// The source without comments and test modules.
fn code(src: &str) -> String {
    let before_tests = src.split("#[cfg(test)]").next().unwrap_or_default();
    before_tests
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module a path used from `current` names, if any.
fn resolve(names: &BTreeSet<String>, current: &str, path: &[&str]) -> Option<String> {
    let (mut base, rest): (Vec<&str>, &[&str]) = match *path.first()? {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (current.split("::").collect(), &path[1..]),
        "super" => {
            let mut base: Vec<&str> = current.split("::").collect();
            let mut rest = path;
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        _ => return None,
    };
    if current == "crate" || current == "main" {
        base.clear();
    }
    (1..=rest.len()).rev().find_map(|n| {
        let candidate = base
            .iter()
            .chain(&rest[..n])
            .copied()
            .collect::<Vec<_>>()
            .join("::");
        names.contains(&candidate).then_some(candidate)
    })
}

/// Every path a piece of code uses, expanding `use a::{b, c::{d}}` groups.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let start_ok = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let rest: String = bytes[i..bytes.len().min(i + 6)].iter().collect();
        if start_ok
            && ["crate", "super", "self"]
                .iter()
                .any(|k| rest.starts_with(k))
        {
            let (items, end) = parse_tree(&bytes, i);
            out.extend(items);
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses `seg::seg::{tree, tree}` at `i`; the paths and where it ended.
fn parse_tree(c: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        let start = i;
        while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        if i == start {
            break;
        }
        prefix.push(c[start..i].iter().collect::<String>());
        if c.get(i) == Some(&':') && c.get(i + 1) == Some(&':') {
            i += 2;
            if c.get(i) == Some(&'{') {
                let mut all = Vec::new();
                i += 1;
                loop {
                    while c.get(i).is_some_and(|ch| ch.is_whitespace() || *ch == ',') {
                        i += 1;
                    }
                    if c.get(i).is_none_or(|ch| *ch == '}') {
                        return (all, i + 1);
                    }
                    let (sub, end) = parse_tree(c, i);
                    for s in sub {
                        all.push(prefix.iter().cloned().chain(s).collect());
                    }
                    all.push(prefix.clone());
                    // Skip what the sub-tree did not consume (`as _`, `Foo`).
                    i = end.max(i + 1);
                    while c.get(i).is_some_and(|ch| *ch != ',' && *ch != '}') {
                        i += 1;
                    }
                }
            }
            continue;
        }
        break;
    }
    (vec![prefix], i)
}

/// Fails naming every cycle among the modules under `src`, between files
/// and between top-level modules.
pub fn check(src: &Path) -> Result<()> {
    let mods = modules(src)?;
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, text) in &mods {
        let deps = edges.entry(name.clone()).or_default();
        for path in paths(&code(text)) {
            let segs: Vec<&str> = path.iter().map(String::as_str).collect();
            let Some(target) = resolve(&names, name, &segs) else {
                continue;
            };
            let own_child = name == "crate" || target.starts_with(&format!("{name}::"));
            if target != *name && !own_child {
                deps.insert(target);
            }
        }
    }
    // And between top-level modules: a use through a parent's re-export
    // (`crate::ebpf::DatapathMaps`) depends on the whole of it.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &edges {
        let head = |m: &str| m.split("::").next().unwrap_or_default().to_owned();
        let deps = top.entry(head(from)).or_default();
        deps.extend(tos.iter().map(|t| head(t)).filter(|t| *t != head(from)));
    }
    let mut cycles = cycles(&edges);
    cycles.extend(self::cycles(&top));
    cycles.sort();
    cycles.dedup();
    if cycles.is_empty() {
        eprintln!("layering: {} modules, no import cycles", mods.len());
        return Ok(());
    }
    let listed: Vec<String> = cycles.iter().map(|c| c.join(" ↔ ")).collect();
    bail!(
        "import cycles among agent/src modules: {}",
        listed.join("; ")
    )
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w.as_str()) {
                let iw = s.index[w.as_str()];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(pairs: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry((*a).into()).or_default().insert((*b).into());
            g.entry((*b).into()).or_default();
        }
        g
    }

    #[test]
    fn finds_a_cycle_and_only_that() {
        let g = graph(&[("a", "b"), ("b", "a"), ("b", "c")]);
        assert_eq!(cycles(&g), vec![vec!["a".to_owned(), "b".to_owned()]]);
        assert!(cycles(&graph(&[("a", "b"), ("b", "c")])).is_empty());
    }

    #[test]
    fn use_groups_are_expanded_and_resolved() {
        let names: BTreeSet<String> = ["ebpf", "ebpf::maps", "capture", "capture::ebpf"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let found: Vec<Option<String>> =
            paths("use crate::{ebpf::{maps::DatapathMaps, Hook}, capture};\nuse super::Settings;")
                .iter()
                .map(|p| {
                    let s: Vec<&str> = p.iter().map(String::as_str).collect();
                    resolve(&names, "capture::ebpf", &s)
                })
                .collect();
        assert!(found.contains(&Some("ebpf::maps".into())), "{found:?}");
        assert!(found.contains(&Some("ebpf".into())), "{found:?}");
        assert!(found.contains(&Some("capture".into())), "{found:?}");
        // `// crate::x` in a comment is not a use.
        assert!(paths(&code("// see crate::capture\nfn f() {}")).is_empty());
    }
}
