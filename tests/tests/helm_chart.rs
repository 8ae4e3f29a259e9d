//! The Helm chart (issue #29): it lints, every documented combination renders and is admitted by
//! a real API server, its defaults are the kustomization's objects and each overlay is one of its
//! values files (so the two cannot drift), a wrong value is refused with a message, and meshca
//! run with the chart's configuration and RBAC against a real API server issues and publishes.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use meshca_tests::TestServer;
use meshca_tests::chart::{self, CHART, comparable, helm, template};
use meshca_tests::cluster::{Cluster, NEWEST, OLDEST, env_with, sign};
use serde_json::Value;

/// The documented values files (docs/kubernetes.md names each).
const EXAMPLES: [&str; 9] = [
    "istio",
    "istiod-certificate",
    "linkerd",
    "linkerd-cert-manager",
    "pod-certificates",
    "monitoring",
    "hsm",
    "federation",
    "production",
];

fn example(name: &str) -> String {
    format!("{CHART}/examples/{name}.yaml")
}

/// What differs between two comparable renderings: (only in a, only in b, in both but unequal).
fn diff(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only in the chart: {k}")),
            Some(w) if w != v => out.push(format!(
                "{k} differs:\n  chart:     {}\n  kustomize: {}",
                serde_json::to_string(v).unwrap(),
                serde_json::to_string(w).unwrap()
            )),
            Some(_) => {}
        }
    }
    out.extend(
        b.keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| format!("only in the kustomization: {k}")),
    );
    out
}

#[test]
fn the_chart_lints_strictly_and_every_documented_combination_renders() {
    let Some(helm) = helm() else { return };
    let (ok, out, err) = chart::run(&helm, &["lint", "--strict", CHART]);
    assert!(ok, "helm lint --strict:\n{out}{err}");
    for name in EXAMPLES {
        let f = example(name);
        let (ok, out, err) = chart::run(&helm, &["lint", "--strict", CHART, "-f", &f]);
        assert!(ok, "helm lint --strict -f {f}:\n{out}{err}");
        let docs = template(&helm, "meshca", &[&f], &[]).unwrap();
        // Every rendering's meshca.toml is one meshca-server accepts (comparable parses it).
        let objects = comparable(&docs);
        assert!(objects.len() >= 15, "{name}: {:?}", objects.keys());
    }
}

/// The chart and `deploy/kubernetes` are the same objects for the defaults: same RBAC, security
/// context, PDB, probes, resources, configuration (compared as meshca-server reads it).
#[test]
fn the_defaults_render_the_objects_the_kustomization_renders() {
    let Some(helm) = helm() else { return };
    let Some(kustomized) = meshca_tests::render("deploy/kubernetes") else {
        return;
    };
    let charted = comparable(&template(&helm, "meshca", &[], &[]).unwrap());
    let kustomized = comparable(&kustomized);
    let d = diff(&charted, &kustomized);
    assert!(
        d.is_empty(),
        "the chart and the kustomization drifted:\n{}",
        d.join("\n")
    );
    assert_eq!(charted.len(), 15, "{:?}", charted.keys());
    // The comparison can fail: one value changed is a difference it names.
    let changed =
        comparable(&template(&helm, "meshca", &[], &["resources.limits.memory=512Mi"]).unwrap());
    let d = diff(&changed, &kustomized);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].contains("Deployment/meshca/meshca") && d[0].contains("512Mi"),
        "{d:?}"
    );
    // As does a configuration that meshca reads differently.
    let changed =
        comparable(&template(&helm, "meshca", &[], &["trustDomain=prod.example"]).unwrap());
    let d = diff(&changed, &kustomized);
    assert!(
        d.len() == 1 && d[0].contains("ConfigMap/meshca/meshca-config"),
        "{d:?}"
    );
}

