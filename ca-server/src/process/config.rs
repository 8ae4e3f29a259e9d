//! Configuration: one typed struct, read from TOML (`--config FILE`), overridden by environment
//! variables and flags (flags win). Every setting has a default; `--print-config` shows the result.

pub mod federation;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rotator::policy::{Policy, duration_str};
use rotator::spiffe::TrustDomain;
use serde::{Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "./meshca-data";
/// Trust domain of a new authority when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default gRPC (TLS) listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// Default HTTP listen address (health, metrics, bundle).
pub const DEFAULT_HTTP_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// Largest request body accepted on the gRPC port.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Environment variable for the state dir.
pub const ENV_STATE_DIR: &str = "MESHCA_STATE_DIR";

/// Everything `meshca-server` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the authority state, tokens and bundle live.
    pub state_dir: PathBuf,
    /// SPIFFE trust domain. Unset: the existing state's, or `cluster.local` for a new authority.
    pub trust_domain: Option<TrustDomain>,
    /// Upstream mode: the trust anchor (PEM) whose key lives elsewhere. meshca never holds its
    /// key, so issuers come from `meshca issuer csr` / `meshca issuer import`.
    pub anchor_cert: Option<PathBuf>,
    /// gRPC (TLS) listen address.
    pub listen: SocketAddr,
    /// HTTP listen address: `/healthz`, `/readyz`, `/metrics`, `/bundle.pem`.
    pub http_listen: SocketAddr,
    /// The gRPC server's own certificate.
    pub tls: TlsConfig,
    /// Lifetimes and rotation points.
    pub policy: Policy,
    /// Opt-in trust-anchor rotation automation (`auto_stage_before`, `auto_advance`); off by
    /// default.
    pub anchor: rotator::anchors::Automation,
    /// Log line format.
    pub log_format: LogFormat,
    /// Istio's CSR API (`istio.v1.auth.IstioCertificateService`) on the gRPC port.
    pub istio: IstioConfig,
    /// Linkerd's identity API (`io.linkerd.proxy.identity.Identity`) on the gRPC port.
    pub linkerd: LinkerdConfig,
    /// Which credentials are accepted, in order.
    pub auth: AuthConfig,
    /// Running on Kubernetes: TokenReview, state in a Secret, leader-elected rotation, bundle
    /// ConfigMaps. Off by default (the embedded default is one process with a state dir).
    pub kubernetes: KubernetesConfig,
    /// Bounds on what any caller can hold: connections, streams, watchers (`[limits]`).
    pub limits: LimitsConfig,
    /// Where anchor and issuer keys live (`[keys]`): the state (default) or a PKCS#11 token.
    pub keys: rotator::keys::KeysConfig,
    /// SPIFFE federation (`[federation]`): the bundle endpoint served over HTTPS.
    pub federation: federation::FederationConfig,
}

/// One authenticator of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// A client certificate from this CA: renewal of the SPIFFE ID it carries.
    Mtls,
    /// `authorization: Bearer <token>` checked with a Kubernetes TokenReview (needs
    /// `[kubernetes] enabled`).
    Tokenreview,
    /// `authorization: Bearer <token>` from `<state-dir>/tokens.json`.
    Static,
}

/// The authenticator chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// In order: a bearer token is offered to `tokenreview` and `static` in the order listed;
    /// the first that accepts it decides. `mtls` accepts client certificates.
    pub authenticators: Vec<AuthMethod>,
    /// How long the bootstrap token written for a new authority is accepted (`0s`: until
    /// revoked). Long enough for the README walkthrough and a day of trying things; after that,
    /// `meshca token add` makes tokens with their own scope and expiry.
    #[serde(with = "duration_str")]
    pub bootstrap_token_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            authenticators: vec![AuthMethod::Mtls, AuthMethod::Static],
            bootstrap_token_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl AuthConfig {
    /// When a bootstrap token made at `now` expires (`None`: a ttl of 0, never).
    pub fn bootstrap_token_expiry(
        &self,
        now: time::OffsetDateTime,
    ) -> Option<time::OffsetDateTime> {
        (!self.bootstrap_token_ttl.is_zero()).then(|| now + self.bootstrap_token_ttl)
    }
}

