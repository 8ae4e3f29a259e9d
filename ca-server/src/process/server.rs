//! Starts and stops a whole meshca server: authority, TLS, gRPC, HTTP, background tasks.
//! `meshca-server` calls this; so do the end-to-end tests, on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rotator::clock::Clock;
use rotator::pki::CaCert;
use rotator::store::FileStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::authority::{Authority, OpenError, OpenOptions, Origin, Storage};
use crate::faces::admin::{self, Admin};
use crate::faces::grpc::Faces;
use crate::faces::http::{HttpState, Readiness};
use crate::issuing::auth::{Authenticator, TokenAuthenticator, write_bootstrap_token};
use crate::issuing::impersonation::{NodeAgents, PodDirectory};
use crate::issuing::issuance::{Audiences, SigningCore};
use crate::issuing::limits::Limits;
use crate::k8s::linkerd::LinkerdRoots;
use crate::k8s::pods::Pods;
use crate::k8s::store::KubeStore;
use crate::k8s::tokenreview::TokenReviewer;
use crate::process::config::{AuthMethod, Config, ConfigError, DEFAULT_TRUST_DOMAIN};
use crate::process::driver::{self, RotationHealth};
use crate::process::metrics::Metrics;
use crate::process::tls::{LiveTls, incoming};

/// How often the tokens file is checked for changes.
const TOKENS_RELOAD: Duration = Duration::from_secs(2);

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The authority could not be opened (corrupt state, expired anchor, ...).
    #[error(transparent)]
    Authority(#[from] OpenError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Anything else, with its reason.
    #[error("{0}")]
    Other(String),
}

/// A running server.
pub struct Server {
    /// The gRPC (TLS) address actually bound.
    pub grpc_addr: SocketAddr,
    /// The HTTP address actually bound.
    pub http_addr: SocketAddr,
    /// The SPIFFE bundle endpoint's address, when `[federation] bundle_endpoint_listen` is set.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// The federated trust domains' refresh status.
    pub federation: Arc<crate::federation::fetch::Federation>,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The authority served.
    pub authority: Arc<Authority>,
    /// The gRPC port's TLS material.
    pub tls: Arc<LiveTls>,
    /// The issuer-rotation driver's health.
    pub health: Arc<RotationHealth>,
    /// The readiness check behind `/readyz`.
    pub readiness: Arc<Readiness>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Whether the authority was created by this start.
    pub created: bool,
    /// The bootstrap token file, when this start created it.
    pub bootstrap_token: Option<PathBuf>,
    /// The state dir.
    pub state_dir: PathBuf,
    /// Whether this replica rotates now (always, with a state dir; the Lease holder on
    /// Kubernetes).
    pub leader: watch::Receiver<bool>,
    _leader_tx: Option<watch::Sender<bool>>,
    /// The TokenReview authenticator, when configured (tests read its call count).
    pub reviewer: Option<Arc<TokenReviewer>>,
    /// The pod directory node agents are checked against, when `[istio] trusted_node_agents`
    /// names any on Kubernetes.
    pub pods: Option<Arc<Pods>>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _lock: std::fs::File,
}

/// Checks the files and modules the configuration names, before anything is written:
/// `anchor_cert` readable and holding a certificate, a PKCS#11 module loadable and its PIN
/// file readable, the `https_web` bundle endpoint's certificate and key usable together, each
/// federated peer's bootstrap bundle readable and of its trust domain, each `web_ca_file`
/// holding a certificate. `meshca-server --print-config` runs it too. (Here, in start-up, not
/// in `config`: reading them is the features' business, and configuration depends on none.)
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    if let Some(p) = &config.anchor_cert {
        let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
            name: "anchor_cert".into(),
            value: p.display().to_string(),
            reason: e.to_string(),
        })?;
        if rotator::client::parse_pem_certs(&text).is_empty() {
            return Err(ConfigError {
                name: "anchor_cert".into(),
                value: p.display().to_string(),
                reason: "no CERTIFICATE in it".into(),
            });
        }
    }
    rotator::pkcs11::check_config(&config.keys).map_err(|(name, value, reason)| ConfigError {
        name: name.into(),
        value,
        reason,
    })?;
    crate::federation::check_files(&config.federation).map_err(|(name, value, reason)| {
        ConfigError {
            name: format!("federation.{name}"),
            value,
            reason,
        }
    })
}