/// Each kustomize overlay is a values file of the chart: the objects the overlay adds (its
/// RBAC, the monitoring objects) are the chart's for that file. The configuration and the
/// Deployment are left out: the overlays leave those edits to the operator ("also set, in the
/// base's meshca.toml"), the values files make them.
#[test]
fn each_overlay_is_a_values_file() {
    let Some(helm) = helm() else { return };
    for (overlay, values) in [
        ("cert-manager", "linkerd-cert-manager"),
        ("istiod-certificate", "istiod-certificate"),
        ("monitoring", "monitoring"),
        ("pod-certificates", "pod-certificates"),
    ] {
        let Some(kustomized) =
            meshca_tests::render(&format!("deploy/kubernetes/overlays/{overlay}"))
        else {
            return;
        };
        let without = |m: BTreeMap<String, Value>| -> BTreeMap<String, Value> {
            m.into_iter()
                .filter(|(k, _)| {
                    !k.starts_with("ConfigMap/meshca/meshca-config")
                        && !k.starts_with("Deployment/meshca/meshca")
                })
                .collect()
        };
        let charted = without(comparable(
            &template(&helm, "meshca", &[&example(values)], &[]).unwrap(),
        ));
        let kustomized = without(comparable(&kustomized));
        let d = diff(&charted, &kustomized);
        assert!(
            d.is_empty(),
            "overlay {overlay} vs {values}.yaml:\n{}",
            d.join("\n")
        );
        let base = without(comparable(&template(&helm, "meshca", &[], &[]).unwrap()));
        assert!(
            charted.len() > base.len(),
            "{values}.yaml adds objects to the defaults"
        );
    }
}

#[test]
fn the_charts_alert_rules_are_the_shipped_ones() {
    let shipped = std::fs::read(meshca_tests::repo().join("deploy/prometheus/meshca-rules.yaml"));
    let charted = std::fs::read(
        meshca_tests::repo()
            .join(CHART)
            .join("files/meshca-rules.yaml"),
    );
    assert_eq!(
        charted.unwrap(),
        shipped.unwrap(),
        "copy deploy/prometheus/meshca-rules.yaml to {CHART}/files/"
    );
}

