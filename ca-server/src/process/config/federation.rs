//! `[federation]`: the SPIFFE bundle endpoint meshca serves and the trust domains it federates
//! with — plain data and its own rules. What reads the files they name, and serves and fetches
//! bundles, is `crate::federation`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rotator::spiffe::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

/// How the bundle endpoint authenticates itself to the peers that fetch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointProfile {
    /// An SVID for `spiffe://<td>/meshca/server` from meshca's own issuer.
    #[default]
    HttpsSpiffe,
    /// An operator-provided web PKI certificate and key.
    HttpsWeb,
}

impl EndpointProfile {
    /// Its name in the configuration: `https_spiffe` or `https_web`.
    pub fn name(self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

impl std::str::FromStr for EndpointProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "https_spiffe" => Ok(Self::HttpsSpiffe),
            "https_web" => Ok(Self::HttpsWeb),
            other => Err(format!(
                "{other:?}: expected \"https_spiffe\" or \"https_web\""
            )),
        }
    }
}

/// Where the system's web PKI roots are read from when a `https_web` peer names no
/// `web_ca_file` (Debian's and Ubuntu's `ca-certificates` bundle).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `[federation]`: the SPIFFE bundle endpoint meshca serves, and the trust domains it federates
/// with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Where the bundle endpoint listens (HTTPS); unset: not served.
    pub bundle_endpoint_listen: Option<SocketAddr>,
    /// `https_spiffe` (default) or `https_web`.
    pub bundle_endpoint_profile: EndpointProfile,
    /// `https_web`: the certificate chain (PEM, leaf first).
    pub bundle_endpoint_cert: Option<PathBuf>,
    /// `https_web`: its private key (PEM).
    pub bundle_endpoint_key: Option<PathBuf>,
    /// The `spiffe_refresh_hint` the bundle endpoint serves: how often peers should fetch.
    #[serde(with = "rotator::policy::duration_str")]
    pub bundle_endpoint_refresh_hint: Duration,
    /// A peer's refresh hint is obeyed within these bounds.
    #[serde(with = "rotator::policy::duration_str")]
    pub refresh_min: Duration,
    /// See `refresh_min`.
    #[serde(with = "rotator::policy::duration_str")]
    pub refresh_max: Duration,
    /// A peer's bundle document larger than this is refused.
    pub max_bundle_bytes: usize,
    /// A peer's bundle with more anchors than this is refused.
    pub max_anchors: usize,
    /// The trust domains whose bundles are fetched and handed to workloads.
    pub trust_domains: Vec<Peer>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            bundle_endpoint_listen: None,
            bundle_endpoint_profile: EndpointProfile::default(),
            bundle_endpoint_cert: None,
            bundle_endpoint_key: None,
            bundle_endpoint_refresh_hint: Duration::from_secs(300),
            refresh_min: Duration::from_secs(10),
            refresh_max: Duration::from_secs(3600),
            max_bundle_bytes: 256 << 10,
            max_anchors: 32,
            trust_domains: Vec::new(),
        }
    }
}

/// One `[[federation.trust_domains]]` entry: a trust domain to federate with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint, `https://…`.
    pub bundle_endpoint_url: String,
    /// How its endpoint authenticates (`https_spiffe` or `https_web`).
    #[serde(default)]
    pub profile: EndpointProfile,
    /// `https_spiffe`: the endpoint's SPIFFE ID, in its trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// `https_spiffe`: the first bundle of that trust domain to trust (PEM), until a fetched one
    /// replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_bundle: Option<PathBuf>,
    /// `https_web`: the roots its endpoint's certificate must chain to (PEM); default: the
    /// system's ([`SYSTEM_ROOTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_ca_file: Option<PathBuf>,
}

impl Peer {
    fn validate(&self) -> Result<(), String> {
        let td = &self.trust_domain;
        if !self.bundle_endpoint_url.starts_with("https://") {
            return Err(format!(
                "{td}: bundle_endpoint_url {:?} must be https://",
                self.bundle_endpoint_url
            ));
        }
        self.bundle_endpoint_url
            .parse::<hyper::Uri>()
            .map_err(|e| format!("{td}: bundle_endpoint_url: {e}"))?;
        match self.profile {
            EndpointProfile::HttpsSpiffe => {
                let id = self.endpoint_spiffe_id.as_ref().ok_or_else(|| {
                    format!("{td}: https_spiffe needs endpoint_spiffe_id (e.g. spiffe://{td}/meshca/server)")
                })?;
                if &id.trust_domain() != td {
                    return Err(format!("{td}: endpoint_spiffe_id {id} is not in {td}"));
                }
                if self.bootstrap_bundle.is_none() {
                    return Err(format!(
                        "{td}: https_spiffe needs bootstrap_bundle (the first bundle of {td} to trust its endpoint with)"
                    ));
                }
                if self.web_ca_file.is_some() {
                    return Err(format!("{td}: web_ca_file is for https_web"));
                }
            }
            EndpointProfile::HttpsWeb => {
                if self.endpoint_spiffe_id.is_some() {
                    return Err(format!("{td}: endpoint_spiffe_id is for https_spiffe"));
                }
            }
        }
        Ok(())
    }
}

impl FederationConfig {
    /// Every peer is complete and listed once, and the bounds are sane; or (setting under
    /// `federation.`, its value, why).
    pub fn validate_peers(&self) -> Result<(), (String, String, String)> {
        let h = rotator::policy::written;
        for (i, p) in self.trust_domains.iter().enumerate() {
            let td = p.trust_domain.to_string();
            p.validate()
                .map_err(|reason| ("trust_domains".to_owned(), td.clone(), reason))?;
            if self.trust_domains[..i]
                .iter()
                .any(|o| o.trust_domain == p.trust_domain)
            {
                return Err(("trust_domains".into(), td, "listed twice".into()));
            }
        }
        if self.refresh_min.is_zero() {
            return Err((
                "refresh_min".into(),
                h(self.refresh_min),
                "must be more than 0".into(),
            ));
        }
        if self.refresh_min > self.refresh_max {
            return Err((
                "refresh_min".into(),
                h(self.refresh_min),
                format!("more than refresh_max = {}", h(self.refresh_max)),
            ));
        }
        if self.bundle_endpoint_refresh_hint.is_zero() {
            return Err((
                "bundle_endpoint_refresh_hint".into(),
                h(self.bundle_endpoint_refresh_hint),
                "must be more than 0: peers would be told to fetch without pause".into(),
            ));
        }
        if self.max_bundle_bytes < 1024 {
            return Err((
                "max_bundle_bytes".into(),
                self.max_bundle_bytes.to_string(),
                "must be at least 1024".into(),
            ));
        }
        if self.max_anchors == 0 {
            return Err((
                "max_anchors".into(),
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The profile and its files agree.
    pub fn validate(&self) -> Result<(), String> {
        let files = (
            self.bundle_endpoint_cert.is_some(),
            self.bundle_endpoint_key.is_some(),
        );
        match (self.bundle_endpoint_profile, files) {
            (EndpointProfile::HttpsWeb, (true, true))
            | (EndpointProfile::HttpsSpiffe, (false, false)) => Ok(()),
            (EndpointProfile::HttpsWeb, _) => Err(
                "needs both federation.bundle_endpoint_cert and federation.bundle_endpoint_key (PEM)"
                    .into(),
            ),
            (EndpointProfile::HttpsSpiffe, _) => Err(
                "federation.bundle_endpoint_cert and _key are for https_web; https_spiffe serves \
                 an SVID that meshca issues itself"
                    .into(),
            ),
        }
    }
}
