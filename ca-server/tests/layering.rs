//! The crate's seams, as a test: which module may name which (docs/ARCHITECTURE.md, "Seams"),
//! and no import circle in any crate of the workspace. It reads the sources and resolves every
//! path a module names after `crate::`, `super::` or `self::` (and `{…}` groups) to the module it
//! starts with, then checks the edges that must not exist and looks for circles. A new import
//! that breaks a seam or closes a circle fails here, naming the modules.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Rules: (modules, by prefix; the modules they must not name, by prefix; why). A request runs
/// downward — faces → issuing → authority — and the process stands beside them.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "authority",
        &[
            "faces",
            "issuing",
            "federation",
            "k8s",
            "process::server",
            "process::driver",
            "process::tls",
            "process::metrics",
        ],
        "the authority owns a `dyn Store`; no backend, face or caller is known to it",
    ),
    (
        "issuing",
        &[
            "faces",
            "federation",
            "k8s",
            "process::server",
            "process::driver",
        ],
        "the issuing core returns typed errors and knows no face (faces map them: faces::codes)",
    ),
    (
        "issuing::signing",
        &["authority", "issuing::issuance"],
        "CSR checks and leaf signing are pure",
    ),
    (
        "issuing::auth",
        &["k8s"],
        "token backends implement `auth::TokenAuthenticator` in their own modules",
    ),
    (
        "process::config",
        &[
            "faces",
            "issuing",
            "authority",
            "federation",
            "k8s",
            "process::server",
            "process::driver",
            "process::tls",
            "process::metrics",
            "process::disk",
        ],
        "configuration is plain data: every part reads it, it names none of them",
    ),
    (
        "k8s::store",
        &["authority"],
        "the Secret store is a store; following it is k8s/follow.rs",
    ),
    (
        "faces",
        &["process::server"],
        "start-up builds the faces, not the other way round",
    ),
];

fn under(module: &str, prefix: &str) -> bool {
    module == prefix || module.starts_with(&format!("{prefix}::"))
}

/// The broken rules of `g`, one line each.
fn broken_rules(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut broken = Vec::new();
    for (from, banned, why) in FORBIDDEN {
        for (m, named) in g.iter().filter(|(m, _)| under(m, from)) {
            for n in named {
                if let Some(b) = banned.iter().find(|b| under(n, b)) {
                    broken.push(format!("{m} names {n} (no {from} may name {b}): {why}"));
                }
            }
        }
    }
    broken
}

fn server_graph() -> BTreeMap<String, BTreeSet<String>> {
    import_graph(&modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &["bin"],
    ))
}

