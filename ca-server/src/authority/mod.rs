//! The running authority: the committed [`AuthorityState`], the store it is committed to, and
//! the immutable [`Snapshot`] the request path reads.
//!
//! Every change goes through [`Authority::transition`]: compute the next state (a pure function
//! of the current state and `now`), commit it to the store, and only then publish it. A crash
//! between commit and publish loses nothing: the next start loads what was committed.

pub mod ledger;

use std::sync::Arc;

use rotator::clock::Clock;
use rotator::pki::CertId;
use rotator::policy::Policy;
use rotator::spiffe::TrustDomain;
use rotator::state::{AuthorityState, StateError};
use rotator::store::{FileStore, StateDir, Store, StoreError};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};

/// The issuer that signs leaves right now, ready to sign.
pub struct SigningIssuer {
    /// Its id.
    pub id: CertId,
    /// The anchor it chains to.
    pub anchor: CertId,
    /// Its certificate.
    pub der: CertificateDer<'static>,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// The signer (certificate name, key identifier and key).
    pub signer: rcgen::Issuer<'static, rotator::pki::SecretKey>,
}

impl std::fmt::Debug for SigningIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningIssuer")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The trust bundle being served.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Version; only ever increases.
    pub version: u64,
    /// The anchors, DER, oldest first.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Their ids, in the same order.
    pub ids: Vec<CertId>,
    /// The anchors as PEM.
    pub pem: String,
    /// Federated trust domains' bundles.
    pub federated: Vec<Federated>,
}

/// A federated trust domain's anchors, as the request path hands them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federated {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its anchors, DER.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Its endpoint's `spiffe_sequence`.
    pub sequence: u64,
}

/// What the request path reads: one immutable view of the committed state.
#[derive(Debug)]
pub struct Snapshot {
    /// The state generation this view was made from.
    pub generation: u64,
    /// The signing issuer, if there is one.
    pub issuer: Option<Arc<SigningIssuer>>,
    /// The bundle.
    pub bundle: Arc<Bundle>,
    /// Every issuer the authority holds (prepared, active, retired), DER: a client
    /// certificate's chain must pass through one of them.
    pub issuers: Arc<Vec<CertificateDer<'static>>>,
    /// Identities refused whatever the credential (`meshca deny`).
    pub denied: Arc<Vec<rotator::state::Denial>>,
    /// Nodes whose agents act for nobody (`meshca deny add --node`).
    pub denied_nodes: Arc<Vec<rotator::state::NodeDenial>>,
    /// Revoked issuers: their leaves no longer authenticate.
    pub revoked: Arc<Vec<rotator::state::Revocation>>,
}

impl Snapshot {
    fn of(state: &AuthorityState) -> Result<Self, StateError> {
        let issuer = match state.active_issuer() {
            Some(i) => Some(Arc::new(SigningIssuer {
                id: i.cert.id().clone(),
                anchor: i.anchor.clone(),
                der: i.cert.der().clone(),
                not_before: i.cert.info.not_before,
                not_after: i.cert.info.not_after,
                signer: i.cert.rcgen_issuer(i.key.clone())?,
            })),
            None => None,
        };
        let anchors: Vec<_> = state.bundle().collect();
        let bundle = Arc::new(Bundle {
            trust_domain: state.trust_domain.clone(),
            version: state.bundle_version,
            anchors: anchors.iter().map(|a| a.cert.der().clone()).collect(),
            ids: anchors.iter().map(|a| a.cert.id().clone()).collect(),
            pem: anchors.iter().map(|a| a.cert.pem()).collect(),
            federated: state
                .federated
                .iter()
                .map(|f| Federated {
                    trust_domain: f.trust_domain.clone(),
                    anchors: rotator::client::parse_pem_certs(&f.anchors_pem),
                    sequence: f.sequence,
                })
                .collect(),
        });
        Ok(Self {
            generation: state.generation,
            issuer,
            bundle,
            issuers: Arc::new(state.issuers.iter().map(|i| i.cert.der().clone()).collect()),
            denied: Arc::new(state.denied.clone()),
            denied_nodes: Arc::new(state.denied_nodes.clone()),
            revoked: Arc::new(state.revoked.clone()),
        })
    }
}

