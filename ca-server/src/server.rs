//! Starts and stops a whole meshca server: authority, TLS, gRPC, HTTP, background tasks.
//! `meshca-server` calls this; so do the end-to-end tests, on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use meshca_proto::v1::identity_service_server::IdentityServiceServer;
use rotator::clock::Clock;
use rotator::store::FileStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, Admin};
use crate::auth::{Authenticator, write_bootstrap_token};
use crate::authority::{Authority, OpenError, OpenOptions, Origin};
use crate::config::{AuthMethod, Config, ConfigError, DEFAULT_TRUST_DOMAIN, MAX_REQUEST_BYTES};
use crate::grpc::Identity;
use crate::http::{HttpState, Readiness, router};
use crate::issuance::Issuer;
use crate::metrics::Metrics;
use crate::rotation::{self, RotationHealth};
use crate::tls::{LiveTls, incoming};
use rotator::pki::CaCert;

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
    pub reviewer: Option<Arc<crate::k8s::tokenreview::TokenReviewer>>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _lock: std::fs::File,
}

impl Server {
    /// Opens (or creates) the authority and starts serving. Returns once every port is bound
    /// and any issuer step that was due has been taken.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        rotator::client::install_crypto_provider();
        config.validate()?;
        let other = |e: &dyn std::fmt::Display| StartError::Other(e.to_string());
        let store = FileStore::open(&config.state_dir).map_err(OpenError::Store)?;
        let lock = store.lock().map_err(OpenError::Store)?;
        let upstream_anchor = match &config.anchor_cert {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    StartError::Other(format!("--anchor-cert {}: {e}", p.display()))
                })?;
                Some(CaCert::from_pem(&text).map_err(|e| {
                    StartError::Other(format!("--anchor-cert {}: {e}", p.display()))
                })?)
            }
        };
        let how = OpenOptions {
            trust_domain: config.trust_domain.clone(),
            default_trust_domain: DEFAULT_TRUST_DOMAIN.parse().map_err(|e| other(&e))?,
            upstream_anchor,
        };
        let kcfg = &config.kubernetes;
        let client = if kcfg.enabled {
            Some(kcfg.client().await.map_err(StartError::Other)?)
        } else {
            None
        };
        let namespace = kcfg.own_namespace();
        let remote = match &client {
            Some(c) if !kcfg.state_secret.is_empty() => Some(Arc::new(
                crate::k8s::store::KubeStore::new(c.clone(), &namespace, &kcfg.state_secret),
            )),
            _ => None,
        };
        let replicated = remote.is_some();
        let (authority, origin) =
            Authority::open_with(store, remote, how, config.policy.clone(), clock.clone()).await?;
        let authority = Arc::new(authority);
        let created = origin == Origin::Created;
        let bootstrap_token = if created {
            let td = authority.snapshot().bundle.trust_domain.clone();
            Some(write_bootstrap_token(&config.state_dir, &td).map_err(|e| other(&e))?)
        } else {
            None
        };
        // Whatever issuer step is overdue (an expired issuer after downtime, a missed activation)
        // happens before the first request is served. A failure here is the driver's to retry.
        match rotation::catch_up(&authority, 8).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("took {n} overdue issuer rotation step(s) at start-up"),
            Err(e) => tracing::error!(
                "an overdue issuer rotation step failed at start-up, the driver will retry: {e}"
            ),
        }

        let reviewer = match &client {
            Some(c)
                if config
                    .auth
                    .authenticators
                    .contains(&AuthMethod::Tokenreview) =>
            {
                Some(Arc::new(crate::k8s::tokenreview::TokenReviewer::new(
                    c.clone(),
                    authority.snapshot().bundle.trust_domain.clone(),
                    clock.clone(),
                    kcfg.token_cache_ttl,
                    kcfg.token_cache_size,
                )))
            }
            _ => None,
        };
        let auth = Arc::new(
            Authenticator::with_chain(
                &config.state_dir,
                config.auth.authenticators.clone(),
                reviewer.clone(),
            )
            .map_err(|e| other(&e))?,
        );
        let metrics = Arc::new(Metrics::new());
        let issuer = Arc::new(
            Issuer::new(authority.clone(), auth.clone(), metrics.clone()).with_audiences(
                crate::issuance::Audiences {
                    meshca: kcfg.token_audience.clone(),
                    istio: config.istio.token_audience.clone(),
                    linkerd: config.linkerd.token_audience.clone(),
                },
            ),
        );
        let health = Arc::new(RotationHealth::default());
        let probe_key = rotator::pki::SecretKey::generate_p256().map_err(|e| other(&e))?;
        let probe_id = format!(
            "spiffe://{}/meshca/readiness-probe",
            authority.snapshot().bundle.trust_domain
        )
        .parse()
        .map_err(|e| other(&e))?;
        let probe_csr = rotator::client::make_csr(&probe_id, &probe_key).map_err(|e| other(&e))?;
        let probe = crate::signing::parse_csr(&probe_csr).map_err(|e| other(&e))?;
        let readiness = Arc::new(Readiness {
            issuer: issuer.clone(),
            probe,
            health: health.clone(),
        });
        let tls = LiveTls::new(&authority, config.tls.clone()).map_err(StartError::Other)?;
        let tls_config = tls.server_config().map_err(StartError::Other)?;

        let grpc_listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let http_listener = TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.http_listen,
                source,
            })?;
        let grpc_addr = grpc_listener.local_addr().map_err(|e| other(&e))?;
        let http_addr = http_listener.local_addr().map_err(|e| other(&e))?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let ready = readiness.clone();
        let admin = Admin::new(
            authority.clone(),
            health.clone(),
            Arc::new(move || ready.check().is_ok()),
        );
        let (admin_socket, admin_task) =
            admin::serve(&config.state_dir, admin, shutdown_rx.clone())
                .await
                .map_err(|e| StartError::Other(format!("admin socket: {e}")))?;
        tasks.spawn(async move {
            let _ = admin_task.await;
        });

        // Who rotates: with the state in a Secret, the Lease holder; otherwise this process.
        let (leader_tx, leader_rx) = watch::channel(!replicated);
        let leader_tx = if let (Some(c), true) = (&client, replicated) {
            tasks.spawn(crate::k8s::lease::run(
                kube::Api::namespaced(c.clone(), &namespace),
                kcfg.lease.clone(),
                kcfg.own_identity(),
                kcfg.lease_duration,
                leader_tx,
                shutdown_rx.clone(),
            ));
            tasks.spawn(crate::k8s::store::follow(
                authority.clone(),
                shutdown_rx.clone(),
            ));
            None
        } else {
            // Always leader; the sender lives as long as the server so the value stays put.
            Some(leader_tx)
        };
        if let Some(c) = &client
            && !kcfg.bundle.namespace_selector.is_empty()
        {
            tasks.spawn(crate::k8s::publish::run(
                c.clone(),
                kcfg.bundle.clone(),
                authority.clone(),
                leader_rx.clone(),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(rotation::drive_while_leader(
            authority.clone(),
            health.clone(),
            metrics.clone(),
            config.anchor.clone(),
            leader_rx.clone(),
            shutdown_rx.clone(),
        ));
        // The issuance ledger: written in batches, closed cleanly at shutdown.
        let ledger_authority = authority.clone();
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            let a = ledger_authority;
            loop {
                let stopping = tokio::select! {
                    () = tokio::time::sleep(crate::ledger::FLUSH_EVERY) => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                let (now, skew) = (a.clock().now(), a.policy().clock_skew);
                let a2 = a.clone();
                let r = tokio::task::spawn_blocking(move || {
                    if stopping {
                        a2.ledger().close(now, skew)
                    } else {
                        a2.ledger().flush(now, skew)
                    }
                })
                .await;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(
                        "issuance ledger {}: write failed, will retry: {e}",
                        a.ledger().path().display()
                    ),
                    Err(e) => tracing::error!("issuance ledger task failed: {e}"),
                }
                if stopping {
                    return;
                }
            }
        });
        tasks.spawn(tls.clone().maintain(authority.clone(), shutdown_rx.clone()));

        let identity = IdentityServiceServer::new(Identity::new(issuer.clone()));
        let istio = config.istio.enabled.then(|| {
            meshca_proto::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(
                crate::istio::Istio::new(issuer.clone()),
            )
        });
        let linkerd = config.linkerd.enabled.then(|| {
            linkerd2_proxy_api::identity::identity_server::IdentityServer::new(
                crate::linkerd::Linkerd::new(
                    issuer.clone(),
                    config.linkerd.control_plane_namespace.clone(),
                ),
            )
        });
        let conns = incoming(grpc_listener, tls_config, shutdown_rx.clone());
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            let r = tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(limit_request_body))
                .add_service(identity)
                .add_optional_service(istio)
                .add_optional_service(linkerd)
                .serve_with_incoming_shutdown(conns, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("gRPC server stopped: {e}");
            }
        });

        let app = router(Arc::new(HttpState {
            issuer: issuer.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        }));
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            let r = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("HTTP server stopped: {e}");
            }
        });

        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(TOKENS_RELOAD) => {}
                    _ = stop.changed() => return,
                }
                match auth.reload_if_changed() {
                    Ok(true) => tracing::info!(tokens = auth.token_count(), "tokens file reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        "tokens file not reloaded, keeping the previous tokens: {e}"
                    ),
                }
            }
        });

        Ok(Self {
            grpc_addr,
            http_addr,
            admin_socket,
            authority,
            tls,
            health,
            readiness,
            metrics,
            created,
            bootstrap_token,
            state_dir: config.state_dir,
            leader: leader_rx,
            _leader_tx: leader_tx,
            reviewer,
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

/// Caps every gRPC request body at [`MAX_REQUEST_BYTES`] (plus the 5-byte frame header). A
/// larger one fails while it is being read, with `InvalidArgument`, before it is buffered.
fn limit_request_body(req: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    req.map(|body| {
        let limited = http_body_util::Limited::new(body, MAX_REQUEST_BYTES + 5).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Box::new(tonic::Status::invalid_argument(format!(
                    "request over {} KiB",
                    MAX_REQUEST_BYTES / 1024
                ))) as Box<dyn std::error::Error + Send + Sync>
            } else {
                e
            }
        });
        tonic::body::Body::new(limited)
    })
}
