//! Bounds on what a caller can hold, and the bookkeeping that enforces them: open connections
//! per port, a connection that never opens a stream or stays without one, watch streams (total,
//! without a client certificate, per peer). The decisions are pure ([`admit_watch`]); this
//! module holds the counters, counts every refusal in `meshca_limit_refusals_total{limit}` and
//! logs refusals at most once per [`LOG_EVERY`] per limit (an attack must not flood the log).
//!
//! What a refusal looks like to the caller: at the connection cap the server stops accepting
//! (the caller waits in the listen backlog until a slot frees); a connection over its address's
//! cap is closed right after `accept` (before TLS); a silent or idle connection is closed; a
//! watch over a cap gets `RESOURCE_EXHAUSTED` naming the cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::process::config::LimitsConfig;

/// How often a refusal of one kind is logged at most (the counter counts every one).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `limits.max_connections` on the gRPC port.
    Connections,
    /// `limits.max_connections_per_ip` on the gRPC port.
    ConnectionsPerIp,
    /// `limits.http_max_connections` on the HTTP port.
    HttpConnections,
    /// A connection finished TLS and opened no stream within `limits.preface_timeout`.
    Preface,
    /// A connection had no open stream for `limits.idle_timeout`.
    Idle,
    /// `limits.watch_max`.
    WatchTotal,
    /// `limits.watch_max_unauthenticated`.
    WatchUnauthenticated,
    /// `limits.watch_per_peer`.
    WatchPerPeer,
    /// `limits.tokenreview_rate`.
    TokenReviewRate,
    /// `limits.tokenreview_in_flight`.
    TokenReviewInFlight,
    /// `limits.issue_rate`, per caller credential.
    IssueRate,
    /// `limits.node_agent_issue_rate`, per node agent and node.
    NodeAgentIssueRate,
    /// `limits.ledger_instances_per_identity`.
    LedgerPerIdentity,
    /// `limits.ledger_max_instances` (the leaf is signed but not recorded).
    LedgerFull,
    /// `limits.unauthenticated_per_connection`: the connection is closed.
    UnauthenticatedPerConnection,
}

impl Limit {
    /// Every limit, for counters initialised at 0.
    pub const ALL: [Limit; 15] = [
        Limit::Connections,
        Limit::ConnectionsPerIp,
        Limit::HttpConnections,
        Limit::Preface,
        Limit::Idle,
        Limit::WatchTotal,
        Limit::WatchUnauthenticated,
        Limit::WatchPerPeer,
        Limit::TokenReviewRate,
        Limit::TokenReviewInFlight,
        Limit::IssueRate,
        Limit::NodeAgentIssueRate,
        Limit::LedgerPerIdentity,
        Limit::LedgerFull,
        Limit::UnauthenticatedPerConnection,
    ];

    /// The `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::HttpConnections => "http_connections",
            Limit::Preface => "preface_timeout",
            Limit::Idle => "idle_timeout",
            Limit::WatchTotal => "watch_total",
            Limit::WatchUnauthenticated => "watch_unauthenticated",
            Limit::WatchPerPeer => "watch_per_peer",
            Limit::TokenReviewRate => "tokenreview_rate",
            Limit::TokenReviewInFlight => "tokenreview_in_flight",
            Limit::IssueRate => "issue_rate",
            Limit::NodeAgentIssueRate => "node_agent_issue_rate",
            Limit::LedgerPerIdentity => "ledger_instances_per_identity",
            Limit::LedgerFull => "ledger_max_instances",
            Limit::UnauthenticatedPerConnection => "unauthenticated_per_connection",
        }
    }
}

/// `limit` of `meshca_limit_refusals_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// [`Limit::label`].
    pub limit: &'static str,
}

/// The limits of one server and what they currently hold.
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    refusals: Family<LimitLabels, Counter>,
    last_log: [AtomicI64; Limit::ALL.len()],
    grpc_connections: Option<Arc<Semaphore>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    http_connections: Option<Arc<Semaphore>>,
    watches: Mutex<WatchBook>,
    reviews_in_flight: Option<Arc<Semaphore>>,
    review_rate: Option<DirectLimiter>,
    issue_rate: Option<KeyedLimiter>,
    node_agent_rate: Option<KeyedLimiter>,
    issue_checks: std::sync::atomic::AtomicU64,
    started: Instant,
}

