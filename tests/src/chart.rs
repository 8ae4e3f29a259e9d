//! The Helm chart (`deploy/helm/meshca`, issue #29): helm built from its Go module by
//! `tests/helm/build.sh` (cached under `target/helm/<version>/`), rendering, and the comparison
//! with `deploy/kubernetes` that keeps the two from drifting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The chart's directory.
pub const CHART: &str = "deploy/helm/meshca";
/// The helm release tests/helm/build.sh builds.
pub const HELM_VERSION: &str = "v4.3.2";

/// The helm binary, built by `tests/helm/build.sh` if not yet cached (`None`: no Go on a
/// laptop; in CI that fails).
pub fn helm() -> Option<PathBuf> {
    let root = crate::repo();
    let bin = std::env::var_os("MESHCA_HELM_CACHE")
        .map_or_else(|| root.join("target/helm"), PathBuf::from)
        .join(HELM_VERSION)
        .join("helm");
    if bin.exists() {
        return Some(bin);
    }
    crate::require_tool("go")?;
    eprintln!("building helm {HELM_VERSION} (tests/helm/build.sh; cached after)");
    let status = Command::new("bash")
        .arg(root.join("tests/helm/build.sh"))
        .status()
        .expect("run tests/helm/build.sh");
    assert!(status.success(), "tests/helm/build.sh failed");
    Some(bin)
}

/// Runs helm with `args` in the repository: (success, stdout, stderr).
pub fn run(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm)
        .args(args)
        .current_dir(crate::repo())
        .output()
        .expect("run helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template meshca deploy/helm/meshca --namespace <ns>` with values files (paths from the
/// repository root) and `--set`s: the objects, or helm's error.
pub fn template(
    helm: &Path,
    ns: &str,
    files: &[&str],
    sets: &[&str],
) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", "meshca", CHART, "--namespace", ns];
    for f in files {
        args.extend(["-f", f]);
    }
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = run(helm, &args);
    if !ok {
        return Err(err);
    }
    Ok(serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect())
}

/// `kind/namespace/name` of an object.
pub fn key(d: &Value) -> String {
    format!(
        "{}/{}/{}",
        d["kind"].as_str().unwrap_or_default(),
        d["metadata"]["namespace"].as_str().unwrap_or_default(),
        d["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The objects by [`key`], made comparable: `meshca.toml` as the configuration meshca-server
/// reads from it (every setting, defaults included: the same configuration written two ways
/// compares equal), without the chart's `checksum/config` pod annotation (helm's way to roll
/// the pods when the configuration changes) and its `helm.sh/resource-policy` (kustomize has no
/// equivalent of either).
pub fn comparable(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .map(|d| {
            let mut d = d.clone();
            if d["kind"] == "ConfigMap"
                && let Some(toml) = d["data"]["meshca.toml"].as_str()
            {
                let c = ca_server::config::Config::from_toml(toml)
                    .unwrap_or_else(|e| panic!("{}: meshca.toml: {e}\n{toml}", key(&d)));
                d["data"]["meshca.toml"] = Value::String(c.to_toml());
            }
            // Helm-only: `helm uninstall` keeps the namespace (and the authority's Secret).
            if let Some(a) = d
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
            {
                a.remove("helm.sh/resource-policy");
                if a.is_empty() {
                    d["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("annotations"));
                }
            }
            if d["kind"] == "Deployment"
                && let Some(meta) = d
                    .pointer_mut("/spec/template/metadata")
                    .and_then(Value::as_object_mut)
                && let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut)
            {
                a.remove("checksum/config");
                if a.is_empty() {
                    meta.remove("annotations");
                }
            }
            (key(&d), d)
        })
        .collect()
}