impl Server {
    /// Opens (or creates) the authority and starts serving. Returns once every port is bound
    /// and any issuer step that was due has been taken. The steps, in order:
    ///
    /// 1. check the configuration and the files and modules it names; lock the state dir (one server per state dir);
    /// 2. connect to Kubernetes when enabled, and choose the store (a Secret, or the state dir);
    /// 3. open the authority (or create it, with a bootstrap token); take overdue issuer steps;
    /// 4. build the request path: authenticators, the signing core, readiness, TLS;
    /// 5. bind the ports, then start the tasks (see `docs/ARCHITECTURE.md`).
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let Opened {
            config,
            lock,
            kube,
            secret,
            authority,
            created,
            bootstrap_token,
        } = Opened::open(config, &clock).await?;
        let path = RequestPath::build(&config, &authority, kube.as_ref(), &clock)?;

        let grpc_listener = bind(config.listen).await?;
        let http_listener = bind(config.http_listen).await?;
        let grpc_addr = grpc_listener.local_addr().map_err(other)?;
        let http_addr = http_listener.local_addr().map_err(other)?;
        let endpoint = BundleEndpoint::bind(&config, &authority).await?;
        let bundle_endpoint_addr = endpoint.as_ref().map(|e| e.addr);
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let admin_socket = path
            .spawn_admin(&config, &authority, &mut tasks, &stop)
            .await?;
        let (leader, leader_tx) = elect(
            kube.as_ref().zip(secret),
            &config,
            &authority,
            &clock,
            &mut tasks,
            &stop,
        );
        if let Some(k) = &kube {
            k.spawn_tasks(&config, &authority, &path, &leader, &mut tasks, &stop);
        }
        path.spawn_background(&config, &authority, &leader, &mut tasks, &stop);
        let listeners = (grpc_listener, http_listener, endpoint);
        path.spawn_faces(&config, &authority, listeners, &mut tasks, &stop);

        Ok(Self {
            grpc_addr,
            http_addr,
            bundle_endpoint_addr,
            federation: path.federation,
            admin_socket,
            authority,
            tls: path.tls,
            health: path.health,
            readiness: path.readiness,
            metrics: path.metrics,
            created,
            bootstrap_token,
            state_dir: config.state_dir,
            leader,
            _leader_tx: leader_tx,
            reviewer: path.reviewer,
            pods: path.pods,
            shutdown,
            tasks,
            _lock: lock,
        })
    }

    /// Stops every task at once, as a crash would: no Lease release, no ledger close (tests of
    /// fail-over use it).
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }

    /// Stops serving and waits for every task to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The pod directory, when something reads it: node agents are checked against the pods on
/// their node, and the Linkerd restart gate counts proxies — on Kubernetes only (it lists every
/// pod in the cluster). A pod that goes takes the cached reviews of tokens bound to it along.
fn pod_directory(
    config: &Config,
    on_kubernetes: bool,
    metrics: &Metrics,
    reviewer: Option<&Arc<TokenReviewer>>,
) -> Option<Arc<Pods>> {
    let i = &config.istio;
    let wanted = (i.enabled && !i.trusted_node_agents.is_empty()) || linkerd_restarts(config);
    if !(on_kubernetes && wanted) {
        return None;
    }
    let pods = Pods::watching(
        i.pod_directory_max_staleness,
        crate::k8s::pods::Watching {
            stalls: metrics.pod_watch_stalls.clone(),
            expired: metrics.pod_watch_expired.clone(),
            ..Default::default()
        },
    );
    if let Some(r) = reviewer {
        let r = Arc::downgrade(r);
        pods.on_gone(Box::new(move |ns, name, uid| {
            if let Some(r) = r.upgrade() {
                r.forget_pod(ns, name, uid);
            }
        }));
    }
    Some(pods)
}

