//! `cargo xtask lint`'s import check: within each crate, no two modules import each other,
//! directly or round a longer loop. A module may use its ancestors and descendants (a `mod.rs`
//! and its children share a room); every other `crate::` or `super::` path is an edge from the
//! module that writes it to the module it names, and a strongly connected set of more than one
//! module is a loop. Test modules (`#[cfg(test)] mod tests` to the end of a file) are left out.
//!
//! It reads paths as text: `use crate::a::b`, `crate::a::f()` and `use crate::{a, b::c}`, which
//! is how this workspace writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, bail};

/// The crates whose modules are checked, by source directory.
const CRATES: [&str; 3] = ["tcpmgm-user/src", "tcpmgm-ebpf/src", "tcpmgm-common/src"];

/// A module by its path below the crate root (`["kernel", "sys"]`; the root is empty).
type Module = Vec<String>;

pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut loops = Vec::new();
    for dir in CRATES {
        let sources = read_dir(&root.join(dir))?;
        for cycle in cycles(&sources) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            loops.push(format!("{dir}: {}", names.join(" <-> ")));
        }
    }
    if !loops.is_empty() {
        bail!("modules that import each other:\n  {}", loops.join("\n  "));
    }
    eprintln!("xtask: no import loop in {}", CRATES.join(", "));
    Ok(())
}

/// Every `.rs` file below `dir`, by its module.
fn read_dir(dir: &Path) -> anyhow::Result<BTreeMap<Module, String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).with_context(|| at.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(dir)?.with_extension("");
                let mut module: Module = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    module.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    module.pop();
                }
                let text = std::fs::read_to_string(&path)?;
                out.insert(module, text);
            }
        }
    }
    Ok(out)
}

/// The loops among `sources`' modules, each as its modules.
fn cycles(sources: &BTreeMap<Module, String>) -> Vec<Vec<Module>> {
    let modules: Vec<&Module> = sources.keys().collect();
    let index = |m: &Module| modules.iter().position(|k| *k == m);
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); modules.len()];
    for (from, (module, text)) in sources.iter().enumerate() {
        for path in paths(module, text) {
            let Some(to) = (0..=path.len())
                .rev()
                .find_map(|n| index(&path[..n].to_vec()))
            else {
                continue;
            };
            let target = modules[to];
            // A module and its ancestors or descendants share a room.
            if !(target.starts_with(module) || module.starts_with(target)) {
                edges[from].insert(to);
            }
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| c.into_iter().map(|i| modules[i].clone()).collect())
        .collect()
}

/// The module paths `text` (module `module`'s source) names through `crate::` and `super::`,
/// outside its test module.
fn paths(module: &Module, text: &str) -> Vec<Vec<String>> {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let mut out = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        if preceded_by_word(text, at) {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                for item in group_items(group) {
                    out.push(words(item));
                }
            }
            None => out.push(words(rest)),
        }
    }
    for (at, _) in text.match_indices("super::") {
        if preceded_by_word(text, at) || text[..at].ends_with("super::") {
            continue;
        }
        let mut base = module.clone();
        let mut rest = &text[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        if let Some(group) = rest.strip_prefix('{') {
            for item in group_items(group) {
                out.push([base.clone(), words(item)].concat());
            }
        } else {
            out.push([base, words(rest)].concat());
        }
    }
    out
}

fn preceded_by_word(text: &str, at: usize) -> bool {
    text[..at]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
}

/// The leading `a::b::c` of `text`, as words.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_owned());
        match rest[end..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// The items of a `{...}` group (the text after its `{`), split at its own commas.
fn group_items(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(group[start..i].trim());
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(group[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.retain(|i| !i.is_empty());
    items
}

/// Tarjan's strongly connected components of the graph `edges` (node i's successors).
fn strongly_connected(edges: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct Walk<'a> {
        edges: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on_stack: Vec<bool>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in self.edges[v].iter() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(i) if self.on_stack[w] => self.low[v] = self.low[v].min(i),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                self.out.push(component);
            }
        }
    }
    let n = edges.len();
    let mut walk = Walk {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        stack: Vec::new(),
        on_stack: vec![false; n],
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if walk.index[v].is_none() {
            walk.visit(v);
        }
    }
    walk.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> BTreeMap<Module, String> {
        files
            .iter()
            .map(|(m, text)| {
                let module = if m.is_empty() {
                    Vec::new()
                } else {
                    m.split("::").map(str::to_owned).collect()
                };
                (module, (*text).to_owned())
            })
            .collect()
    }

    #[test]
    fn a_loop_through_any_way_of_naming_a_module_is_found() {
        let sources = tree(&[
            ("", "mod a; mod b; mod c;"),
            ("a", "use crate::{b::{self, Thing}, x};\nfn f() {}"),
            ("b", "fn g() { super::c::h(); }"),
            ("c", "pub fn h() { crate::a::f(); }"),
        ]);
        let found = cycles(&sources);
        assert_eq!(found.len(), 1, "{found:?}");
        let mut names: Vec<String> = found[0].iter().map(|m| m.join("::")).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn this_workspace_has_no_import_loop() {
        check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).unwrap();
    }

    #[test]
    fn parents_children_and_tests_make_no_loop() {
        let sources = tree(&[
            ("", "mod kernel; mod policy;"),
            ("kernel", "mod sys; use self::sys::bpf; pub struct Error;"),
            ("kernel::sys", "use super::Error; use crate::policy::Rule;"),
            (
                "policy",
                "pub struct Rule;\n#[cfg(test)]\nmod tests { use crate::kernel::sys; }",
            ),
        ]);
        assert!(cycles(&sources).is_empty());
        // Without the test module's exemption, policy and kernel::sys would import each other.
        let mut with_use = sources.clone();
        with_use.insert(vec!["policy".into()], "use crate::kernel::sys::bpf;".into());
        assert_eq!(cycles(&with_use).len(), 1);
    }
}