/// The Istio face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IstioConfig {
    /// Serve it.
    pub enabled: bool,
    /// The audience istio-agent's tokens are reviewed for (TokenReview).
    pub token_audience: String,
    /// ServiceAccounts (`namespace/name`) that may request certificates for the pods on their
    /// own node (Istio ambient's ztunnel: `istio-system/ztunnel`), Kubernetes mode only. Empty:
    /// none; any request naming another workload (`ImpersonatedIdentity`) is refused.
    pub trusted_node_agents: Vec<String>,
    /// A node agent's request for a workload not (yet) seen on its node waits this long for the
    /// pod directory (a pod scheduled a moment ago), then fails `UNAVAILABLE` (retryable).
    #[serde(with = "duration_str")]
    pub node_authorization_wait: Duration,
    /// The pod directory answers no question while it has been out of touch with the API
    /// server for longer than this (requests fail `UNAVAILABLE` instead of trusting an old
    /// picture of which pod runs where).
    #[serde(with = "duration_str")]
    pub pod_directory_max_staleness: Duration,
    /// istiod's own serving certificate, kept by meshca in a Secret (Kubernetes mode).
    pub istiod_certificate: IstiodCertificate,
}

/// `[istio.istiod_certificate]`: with istiod's CA off (`ENABLE_CA_SERVER=false`), istiod serves
/// secure XDS (15012) and its webhooks only with a certificate it is given, the `istiod-tls`
/// Secret mounted at `/var/run/secrets/istiod/tls` (`tls.crt`, `tls.key`, `ca.crt`), and proxies
/// verify it against the mesh's roots: meshca's anchors. meshca writes that Secret (the leader,
/// in Kubernetes mode) and keeps it: renewed two thirds into its life, re-issued when the active
/// issuer changes, `ca.crt` the whole bundle through every rotation phase. Off unless
/// `dns_names` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IstiodCertificate {
    /// The Secret's namespace (istiod's).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The certificate's DNS names (`istiod.istio-system.svc`, and for revisions
    /// `istiod-<rev>.istio-system.svc`). Empty: off. DNS names only: the certificate can never
    /// carry a SPIFFE ID.
    pub dns_names: Vec<String>,
    /// Its lifetime (clamped to the active issuer's notAfter, like every leaf).
    #[serde(with = "duration_str")]
    pub ttl: Duration,
}

impl Default for IstiodCertificate {
    fn default() -> Self {
        Self {
            namespace: "istio-system".into(),
            secret: "istiod-tls".into(),
            dns_names: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl IstiodCertificate {
    /// Whether meshca keeps the Secret.
    pub fn enabled(&self) -> bool {
        !self.dns_names.is_empty()
    }

    fn validate(&self, kubernetes: bool) -> Result<(), ConfigError> {
        let bad = |name: &str, value: String, reason: &str| ConfigError {
            name: format!("istio.istiod_certificate.{name}"),
            value,
            reason: reason.into(),
        };
        if !self.enabled() {
            return Ok(());
        }
        if !kubernetes {
            return Err(bad(
                "dns_names",
                self.dns_names.join(","),
                "istiod's certificate is kept in a Kubernetes Secret: set [kubernetes] enabled = true",
            ));
        }
        for (name, v) in [("namespace", &self.namespace), ("secret", &self.secret)] {
            if !is_dns_subdomain(v) {
                return Err(bad(
                    name,
                    v.clone(),
                    "not a Kubernetes object name (lowercase DNS subdomain)",
                ));
            }
        }
        for n in &self.dns_names {
            if !is_dns_subdomain(n) {
                return Err(bad(
                    "dns_names",
                    n.clone(),
                    "not a DNS name (lowercase letters, digits, '-' and '.'; never a URI)",
                ));
            }
        }
        if self.ttl < Duration::from_secs(3600) {
            return Err(bad(
                "ttl",
                rotator::policy::written(self.ttl),
                "shorter than 1h: istiod reloads it, but a renewal every few minutes is churn",
            ));
        }
        Ok(())
    }
}

impl Default for IstioConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_audience: "istio-ca".into(),
            trusted_node_agents: Vec::new(),
            node_authorization_wait: Duration::from_secs(2),
            pod_directory_max_staleness: Duration::from_secs(60),
            istiod_certificate: IstiodCertificate::default(),
        }
    }
}