/// Steps 1–3 of [`Server::start`]: the configuration checked, the state dir locked, Kubernetes
/// connected, the authority opened (or created, with its bootstrap token), overdue steps taken.
struct Opened {
    config: Config,
    lock: std::fs::File,
    kube: Option<Kube>,
    secret: Option<Arc<KubeStore>>,
    authority: Arc<Authority>,
    created: bool,
    bootstrap_token: Option<PathBuf>,
}

impl Opened {
    async fn open(mut config: Config, clock: &Arc<dyn Clock>) -> Result<Self, StartError> {
        rotator::client::install_crypto_provider();
        config.validate()?;
        check_files(&config)?;
        let (files, lock) = lock_state_dir(&config)?;
        // Everything local (ledger, tokens, admin socket, bootstrap token) lives where the store
        // does: `<state dir>/meshca` when the configured dir belongs to another user.
        config.state_dir = files.dir().to_owned();
        // Before the state is read: the keys it names must be found in the configured store, and
        // new ones made there. One key backend per process.
        rotator::keys::set_ca_key_store(
            rotator::pkcs11::open_configured(&config.keys).map_err(StartError::Other)?,
        );
        let kube = Kube::connect(&config).await?;
        let secret = kube.as_ref().and_then(|k| k.state_secret(&config));
        let storage = storage(files, secret.clone());
        let (authority, created) = open_authority(&config, storage, clock.clone()).await?;
        let ledger_limits = config.limits.ledger();
        authority.ledger().with(|l| l.set_limits(ledger_limits));
        let bootstrap_token = created
            .then(|| {
                write_bootstrap_token(
                    &config.state_dir,
                    &authority.snapshot().bundle.trust_domain,
                    config.auth.bootstrap_token_expiry(clock.now()),
                )
            })
            .transpose()
            .map_err(other)?;
        catch_up(&authority).await;
        Ok(Self {
            config,
            lock,
            kube,
            secret,
            authority,
            created,
            bootstrap_token,
        })
    }
}

/// Step 4: everything a request goes through, built once and shared by the tasks.
struct RequestPath {
    limits: Arc<Limits>,
    auth: Arc<Authenticator>,
    reviewer: Option<Arc<TokenReviewer>>,
    pods: Option<Arc<Pods>>,
    metrics: Arc<Metrics>,
    core: Arc<SigningCore>,
    health: Arc<RotationHealth>,
    readiness: Arc<Readiness>,
    tls: Arc<LiveTls>,
    tls_config: Arc<rustls::ServerConfig>,
    federation: Arc<crate::federation::fetch::Federation>,
}

impl RequestPath {
    /// The authenticator chain (with TokenReview on Kubernetes), the signing core every face
    /// shares, readiness, and the gRPC port's live TLS.
    fn build(
        config: &Config,
        authority: &Arc<Authority>,
        kube: Option<&Kube>,
        clock: &Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let mut metrics = Metrics::new();
        metrics.registry_mut().register(
            "disk_write_failures",
            "Failed writes of local files (state, bundle, ledger); each is retried",
            authority.disk().counter(),
        );
        let metrics = Arc::new(metrics);
        let limits = Arc::new(Limits::new(
            config.limits.clone(),
            metrics.limit_refusals.clone(),
        ));
        let reviewer = kube.and_then(|k| k.token_reviewer(config, authority, clock, &limits));
        let auth = Arc::new(
            Authenticator::with_chain(
                &config.state_dir,
                config.auth.authenticators.clone(),
                reviewer.clone().map(|r| r as Arc<dyn TokenAuthenticator>),
            )
            .map_err(other)?,
        );
        let pods = pod_directory(config, kube.is_some(), &metrics, reviewer.as_ref());
        let i = &config.istio;
        let agents = NodeAgents::new(
            i.trusted_node_agents.clone(),
            pods.clone().map(|p| p as Arc<dyn PodDirectory>),
            i.node_authorization_wait,
        );
        let core = Arc::new(
            SigningCore::new(authority.clone(), auth.clone(), metrics.clone())
                .with_audiences(Audiences::of(config))
                .with_limits(limits.clone())
                .with_node_agents(agents),
        );
        let health = Arc::new(RotationHealth::default());
        let readiness = Arc::new(
            Readiness::new(core.clone(), health.clone(), config.limits.readyz_cache)
                .map_err(other)?,
        );
        let tls = LiveTls::new(authority, config.tls.clone()).map_err(StartError::Other)?;
        let tls_config = tls.server_config().map_err(StartError::Other)?;
        Ok(Self {
            limits,
            auth,
            reviewer,
            pods,
            metrics,
            core,
            health,
            readiness,
            tls,
            tls_config,
            federation: Arc::default(),
        })
    }

