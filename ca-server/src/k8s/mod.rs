//! Running on Kubernetes. The API server (and etcd behind it) is the distributed engine; meshca
//! adds no consensus of its own:
//!
//! - [`tokenreview`]: ServiceAccount tokens authenticated with a TokenReview, cached briefly,
//!   after their signature verified against the API server's published keys ([`jwks`]);
//! - [`store`]: the authority state in one Secret, written with optimistic concurrency
//!   (`resourceVersion`); a 409 is re-read and re-decided, never overwritten;
//! - [`lease`]: a coordination.k8s.io Lease elects the one replica that rotates; every replica
//!   signs and follows the Secret;
//! - [`follow`]: a replica adopts every newer state another replica commits to the Secret;
//! - [`publish`]: the trust bundle as a ConfigMap in every namespace matching a label selector;
//! - [`istiod`]: istiod's serving certificate in its `istiod-tls` Secret, when configured;
//! - [`podcerts`]: PodCertificateRequests for meshca's signer answered, and its
//!   ClusterTrustBundle kept, when `[kubernetes.pod_certificates]` is on.
//!
//! The settings (`[kubernetes]`) are `crate::process::config::KubernetesConfig`: configuration depends on
//! nothing here, and this module depends on it.
//!
//! Every call goes through `kube::Client`; the endpoints used are exactly those granted by
//! `deploy/kubernetes/base/rbac.yaml`.

pub mod follow;
pub mod issuer_secret;
pub mod istiod;
pub mod jwks;
pub mod lease;
pub mod linkerd;
pub mod podcerts;
pub mod pods;
pub mod publish;
pub mod store;
pub mod tokenreview;

pub use crate::process::config::{BundlePublication, KubernetesConfig};

/// A client for the API server `cfg` names (in-cluster configuration, or `KUBECONFIG`, when it
/// names none).
pub async fn client(cfg: &KubernetesConfig) -> Result<kube::Client, String> {
    let mut config = if !cfg.kubeconfig.is_empty() {
        let file = kube::config::Kubeconfig::read_from(&cfg.kubeconfig)
            .map_err(|e| format!("kubernetes.kubeconfig {:?}: {e}", cfg.kubeconfig))?;
        let mut c =
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubernetes.kubeconfig {:?}: {e}", cfg.kubeconfig))?;
        c.default_namespace = cfg.own_namespace();
        c
    } else if cfg.api_url.is_empty() {
        kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?
    } else {
        let url = cfg
            .api_url
            .parse()
            .map_err(|e| format!("kubernetes.api_url {:?}: {e}", cfg.api_url))?;
        let mut c = kube::Config::new(url);
        c.default_namespace = cfg.own_namespace();
        c
    };
    // No transparent retries: kube's default retries a 503 up to 15 times with exponential
    // backoff (minutes). A certificate request answers `Unavailable` at once and the proxy
    // retries; the rotation driver and the publisher retry on their own schedules.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Marks `meta` as written by meshca: the `app.kubernetes.io/managed-by=meshca` label and
/// `annotation`, keeping the labels and annotations others put there.
pub fn stamp(meta: &mut kube::api::ObjectMeta, annotation: (&str, String)) {
    meta.labels
        .get_or_insert_default()
        .insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    meta.annotations
        .get_or_insert_default()
        .insert(annotation.0.to_owned(), annotation.1);
}

/// Label on every object meshca writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca");

/// Whether a kube error means "someone else wrote first" (409 Conflict / AlreadyExists).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether a kube error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