/// The authority could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The state dir is corrupt, unreadable or in use.
    #[error("cannot use the state dir: {0}")]
    Store(#[from] StoreError),
    /// The configuration contradicts the stored state.
    #[error("{0}")]
    Mismatch(String),
    /// The stored state cannot be served safely.
    #[error("{0}")]
    Unusable(String),
    /// A transition failed.
    #[error("{0}")]
    State(#[from] StateError),
    /// The issuance ledger file cannot be written.
    #[error("issuance ledger: {0}")]
    Ledger(String),
    /// Replacing an unusable issuer at start-up failed.
    #[error("replacing the unusable active issuer failed: {0}")]
    Transition(#[from] TransitionError),
}

/// A transition could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The transition does not apply to the current state.
    #[error("{0}")]
    State(#[from] StateError),
    /// The store refused the commit; nothing changed.
    #[error("commit failed, nothing changed: {0}")]
    Store(#[from] StoreError),
}

/// Logs the journal entries of `next` newer than generation `since`.
fn log_journal(since: u64, next: &AuthorityState, prefix: &str) {
    for e in next.history.iter().filter(|e| e.generation > since) {
        tracing::info!(target: "meshca::journal", generation = e.generation, "{prefix}{}", e.what);
    }
}

/// How often a transition re-reads and re-decides after another replica committed first.
const CONFLICT_RETRIES: u32 = 5;

/// How to open an authority.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The configured trust domain, if any.
    pub trust_domain: Option<TrustDomain>,
    /// The trust domain of a new authority when none is configured.
    pub default_trust_domain: TrustDomain,
    /// Upstream mode: the anchor whose key lives elsewhere.
    pub upstream_anchor: Option<rotator::pki::CaCert>,
}

/// How the authority came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from the store.
    Loaded,
    /// Created now (no state existed).
    Created,
}

/// Where an authority keeps what it commits, and its local outputs.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Where the state is committed (a state dir, a Kubernetes Secret, ...).
    pub state: Arc<dyn Store>,
    /// The local state dir: `bundle.pem` is written here after every change, whichever store
    /// holds the state, and the issuance ledger lives here.
    pub dir: StateDir,
}

impl Storage {
    /// State, bundle and ledger all in one state dir (the embedded default).
    pub fn files(store: FileStore) -> Self {
        Self {
            dir: store.state_dir(),
            state: Arc::new(store),
        }
    }
}

/// The running authority.
pub struct Authority {
    policy: Policy,
    ledger: crate::authority::ledger::LedgerHandle,
    clock: Arc<dyn Clock>,
    storage: Storage,
    state: Mutex<AuthorityState>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    disk: crate::process::disk::DiskWrites,
    restart_bound: std::sync::OnceLock<Arc<dyn RestartBoundSource>>,
}