    /// The admin API on its 0600 unix socket in the state dir; returns the socket's path.
    async fn spawn_admin(
        &self,
        config: &Config,
        authority: &Arc<Authority>,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) -> Result<PathBuf, StartError> {
        let ready = self.readiness.clone();
        let admin = Admin::new(
            authority.clone(),
            self.health.clone(),
            Arc::new(move || ready.check().is_ok()),
        )
        .with_federation(self.federation.clone());
        let (socket, task) = admin::serve(&config.state_dir, admin, stop.clone())
            .await
            .map_err(|e| StartError::Other(format!("admin socket: {e}")))?;
        tasks.spawn(async move {
            let _ = task.await;
        });
        Ok(socket)
    }

    /// The rotation driver and the federated trust domains' refreshers (both acting while
    /// leader), the ledger writer, the TLS certificate's renewal, and the tokens-file reloader.
    fn spawn_background(
        &self,
        config: &Config,
        authority: &Arc<Authority>,
        leader: &watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        tasks.spawn(driver::drive_while_leader(
            authority.clone(),
            self.health.clone(),
            self.metrics.clone(),
            config.anchor.clone(),
            leader.clone(),
            stop.clone(),
        ));
        tasks.spawn(crate::authority::write_ledger(
            authority.clone(),
            stop.clone(),
        ));
        tasks.spawn(self.tls.clone().maintain(authority.clone(), stop.clone()));
        tasks.spawn(crate::issuing::auth::reload_tokens(
            self.auth.clone(),
            TOKENS_RELOAD,
            stop.clone(),
        ));
        crate::federation::fetch::spawn(
            &self.federation,
            &config.federation,
            authority,
            leader,
            tasks,
            stop,
        );
    }

    /// The gRPC faces on the TLS port, the HTTP port, and the SPIFFE bundle endpoint if bound.
    fn spawn_faces(
        &self,
        config: &Config,
        authority: &Arc<Authority>,
        (grpc, http, endpoint): (TcpListener, TcpListener, Option<BundleEndpoint>),
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        let conns = incoming(
            grpc,
            self.tls_config.clone(),
            self.limits.clone(),
            stop.clone(),
        );
        let faces = Faces::of(config, &self.core, &self.limits);
        let cfg = config.limits.clone();
        let grpc_stop = stop.clone();
        tasks.spawn(async move { crate::faces::grpc::serve(conns, faces, &cfg, grpc_stop).await });
        let state = HttpState {
            issuer: self.core.clone(),
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            federation: self.federation.clone(),
        };
        tasks.spawn(crate::faces::http::serve(
            http,
            state,
            self.limits.clone(),
            stop.clone(),
        ));
        if let Some(e) = endpoint {
            e.spawn(self, authority, tasks, stop);
        }
    }
}

/// The SPIFFE bundle endpoint (`[federation]`), bound: its listener and TLS.
struct BundleEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
    tls: crate::federation::EndpointTls,
    refresh_hint: std::time::Duration,
}

impl BundleEndpoint {
    /// Its TLS (the profile's certificate) and its port, when configured.
    async fn bind(config: &Config, authority: &Authority) -> Result<Option<Self>, StartError> {
        let Some(listen) = config.federation.bundle_endpoint_listen else {
            return Ok(None);
        };
        let tls = crate::federation::endpoint_tls(&config.federation, authority)
            .map_err(StartError::Other)?;
        let listener = bind(listen).await?;
        let addr = listener.local_addr().map_err(other)?;
        Ok(Some(Self {
            listener,
            addr,
            tls,
            refresh_hint: config.federation.bundle_endpoint_refresh_hint,
        }))
    }

