//! The library's layers, read from its sources: dependencies point one way (`ops`, `comm` <-
//! `layers` <- `runtime` <- zoo, bin), `pipe` and `zero` never use the engine, the zoo never calls
//! kernels directly, no two modules import each other in a circle (inside `zero/` excepted:
//! the optimizer's flow and its state backends call each other by design), and no file of
//! `layers/` or `runtime/` grows past what one reads in a sitting. ARCHITECTURE.md explains why.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments (doc links name modules without depending on them).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal is kept (rare, and never a path).
            Some(i) if l[..i].matches('"').count() % 2 == 0 => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The library's modules, by path (`runtime::zero::stage3`), and their files.
fn modules() -> BTreeMap<String, PathBuf> {
    let src = root().join("candle-deepscale/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(&src).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            (parts.join("::"), f)
        })
        .collect()
}

/// Identifier paths following `prefix` (`crate::`, `super::`) in `code`.
fn paths_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).filter_map(move |(i, _)| {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &code[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let p = rest[..end].trim_end_matches(':');
        (!p.is_empty()).then(|| p.to_string())
    })
}

/// The module graph: each module's library dependencies. A path into a `mod.rs` that names an
/// item it re-exports from a child resolves to that child.
fn graph(mods: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut reexports: BTreeMap<(String, String), String> = BTreeMap::new();
    for (m, f) in mods {
        let c = code(f);
        for line in c
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("pub use "))
        {
            let body = line.trim_start_matches("pub use ").trim_end_matches(';');
            let body = body.strip_prefix("self::").unwrap_or(body);
            let Some((child, items)) = body.split_once("::") else {
                continue;
            };
            let child_path = if m.is_empty() {
                child.to_string()
            } else {
                format!("{m}::{child}")
            };
            if !mods.contains_key(&child_path) {
                continue;
            }
            for item in items
                .trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .map(|s| s.trim().rsplit("::").next().unwrap_or("").to_string())
                .filter(|s| !s.is_empty())
            {
                reexports.insert((m.clone(), item), child_path.clone());
            }
        }
    }
    let resolve = |path: &str| -> Option<String> {
        let segs: Vec<&str> = path.split("::").collect();
        (1..=segs.len()).rev().find_map(|n| {
            let cand = segs[..n].join("::");
            if !mods.contains_key(&cand) {
                return None;
            }
            Some(
                segs.get(n)
                    .and_then(|item| reexports.get(&(cand.clone(), item.to_string())))
                    .cloned()
                    .unwrap_or(cand),
            )
        })
    };
    let mut g = BTreeMap::new();
    for (m, f) in mods {
        if m.is_empty() {
            continue; // lib.rs: the crate's map and the deprecated paths
        }
        let c = code(f);
        // `super` of a file module is its folder's module; of a mod.rs, the folder above.
        let parent = {
            let mut p: Vec<&str> = m.split("::").collect();
            p.pop();
            p.join("::")
        };
        let mut deps = BTreeSet::new();
        for p in paths_after(&c, "crate::") {
            deps.extend(resolve(&p));
        }
        for p in paths_after(&c, "super::") {
            let full = if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            };
            deps.extend(resolve(&full));
        }
        // A folder's mod.rs naming a child module by a relative path uses it; re-exporting it
        // (`pub use child::Item`) only opens it to the outside.
        if is_mod_rs_of(m, mods) {
            let body: String = c
                .lines()
                .filter(|l| !l.trim_start().starts_with("pub use "))
                .collect::<Vec<_>>()
                .join("\n");
            for (child, _) in mods.range(format!("{m}::")..) {
                let Some(name) = child.strip_prefix(&format!("{m}::")) else {
                    break;
                };
                if name.contains("::") {
                    continue;
                }
                for p in paths_after(&body, &format!("{name}::")) {
                    deps.extend(resolve(&format!("{child}::{p}")));
                }
            }
        }
        deps.remove(m);
        g.insert(m.clone(), deps);
    }
    g
}

fn is_mod_rs_of(m: &str, mods: &BTreeMap<String, PathBuf>) -> bool {
    mods.get(m)
        .is_some_and(|f| f.file_name().is_some_and(|n| n == "mod.rs"))
}

fn top(m: &str) -> &str {
    m.split("::").next().unwrap_or("")
}

#[test]
fn dependencies_point_one_way() {
    let mods = modules();
    let g = graph(&mods);
    assert!(g.len() > 50, "found only {} modules", g.len());
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            let bad = match (top(m), top(d)) {
                ("ops", t) => t != "ops",
                ("comm", t) => t != "comm",
                ("layers", t) => t == "runtime",
                _ => false,
            } || ((m.starts_with("runtime::pipe") || m.starts_with("runtime::zero"))
                && d == "runtime::engine");
            if bad {
                wrong.push(format!("{m} uses {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "upward imports:\n{}", wrong.join("\n"));
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.low[v].min(self.index[w]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn no_import_circles_outside_zero() {
    let mods = modules();
    let mut g = graph(&mods);
    // Inside zero/ the optimizer's flow and its state backends call each other by design.
    for (m, deps) in g.iter_mut() {
        if m.starts_with("runtime::zero") {
            deps.retain(|d| !d.starts_with("runtime::zero"));
        }
    }
    let found = circles(&g);
    assert!(found.is_empty(), "import circles: {found:?}");
}

/// The checks above can fail: a synthetic circle and an upward import are found.
#[test]
fn the_checks_find_what_they_look_for() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    g.insert("d".into(), BTreeSet::new());
    assert_eq!(circles(&g), vec![vec!["a", "b", "c"]]);
    let c = "use crate::runtime::engine::Engine; // crate::ops::x\nlet x = crate::layers::linear::linear(a);";
    let paths: Vec<String> = paths_after(c, "crate::").collect();
    assert_eq!(paths.len(), 3);
    assert!(code_of(c).contains("crate::runtime") && !code_of(c).contains("crate::ops"));
}

fn code_of(s: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("x.rs");
    std::fs::write(&p, s).expect("write");
    code(&p)
}

#[test]
fn the_zoo_uses_layers_and_the_runtime_never_kernels() {
    let mut files = Vec::new();
    rust_files(&root().join("zoo/src"), &mut files);
    let wrong: Vec<String> = files
        .iter()
        .filter(|f| code(f).contains("candle_deepscale::ops"))
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        wrong.is_empty(),
        "zoo files calling ops directly: {wrong:?}"
    );
}

#[test]
fn files_stay_readable() {
    let mods = modules();
    let mut long = Vec::new();
    for (m, f) in &mods {
        let lines = std::fs::read_to_string(f).expect("source").lines().count();
        // Kernels (ops/) and communication backends (comm/) are exempt: a file is one algorithm.
        let limit = match top(m) {
            "layers" | "runtime" => 800,
            _ => usize::MAX,
        };
        let limit = if m == "runtime::engine" { 600 } else { limit };
        if lines > limit {
            long.push(format!(
                "{} has {lines} lines (at most {limit})",
                f.display()
            ));
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}