type DirectLimiter = governor::DefaultDirectRateLimiter;
type KeyedLimiter = governor::DefaultKeyedRateLimiter<String>;

/// A request refused by a limit, with when trying again makes sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Which limit.
    pub limit: Limit,
    /// Why, for the caller.
    pub message: String,
    /// When a retry can succeed, if known.
    pub retry_after: Option<Duration>,
}

impl Limits {
    /// Limits `cfg`, counting refusals in `refusals` (registered by [`crate::process::metrics`]).
    pub fn new(cfg: LimitsConfig, refusals: Family<LimitLabels, Counter>) -> Self {
        let cap = |n: usize| (n > 0).then(|| Arc::new(Semaphore::new(n)));
        let review_rate = std::num::NonZeroU32::new(cfg.tokenreview_rate).map(|rate| {
            let burst = std::num::NonZeroU32::new(cfg.tokenreview_burst).unwrap_or(rate);
            governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
        });
        let keyed = |rate: u32, burst: u32| {
            std::num::NonZeroU32::new(rate).map(|rate| {
                let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
                governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
            })
        };
        Self {
            issue_rate: keyed(cfg.issue_rate, cfg.issue_burst),
            node_agent_rate: keyed(cfg.node_agent_issue_rate, cfg.node_agent_issue_burst),
            issue_checks: Default::default(),
            grpc_connections: cap(cfg.max_connections),
            per_ip: Mutex::default(),
            http_connections: cap(cfg.http_max_connections),
            reviews_in_flight: cap(cfg.tokenreview_in_flight),
            review_rate,
            cfg,
            refusals,
            last_log: Default::default(),
            watches: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// Counts a refusal and logs it unless one of its kind was logged within [`LOG_EVERY`].
    pub fn refused(&self, limit: Limit, detail: &dyn std::fmt::Display) {
        let total = self
            .refusals
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .inc()
            + 1;
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let slot = &self.last_log[Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0)];
        let last = slot.load(Ordering::Relaxed);
        let every = i64::try_from(LOG_EVERY.as_millis()).unwrap_or(i64::MAX);
        if (last == 0 || now - last >= every)
            && slot
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(target: "meshca::limits", limit = limit.label(), total, "refused: {detail} (logged at most every {}s per limit)", LOG_EVERY.as_secs());
        }
    }