impl IstioConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for a in &self.trusted_node_agents {
            let ok = a
                .split_once('/')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
            if !ok {
                return Err(ConfigError {
                    name: "istio.trusted_node_agents".into(),
                    value: a.clone(),
                    reason: "each entry is namespace/serviceaccount, e.g. istio-system/ztunnel"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

/// The Linkerd face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkerdConfig {
    /// Serve it.
    pub enabled: bool,
    /// The namespace of Linkerd's control plane, part of every identity:
    /// `<sa>.<ns>.serviceaccount.identity.<control_plane_namespace>.<trust domain>`.
    pub control_plane_namespace: String,
    /// The audience Linkerd proxies' tokens are reviewed for (TokenReview).
    pub token_audience: String,
}

impl Default for LinkerdConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            control_plane_namespace: "linkerd".into(),
            token_audience: "identity.l5d.io".into(),
        }
    }
}

/// The names the gRPC server's certificate carries (clients verify one of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<IpAddr>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            dns_names: vec!["localhost".into()],
            ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            trust_domain: None,
            anchor_cert: None,
            listen: DEFAULT_LISTEN,
            http_listen: DEFAULT_HTTP_LISTEN,
            tls: TlsConfig::default(),
            policy: Policy::default(),
            anchor: rotator::anchors::Automation::default(),
            istio: IstioConfig::default(),
            linkerd: LinkerdConfig::default(),
            auth: AuthConfig::default(),
            kubernetes: KubernetesConfig::default(),
            limits: LimitsConfig::default(),
            keys: rotator::keys::KeysConfig::default(),
            federation: federation::FederationConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

