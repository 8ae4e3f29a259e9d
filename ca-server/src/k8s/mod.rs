//! Running on Kubernetes. The API server (and etcd behind it) is the distributed engine; meshca
//! adds no consensus of its own:
//!
//! - [`tokenreview`]: ServiceAccount tokens authenticated with a TokenReview, cached briefly;
//! - [`store`]: the authority state in one Secret, written with optimistic concurrency
//!   (`resourceVersion`); a 409 is re-read and re-decided, never overwritten;
//! - [`lease`]: a coordination.k8s.io Lease elects the one replica that rotates; every replica
//!   signs and follows the Secret;
//! - [`publish`]: the trust bundle as a ConfigMap in every namespace matching a label selector.
//!
//! Every call goes through `kube::Client`; the endpoints used are exactly those granted by
//! `deploy/kubernetes/base/rbac.yaml`.

pub mod lease;
pub mod publish;
pub mod store;
pub mod tokenreview;

use std::time::Duration;

use rotator::policy::duration_str;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `[kubernetes]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Use the Kubernetes API at all.
    pub enabled: bool,
    /// The API server's URL. Empty: in-cluster configuration (or `KUBECONFIG` outside a pod).
    pub api_url: String,
    /// meshca's own namespace (Secrets, Lease). Empty: the pod's (from the service account
    /// mount), else `meshca`.
    pub namespace: String,
    /// The Secret holding the authority state. Empty: keep state in the state dir (one replica).
    pub state_secret: String,
    /// The Lease whose holder rotates.
    pub lease: String,
    /// How long a Lease is held without renewal before another replica may take it.
    #[serde(with = "duration_str")]
    pub lease_duration: Duration,
    /// This replica's name in the Lease. Empty: `$POD_NAME`, else the host name.
    pub identity: String,
    /// The audience meshca.v1 callers' tokens are reviewed for.
    pub token_audience: String,
    /// How long a TokenReview answer is reused (never past the token's own `exp`).
    #[serde(with = "duration_str")]
    pub token_cache_ttl: Duration,
    /// At most this many cached answers.
    pub token_cache_size: usize,
    /// Bundle publication.
    pub bundle: BundlePublication,
}

/// `[kubernetes.bundle]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundlePublication {
    /// Namespaces whose labels match this selector get the bundle ConfigMaps. Empty: publish
    /// nothing.
    pub namespace_selector: String,
    /// The ConfigMap's name (key `ca-bundle.crt`).
    pub configmap: String,
    /// Also write Istio's shape: `istio-ca-root-cert`, key `root-cert.pem`.
    pub istio: bool,
    /// Also write Linkerd's shape: `linkerd-identity-trust-roots`, key `ca-bundle.crt`.
    pub linkerd: bool,
    /// Re-check namespaces this often (a bundle change publishes at once).
    #[serde(with = "duration_str")]
    pub resync: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            api_url: String::new(),
            namespace: String::new(),
            state_secret: "meshca-authority".into(),
            lease: "meshca-rotation".into(),
            lease_duration: Duration::from_secs(15),
            identity: String::new(),
            token_audience: "meshca".into(),
            token_cache_ttl: Duration::from_secs(60),
            token_cache_size: 10_000,
            bundle: BundlePublication::default(),
        }
    }
}

impl Default for BundlePublication {
    fn default() -> Self {
        Self {
            namespace_selector: String::new(),
            configmap: "meshca-trust-bundle".into(),
            istio: false,
            linkerd: false,
            resync: Duration::from_secs(30),
        }
    }
}

const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl KubernetesConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name: &str, value: String, reason: &str| ConfigError {
            name: format!("kubernetes.{name}"),
            value,
            reason: reason.into(),
        };
        if !self.enabled {
            return Ok(());
        }
        if self.lease_duration < Duration::from_secs(2) {
            return Err(bad(
                "lease_duration",
                humantime::format_duration(self.lease_duration).to_string(),
                "shorter than 2s: the holder could not renew in time",
            ));
        }
        if self.token_cache_size == 0 {
            return Err(bad("token_cache_size", "0".into(), "must be at least 1"));
        }
        for (name, v) in [
            ("state_secret", &self.state_secret),
            ("lease", &self.lease),
            ("bundle.configmap", &self.bundle.configmap),
        ] {
            if !v.is_empty() && !is_dns_subdomain(v) {
                return Err(bad(
                    name,
                    v.clone(),
                    "not a Kubernetes object name (lowercase DNS subdomain)",
                ));
            }
        }
        if !self.bundle.namespace_selector.is_empty()
            && publish::parse_selector(&self.bundle.namespace_selector).is_err()
        {
            return Err(bad(
                "bundle.namespace_selector",
                self.bundle.namespace_selector.clone(),
                "not an equality label selector (`key=value,key2=value2`)",
            ));
        }
        Ok(())
    }

    /// The namespace meshca lives in.
    pub fn own_namespace(&self) -> String {
        if !self.namespace.is_empty() {
            return self.namespace.clone();
        }
        std::fs::read_to_string(SA_NAMESPACE_FILE)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "meshca".into())
    }

    /// This replica's identity in the Lease.
    pub fn own_identity(&self) -> String {
        if !self.identity.is_empty() {
            return self.identity.clone();
        }
        std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_owned())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("meshca-{}", std::process::id()))
    }

    /// A client for the configured API server.
    pub async fn client(&self) -> Result<kube::Client, String> {
        let mut config = if self.api_url.is_empty() {
            kube::Config::infer().await.map_err(|e| {
                format!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}")
            })?
        } else {
            let url = self
                .api_url
                .parse()
                .map_err(|e| format!("kubernetes.api_url {:?}: {e}", self.api_url))?;
            let mut c = kube::Config::new(url);
            c.default_namespace = self.own_namespace();
            c
        };
        // No transparent retries: kube's default retries a 503 up to 15 times with exponential
        // backoff (minutes). A certificate request answers `Unavailable` at once and the proxy
        // retries; the rotation driver and the publisher retry on their own schedules.
        config.default_retry = false;
        kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Marks `meta` as written by meshca: the `app.kubernetes.io/managed-by=meshca` label and
/// `annotation`, keeping the labels and annotations others put there.
pub fn stamp(meta: &mut kube::api::ObjectMeta, annotation: (&str, String)) {
    meta.labels.get_or_insert_default().insert(
        store::MANAGED_BY.0.to_owned(),
        store::MANAGED_BY.1.to_owned(),
    );
    meta.annotations
        .get_or_insert_default()
        .insert(annotation.0.to_owned(), annotation.1);
}

/// Whether a kube error means "someone else wrote first" (409 Conflict / AlreadyExists).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether a kube error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