/// Counts the workloads that read trust anchors only when they start (Linkerd's proxies) against
/// `anchors`, the bundle's: the seam between the gates and where such workloads are seen
/// (`k8s::linkerd`).
pub trait RestartBoundSource: Send + Sync + std::fmt::Debug {
    /// How many of them hold all of `anchors`, or why that cannot be said.
    fn count(&self, anchors: &[CertificateDer<'static>]) -> rotator::ledger::RestartBound;
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("generation", &self.snapshot().generation)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the authority from `storage.state`, or creates one when that store has never held
    /// one (around `how.upstream_anchor` if given: upstream mode, no anchor key here). When
    /// another replica creates it first, that one is served.
    ///
    /// A loaded state must be for the configured trust domain (when one is set), hold the
    /// upstream anchor (when one is given), and have no expired anchor in its bundle. An expired
    /// or missing issuer is the rotation driver's to replace (`driver::catch_up`).
    pub async fn open(
        storage: Storage,
        how: OpenOptions,
        policy: Policy,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Origin), OpenError> {
        let now = clock.now();
        let store = &storage.state;
        let origin_name = store.origin();
        let (state, origin) = match store.load().await? {
            Some(s) => {
                check_loaded(&s, &how, &origin_name)?;
                (s, Origin::Loaded)
            }
            None => {
                let td = how.trust_domain.unwrap_or(how.default_trust_domain);
                let s = match how.upstream_anchor {
                    Some(anchor) => AuthorityState::with_anchor(td, anchor, None, &policy, now)?,
                    None => AuthorityState::genesis(td, &policy, now)?,
                };
                match store.commit(None, &s).await {
                    Ok(()) => (s, Origin::Created),
                    // Another replica created it first: serve that one.
                    Err(StoreError::Conflict { .. }) if store.shared() => {
                        match store.load().await? {
                            Some(theirs) => (theirs, Origin::Loaded),
                            None => {
                                return Err(OpenError::Unusable(format!(
                                    "{origin_name}: creating it conflicted, yet it cannot be read back"
                                )));
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        for a in state.bundle() {
            if a.cert.info.not_after <= now {
                return Err(OpenError::Unusable(format!(
                    "{origin_name}: trust anchor {} in the bundle expired at {}. Nothing signed under it verifies any more; \
                     meshca will not serve it. Recover by starting a new authority (move the state dir aside) \
                     and restarting workloads so they fetch the new bundle.",
                    a.cert.id(),
                    rotator::clock::rfc3339(a.cert.info.not_after)
                )));
            }
        }
        let disk = crate::process::disk::DiskWrites::default();
        if let Err(e) = storage.dir.write_bundle(&state) {
            disk.failed("bundle", &e);
        }
        let ledger = open_ledger(
            &storage,
            origin == Origin::Created && !store.shared(),
            now,
            &policy,
        )?;
        let snapshot = watch::Sender::new(Arc::new(Snapshot::of(&state)?));
        Ok((
            Self {
                ledger,
                policy,
                clock,
                storage,
                state: Mutex::new(state),
                snapshot,
                disk,
                restart_bound: std::sync::OnceLock::new(),
            },
            origin,
        ))
    }

    /// Applies `f` to the committed state at `now`. `Ok(None)` from `f` means nothing to do.
    /// Otherwise the result is committed to the store and then published; on any error nothing
    /// changes. Transitions are serialized.
    pub async fn transition<F>(&self, mut f: F) -> Result<bool, TransitionError>
    where
        F: FnMut(&AuthorityState, OffsetDateTime) -> Result<Option<AuthorityState>, StateError>,
    {
        let mut state = self.state.lock().await;
        let mut attempts = 0;
        loop {
            let now = self.clock.now();
            let Some(next) = f(&state, now)? else {
                return Ok(false);
            };
            next.check()?;
            let snapshot = Snapshot::of(&next)?;
            match self
                .storage
                .state
                .commit(Some(state.generation), &next)
                .await
            {
                Ok(()) => {}
                // Another replica committed first: take what it committed and decide again.
                Err(StoreError::Conflict { expected, found })
                    if self.storage.state.shared() && attempts < CONFLICT_RETRIES =>
                {
                    attempts += 1;
                    tracing::info!(target: "meshca::journal", expected, found, "another replica committed first; re-reading and deciding again");
                    if let Some(theirs) = self.storage.state.load().await? {
                        self.install(&mut state, theirs)?;
                    }
                    continue;
                }
                Err(e) => {
                    if matches!(e, StoreError::Io { .. }) {
                        self.disk.failed("state", &e);
                    }
                    // A write can fail after its commit point (state.json renamed, then its
                    // directory's fsync failed; an API call that timed out after the server
                    // applied it). Ask the store what it holds: if that is newer than ours, take
                    // it — disk and memory must never disagree — and, if it is not exactly ours,
                    // decide again on top of it.
                    let stored = self.storage.state.load().await.ok().flatten();
                    if let Some(stored) = stored
                        && stored.generation > state.generation
                        && attempts < CONFLICT_RETRIES
                    {
                        attempts += 1;
                        let ours = format!("{stored:?}") == format!("{next:?}");
                        tracing::warn!(target: "meshca::journal", generation = stored.generation, ours,
                            "the store reported an error, yet holds a newer state: taking it ({e})");
                        self.install(&mut state, stored)?;
                        if ours {
                            return Ok(true);
                        }
                        continue;
                    }
                    return Err(e.into());
                }
            }
            if !self.storage.state.shared() {
                self.disk.ok("state");
            }
            self.write_bundle(&next);
            rotator::store::fault_point("transition:after-commit");
            log_journal(state.generation, &next, "");
            destroy_released_keys(&state, &next);
            *state = next;
            self.snapshot.send_replace(Arc::new(snapshot));
            return Ok(true);
        }
    }

    /// Takes a state another replica committed, if it is newer than ours (generations only
    /// grow, so a bundle version never goes backwards). `Ok(true)` when adopted.
    pub async fn adopt(&self, theirs: AuthorityState) -> Result<bool, TransitionError> {
        let mut state = self.state.lock().await;
        self.install(&mut state, theirs)
    }

    /// Makes `theirs` the state if it is newer; `Ok(true)` when it was.
    fn install(
        &self,
        state: &mut AuthorityState,
        theirs: AuthorityState,
    ) -> Result<bool, TransitionError> {
        if theirs.generation <= state.generation {
            return Ok(false);
        }
        theirs.check()?;
        let snapshot = Snapshot::of(&theirs)?;
        self.write_bundle(&theirs);
        log_journal(state.generation, &theirs, "(another replica) ");
        *state = theirs;
        self.snapshot.send_replace(Arc::new(snapshot));
        Ok(true)
    }

    /// Writes `bundle.pem` for `state`; a failure is recorded ([`Authority::disk`]) and retried
    /// by [`Authority::retry_outputs`], never returned: the state is committed either way.
    fn write_bundle(&self, state: &AuthorityState) {
        match self.storage.dir.write_bundle(state) {
            Ok(()) => self.disk.ok("bundle"),
            Err(e) => self.disk.failed("bundle", &e),
        }
    }

    /// Writes again the local outputs whose last write failed (`bundle.pem`). Called by the
    /// ledger writer every tick; cheap when nothing is failing.
    pub async fn retry_outputs(&self) {
        if self.disk.is_failing("bundle") {
            let state = self.state.lock().await;
            self.write_bundle(&state);
        }
    }

    /// Failed local writes, for `/readyz` and `/metrics`.
    pub fn disk(&self) -> &crate::process::disk::DiskWrites {
        &self.disk
    }

    /// Re-reads a shared store and adopts its state if newer (no-op for a store only this
    /// process writes).
    pub async fn resync(&self) -> Result<bool, TransitionError> {
        if !self.storage.state.shared() {
            return Ok(false);
        }
        match self.storage.state.load().await? {
            Some(theirs) => self.adopt(theirs).await,
            None => Ok(false),
        }
    }

    /// Where the state is committed and the local outputs.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The current view for the request path.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Reads the committed state.
    pub async fn read<R>(&self, f: impl FnOnce(&AuthorityState) -> R) -> R {
        f(&*self.state.lock().await)
    }

    /// A copy of the committed state.
    pub async fn state(&self) -> AuthorityState {
        self.state.lock().await.clone()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The issuance ledger.
    pub fn ledger(&self) -> &crate::authority::ledger::LedgerHandle {
        &self.ledger
    }

    /// The ledger's view for the gates of the current phase (bundle convergence is counted
    /// against the current bundle version).
    pub async fn ledger_summary(&self) -> rotator::ledger::LedgerSummary {
        let (version, staged) = self.version_and_staged().await;
        let mut s = self.ledger.summary(
            self.clock.now(),
            self.policy.leaf_ttl_max,
            self.policy.clock_skew,
            version,
        );
        self.count_restart_bound(&mut s, staged);
        self.count_revoked(&mut s).await;
        s
    }

    /// Counts workloads that read anchors only at start with `source` from now on (Kubernetes
    /// with Linkerd; once: a second call is ignored).
    pub fn count_restart_bound_with(&self, source: Arc<dyn RestartBoundSource>) {
        let _ = self.restart_bound.set(source);
    }

    async fn version_and_staged(&self) -> (u64, bool) {
        let st = self.state.lock().await;
        (
            st.bundle_version,
            matches!(st.phase, rotator::state::Phase::Staged { .. }),
        )
    }

    /// What is left under each revoked issuer (a scan of the ledger per revoked issuer: only
    /// while a revocation is in force).
    async fn count_revoked(&self, s: &mut rotator::ledger::LedgerSummary) {
        let revoked: Vec<CertId> = self
            .state
            .lock()
            .await
            .revoked
            .iter()
            .map(|r| r.issuer.clone())
            .collect();
        if revoked.is_empty() {
            return;
        }
        let now = self.clock.now().unix_timestamp();
        s.revoked_issuers = self.ledger.with(|l| {
            revoked
                .into_iter()
                .map(|issuer| {
                    let (live_leaves, last_expires) = l.live_under_issuer(&issuer, now);
                    rotator::ledger::RevokedLive {
                        issuer,
                        live_leaves,
                        last_expires,
                    }
                })
                .collect()
        });
    }

    /// While staged (the one phase whose gate reads it), the count of workloads that read
    /// anchors only at start.
    fn count_restart_bound(&self, s: &mut rotator::ledger::LedgerSummary, staged: bool) {
        if let Some(src) = self.restart_bound.get().filter(|_| staged) {
            s.restart_bound = src.count(&self.snapshot().bundle.anchors);
        }
    }

    /// The same for `/metrics`: reused for up to a second (see
    /// [`LedgerHandle::summary_for_scrape`](crate::authority::ledger::LedgerHandle::summary_for_scrape)).
    pub async fn ledger_summary_for_scrape(&self) -> rotator::ledger::LedgerSummary {
        let (version, staged) = self.version_and_staged().await;
        let mut s = self.ledger.summary_for_scrape(
            self.clock.now(),
            self.policy.leaf_ttl_max,
            self.policy.clock_skew,
            version,
        );
        self.count_restart_bound(&mut s, staged);
        self.count_revoked(&mut s).await;
        s
    }
}

/// Keys in a key store that `before` held and `after` (committed) no longer does — a pruned
/// issuer's, an archived anchor's after `key_retention` — are destroyed in the store, on the
/// schedule the file backend deletes key files. A failure is logged; the key is then orphaned
/// in the token, never lost from a state that still needs it.
fn destroy_released_keys(before: &AuthorityState, after: &AuthorityState) {
    let kept = after.stored_keys();
    for (reference, key) in before.stored_keys() {
        if kept.contains_key(&reference) {
            continue;
        }
        match key.destroy() {
            Ok(()) => {
                tracing::info!(target: "meshca::journal", key = %reference, "retired key destroyed in its key store")
            }
            Err(e) => {
                tracing::error!(target: "meshca::journal", key = %reference, "retired key not destroyed: {e}")
            }
        }
    }
}

/// Writes the issuance ledger in batches every [`crate::authority::ledger::FLUSH_EVERY`] until `stop`,
/// then closes it cleanly (a `closed` line: the next start trusts it). A failed write is
/// retried on the next tick; the records stay queued.
pub async fn write_ledger(authority: Arc<Authority>, mut stop: watch::Receiver<bool>) {
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(crate::authority::ledger::FLUSH_EVERY) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let (now, skew) = (authority.clock().now(), authority.policy().clock_skew);
        let a = authority.clone();
        let r = tokio::task::spawn_blocking(move || {
            if stopping {
                a.ledger().close(now, skew)
            } else {
                a.ledger().flush(now, skew)
            }
        })
        .await;
        match r {
            Ok(Ok(())) => authority.disk().ok("ledger"),
            Ok(Err(e)) => authority.disk().failed(
                "ledger",
                &format!("{}: {e}", authority.ledger().path().display()),
            ),
            Err(e) => tracing::error!("issuance ledger task failed: {e}"),
        }
        authority.retry_outputs().await;
        if stopping {
            return;
        }
    }
}

/// A loaded state must be for the configured trust domain and hold the upstream anchor.
fn check_loaded(s: &AuthorityState, how: &OpenOptions, origin: &str) -> Result<(), OpenError> {
    if let Some(td) = &how.trust_domain
        && *td != s.trust_domain
    {
        return Err(OpenError::Mismatch(format!(
            "{origin}: the state is for trust domain {} but the configuration says {td}; a trust domain cannot change",
            s.trust_domain
        )));
    }
    if let Some(up) = &how.upstream_anchor
        && s.anchor(up.id()).is_none_or(|a| !a.status.in_bundle())
    {
        return Err(OpenError::Mismatch(format!(
            "{origin}: --anchor-cert {} is not an anchor in this authority's bundle ({})",
            up.id(),
            s.bundle()
                .map(|a| a.cert.id().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Opens the issuance ledger in the state dir. With a shared store, replicas sign
/// independently and each ledger sees only its own leaves: it is marked partial, so a measured
/// gate never counts a fraction of the fleet (only the time-based fallbacks apply).
fn open_ledger(
    storage: &Storage,
    fresh: bool,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<crate::authority::ledger::LedgerHandle, OpenError> {
    let (ledger, loaded) = crate::authority::ledger::LedgerHandle::open(
        storage.dir.path(),
        fresh,
        now,
        policy.clock_skew,
    )
    .map_err(OpenError::Ledger)?;
    if storage.state.shared() {
        ledger.with(rotator::ledger::Ledger::set_partial);
        tracing::warn!(
            "state in {}: replicas sign independently, so the issuance ledger is partial; the trust-anchor \
             gates use their time-based fallbacks only",
            storage.state.origin()
        );
    }
    match loaded {
        crate::authority::ledger::Loaded::New => {}
        crate::authority::ledger::Loaded::Clean { records } => {
            tracing::info!(records, "issuance ledger loaded");
        }
        crate::authority::ledger::Loaded::Incomplete(why) => tracing::warn!(
            "issuance ledger {why}: it is complete only from now, so the trust-anchor gates use their \
             time-based fallback until {}",
            rotator::clock::rfc3339(now + policy.leaf_ttl_max + policy.clock_skew)
        ),
    }
    Ok(ledger)
}
