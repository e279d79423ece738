//! The module structure, checked on the sources: vendor modules never import the proxy (the
//! proxy maps their typed errors, see src/proxy/error.rs), and no two modules import each
//! other, at any level of the tree (`store` and `tenants`, `store::embedded` and
//! `store::master_key`, ...). A module is a directory or a file under src/; a reference is a
//! `crate::` or `super::` path outside comments and outside the unit-test module that ends a
//! file. src/testing.rs holds unit-test helpers only and is not checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path of a source file: `src/store/embedded/mod.rs` → `["store", "embedded"]`.
fn module_of(file: &Path, src: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without line comments and without its trailing unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path a file's code names through `crate::` or `super::`, including each
/// item of a `use crate::{a, b::c}` group.
fn references(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let is_path = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for (i, _) in code.match_indices("::") {
        let start = code[..i].rfind(|c: char| !is_path(c)).map_or(0, |j| j + 1);
        let text = &code[start..];
        let end = text.find(|c: char| !is_path(c)).unwrap_or(text.len());
        let segments: Vec<&str> = text[..end].split("::").collect();
        // Only the first `::` of a path starts it.
        if start + segments[0].len() != i {
            continue;
        }
        let mut base: Vec<String> = match segments[0] {
            "crate" => Vec::new(),
            // `super` of `a/b.rs` and of `a/b/mod.rs` is `a`.
            "super" => module[..module.len().saturating_sub(1)].to_vec(),
            _ => continue,
        };
        let mut rest = segments[1..].iter().peekable();
        while rest.peek() == Some(&&"super") {
            base.pop();
            rest.next();
        }
        base.extend(rest.filter(|s| !s.is_empty()).map(|s| s.to_string()));
        match text[end..].strip_prefix('{') {
            Some(group) => {
                // The first segment of each item at the group's top level.
                let mut depth = 0;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && depth == 0 && !c.is_whitespace() => {
                            item_start = false;
                            let name_end = group[j..]
                                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                                .map_or(group.len(), |k| j + k);
                            let mut path = base.clone();
                            path.push(group[j..name_end].to_owned());
                            out.push(path);
                        }
                        _ => {}
                    }
                }
            }
            None => out.push(base),
        }
    }
    out
}

/// Edges between sibling modules: `a` → `b` when code in `a` (or below) names `b` (or below),
/// both children of the same parent.
fn sibling_edges() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for file in files {
        let module = module_of(&file, &src);
        if module
            .first()
            .is_some_and(|m| m == "testing" || m == "main")
        {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for target in references(&code(&text), &module) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len() && common < target.len() {
                edges
                    .entry(module[..=common].to_vec())
                    .or_default()
                    .insert(target[..=common].to_vec());
            }
        }
    }
    edges
}

#[test]
fn vendors_never_import_the_proxy() {
    let edges = sibling_edges();
    let from_vendors = edges.get(&vec!["vendors".to_owned()]);
    assert!(
        from_vendors.is_some_and(|to| !to.contains(&vec!["proxy".to_owned()])),
        "src/vendors/ imports crate::proxy: {from_vendors:?}"
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let edges = sibling_edges();
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|t| t.contains(a)) {
                cycles.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert_eq!(
        cycles,
        Vec::<String>::new(),
        "modules that import each other"
    );
}

#[test]
fn the_check_sees_imports() {
    // The checker itself: a cycle and a reference through `super::super` are found.
    let module = vec!["store".to_owned(), "embedded".to_owned()];
    let refs = references(
        "use super::master_key::X; let p = super::super::proxy::Y; crate::a::b();\n\
         use super::{files, record::{R, S}};",
        &module,
    );
    let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        refs,
        vec![
            path(&["store", "master_key", "X"]),
            path(&["proxy", "Y"]),
            path(&["a", "b"]),
            path(&["store", "files"]),
            path(&["store", "record"]),
        ]
    );
    assert!(sibling_edges().len() > 5, "the sources were read");
}