    /// One of the `max_connections` slots, waited for before the next `accept`: at the cap the
    /// server stops accepting, so new connections wait in the kernel's listen backlog and are
    /// taken in order as slots free, instead of being closed and coming back as retries (a
    /// restart storm would otherwise turn into a retry storm). Reaching the cap is counted and
    /// logged. `None`: no cap.
    pub async fn grpc_slot(&self) -> Option<OwnedSemaphorePermit> {
        let sem = self.grpc_connections.as_ref()?;
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Some(p);
        }
        self.refused(
            Limit::Connections,
            &format_args!(
                "all {} connection slots are taken: new connections wait in the listen backlog",
                self.cfg.max_connections
            ),
        );
        sem.clone().acquire_owned().await.ok()
    }

    /// A slot for a new gRPC connection from `peer` holding `global` (from
    /// [`grpc_slot`](Self::grpc_slot)), or `None` (counted) when its address holds
    /// `max_connections_per_ip` already: one source cannot take every slot.
    pub fn grpc_connection(
        self: &Arc<Self>,
        peer: IpAddr,
        global: Option<OwnedSemaphorePermit>,
    ) -> Option<ConnSlot> {
        let cap = self.cfg.max_connections_per_ip;
        if cap != 0 {
            let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(peer).or_default();
            if *n >= cap {
                drop(m);
                self.refused(
                    Limit::ConnectionsPerIp,
                    &format_args!("connection from {peer}: it holds {cap} already"),
                );
                return None;
            }
            *n += 1;
        }
        let ip_slot = (cap != 0).then(|| PerIpSlot {
            limits: self.clone(),
            ip: peer,
        });
        Some(ConnSlot {
            _global: global,
            _per_ip: ip_slot,
        })
    }

    /// A slot for a new HTTP connection, or `None` (counted) when all are taken.
    pub fn http_connection(&self, peer: IpAddr) -> Option<Option<OwnedSemaphorePermit>> {
        self.connection(&self.http_connections, Limit::HttpConnections, peer)
    }

    fn connection(
        &self,
        sem: &Option<Arc<Semaphore>>,
        limit: Limit,
        peer: IpAddr,
    ) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(sem) = sem else {
            return Some(None);
        };
        match sem.clone().try_acquire_owned() {
            Ok(p) => Some(Some(p)),
            Err(_) => {
                self.refused(
                    limit,
                    &format_args!("connection from {peer}: all connection slots are taken"),
                );
                None
            }
        }
    }

    /// Room for one TokenReview (its in-flight slot, held until dropped), or the cap that is
    /// reached (counted): the API server sees at most `tokenreview_rate` reviews per second
    /// and `tokenreview_in_flight` at once from this replica.
    pub fn token_review(&self) -> Result<Option<OwnedSemaphorePermit>, Limit> {
        let slot = match &self.reviews_in_flight {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.refused(
                        Limit::TokenReviewInFlight,
                        &format_args!(
                            "{} TokenReviews already await the API server",
                            self.cfg.tokenreview_in_flight
                        ),
                    );
                    return Err(Limit::TokenReviewInFlight);
                }
            },
        };
        if let Some(rate) = &self.review_rate
            && rate.check().is_err()
        {
            self.refused(
                Limit::TokenReviewRate,
                &format_args!("over {} TokenReviews per second", self.cfg.tokenreview_rate),
            );
            return Err(Limit::TokenReviewRate);
        }
        Ok(slot)
    }

    /// One certificate for `caller` (its credential's name), or a refusal with the time until
    /// its bucket has room (counted).
    pub fn issue(&self, caller: &str) -> Result<(), Refusal> {
        self.take(Limit::IssueRate, caller)
    }

    /// One certificate a node agent asks for a workload it serves (`via`: agent and node), from
    /// the node agents' own, larger budget.
    pub fn node_agent_issue(&self, via: &str) -> Result<(), Refusal> {
        self.take(Limit::NodeAgentIssueRate, via)
    }

    fn take(&self, limit: Limit, caller: &str) -> Result<(), Refusal> {
        let (rate, per_second, burst) = match limit {
            Limit::NodeAgentIssueRate => (
                &self.node_agent_rate,
                self.cfg.node_agent_issue_rate,
                self.cfg.node_agent_issue_burst,
            ),
            _ => (&self.issue_rate, self.cfg.issue_rate, self.cfg.issue_burst),
        };
        let Some(rate) = rate else {
            return Ok(());
        };
        // Forget idle callers now and then, so the buckets do not grow without bound.
        if self.issue_checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        let Err(not_until) = rate.check_key(&caller.to_owned()) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let r = Refusal {
            limit,
            message: format!(
                "{caller} is over limits.{} ({per_second}/s after a burst of {burst}): retry in {} ms",
                limit.label(),
                wait.as_millis().max(1)
            ),
            retry_after: Some(wait),
        };
        self.refused(limit, &r.message);
        Err(r)
    }

    /// Admits a watch stream from `peer`, or says which cap it would exceed (counted).
    pub fn watch(self: &Arc<Self>, peer: WatchPeer) -> Result<WatchPermit, WatchRefused> {
        let mut book = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        match admit_watch(&book, &peer, &self.cfg) {
            Ok(()) => {
                book.add(&peer);
                Ok(WatchPermit {
                    limits: self.clone(),
                    peer,
                })
            }
            Err(limit) => {
                drop(book);
                let refusal = WatchRefused {
                    limit,
                    cap: match limit {
                        Limit::WatchTotal => self.cfg.watch_max,
                        Limit::WatchUnauthenticated => self.cfg.watch_max_unauthenticated,
                        _ => self.cfg.watch_per_peer,
                    },
                };
                self.refused(limit, &format_args!("watch from {}: {refusal}", peer.key()));
                Err(refusal)
            }
        }
    }

    /// Open watch streams: (all, without a client certificate).
    pub fn watching(&self) -> (usize, usize) {
        let b = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        (b.total, b.unauthenticated)
    }
}

/// A gRPC connection's slots (global and per address), freed when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    _global: Option<OwnedSemaphorePermit>,
    _per_ip: Option<PerIpSlot>,
}

#[derive(Debug)]
struct PerIpSlot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut m = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Who opens a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchPeer {
    /// The remote address.
    pub ip: IpAddr,
    /// The SPIFFE ID of its client certificate, if it presented one.
    pub spiffe_id: Option<String>,
}