/// A bad setting: which, its value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {name} = {value}: {reason}")]
pub struct ConfigError {
    /// The setting (or file).
    pub name: String,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

impl Config {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            name: "--config".into(),
            value: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|mut e| {
            e.value = path.display().to_string();
            e
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            name: "--config".into(),
            value: String::new(),
            reason: e.to_string(),
        })
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Checks what serde cannot: the policy's arithmetic and the TLS names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy.validate().map_err(|e| ConfigError {
            name: format!("policy.{}", e.name),
            value: e.value,
            reason: e.reason,
        })?;
        if let Some(before) = self.anchor.auto_stage_before {
            let h = rotator::policy::written;
            let p = &self.policy;
            // A whole gated rotation by the time fallbacks: stage → activate → finish.
            let needs = 2 * p.leaf_ttl_max + p.propagation_allowance + p.clock_skew;
            if before >= p.anchor_ttl {
                return Err(ConfigError {
                    name: "anchor.auto_stage_before".into(),
                    value: h(before),
                    reason: format!(
                        "not shorter than policy.anchor_ttl = {}: every new anchor would be staged over again at once",
                        h(p.anchor_ttl)
                    ),
                });
            }
            if before < needs {
                return Err(ConfigError {
                    name: "anchor.auto_stage_before".into(),
                    value: h(before),
                    reason: format!(
                        "shorter than a whole rotation by its time gates (2 × leaf_ttl_max + propagation_allowance + \
                         clock_skew = {}): the anchor could expire mid-rotation",
                        h(needs)
                    ),
                });
            }
        }
        if self.tls.dns_names.is_empty() && self.tls.ip_addresses.is_empty() {
            return Err(ConfigError {
                name: "tls".into(),
                value: "[]".into(),
                reason: "the server certificate needs at least one DNS name or IP address".into(),
            });
        }
        if self.auth.authenticators.is_empty() {
            return Err(ConfigError {
                name: "auth.authenticators".into(),
                value: "[]".into(),
                reason: "no authenticator: nothing could ever be issued".into(),
            });
        }
        if self.auth.authenticators.contains(&AuthMethod::Tokenreview) && !self.kubernetes.enabled {
            return Err(ConfigError {
                name: "auth.authenticators".into(),
                value: "tokenreview".into(),
                reason: "TokenReview needs the Kubernetes API: set [kubernetes] enabled = true"
                    .into(),
            });
        }
        self.istio.validate()?;
        self.istio
            .istiod_certificate
            .validate(self.kubernetes.enabled)?;
        self.kubernetes.validate()?;
        if !self.kubernetes.issuer_secret.is_empty() && self.anchor_cert.is_none() {
            return Err(ConfigError {
                name: "kubernetes.issuer_secret".into(),
                value: self.kubernetes.issuer_secret.clone(),
                reason: "needs upstream mode (anchor_cert): with the anchor key here, meshca makes its own issuers".into(),
            });
        }
        self.limits.validate()?;
        self.validate_federation()?;
        for n in &self.tls.dns_names {
            if rustls_pki_types::DnsName::try_from(n.as_str()).is_err() {
                return Err(ConfigError {
                    name: "tls.dns_names".into(),
                    value: n.clone(),
                    reason: "not a DNS name".into(),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// `[federation]`: the endpoint's profile and files agree, every peer is complete and listed
    /// once, and this authority's own trust domain is not among them.
    fn validate_federation(&self) -> Result<(), ConfigError> {
        self.federation.validate().map_err(|reason| ConfigError {
            name: "federation.bundle_endpoint_profile".into(),
            value: self.federation.bundle_endpoint_profile.name().into(),
            reason,
        })?;
        self.federation
            .validate_peers()
            .map_err(|(name, value, reason)| ConfigError {
                name: format!("federation.{name}"),
                value,
                reason,
            })?;
        match &self.trust_domain {
            Some(td)
                if self
                    .federation
                    .trust_domains
                    .iter()
                    .any(|p| &p.trust_domain == td) =>
            {
                Err(ConfigError {
                    name: "federation.trust_domains".into(),
                    value: td.to_string(),
                    reason: "this authority's own trust domain cannot be federated with".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// `[limits]`: every resource a caller can hold has a bound. The defaults are sized for the
/// shipped Deployment (256 MiB, 1 CPU); the arithmetic is beside each field and in
/// docs/configuration.md. `0` means unlimited (for tests and negative controls only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections on the gRPC port, handshaking ones included. An idle TLS connection
    /// costs ~27 KiB: 2048 × 27 KiB ≈ 55 MiB worst case.
    pub max_connections: usize,
    /// Of which from one remote address: one source cannot take every slot.
    pub max_connections_per_ip: usize,
    /// A connection that finished TLS must open its first stream within this.
    #[serde(with = "duration_str")]
    pub preface_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// The server pings an idle connection this often ...
    #[serde(with = "duration_str")]
    pub keepalive_interval: Duration,
    /// ... and closes it when no answer comes within this.
    #[serde(with = "duration_str")]
    pub keepalive_timeout: Duration,
    /// Connections are closed (gracefully) after this long, so that long-lived ones
    /// re-handshake and re-authenticate.
    #[serde(with = "duration_str")]
    pub max_connection_age: Duration,
    /// In-flight requests may finish within this after `max_connection_age`.
    #[serde(with = "duration_str")]
    pub max_connection_age_grace: Duration,
    /// Every unary request must be answered within this.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// `WatchTrustBundle` streams open at once. ~6 KiB each: 4096 × 6 KiB ≈ 24 MiB.
    pub watch_max: usize,
    /// Of which without a client certificate (the bundle is public, so anyone may watch; they
    /// get a quarter of the share).
    pub watch_max_unauthenticated: usize,
    /// Per peer: per remote IP without a client certificate, per (IP, SPIFFE ID) with one.
    /// 32: pods sharing an address (hostNetwork, NAT) and restarts whose old streams have not
    /// closed yet fit; one address still cannot take the unauthenticated share (1024).
    pub watch_per_peer: usize,
    /// Open connections on the HTTP port (probes, scrapes, bundle downloads).
    pub http_max_connections: usize,
    /// An HTTP request's headers must arrive within this (slowloris).
    #[serde(with = "duration_str")]
    pub http_header_timeout: Duration,
    /// `/readyz` reuses a probe result this young instead of signing a probe leaf each time.
    #[serde(with = "duration_str")]
    pub readyz_cache: Duration,
    /// TokenReviews sent per second at most (a burst of `tokenreview_burst` allowed); beyond,
    /// a request whose token is not cached fails `UNAVAILABLE` (the proxy retries).
    pub tokenreview_rate: u32,
    /// See `tokenreview_rate`.
    pub tokenreview_burst: u32,
    /// TokenReviews awaiting the API server at once.
    pub tokenreview_in_flight: usize,
    /// Certificates one caller credential (a token, a ServiceAccount, a client certificate's
    /// SPIFFE ID) may obtain per second, after a burst of `issue_burst`; beyond it
    /// `RESOURCE_EXHAUSTED` with a retry hint.
    pub issue_rate: u32,
    /// See `issue_rate`.
    pub issue_burst: u32,
    /// Certificates one node agent (per node: every ztunnel shares one ServiceAccount) may
    /// obtain for the workloads it serves, per second after a burst of `node_agent_issue_burst`.
    pub node_agent_issue_rate: u32,
    /// See `node_agent_issue_rate`.
    pub node_agent_issue_burst: u32,
    /// Instances the issuance ledger holds in all (~95 bytes each when ten or more share a
    /// SPIFFE ID, ~170 when each has its own: 500,000 ≈ 45–81 MiB). Beyond,
    /// leaves are still signed but not recorded, and the measured gates fall back to time.
    pub ledger_max_instances: usize,
    /// Live instances one SPIFFE ID may hold in the ledger; a new one beyond it is refused.
    pub ledger_instances_per_identity: usize,
    /// Requests answered `UNAUTHENTICATED` on one connection before it is closed: a flood of
    /// guessed tokens must pay a new (lower-priority) TLS handshake every few guesses.
    pub unauthenticated_per_connection: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 2048,
            max_connections_per_ip: 128,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 64,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(300),
            request_timeout: Duration::from_secs(15),
            watch_max: 4096,
            watch_max_unauthenticated: 1024,
            watch_per_peer: 32,
            http_max_connections: 256,
            http_header_timeout: Duration::from_secs(5),
            readyz_cache: Duration::from_secs(1),
            tokenreview_rate: 50,
            tokenreview_burst: 100,
            tokenreview_in_flight: 32,
            issue_rate: 20,
            issue_burst: 200,
            node_agent_issue_rate: 50,
            node_agent_issue_burst: 500,
            ledger_max_instances: 500_000,
            ledger_instances_per_identity: 1000,
            unauthenticated_per_connection: 16,
        }
    }
}

/// Environment variables `MESHCA_LIMITS_<NAME>` set `limits.<name>` (e.g.
/// `MESHCA_LIMITS_MAX_CONNECTIONS=4096`).
pub const ENV_LIMITS_PREFIX: &str = "MESHCA_LIMITS_";

impl LimitsConfig {
    /// These limits with `overrides` applied in order: `(name, value)` as `limits.<name> = value`
    /// would be in TOML, a value that parses as an integer taken as one, anything else as a
    /// string (durations: `"30s"`). An unknown name or a bad value is an error naming it.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(self).map_err(|e| ConfigError {
            name: "limits".into(),
            value: String::new(),
            reason: e.to_string(),
        })?;
        let mut out = self.clone();
        for (name, value) in overrides {
            let err = |reason: String| ConfigError {
                name: format!("limits.{name}"),
                value: value.into(),
                reason,
            };
            if !table.contains_key(name) {
                return Err(err(
                    "no such limit (see docs/configuration.md, Limits)".into()
                ));
            }
            let count = matches!(table.get(name), Some(toml::Value::Integer(_)));
            let v = match value.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) if count => {
                    return Err(err(
                        "not a whole number (this limit is a count; 0 means unlimited)".into(),
                    ));
                }
                Err(_) => toml::Value::String(value.trim().to_owned()),
            };
            table.insert(name.to_owned(), v);
            // Checked one at a time, so that an error names the value that caused it.
            out = table.clone().try_into().map_err(|e: toml::de::Error| {
                err(if count {
                    "out of range for this limit (a count from 0)".to_owned()
                } else {
                    e.message().to_owned()
                })
            })?;
        }
        Ok(out)
    }

    /// `(name, value)` of every `MESHCA_LIMITS_<NAME>` in `vars`, the name lowercased.
    pub fn env_overrides(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = vars
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(ENV_LIMITS_PREFIX)
                    .map(|n| (n.to_ascii_lowercase(), v))
            })
            .collect();
        out.sort();
        out
    }

    /// No limit at all (`0` everywhere a count is): for negative controls in tests.
    pub fn unlimited() -> Self {
        Self {
            max_connections: 0,
            max_connections_per_ip: 0,
            watch_max: 0,
            watch_max_unauthenticated: 0,
            watch_per_peer: 0,
            http_max_connections: 0,
            tokenreview_rate: 0,
            tokenreview_in_flight: 0,
            issue_rate: 0,
            node_agent_issue_rate: 0,
            ledger_max_instances: 0,
            ledger_instances_per_identity: 0,
            unauthenticated_per_connection: 0,
            ..Self::default()
        }
    }

    /// The ledger's share of these limits.
    pub fn ledger(&self) -> rotator::ledger::LedgerLimits {
        rotator::ledger::LedgerLimits {
            max_instances: self.ledger_max_instances,
            max_per_identity: self.ledger_instances_per_identity,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = rotator::policy::written;
        for (name, d) in [
            ("preface_timeout", self.preface_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("max_connection_age", self.max_connection_age),
            ("request_timeout", self.request_timeout),
            ("http_header_timeout", self.http_header_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError {
                    name: format!("limits.{name}"),
                    value: h(d),
                    reason: "must be more than 0".into(),
                });
            }
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError {
                name: "limits.max_concurrent_streams".into(),
                value: "0".into(),
                reason: "no stream could ever open".into(),
            });
        }
        if self.max_connections != 0 && self.max_connections_per_ip > self.max_connections {
            return Err(ConfigError {
                name: "limits.max_connections_per_ip".into(),
                value: self.max_connections_per_ip.to_string(),
                reason: format!(
                    "more than max_connections = {}: the per-address cap could never apply",
                    self.max_connections
                ),
            });
        }
        if self.watch_max != 0 && self.watch_max_unauthenticated > self.watch_max {
            return Err(ConfigError {
                name: "limits.watch_max_unauthenticated".into(),
                value: self.watch_max_unauthenticated.to_string(),
                reason: format!(
                    "more than watch_max = {}: unauthenticated watchers could take every slot",
                    self.watch_max
                ),
            });
        }
        Ok(())
    }
}