/// `values.schema.json` refuses a wrong value at install (helm checks it in `template`, `install`
/// and `upgrade` alike) with a message naming the value; the same place with a good value passes.
#[test]
fn a_wrong_value_is_refused_with_a_message() {
    let Some(helm) = helm() else { return };
    for (bad, good, says) in [
        ("replicas=0", "replicas=3", "/replicas"),
        (
            "trustDomain=Prod.Example",
            "trustDomain=prod.example",
            "/trustDomain",
        ),
        ("keys.backend=vault", "keys.backend=file", "/keys/backend"),
        (
            "limits.max_conections=10",
            "limits.max_connections=10",
            "max_conections",
        ),
        (
            "limits.idle_timeout=soon",
            "limits.idle_timeout=90s",
            "/limits/idle_timeout",
        ),
        (
            "auth.authenticators={oauth}",
            "auth.authenticators={mtls}",
            "/auth/authenticators",
        ),
        (
            "kubernetes.issuerSecret=just-a-name",
            "kubernetes.issuerSecret=",
            "/kubernetes/issuerSecret",
        ),
        ("replica=3", "replicas=3", "replica"),
        (
            "service.grpcPort=70000",
            "service.grpcPort=8443",
            "/service/grpcPort",
        ),
    ] {
        let e = template(&helm, "meshca", &[], &[bad]).unwrap_err();
        assert!(e.contains("schema") && e.contains(says), "{bad}: {e}");
        template(&helm, "meshca", &[], &[good]).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    // Values that only make sense together: PKCS#11 needs its module, token and PIN Secret;
    // cert-manager's issuer needs the anchor.
    let e = template(&helm, "meshca", &[], &["keys.backend=pkcs11"]).unwrap_err();
    assert!(e.contains("/keys/pkcs11"), "{e}");
    let e = template(
        &helm,
        "meshca",
        &[],
        &["kubernetes.issuerSecret=linkerd/linkerd-identity-issuer"],
    )
    .unwrap_err();
    assert!(e.contains("anchorCert"), "{e}");
}

async fn every_rendering_admitted(version: &'static str) {
    let Some(helm) = helm() else { return };
    let Some(cluster) = Cluster::shared(version) else {
        return;
    };
    let admin = cluster.admin().await;
    let mut renderings = vec![(
        "defaults".to_owned(),
        template(&helm, "meshca", &[], &[]).unwrap(),
    )];
    for name in EXAMPLES {
        renderings.push((
            format!("{name}.yaml"),
            template(&helm, "meshca", &[&example(name)], &[]).unwrap(),
        ));
    }
    // The check can fail: a pod mounting a hostPath (what hsm.yaml must not do) is refused.
    let host_path = template(
        &helm,
        "meshca",
        &[],
        &[
            "extraVolumes[0].name=module",
            "extraVolumes[0].hostPath.path=/opt/pkcs11",
            "extraVolumeMounts[0].name=module",
            "extraVolumeMounts[0].mountPath=/opt/pkcs11",
        ],
    )
    .unwrap();
    let refused = cluster
        .admit_pod_restricted(&admin, &host_path, "a hostPath volume")
        .await
        .unwrap_err();
    assert!(refused.contains("hostPath"), "{refused}");
    for (label, docs) in renderings {
        // Pod Security admission enforces on pods, not Deployments: each rendering's pod, as a
        // pod, in a namespace enforcing `restricted` (the profile the chart's namespace carries).
        cluster
            .admit_pod_restricted(&admin, &docs, &label)
            .await
            .unwrap();
        let n = docs.len();
        let admitted = cluster
            .dry_run_apply(&admin, docs, &format!("{version} chart {label}"))
            .await;
        let crds = if label == "monitoring.yaml" { 2 } else { 0 };
        assert_eq!(admitted.len() + crds, n, "{label}: {admitted:?}");
    }
}

#[tokio::test]
async fn every_rendering_is_admitted_by_a_real_api_server_v1_37() {
    every_rendering_admitted(NEWEST).await;
}

#[tokio::test]
async fn every_rendering_is_admitted_by_a_real_api_server_v1_35() {
    every_rendering_admitted(OLDEST).await;
}

/// meshca with the chart's configuration (its meshca.toml, as rendered) and the chart's RBAC
/// only, as its ServiceAccount against a real API server: a workload's projected token gets a
/// certificate, and the bundle ConfigMap appears in a labelled namespace.
#[tokio::test]
async fn meshca_with_the_charts_configuration_and_rbac_issues_and_publishes() {
    let Some(helm) = helm() else { return };
    // The chart's RBAC, applied for a namespace the test owns (its Roles and bindings moved
    // there, cluster-scoped names prefixed: the API server is shared with other tests).
    let rbac = template(&helm, "meshca", &[], &[]).unwrap();
    let Some(e) = env_with(NEWEST, rbac, &[]).await else {
        return;
    };
    let docs = template(&helm, &e.ns, &[], &[]).unwrap();
    let toml = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["meshca.toml"].as_str())
        .unwrap()
        .to_owned();
    let c = e.cluster;
    let labelled = c.namespace(&e.admin, "apps").await;
    // The chart's selector, with a value only this test's namespaces carry (the cluster is
    // shared with other tests' meshcas).
    let selector = format!("meshca.io/trust-bundle={}", e.ns);
    let ns_api = Api::<k8s_openapi::api::core::v1::Namespace>::all(e.admin.clone());
    let patch = serde_json::json!({"metadata": {"labels": {"meshca.io/trust-bundle": e.ns}}});
    ns_api
        .patch(
            &labelled,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    c.service_account(&e.admin, &labelled, "web").await;
    let srv = TestServer::start_with(|cfg| {
        let mut charted = ca_server::config::Config::from_toml(&toml).unwrap();
        // Where this process runs: its temp state dir, loopback ports, the kubeconfig of the
        // ServiceAccount (in a pod: the mounted token), the test's namespace and selector.
        charted.state_dir = cfg.state_dir.clone();
        charted.listen = cfg.listen;
        charted.tls = cfg.tls.clone();
        charted.http_listen = cfg.http_listen;
        charted.kubernetes.kubeconfig = e.kubeconfig.display().to_string();
        charted.kubernetes.namespace = e.ns.clone();
        charted.kubernetes.bundle.namespace_selector = selector.clone();
        charted.kubernetes.bundle.resync = Duration::from_millis(300);
        charted.istio.trusted_node_agents.clear();
        *cfg = charted;
    })
    .await;
    let want = format!("spiffe://cluster.local/ns/{labelled}/sa/web");
    let token = c
        .token(&e.admin, &labelled, "web", &["meshca"], 600, None)
        .await;
    assert_eq!(sign(&srv, &want, &token).await.unwrap(), want);
    let cms = Api::<ConfigMap>::namespaced(e.admin.clone(), &labelled);
    let published = meshca_tests::eventually(Duration::from_secs(20), || async {
        cms.get_opt("meshca-trust-bundle")
            .await
            .unwrap()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("ca-bundle.crt").cloned())
    })
    .await;
    let pem = published.expect("the bundle ConfigMap in the labelled namespace");
    assert_eq!(
        meshca_tests::pem_certs(&pem),
        srv.bundle(),
        "the published bundle is the authority's"
    );
}
