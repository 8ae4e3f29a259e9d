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