// Kubernetes settings. They live here, with every other setting, so that configuration depends
// on nothing in `k8s` (which reads them).

/// `[kubernetes]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Use the Kubernetes API at all.
    pub enabled: bool,
    /// The API server's URL. Empty: in-cluster configuration (or `KUBECONFIG` outside a pod).
    pub api_url: String,
    /// A kubeconfig file to use instead (its current context: server, CA, and a client
    /// certificate, a token or a `tokenFile` re-read as it rotates). Empty: `api_url`, else
    /// in-cluster configuration. For running meshca outside the cluster as its ServiceAccount.
    pub kubeconfig: String,
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
    /// Upstream mode with cert-manager: the `kubernetes.io/tls` Secret (`namespace/name`;
    /// `tls.crt`, `tls.key`) holding the issuer it renews. meshca adopts every renewal that
    /// chains to an anchor in the bundle and fits the leaf policy, and keeps the last good issuer
    /// otherwise. Empty: off.
    pub issuer_secret: String,
    /// Bundle publication.
    pub bundle: BundlePublication,
    /// Kubernetes-native pod certificates (`[kubernetes.pod_certificates]`).
    pub pod_certificates: PodCertificates,
}

/// `[kubernetes.pod_certificates]`: meshca as the signer of PodCertificateRequests (KEP-4317)
/// named `signer_name`, and its trust bundle as a ClusterTrustBundle for that signer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodCertificates {
    /// Sign PodCertificateRequests (the Lease holder does). Off by default.
    pub enabled: bool,
    /// The signer name pods ask for in their `podCertificate` volume.
    pub signer_name: String,
    /// Publish the trust bundle as a ClusterTrustBundle linked to the signer (named
    /// `<signer name with / as :>:bundle`).
    pub trust_bundle: bool,
}