    /// Serves it, and keeps its SVID renewed (`https_spiffe`).
    fn spawn(
        self,
        path: &RequestPath,
        authority: &Arc<Authority>,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        if let Some(live) = self.tls.live {
            tasks.spawn(live.maintain(authority.clone(), stop.clone()));
        }
        tasks.spawn(crate::faces::http::serve_app(
            self.listener,
            crate::federation::router(path.core.clone(), self.refresh_hint),
            Some(tokio_rustls::TlsAcceptor::from(self.tls.config)),
            path.limits.clone(),
            stop.clone(),
        ));
    }
}

/// Whether Linkerd proxies are counted for the activate gate: on Kubernetes, with the Linkerd
/// face, when meshca publishes Linkerd's trust roots (it then knows when new anchors reached
/// them).
fn linkerd_restarts(config: &Config) -> bool {
    config.kubernetes.enabled && config.linkerd.enabled && config.kubernetes.bundle.linkerd
}

fn other(e: impl std::fmt::Display) -> StartError {
    StartError::Other(e.to_string())
}

/// Step 1: the state dir, created 0700 if missing (or meshca's own directory in it when it belongs
/// to another user, as an emptyDir does), and its lock (held while the server runs).
fn lock_state_dir(config: &Config) -> Result<(FileStore, std::fs::File), StartError> {
    let files = FileStore::open(&config.state_dir).map_err(OpenError::Store)?;
    let lock = files.lock().map_err(OpenError::Store)?;
    Ok((files, lock))
}

/// Kubernetes, when `[kubernetes] enabled`: the client and meshca's own namespace.
struct Kube {
    client: kube::Client,
    namespace: String,
}

impl Kube {
    /// Step 2: a client for the configured API server (no request is made yet).
    async fn connect(config: &Config) -> Result<Option<Self>, StartError> {
        let k = &config.kubernetes;
        if !k.enabled {
            return Ok(None);
        }
        Ok(Some(Self {
            client: crate::k8s::client(k).await.map_err(StartError::Other)?,
            namespace: k.own_namespace(),
        }))
    }

    /// The TokenReview authenticator, when `tokenreview` is in the chain.
    fn token_reviewer(
        &self,
        config: &Config,
        authority: &Authority,
        clock: &Arc<dyn Clock>,
        limits: &Arc<Limits>,
    ) -> Option<Arc<TokenReviewer>> {
        let k = &config.kubernetes;
        config
            .auth
            .authenticators
            .contains(&AuthMethod::Tokenreview)
            .then(|| {
                Arc::new(TokenReviewer::new(
                    self.client.clone(),
                    authority.snapshot().bundle.trust_domain.clone(),
                    clock.clone(),
                    k.token_cache_ttl,
                    k.token_cache_size,
                    limits.clone(),
                ))
            })
    }

    /// The state Secret, when one is configured (replicas share it).
    fn state_secret(&self, config: &Config) -> Option<Arc<KubeStore>> {
        let name = &config.kubernetes.state_secret;
        (!name.is_empty())
            .then(|| Arc::new(KubeStore::new(self.client.clone(), &self.namespace, name)))
    }

    /// The Kubernetes tasks beside the request path: bundle publication, the cert-manager issuer
    /// Secret, the pod directory and the Linkerd trust-roots reader (each when configured).
    fn spawn_tasks(
        &self,
        config: &Config,
        authority: &Arc<Authority>,
        path: &RequestPath,
        leader: &watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        self.publish_bundles(config, authority, leader, tasks, stop);
        if config.istio.istiod_certificate.enabled() {
            tasks.spawn(crate::k8s::istiod::run(
                self.client.clone(),
                config.istio.istiod_certificate.clone(),
                authority.clone(),
                leader.clone(),
                stop.clone(),
            ));
        }
        if let Some((ns, name)) = config.kubernetes.issuer_secret() {
            tasks.spawn(crate::k8s::issuer_secret::follow(
                self.client.clone(),
                (ns.to_owned(), name.to_owned()),
                authority.clone(),
                leader.clone(),
                path.metrics.issuer_source_refusals.clone(),
                stop.clone(),
            ));
        }
        if config.kubernetes.pod_certificates.enabled {
            tasks.spawn(crate::k8s::podcerts::run(
                self.client.clone(),
                config.kubernetes.pod_certificates.clone(),
                path.core.clone(),
                leader.clone(),
                stop.clone(),
            ));
        }
        if let Some(p) = &path.pods {
            tasks.spawn(p.clone().run(self.client.clone(), stop.clone()));
            if linkerd_restarts(config) {
                let roots = LinkerdRoots::new(p.clone(), &config.linkerd.control_plane_namespace);
                authority.count_restart_bound_with(roots.clone());
                tasks.spawn(roots.run(self.client.clone(), stop.clone()));
            }
        }
    }

