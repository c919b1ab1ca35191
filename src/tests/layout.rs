//! The module layout: no import cycles between the modules of `src/`.
//!
//! Each file's production code (its `#[cfg(test)] mod …` blocks and the
//! test-only `src/tests/` left out) is read for `crate::a::b…` paths, in
//! `use` lines and inline; a path names the longest module it starts with
//! (`crate::provider::custom::endpoint_path` is `provider::custom`). A child
//! module may use its parent (`provider::custom` → `provider`), but then the
//! parent must not use the child.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`, recursively, with its module path
/// (`src/provider/mod.rs` is `provider`, `src/provider/custom.rs` is
/// `provider::custom`), `src/tests/` and `src/lib.rs` excluded.
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let module = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}::{name}")
        };
        if path.is_dir() {
            if prefix.is_empty() && (name == "tests" || name == "testdata") {
                continue;
            }
            modules(&path, &module, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match name.as_str() {
                "lib" if prefix.is_empty() => continue,
                "mod" => prefix.to_string(),
                _ => module,
            };
            out.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The code of a file without comments and without its test modules
/// (`#[cfg(test)]` or `#[cfg(all(test, …))]` followed by `mod name {`, up to
/// the `}` at the same indentation).
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let test_only =
            trimmed.starts_with("#[cfg(test)]") || trimmed.starts_with("#[cfg(all(test");
        let next_is_mod = lines.peek().is_some_and(|next| {
            let next = next.trim_start();
            next.starts_with("mod ") || next.starts_with("pub mod ")
        });
        if test_only && next_is_mod {
            let indent = &line[..line.len() - trimmed.len()];
            let close = format!("{indent}}}");
            for inner in lines.by_ref() {
                if inner == close {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The modules `code` (of module `from`) names through `crate::` paths.
fn uses(from: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `tollgate_crate::`
        }
        let rest = &code[at + "crate::".len()..];
        assert!(
            !rest.starts_with('{'),
            "{from}: write `use crate::module::…` per module, not `use crate::{{…}}`"
        );
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let target = (1..=segments.len())
            .rev()
            .map(|n| segments[..n].join("::"))
            .find(|m| known.contains(m));
        match target {
            Some(m) if m != from => {
                found.insert(m);
            }
            Some(_) => {}
            None => panic!("{from}: `crate::{path}` names no module of src/"),
        }
    }
    found
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|m| m == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

/// The module graph of the production code of `src/`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = BTreeMap::new();
    modules(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        "",
        &mut files,
    );
    let known: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(m, text)| (m.clone(), uses(m, &production_code(text), &known)))
        .collect()
}

#[test]
fn the_modules_of_src_import_each_other_without_cycles() {
    let graph = module_graph();
    // The reader sees the layout: nested modules and the edges it must see.
    for m in ["provider", "provider::custom", "provider::introspection"] {
        assert!(graph.contains_key(m), "{m} not found");
    }
    assert!(graph["provider::custom"].contains("provider"));
    assert!(graph["jwt"].contains("key_set"));
    assert!(graph["config"].contains("provider::introspection"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn the_cycle_check_finds_cycles_and_skips_tests_and_comments() {
    let known: BTreeSet<String> = ["a", "b", "b::c"].map(String::from).into();
    let code = production_code(
        "use crate::b::c::Thing;\n\
         // crate::a in a comment\n\
         fn f() { crate::b::g(); }\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::a::X;\n}\n",
    );
    assert_eq!(
        uses("a", &code, &known),
        ["b", "b::c"].map(String::from).into()
    );
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            g.entry(from.to_string())
                .or_default()
                .insert(to.to_string());
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "b::c")])), None);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "b::c"), ("b::c", "a")])),
        Some(["a", "b", "b::c", "a"].map(String::from).to_vec())
    );
}