impl WatchPeer {
    fn key(&self) -> String {
        match &self.spiffe_id {
            Some(id) => format!("{} ({id})", self.ip),
            None => format!("{} (no client certificate)", self.ip),
        }
    }
}

/// Open watch streams.
#[derive(Debug, Default)]
pub struct WatchBook {
    total: usize,
    unauthenticated: usize,
    per_peer: HashMap<WatchPeer, usize>,
}

impl WatchBook {
    fn add(&mut self, p: &WatchPeer) {
        self.total += 1;
        self.unauthenticated += usize::from(p.spiffe_id.is_none());
        *self.per_peer.entry(p.clone()).or_default() += 1;
    }

    fn remove(&mut self, p: &WatchPeer) {
        self.total = self.total.saturating_sub(1);
        if p.spiffe_id.is_none() {
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
        }
        if let Some(n) = self.per_peer.get_mut(p) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(p);
            }
        }
    }
}

/// Whether one more watch stream from `peer` fits (`0` in `cfg` means unlimited), or which cap
/// it would exceed: per peer first (the narrowest), then the unauthenticated share, then all.
pub fn admit_watch(book: &WatchBook, peer: &WatchPeer, cfg: &LimitsConfig) -> Result<(), Limit> {
    let full = |n: usize, cap: usize| cap != 0 && n >= cap;
    if full(
        book.per_peer.get(peer).copied().unwrap_or(0),
        cfg.watch_per_peer,
    ) {
        return Err(Limit::WatchPerPeer);
    }
    if peer.spiffe_id.is_none() && full(book.unauthenticated, cfg.watch_max_unauthenticated) {
        return Err(Limit::WatchUnauthenticated);
    }
    if full(book.total, cfg.watch_max) {
        return Err(Limit::WatchTotal);
    }
    Ok(())
}

/// A watch stream over a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} watch streams are open ({}): try again later, or fetch the bundle with GetTrustBundle", .cap, match .limit {
    Limit::WatchPerPeer => "limits.watch_per_peer, from this peer",
    Limit::WatchUnauthenticated => "limits.watch_max_unauthenticated, without a client certificate",
    _ => "limits.watch_max, in all",
})]
pub struct WatchRefused {
    /// The cap.
    pub limit: Limit,
    /// Its value.
    pub cap: usize,
}

/// An admitted watch stream; dropping it frees its slot.
#[derive(Debug)]
pub struct WatchPermit {
    limits: Arc<Limits>,
    peer: WatchPeer,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.limits
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.peer);
    }
}

/// What one connection is doing: how many streams are open and since when it has had none.
/// The request path counts streams ([`CountStreams`]); the connection reads it to decide
/// whether it is idle.
#[derive(Debug)]
pub struct ConnActivity {
    open: AtomicUsize,
    /// Milliseconds from `born` to the moment the last stream closed (0: none has yet).
    last_close_ms: AtomicI64,
    born: Instant,
    /// Requests answered `UNAUTHENTICATED` on this connection (the connection closes itself at
    /// `limits.unauthenticated_per_connection`).
    unauthenticated: AtomicU32,
}

impl ConnActivity {
    /// A connection with no stream yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            last_close_ms: AtomicI64::new(0),
            born: Instant::now(),
            unauthenticated: AtomicU32::new(0),
        })
    }

    /// A request on it was answered `UNAUTHENTICATED`.
    pub fn unauthenticated(&self) {
        self.unauthenticated.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests answered `UNAUTHENTICATED` on it so far.
    pub fn unauthenticated_count(&self) -> u32 {
        self.unauthenticated.load(Ordering::Acquire)
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// When the connection became idle (its last stream closed, or it was born), if it is idle.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.open() == 0).then(|| {
            let ms = self.last_close_ms.load(Ordering::Acquire);
            self.born + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        })
    }

    /// Whether a stream has ever closed on it (it sent a preface and a request).
    pub fn served(&self) -> bool {
        self.last_close_ms.load(Ordering::Acquire) > 0 || self.open() > 0
    }

    /// A stream opened; dropping the guard closes it.
    pub fn begin(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// One open stream of a connection.
#[derive(Debug)]
pub struct StreamGuard(Arc<ConnActivity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = i64::try_from(self.0.born.elapsed().as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        self.0.last_close_ms.store(ms, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Finds a request's connection activity in its extensions (where the connection layer put it).
pub type ActivityOf = for<'a> fn(&'a http::Extensions) -> Option<&'a Arc<ConnActivity>>;

/// A tower layer that counts each request as an open stream of its connection until its
/// response body is dropped (a watch stream stays open as long as it is watched). The
/// connection's [`ConnActivity`] is found by the function it holds (the TLS layer's), so that
/// limits know nothing of connections.
#[derive(Clone, Copy)]
pub struct CountStreams(pub ActivityOf);

impl std::fmt::Debug for CountStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountStreams")
    }
}

impl<S> tower::Layer<S> for CountStreams {
    type Service = CountStreamsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountStreamsService {
            inner,
            activity_of: self.0,
        }
    }
}