#[test]
fn seams_hold() {
    let g = server_graph();
    // The folders are there (a rename would make every rule pass vacuously).
    for m in [
        "faces::grpc",
        "faces::istio",
        "issuing::issuance",
        "issuing::signing",
        "authority",
        "authority::ledger",
        "process::config",
        "process::server",
        "k8s::store",
    ] {
        assert!(g.contains_key(m), "no module {m}");
    }
    let broken = broken_rules(&g);
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The reader sees imports (a negative control for the test above): the imports that made the
/// cycles before the seams — the authority naming the Secret store, the store naming the
/// authority, a signing module naming the issuance that calls it, configuration naming a
/// feature — break their rules, and files that do name modules today are read.
#[test]
fn the_reader_sees_imports() {
    let mods: Modules = [
        (
            "",
            "pub mod authority; pub mod k8s; pub mod issuing; pub mod process;",
        ),
        (
            "authority",
            "remote: Option<Arc<crate::k8s::store::KubeStore>>,",
        ),
        ("k8s", "pub mod store;"),
        (
            "k8s::store",
            "pub async fn follow(a: std::sync::Arc<crate::authority::Authority>) {}",
        ),
        ("issuing", "pub mod signing; pub mod issuance;"),
        ("issuing::issuance", ""),
        (
            "issuing::signing",
            "use crate::issuing::{issuance::SigningCore};",
        ),
        ("process", "pub mod config;"),
        (
            "process::config",
            "pub f: crate::federation::FederationConfig,",
        ),
        ("federation", ""),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let broken = broken_rules(&import_graph(&mods));
    for want in [
        "authority names k8s::store",
        "k8s::store names authority",
        "issuing::signing names issuing::issuance",
        "process::config names federation",
    ] {
        assert!(
            broken.iter().any(|b| b.starts_with(want)),
            "{want} not found in {broken:#?}"
        );
    }
    let g = server_graph();
    assert!(g["process::server"].contains("authority"));
    assert!(g["process::server"].iter().any(|m| m.starts_with("k8s")));
    assert!(g["k8s::follow"].contains("authority"));
    assert!(g["k8s::tokenreview"].contains("issuing::auth"));
    assert!(g["faces::grpc"].contains("issuing::issuance"));
}

// ---------------------------------------------------------------------------------------------
// Reading the modules; no import circle in any crate of the workspace (issue #26).

/// A crate's modules by path (`""` for the root, `a::b`), each with its source text.
type Modules = BTreeMap<String, String>;

/// The modules of the crate whose root file is in `dir` (`lib.rs` or `main.rs`); `skip` names
/// subfolders that are other crates (`bin`).
fn modules(dir: &Path, skip: &[&str]) -> Modules {
    fn walk(dir: &Path, prefix: &[String], skip: &[&str], out: &mut Modules) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if prefix.is_empty() && skip.contains(&name.as_str()) {
                    continue;
                }
                let mut next = prefix.to_vec();
                next.push(name);
                walk(&p, &next, skip, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut path = prefix.to_vec();
                if !matches!(stem, "mod" | "lib" | "main") {
                    path.push(stem.to_owned());
                }
                out.insert(path.join("::"), std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = Modules::new();
    walk(dir, &[], skip, &mut out);
    out
}

/// The text that counts: before `#[cfg(test)]`, without comment lines (a doc link is not a
/// dependency).
fn code(text: &str) -> String {
    text.split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path `text` names after `crate::`, `super::` or `self::`, as (that word, segments);
/// a `{…}` group gives one path per item.
fn named_paths(text: &str) -> Vec<(&'static str, Vec<String>)> {
    fn ident(s: &str) -> &str {
        let n = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        &s[..n]
    }
    let mut out = Vec::new();
    for base in ["crate", "super", "self"] {
        let pat = format!("{base}::");
        let mut from = 0;
        while let Some(i) = text[from..].find(&pat) {
            let at = from + i;
            from = at + pat.len();
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut rest = &text[from..];
            let mut segs = Vec::new();
            loop {
                if let Some(group) = rest.strip_prefix('{') {
                    let mut depth = 0;
                    let end = group
                        .char_indices()
                        .find(|&(_, c)| {
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => return true,
                                '}' => depth -= 1,
                                _ => {}
                            }
                            false
                        })
                        .map_or(group.len(), |(i, _)| i);
                    let mut item = String::new();
                    let mut d = 0;
                    let mut items = Vec::new();
                    for c in group[..end].chars() {
                        match c {
                            '{' => d += 1,
                            '}' => d -= 1,
                            ',' if d == 0 => {
                                items.push(std::mem::take(&mut item));
                                continue;
                            }
                            _ => {}
                        }
                        item.push(c);
                    }
                    items.push(item);
                    for it in items {
                        let mut p = segs.clone();
                        p.extend(it.trim().split("::").map(ident).map(String::from));
                        out.push((base, p));
                    }
                    break;
                }
                let id = ident(rest);
                if id.is_empty() {
                    out.push((base, segs));
                    break;
                }
                segs.push(id.to_owned());
                rest = &rest[id.len()..];
                match rest.strip_prefix("::") {
                    Some(r) => rest = r,
                    None => {
                        out.push((base, segs));
                        break;
                    }
                }
            }
        }
    }
    out
}

/// Module → the modules it names: `crate::`/`super::`/`self::` paths resolved to the longest
/// module they start with, and a declared child module named by its bare name.
fn import_graph(mods: &Modules) -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    for (m, text) in mods {
        let text = code(text);
        let here: Vec<String> = if m.is_empty() {
            Vec::new()
        } else {
            m.split("::").map(String::from).collect()
        };
        let mut to = BTreeSet::new();
        for (base, segs) in named_paths(&text) {
            let mut full = match base {
                "crate" => Vec::new(),
                "super" => here[..here.len().saturating_sub(1)].to_vec(),
                _ => here.clone(),
            };
            full.extend(segs);
            if let Some(target) = (1..=full.len())
                .rev()
                .map(|i| full[..i].join("::"))
                .find(|c| mods.contains_key(c))
                && &target != m
            {
                to.insert(target);
            }
        }
        for line in text.lines() {
            let l = line.trim_start().trim_start_matches("pub ").trim_start();
            if let Some(child) = l.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                let path = if m.is_empty() {
                    child.to_owned()
                } else {
                    format!("{m}::{child}")
                };
                let named = text.match_indices(&format!("{child}::")).any(|(i, _)| {
                    !text[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if named && mods.contains_key(&path) {
                    to.insert(path);
                }
            }
        }
        g.insert(m.clone(), to);
    }
    g
}

/// The import circles of `g` (strongly connected sets of more than one module), each sorted.
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: finish order on g, then components on the reverse graph.
    fn visit<'a>(
        v: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a str>,
    ) {
        if !seen.insert(v) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            visit(w, g, seen, out);
        }
        out.push(v);
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for v in g.keys() {
        visit(v, g, &mut seen, &mut order);
    }
    let mut rev: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (v, ws) in g {
        for w in ws {
            rev.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for v in order.into_iter().rev() {
        let mut comp = Vec::new();
        visit(v, &rev, &mut seen, &mut comp);
        if comp.len() > 1 {
            let mut c: Vec<String> = comp.into_iter().map(String::from).collect();
            c.sort();
            found.push(c);
        }
    }
    found
}

#[test]
fn no_crate_of_the_workspace_has_an_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crates = [
        ("meshca-server", root.join("ca-server/src"), &["bin"][..]),
        ("meshca-rotator", root.join("rotator/src"), &["bin"][..]),
        ("meshca (CLI)", root.join("rotator/src/bin/meshca"), &[][..]),
        ("meshca-proto", root.join("proto/src"), &[][..]),
        ("meshca-tests", root.join("tests/src"), &[][..]),
    ];
    let mut found = Vec::new();
    for (name, dir, skip) in crates {
        let mods = modules(&dir, skip);
        assert!(
            mods.len() > 1 || name == "meshca-proto",
            "{name}: modules read"
        );
        for c in circles(&import_graph(&mods)) {
            found.push(format!("{name}: {}", c.join(" ↔ ")));
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

/// Negative control for the test above: the circles this crate had before issue #26 — config
/// naming federation which names http which names config; grpc and istio naming each other; a
/// parent naming its child that names it back — are found.
#[test]
fn the_circle_finder_finds_circles() {
    let mods: Modules = [
        (
            "",
            "pub mod config; pub mod federation; pub mod http; mod k8s;",
        ),
        (
            "config",
            "pub federation: crate::federation::FederationConfig,",
        ),
        (
            "federation",
            "use crate::{http::spiffe_bundle_response, tls};",
        ),
        ("http", "fn f(c: &crate::config::Config) {}"),
        ("tls", ""),
        ("grpc", "istio: crate::istio::Istio,"),
        ("istio", "use crate::grpc::caller_of;"),
        ("k8s", "pub mod store;\nfn g() { store::MANAGED_BY; }"),
        (
            "k8s::store",
            "use super::is_conflict;\n// crate::tls only in a comment",
        ),
        (
            "quiet",
            "// crate::grpc::x\n#[cfg(test)]\nuse crate::istio;",
        ),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let g = import_graph(&mods);
    assert!(g["quiet"].is_empty(), "comments and tests do not count");
    assert!(!g["k8s::store"].contains("tls"));
    let found = circles(&g);
    let want: Vec<Vec<String>> = vec![
        vec!["config".into(), "federation".into(), "http".into()],
        vec!["grpc".into(), "istio".into()],
        vec!["k8s".into(), "k8s::store".into()],
    ];
    let mut got = found.clone();
    got.sort();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// No function over 100 lines in the workspace's libraries and binaries, none over 80 in
// ca-server (issue #26). Integration-test scenarios (`*/tests/*.rs`) and `#[cfg(test)]` modules
// are scripts read top to bottom and are not counted.

/// `text` with string and character literals and comments blanked (their braces do not count).
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == 'r'
            && matches!(next, Some('"' | '#'))
            && !b[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) == Some(&'"') {
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    if b[j] == '\n' {
                        out.push('\n');
                    }
                    j += 1;
                }
                i = j;
                continue;
            }
        }
        if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                } else if b[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '\'' && next.is_some() {
            // A char literal ('{', '\n', '\''), not a lifetime ('a).
            let close = if next == Some('\\') { 3 } else { 2 };
            if b.get(i + close) == Some(&'\'') {
                i += close + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// (name, first line, lines) of every function in `text` outside `#[cfg(test)]`.
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let mut t = l.trim_start();
        for w in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
        ] {
            t = t.strip_prefix(w).unwrap_or(t);
            t = t.strip_prefix(w).unwrap_or(t);
        }
        let Some(rest) = t.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0i64;
        let mut opened = false;
        for (j, l2) in lines.iter().enumerate().skip(i) {
            for c in l2.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !opened && l2.trim_end().ends_with(';') {
                break;
            }
            if opened && depth <= 0 {
                out.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_a_screenful_or_two() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut long = Vec::new();
    let mut seen = 0;
    for (dir, limit) in [
        ("ca-server/src", 80),
        ("rotator/src", 100),
        ("proto/src", 100),
        ("tests/src", 100),
    ] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for (name, line, n) in function_lengths(&text) {
                        seen += 1;
                        if n > limit {
                            long.push(format!(
                                "{}:{line} fn {name}: {n} lines (at most {limit})",
                                p.strip_prefix(&root).unwrap_or(&p).display()
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(seen > 500, "functions read: {seen}");
    assert!(long.is_empty(), "{}", long.join("\n"));
}

/// The counter counts (a negative control): braces in strings, raw strings, chars and comments
/// do not count; a function's lines run from `fn` to its closing brace.
#[test]
fn the_function_counter_counts() {
    let text = "pub async fn a() {\n    let s = \"}}}\";\n    let r = r#\"{\"#;\n    let c = '}';\n    // }\n    if x {\n    }\n}\nfn b();\nfn c<'a>(x: &'a str) {}\n";
    assert_eq!(
        function_lengths(text),
        vec![("a".into(), 1, 8), ("c".into(), 10, 1)]
    );
    let long = format!("fn long() {{\n{}}}\n", "    x();\n".repeat(120));
    assert_eq!(function_lengths(&long)[0].2, 122);
}
