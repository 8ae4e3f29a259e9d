//! The crate's seams, as a test: which module may name which (docs/ARCHITECTURE.md, "Seams").
//! It reads the sources and lists every `crate::<module>` a file names (in paths and in `use
//! crate::{…}` groups), then checks the edges that must not exist. A new import that breaks a
//! seam fails here with the file and the module it named.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::path::Path;

/// The `crate::` modules a source file names (outside its `#[cfg(test)]` part).
fn names(file: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file);
    names_in(&std::fs::read_to_string(&path).unwrap(), file)
}

fn names_in(text: &str, file: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, d}`: each top-level name in the group.
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let m: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !m.is_empty() {
                    out.insert(m);
                }
            }
        } else {
            let m: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(m);
        }
    }
    // `super::x` inside `k8s/` names a sibling under k8s.
    if file.starts_with("k8s/") && text.contains("super::") {
        out.insert("k8s".into());
    }
    out
}

/// Edges that must not exist: (file, modules it must not name, why).
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "authority.rs",
        &[
            "k8s", "grpc", "http", "admin", "server", "istio", "linkerd", "tls",
        ],
        "the authority owns a `dyn Store`; no backend or face is known to it",
    ),
    (
        "auth.rs",
        &["k8s"],
        "token backends implement `auth::TokenAuthenticator` in their own modules",
    ),
    (
        "config.rs",
        &["k8s", "server"],
        "configuration depends on nothing that reads it",
    ),
    (
        "k8s/store.rs",
        &["authority"],
        "the Secret store is a store; following it is k8s/follow.rs",
    ),
    (
        "issuance.rs",
        &["grpc", "istio", "linkerd", "admin", "codes"],
        "the signing core returns typed errors; faces map them (codes.rs)",
    ),
    (
        "signing.rs",
        &["authority", "issuance", "grpc", "k8s"],
        "CSR checks and leaf signing are pure",
    ),
];

#[test]
fn seams_hold() {
    let mut broken = Vec::new();
    for (file, banned, why) in FORBIDDEN {
        let named = names(file);
        for b in *banned {
            if named.contains(*b) {
                broken.push(format!("{file} names crate::{b}: {why}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The reader sees imports at all (a negative control for the test above): the imports that
/// made the cycles before the seams (authority.rs and k8s/store.rs naming each other, auth.rs
/// naming the TokenReview backend) are found, and files that do name modules today are read.
#[test]
fn the_reader_sees_imports() {
    let old_authority = "use crate::ledger::LedgerHandle;\n\
        remote: Option<Arc<crate::k8s::store::KubeStore>>,";
    assert!(names_in(old_authority, "authority.rs").contains("k8s"));
    let old_store =
        "pub async fn follow(authority: std::sync::Arc<crate::authority::Authority>) {}";
    assert!(names_in(old_store, "k8s/store.rs").contains("authority"));
    let grouped = "use crate::{auth::Caller, k8s::tokenreview::TokenReviewer};";
    assert_eq!(
        names_in(grouped, "auth.rs"),
        ["auth", "k8s"].map(String::from).into()
    );
    assert!(names_in("#[cfg(test)]\nuse crate::k8s;", "auth.rs").is_empty());
    assert!(names("server.rs").contains("authority"));
    assert!(names("server.rs").contains("k8s"));
    assert!(names("k8s/follow.rs").contains("authority"));
    assert!(names("k8s/tokenreview.rs").contains("auth"));
    assert!(names("grpc.rs").contains("codes") || names("grpc.rs").contains("issuance"));
}

// ---------------------------------------------------------------------------------------------
// No import circle in any crate of the workspace (issue #26).

use std::collections::BTreeMap;

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