impl Default for PodCertificates {
    fn default() -> Self {
        Self {
            enabled: false,
            signer_name: "meshca.io/spiffe".into(),
            trust_bundle: true,
        }
    }
}

impl PodCertificates {
    /// The ClusterTrustBundle's name: the signer name with `/` as `:`, then `:bundle` (the
    /// API server requires the signer name, so written, as its prefix).
    pub fn trust_bundle_name(&self) -> String {
        format!("{}:bundle", self.signer_name.replace('/', ":"))
    }
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
            kubeconfig: String::new(),
            namespace: String::new(),
            state_secret: "meshca-authority".into(),
            lease: "meshca-rotation".into(),
            lease_duration: Duration::from_secs(15),
            identity: String::new(),
            token_audience: "meshca".into(),
            token_cache_ttl: Duration::from_secs(60),
            token_cache_size: 10_000,
            issuer_secret: String::new(),
            bundle: BundlePublication::default(),
            pod_certificates: PodCertificates::default(),
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
    /// `issuer_secret` as (namespace, name), when set.
    pub fn issuer_secret(&self) -> Option<(&str, &str)> {
        self.issuer_secret
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    }

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
                rotator::policy::written(self.lease_duration),
                "shorter than 2s: the holder could not renew in time",
            ));
        }
        if self.token_cache_size == 0 {
            return Err(bad("token_cache_size", "0".into(), "must be at least 1"));
        }
        if !self.issuer_secret.is_empty()
            && self
                .issuer_secret()
                .is_none_or(|(ns, n)| !is_dns_subdomain(ns) || !is_dns_subdomain(n))
        {
            return Err(bad(
                "issuer_secret",
                self.issuer_secret.clone(),
                "expected namespace/name of a kubernetes.io/tls Secret",
            ));
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
        let pc = &self.pod_certificates;
        if pc.enabled {
            let valid = pc
                .signer_name
                .split_once('/')
                .is_some_and(|(domain, path)| {
                    is_dns_subdomain(domain)
                        && domain.contains('.')
                        && !path.is_empty()
                        && !path.contains('/')
                        && !domain.starts_with("kubernetes.io")
                        && path
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                });
            if !valid {
                return Err(bad(
                    "pod_certificates.signer_name",
                    pc.signer_name.clone(),
                    "expected <domain>/<path> (e.g. meshca.io/spiffe), not under kubernetes.io",
                ));
            }
        }
        if !self.bundle.namespace_selector.is_empty()
            && parse_selector(&self.bundle.namespace_selector).is_err()
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

/// Parses an equality selector `k=v,k2=v2` (also `k==v`).
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once("==")
            .or_else(|| part.split_once('='))
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains('!') || v.contains('=') {
            return Err(format!("{part:?} is not key=value"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    if out.is_empty() {
        return Err("empty selector".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_set_from_the_environment_and_flags_by_its_toml_name() {
        let base = LimitsConfig::default();
        let env = LimitsConfig::env_overrides([
            (
                "MESHCA_LIMITS_MAX_CONNECTIONS".to_owned(),
                "4096".to_owned(),
            ),
            ("MESHCA_LIMITS_IDLE_TIMEOUT".to_owned(), "90s".to_owned()),
            ("MESHCA_LISTEN".to_owned(), "0.0.0.0:1".to_owned()),
        ]);
        assert_eq!(env.len(), 2, "only MESHCA_LIMITS_*: {env:?}");
        let l = base
            .with_overrides(
                env.iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .chain([("max_connections", "512")]),
            )
            .unwrap();
        assert_eq!(
            l.max_connections, 512,
            "the flag comes after the environment"
        );
        assert_eq!(l.idle_timeout, Duration::from_secs(90));
        assert_eq!(l.watch_max, base.watch_max, "the rest unchanged");

        let e = base.with_overrides([("max_conections", "1")]).unwrap_err();
        assert_eq!(e.name, "limits.max_conections");
        assert!(e.reason.contains("no such limit"), "{e}");
        let e = base
            .with_overrides([("watch_max", "64"), ("idle_timeout", "soon")])
            .unwrap_err();
        assert_eq!(
            (e.name.as_str(), e.value.as_str()),
            ("limits.idle_timeout", "soon")
        );
        let e = base
            .with_overrides([("max_connections", "-1")])
            .unwrap_err();
        assert_eq!(e.name, "limits.max_connections", "{e}");
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = c.to_toml();
        assert!(text.contains("leaf_ttl_default = \"1d\""), "{text}");
        assert_eq!(Config::from_toml(&text).unwrap(), c);
    }

    #[test]
    fn partial_files_keep_defaults() {
        let c = Config::from_toml("trust_domain = \"example.org\"\n[policy]\nleaf_ttl_max = \"12h\"\nleaf_ttl_default = \"6h\"\n").unwrap();
        assert_eq!(c.trust_domain.unwrap().as_str(), "example.org");
        assert_eq!(
            c.policy.leaf_ttl_max,
            std::time::Duration::from_secs(12 * 3600)
        );
        assert_eq!(c.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = Config::from_toml("lisen = \"1.2.3.4:5\"").unwrap_err();
        assert!(e.reason.contains("unknown field `lisen`"), "{e}");
        let e = Config::from_toml("trust_domain = \"Bad Domain\"").unwrap_err();
        assert!(e.reason.contains("invalid trust domain"), "{e}");
        let e = Config::from_toml("[policy]\nleaf_ttl_max = \"forever\"").unwrap_err();
        assert!(e.reason.contains("forever"), "{e}");
        let c = Config::from_toml("[policy]\nissuer_ttl = \"3d\"").unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.name, "policy.issuer_ttl");
        let c = Config::from_toml("[anchor]\nauto_stage_before = \"400d\"\nauto_advance = true")
            .unwrap();
        assert_eq!(c.validate().unwrap_err().name, "anchor.auto_stage_before");
        let c = Config::from_toml("[anchor]\nauto_stage_before = \"2d\"").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.reason.contains("mid-rotation"), "{e}");
        let c = Config::from_toml("[anchor]\nauto_stage_before = \"90d\"\nauto_advance = true")
            .unwrap();
        c.validate().unwrap();
        assert!(c.anchor.auto_advance);
        let c = Config::from_toml("[tls]\ndns_names = [\"not a name\"]").unwrap();
        assert_eq!(c.validate().unwrap_err().name, "tls.dns_names");
    }

    #[test]
    fn selectors() {
        let s = parse_selector("meshca.io/trust-bundle=enabled, team==a").unwrap();
        assert_eq!(s.get("meshca.io/trust-bundle").unwrap(), "enabled");
        assert_eq!(s.get("team").unwrap(), "a");
        for bad in ["", "novalue", "a!=b", "a=b=c"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }
}