    /// The bundle ConfigMaps, when a namespace selector is configured (the leader writes).
    fn publish_bundles(
        &self,
        config: &Config,
        authority: &Arc<Authority>,
        leader: &watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        let b = &config.kubernetes.bundle;
        if b.namespace_selector.is_empty() {
            return;
        }
        tasks.spawn(crate::k8s::publish::run(
            self.client.clone(),
            b.clone(),
            authority.clone(),
            leader.clone(),
            stop.clone(),
        ));
    }
}

/// Step 2: where the state is committed: the shared Secret when configured (the state dir then
/// keeps the bundle file and the ledger only), else the state dir itself.
fn storage(files: FileStore, secret: Option<Arc<KubeStore>>) -> Storage {
    match secret {
        Some(secret) => Storage {
            dir: files.state_dir(),
            state: secret,
        },
        None => Storage::files(files),
    }
}

/// Step 3: the authority, loaded or created. `true` when this start created it.
async fn open_authority(
    config: &Config,
    storage: Storage,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Authority>, bool), StartError> {
    let upstream_anchor = match &config.anchor_cert {
        None => None,
        Some(p) => {
            let bad = |e: &dyn std::fmt::Display| {
                StartError::Other(format!("--anchor-cert {}: {e}", p.display()))
            };
            let text = std::fs::read_to_string(p).map_err(|e| bad(&e))?;
            Some(CaCert::from_pem(&text).map_err(|e| bad(&e))?)
        }
    };
    let how = OpenOptions {
        trust_domain: config.trust_domain.clone(),
        default_trust_domain: DEFAULT_TRUST_DOMAIN.parse().map_err(other)?,
        upstream_anchor,
    };
    let (authority, origin) = Authority::open(storage, how, config.policy.clone(), clock).await?;
    Ok((Arc::new(authority), origin == Origin::Created))
}

/// Step 3: whatever issuer step is overdue (an expired issuer after downtime, a missed
/// activation) happens before the first request is served. A failure is the driver's to retry.
async fn catch_up(authority: &Authority) {
    match driver::catch_up(authority, 8).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("took {n} overdue issuer rotation step(s) at start-up"),
        Err(e) => tracing::error!(
            "an overdue issuer rotation step failed at start-up, the driver will retry: {e}"
        ),
    }
}

/// Connections the kernel completes and holds for `accept`: at `limits.max_connections` the
/// server stops accepting and new connections wait here (beyond it, the kernel drops SYNs and
/// clients' TCP retransmits them). Linux caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

/// Who rotates: with the state in a shared Secret, the Lease holder (and every replica follows
/// the Secret); otherwise this process, always. Returns the leader flag and, when always
/// leader, its sender (kept for the server's life so the value stays put).
fn elect(
    shared: Option<(&Kube, Arc<KubeStore>)>,
    config: &Config,
    authority: &Arc<Authority>,
    clock: &Arc<dyn Clock>,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> (watch::Receiver<bool>, Option<watch::Sender<bool>>) {
    let (leader_tx, leader) = watch::channel(shared.is_none());
    let Some((k, secret)) = shared else {
        return (leader, Some(leader_tx));
    };
    let kc = &config.kubernetes;
    tasks.spawn(crate::k8s::lease::run(
        crate::k8s::lease::Campaign {
            api: kube::Api::namespaced(k.client.clone(), &k.namespace),
            name: kc.lease.clone(),
            me: kc.own_identity(),
            duration: kc.lease_duration,
            clock: clock.clone(),
        },
        leader_tx,
        stop.clone(),
    ));
    tasks.spawn(crate::k8s::follow::follow(
        authority.clone(),
        secret,
        stop.clone(),
    ));
    (leader, None)
}