/// See [`CountStreams`].
#[derive(Clone)]
pub struct CountStreamsService<S> {
    inner: S,
    activity_of: ActivityOf,
}

impl<S: std::fmt::Debug> std::fmt::Debug for CountStreamsService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountStreamsService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CountStreamsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = (self.activity_of)(req.extensions()).map(ConnActivity::begin);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A refused credential (trailers-only answer: the status is in the headers).
            if let Some(g) = &guard
                && resp
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|v| v.as_bytes() == b"16")
            {
                g.0.unauthenticated();
            }
            Ok(match guard {
                Some(g) => resp.map(|b| {
                    tonic::body::Body::new(Guarded {
                        inner: b,
                        _guard: g,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that holds its stream open until dropped.
struct Guarded {
    inner: tonic::body::Body,
    _guard: StreamGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: u8, id: Option<&str>) -> WatchPeer {
        WatchPeer {
            ip: IpAddr::from([10, 0, 0, ip]),
            spiffe_id: id.map(str::to_owned),
        }
    }

    #[test]
    fn watch_caps_apply_narrowest_first_and_free_on_close() {
        let cfg = LimitsConfig {
            watch_max: 4,
            watch_max_unauthenticated: 2,
            watch_per_peer: 2,
            ..LimitsConfig::default()
        };
        let mut b = WatchBook::default();
        let (a, c, d) = (
            peer(1, None),
            peer(2, None),
            peer(3, Some("spiffe://td/ns/a/sa/b")),
        );
        assert_eq!(admit_watch(&b, &a, &cfg), Ok(()));
        b.add(&a);
        b.add(&a);
        // A third from the same peer: per peer, although the unauthenticated share is full too.
        assert_eq!(admit_watch(&b, &a, &cfg), Err(Limit::WatchPerPeer));
        // Another unauthenticated peer: the share is full.
        assert_eq!(admit_watch(&b, &c, &cfg), Err(Limit::WatchUnauthenticated));
        // An authenticated peer still fits, twice, then all four slots are taken.
        b.add(&d);
        b.add(&peer(4, Some("spiffe://td/ns/a/sa/c")));
        assert_eq!(
            admit_watch(&b, &peer(5, Some("spiffe://td/ns/x/sa/y")), &cfg),
            Err(Limit::WatchTotal)
        );
        // Closing one frees its slot in every count it held.
        b.remove(&a);
        assert_eq!(admit_watch(&b, &c, &cfg), Ok(()));
        b.add(&c);
        assert_eq!(
            admit_watch(&b, &peer(6, None), &cfg),
            Err(Limit::WatchUnauthenticated)
        );
        assert_eq!(admit_watch(&b, &d, &cfg), Err(Limit::WatchTotal));
        // Unlimited: nothing is refused.
        let open = LimitsConfig::unlimited();
        for _ in 0..100 {
            b.add(&a);
        }
        assert_eq!(admit_watch(&b, &a, &open), Ok(()));
    }

    #[test]
    fn refusals_are_counted_every_time() {
        let fam = Family::<LimitLabels, Counter>::default();
        let l = Limits::new(LimitsConfig::default(), fam.clone());
        for _ in 0..5 {
            l.refused(Limit::Preface, &"x");
        }
        assert_eq!(
            fam.get_or_create(&LimitLabels {
                limit: "preface_timeout"
            })
            .get(),
            5
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_streams() {
        let a = ConnActivity::new();
        let born = a.idle_since().unwrap();
        assert!(!a.served());
        tokio::time::advance(Duration::from_secs(3)).await;
        let g = a.begin();
        assert_eq!(a.idle_since(), None);
        assert!(a.served());
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(g);
        assert_eq!(a.idle_since().unwrap(), born + Duration::from_secs(5));
    }
}
