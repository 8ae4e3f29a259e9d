//! The issuance ledger: which leaves are live, which anchor each chains to, and which bundle
//! version each live workload has been handed. The trust-anchor gates read it
//! ([`crate::anchors`]); it is pure (no clock, no disk). The server feeds it from the signing
//! path and the bundle stream and persists it in batches (`ca-server/src/authority/ledger.rs`).
//!
//! ## What a "live workload" is
//!
//! A workload *instance* is identified by `(SPIFFE ID, instance_id)` when the client sends an
//! `instance_id` (a pod UID, a process id: anything stable for the life of one running instance),
//! and by `(SPIFFE ID, public key)` when it does not. Each instance counts with its newest leaf
//! only: a newer leaf for the same instance *supersedes* the older one (a proxy presents the leaf
//! it renewed to). An instance is *live* while its newest leaf is unexpired, counting the clock
//! skew allowance (`notAfter + clock_skew > now`), or while it holds an authenticated
//! `WatchTrustBundle` stream open.
//!
//! Limits, all on the safe side except the last:
//! - A client that sends no `instance_id` and makes a new key for every renewal looks like a new
//!   instance each time; its superseded leaves stay "live" until they expire. Gates open later,
//!   never earlier.
//! - Leaves signed while the ledger was not recording (before it existed, or lost in a crash
//!   before a flush) are unknown: the ledger is *complete* only from [`Ledger::complete_since`],
//!   and the gates use measurements only once every unknown leaf must have expired
//!   ([`Ledger::trustworthy_at`]); before that they use the time-based fallback and say so.
//! - Verifiers that never talk to meshca (they read `bundle.pem` or `/bundle.pem` from
//!   somewhere) are invisible: the `propagation_allowance` in the time-based gate is for them.
//! - An instance is trusted to present its newest leaf once it has received it. A workload could
//!   claim another instance's id *of its own SPIFFE ID* and so supersede that instance's leaf;
//!   it cannot touch another SPIFFE ID's entries.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pki::CertId;

pub mod file;
mod names;

/// One leaf, as the ledger remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafRecord {
    /// Serial, lowercase hex.
    #[serde(rename = "s")]
    pub serial: String,
    /// The SPIFFE ID in the leaf.
    #[serde(rename = "id")]
    pub spiffe_id: String,
    /// The instance: the client's `instance_id`, or `key:<hash>` of the leaf's public key.
    #[serde(rename = "i")]
    pub instance: String,
    /// The anchor the leaf chains to.
    #[serde(rename = "a")]
    pub anchor: CertId,
    /// When it was signed, Unix seconds: the newest leaf of an instance is the one signed last
    /// (not the one living longest: a renewal may ask for a shorter TTL).
    #[serde(rename = "t")]
    pub issued: i64,
    /// notAfter, Unix seconds.
    #[serde(rename = "na")]
    pub not_after: i64,
    /// The bundle version handed out with the leaf.
    #[serde(rename = "v")]
    pub bundle_version: u64,
    /// Who asked on the workload's behalf: a node agent and its node
    /// (`k8s:istio-system/ztunnel@node-a`); absent when the workload asked for itself.
    #[serde(rename = "via", default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The issuer that signed it (absent in records written before meshca recorded it).
    #[serde(rename = "is", default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<CertId>,
    /// The face it was asked for on (absent: `meshca`, as in records written before meshca
    /// recorded it).
    #[serde(rename = "f", default, skip_serializing_if = "Api::is_meshca")]
    pub api: Api,
}

/// The wire API a leaf was asked for on, as the ledger counts it: each face hands a bundle (or
/// none) in its own way, and `meshca status` shows how far each has converged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Api {
    /// `meshca.v1`: the bundle in every answer and on `WatchTrustBundle`.
    #[default]
    Meshca,
    /// Istio's `CreateCertificate`: every anchor in the answer's last element.
    Istio,
    /// Linkerd's `Certify`: no bundle (its proxies read anchors at start).
    Linkerd,
    /// A Kubernetes PodCertificateRequest: no bundle in the answer (the pod projects the
    /// signer's ClusterTrustBundle).
    Pod,
}

impl Api {
    /// Every face, in the order they are shown.
    pub const ALL: [Api; 4] = [Api::Meshca, Api::Istio, Api::Linkerd, Api::Pod];

    /// Its name in status, metrics and the ledger file.
    pub fn label(self) -> &'static str {
        match self {
            Api::Meshca => "meshca",
            Api::Istio => "istio",
            Api::Linkerd => "linkerd",
            Api::Pod => "pod",
        }
    }

    fn is_meshca(&self) -> bool {
        *self == Api::Meshca
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// An instance's key: 128 bits of SHA-256 over (SPIFFE ID, instance). The ledger keeps the key,
/// not the instance string: the key is all it ever compares.
pub type Key = u128;

/// The key of instance `instance` of `spiffe_id`.
pub fn key(spiffe_id: &str, instance: &str) -> Key {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(spiffe_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(instance.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(b)
}

/// A slot that holds no leaf.
const FREE: u32 = u32::MAX;
/// No name (no node agent asked; no issuer recorded).
const NONE: u32 = u32::MAX;
/// The serial is not up to 16 bytes of lowercase hex: it is kept in `odd_serials`.
const ODD_SERIAL: u8 = u8::MAX;

/// A leaf as held in memory: 60 bytes of fixed fields. Strings are indices into the ledger's
/// interned names, anchors and issuers small indices, times 32-bit Unix seconds (to 2106).
#[derive(Debug, Clone, Copy)]
struct Leaf {
    /// The instance's [`Key`], in 4-byte words (so the record is 4-byte aligned).
    key: [u32; 4],
    /// The serial's bytes (`serial_len` of them), or [`ODD_SERIAL`].
    serial: [u8; 16],
    /// Index into `ids`; [`FREE`]: this slot holds no leaf.
    id: u32,
    /// Index into `vias`, or [`NONE`].
    via: u32,
    issued: u32,
    not_after: u32,
    version: u32,
    /// Index into the ledger's anchors.
    anchor: u16,
    /// Index into the ledger's issuers; `u16::MAX`: unknown.
    issuer: u16,
    serial_len: u8,
    api: Api,
    /// In the ledger's queue of leaves not yet written.
    queued: bool,
}

fn pack(k: Key) -> [u32; 4] {
    let b = k.to_le_bytes();
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

fn unpack(w: [u32; 4]) -> Key {
    w.iter()
        .rev()
        .fold(0u128, |k, x| (k << 32) | u128::from(*x))
}

/// The index table's hash of a key (the key is already a digest).
fn key_hash(w: &[u32; 4]) -> u64 {
    (u64::from(w[1]) << 32) | u64::from(w[0])
}

/// Unix seconds as held: clamped into 0..=u32::MAX.
fn secs(t: i64) -> u32 {
    u32::try_from(t.clamp(0, i64::from(u32::MAX))).unwrap_or(u32::MAX)
}

/// A serial as held: up to 16 bytes when it is lowercase hex of even length, else odd.
fn serial_bytes(s: &str) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    let hexish = s.len().is_multiple_of(2)
        && s.len() <= 32
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if !hexish {
        return ([0; 16], ODD_SERIAL);
    }
    match hex::decode_to_slice(s, &mut out[..s.len() / 2]) {
        Ok(()) => (out, u8::try_from(s.len() / 2).unwrap_or(ODD_SERIAL)),
        Err(_) => ([0; 16], ODD_SERIAL),
    }
}

#[derive(Debug, Clone, Default)]
struct Watch {
    /// Open streams for this instance.
    open: u32,
    /// The newest bundle version sent on any of them.
    version: u64,
}

/// The ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    complete_since: OffsetDateTime,
    /// The newest leaf of each instance, in slots (freed slots are reused).
    slots: Vec<Leaf>,
    free_slots: Vec<u32>,
    /// Slot numbers, found by their leaf's key.
    index: hashbrown::HashTable<u32>,
    /// SPIFFE IDs; an ID's hold count is how many instances it has (`limits.max_per_identity`).
    ids: names::Names,
    /// Who asked on the workloads' behalf.
    vias: names::Names,
    /// Serials that are not short lowercase hex, by slot (none from meshca's own signer).
    odd_serials: HashMap<u32, Box<str>>,
    /// Slots whose leaf changed since the file last had it.
    queued: Vec<u32>,
    /// Authenticated bundle watchers per instance.
    watches: HashMap<Key, Watch>,
    /// The anchors leaves chain to (entries hold an index), and whether the file names each.
    anchors: Vec<CertId>,
    anchors_written: Vec<bool>,
    /// The issuers that signed them (entries hold an index), and whether the file names each.
    issuers: Vec<CertId>,
    issuers_written: Vec<bool>,
    /// Other processes sign too (replicas): this ledger never sees every leaf.
    partial: bool,
    /// Bounds on what it holds.
    limits: LedgerLimits,
    /// The gates' counts, kept up to date by every change.
    tally: Tally,
    /// Per face, a bundle version every workload of that face holds whatever its record says:
    /// set where the face delivers bundles out of band (pod certificates: the ClusterTrustBundle,
    /// once the kubelets' refresh and the propagation allowance have passed since it was written).
    delivered: BTreeMap<Api, u64>,
}

/// What [`Ledger::summary`] reports, kept incrementally: every change to an instance takes its
/// old contribution out and puts its new one in, and leaves stop being live in notAfter order as
/// the summaries' time advances. A summary then costs O(anchors + bundle versions + leaves that
/// expired since the last one), not O(leaves): a `/metrics` scrape or a gate decision does not
/// walk a ledger of a million instances under the mutex the signing path takes.
#[derive(Debug, Clone)]
struct Tally {
    /// Leaves are live while `not_after > cut` (Unix seconds). Moved forward by summaries,
    /// never back (a summary for an earlier time scans instead).
    cut: i64,
    /// Live leaves by anchor index.
    by_anchor: HashMap<u16, u64>,
    /// Live instances by the face of their newest leaf (`meshca` for a stream without a leaf)
    /// and the newest bundle version they have been handed.
    by_version: BTreeMap<(Api, u64), u64>,
    /// Every held leaf as (notAfter, slot): those whose notAfter the cut passes stop being live
    /// (summaries), and compaction drops the expired from the front.
    expiry: std::collections::BTreeSet<(u32, u32)>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            cut: i64::MIN,
            by_anchor: HashMap::new(),
            by_version: BTreeMap::new(),
            expiry: std::collections::BTreeSet::new(),
        }
    }
}

/// One instance's share of the tally: the anchor of its live leaf, and its face and bundle
/// version if it is live at all.
type Contribution = (Option<u16>, Option<(Api, u64)>);

/// A name as a new leaf gives it: a string (signing) or an index the caller already holds
/// (replaying the file).
#[derive(Debug, Clone, Copy)]
enum Name<'a> {
    Text(&'a str),
    Held(u32),
}

/// A new leaf's serial: as text (signing: lowercase hex, normally), or already as the bytes a
/// leaf holds (replaying the file: up to 16, the rest zero).
#[derive(Debug, Clone, Copy)]
enum Serial<'a> {
    Text(&'a str),
    Bytes([u8; 16], u8),
}

/// A leaf about to be recorded, its strings not yet interned.
#[derive(Debug, Clone, Copy)]
struct Incoming<'a> {
    key: Key,
    serial: Serial<'a>,
    id: Name<'a>,
    via: Option<Name<'a>>,
    anchor: u16,
    issuer: u16,
    issued: i64,
    not_after: i64,
    version: u64,
    api: Api,
}

/// A leaf the ledger holds, as the deny list and tests read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLeaf {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID in the leaf.
    pub spiffe_id: String,
    /// The anchor it chains to.
    pub anchor: CertId,
    /// When it was signed, Unix seconds.
    pub issued: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// The newest bundle version its instance has been handed.
    pub bundle_version: u64,
    /// Who asked on the workload's behalf.
    pub via: Option<String>,
    /// The issuer that signed it, when recorded.
    pub issuer: Option<CertId>,
    /// The face it was asked for on.
    pub api: Api,
}

/// Bounds on the ledger (`0`: unlimited). Memory is the reason: ~95 bytes per instance when
/// ten or more share a SPIFFE ID, ~170 when each has its own, the incremental tally included
/// (docs/benchmarks.md): the default 500,000 instances are 45–81 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerLimits {
    /// Instances held in all. A leaf signed while it is full is not recorded, and the ledger is
    /// then complete only from that moment: the measured gates fall back to time until every
    /// unrecorded leaf has expired. A full ledger makes a rotation slower, never unsafe.
    pub max_instances: usize,
    /// Instances of one SPIFFE ID. A new instance beyond it is refused before signing (one
    /// identity cannot fill the ledger with fresh instance ids).
    pub max_per_identity: usize,
}

/// Whether a signed leaf's record was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Held (a new instance, or a newer leaf of a known one).
    Kept,
    /// Not held: the ledger was full. It is complete only from the leaf's issue time on.
    DroppedFull,
}

/// An identity already holds as many instances as it may.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{spiffe_id} already holds {held} live instances (limits.ledger_instances_per_identity): reuse an instance_id, or wait for old leaves to expire"
)]
pub struct TooManyInstances {
    /// The identity.
    pub spiffe_id: String,
    /// How many it holds.
    pub held: u32,
}

/// What the gates need from the ledger at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSummary {
    /// The ledger knows every leaf signed from here on.
    pub complete_since: OffsetDateTime,
    /// Measurements can be trusted from here on: every leaf signed before `complete_since` has
    /// expired by then.
    pub trustworthy_at: OffsetDateTime,
    /// Live leaves (newest per instance) by the anchor they chain to.
    pub live_leaves: BTreeMap<CertId, u64>,
    /// Live instances.
    pub live_workloads: u64,
    /// Live instances that have been handed bundle version `min_version` or newer.
    pub workloads_current: u64,
    /// The version `workloads_current` counts against.
    pub min_version: u64,
    /// `live_workloads` and `workloads_current` by the face each workload's newest leaf came
    /// in on (faces with no live workload left out).
    pub by_api: BTreeMap<Api, ApiConvergence>,
    /// Other replicas sign too: this ledger never sees every leaf, so it is never trustworthy.
    pub partial: bool,
    /// Workloads that read trust anchors only when they start (Linkerd's proxies), counted from
    /// the cluster's pods, not from the ledger.
    pub restart_bound: RestartBound,
    /// Live leaves under each revoked issuer (`meshca issuer revoke`).
    pub revoked_issuers: Vec<RevokedLive>,
}

/// One face's share of the convergence count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApiConvergence {
    /// Live workloads whose newest leaf came in on this face.
    pub live_workloads: u64,
    /// Of which have been handed the counted bundle version or newer (named as in the status
    /// document's totals).
    #[serde(rename = "workloads_with_current_bundle")]
    pub workloads_current: u64,
}

/// What is left under a revoked issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedLive {
    /// The issuer.
    pub issuer: CertId,
    /// Its leaves not yet expired.
    pub live_leaves: u64,
    /// When the last of them expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_expires: Option<i64>,
}

/// Workloads that read the trust anchors once, at start (linkerd2-proxy reads
/// `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS` from its pod spec: linkerd2#9313): a bundle reaches
/// them only through a new pod. Counted against the moment the current bundle's anchors reached
/// the ConfigMap their pods are made from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RestartBound {
    /// Not counted: no such workloads are served (not Kubernetes, or that face is off).
    #[default]
    NotTracked,
    /// They may exist but cannot be counted now (pods cannot be listed, the ConfigMap cannot
    /// be read): the gates fall back to time and say so.
    Unknown {
        /// Why.
        reason: String,
    },
    /// Counted.
    Counted {
        /// Proxies running (pods not finished).
        proxies: u64,
        /// Of which hold only older anchors until they are replaced: their
        /// `linkerd.io/trust-root-sha256` annotation is not the SHA-256 of the ConfigMap's
        /// current `ca-bundle.crt` (or, without the annotation, they were made before the
        /// current anchors reached it).
        stale: u64,
        /// When the current anchors reached the ConfigMap (`None`: not yet; every proxy is
        /// stale).
        #[serde(default, with = "crate::clock::rfc3339_utc::option")]
        since: Option<OffsetDateTime>,
        /// Why the anchors are not known to have reached the ConfigMap, when `since` is `None`
        /// (it is missing, unreadable, or lacks meshca's annotation: counted as not reached).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_reached: Option<String>,
        /// The workloads owning stale pods, for `meshca anchors restarts`.
        workloads: Vec<StaleWorkload>,
        /// Of `proxies`, those judged by when their pod was made because it lacks the
        /// injector's `linkerd.io/trust-root-sha256` annotation (the others are judged by
        /// comparing it with the SHA-256 of the trust-roots ConfigMap).
        #[serde(default)]
        by_creation_time: u64,
    },
}

/// A workload whose pods hold only older anchors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleWorkload {
    /// Its namespace.
    pub namespace: String,
    /// `Deployment/<name>`, `StatefulSet/<name>`, `DaemonSet/<name>`, or `Pod/<name>` for a
    /// pod no controller owns.
    pub owner: String,
    /// Its stale pods.
    pub stale_pods: u64,
    /// The PodDisruptionBudget covering its pods, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdb: Option<String>,
    /// How many of its pods that budget lets go now (`status.disruptionsAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruptions_allowed: Option<i32>,
}

impl LedgerSummary {
    /// Live leaves chaining to `anchor`.
    pub fn live_under(&self, anchor: &CertId) -> u64 {
        self.live_leaves.get(anchor).copied().unwrap_or(0)
    }

    /// Whether measurements may be used at `now`.
    pub fn trustworthy(&self, now: OffsetDateTime) -> bool {
        !self.partial && now >= self.trustworthy_at
    }
}

impl Ledger {
    /// An empty ledger that has known every leaf since `complete_since`.
    pub fn new(complete_since: OffsetDateTime) -> Self {
        Self {
            complete_since,
            slots: Vec::new(),
            free_slots: Vec::new(),
            index: hashbrown::HashTable::new(),
            ids: names::Names::default(),
            vias: names::Names::default(),
            odd_serials: HashMap::new(),
            queued: Vec::new(),
            watches: HashMap::new(),
            anchors: Vec::new(),
            anchors_written: Vec::new(),
            issuers: Vec::new(),
            issuers_written: Vec::new(),
            partial: false,
            limits: LedgerLimits::default(),
            tally: Tally::default(),
            delivered: BTreeMap::new(),
        }
    }

    /// Every workload of face `api` holds bundle `version` or newer now (never lowered).
    pub fn set_delivered(&mut self, api: Api, version: u64) {
        let v = self.delivered.entry(api).or_insert(0);
        *v = (*v).max(version);
    }

    /// The slot holding instance `k`'s leaf.
    fn slot_of(&self, k: Key) -> Option<u32> {
        let w = pack(k);
        let slots = &self.slots;
        self.index
            .find(key_hash(&w), |&s| slots[s as usize].key == w)
            .copied()
    }

    fn leaf_of(&self, k: Key) -> Option<&Leaf> {
        self.slot_of(k).map(|s| &self.slots[s as usize])
    }

    /// Instance `k`'s contribution when leaves are live above `cut`.
    fn contribution_at(&self, k: Key, cut: i64) -> Contribution {
        let leaf = self.leaf_of(k);
        let watch = self.watches.get(&k);
        let leaf_live = leaf.is_some_and(|r| i64::from(r.not_after) > cut);
        let version = (leaf_live || watch.is_some()).then(|| {
            (
                leaf.map_or(Api::Meshca, |r| r.api),
                leaf.map_or(0, |r| u64::from(r.version))
                    .max(watch.map_or(0, |w| w.version)),
            )
        });
        (leaf.filter(|_| leaf_live).map(|r| r.anchor), version)
    }

    fn count(&mut self, c: Contribution, add: bool) {
        fn bump(n: &mut u64, add: bool) {
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(a) = c.0 {
            let n = self.tally.by_anchor.entry(a).or_insert(0);
            bump(n, add);
            if *n == 0 {
                self.tally.by_anchor.remove(&a);
            }
        }
        if let Some(v) = c.1 {
            let n = self.tally.by_version.entry(v).or_insert(0);
            bump(n, add);
            if *n == 0 {
                self.tally.by_version.remove(&v);
            }
        }
    }

    /// Where instance `k` is in the expiry index: (notAfter, slot).
    fn expiry_of(&self, k: Key) -> Option<(u32, u32)> {
        self.slot_of(k)
            .map(|s| (self.slots[s as usize].not_after, s))
    }

    /// Applies `f`, a change to instance `k`, and moves `k`'s contribution in the tally.
    fn change<R>(&mut self, k: Key, f: impl FnOnce(&mut Self) -> R) -> R {
        let cut = self.tally.cut;
        let before = self.contribution_at(k, cut);
        let old = self.expiry_of(k);
        let r = f(self);
        let after = self.contribution_at(k, cut);
        let new = self.expiry_of(k);
        if old != new {
            if let Some(e) = old {
                self.tally.expiry.remove(&e);
            }
            if let Some(e) = new {
                self.tally.expiry.insert(e);
            }
        }
        self.count(before, false);
        self.count(after, true);
        r
    }

    /// Moves the tally's time forward to `cut`: leaves with `not_after <= cut` stop being live.
    fn advance(&mut self, cut: i64) {
        let old = self.tally.cut;
        if cut <= old {
            return;
        }
        self.tally.cut = cut;
        if cut < 0 || old >= i64::from(u32::MAX) {
            return;
        }
        let passing: Vec<u32> = self
            .tally
            .expiry
            .range((secs(old.saturating_add(1)), 0)..=(secs(cut), u32::MAX))
            .filter(|(na, _)| i64::from(*na) > old)
            .map(|&(_, s)| s)
            .collect();
        for s in passing {
            let k = unpack(self.slots[s as usize].key);
            let before = self.contribution_at(k, old);
            let after = self.contribution_at(k, cut);
            self.count(before, false);
            self.count(after, true);
        }
    }

    /// Sets its bounds.
    pub fn set_limits(&mut self, limits: LedgerLimits) {
        self.limits = limits;
    }

    /// Whether a leaf for `(spiffe_id, instance)` may be signed: a known instance always may;
    /// a new one not when its identity already holds `max_per_identity` instances.
    pub fn admit(&self, spiffe_id: &str, instance: &str) -> Result<(), TooManyInstances> {
        let cap = self.limits.max_per_identity;
        if cap == 0 || self.slot_of(key(spiffe_id, instance)).is_some() {
            return Ok(());
        }
        let held = self.ids.find(spiffe_id).map_or(0, |i| self.ids.refs(i));
        if usize::try_from(held).unwrap_or(usize::MAX) >= cap {
            return Err(TooManyInstances {
                spiffe_id: spiffe_id.to_owned(),
                held,
            });
        }
        Ok(())
    }

    /// Marks the ledger as one of several (replicas sign independently): measured gates must
    /// never use it.
    pub fn set_partial(&mut self) {
        self.partial = true;
    }

    fn anchor_index(&mut self, a: &CertId) -> u16 {
        if let Some(i) = self.anchors.iter().position(|x| x == a) {
            return u16::try_from(i).unwrap_or(u16::MAX);
        }
        self.anchors.push(a.clone());
        self.anchors_written.push(false);
        u16::try_from(self.anchors.len() - 1).unwrap_or(u16::MAX)
    }

    fn issuer_index(&mut self, i: &CertId) -> u16 {
        if let Some(n) = self.issuers.iter().position(|x| x == i) {
            return u16::try_from(n).unwrap_or(u16::MAX);
        }
        self.issuers.push(i.clone());
        self.issuers_written.push(false);
        u16::try_from(self.issuers.len() - 1).unwrap_or(u16::MAX)
    }

    /// The held leaves (free slots skipped), with their slot numbers.
    fn held(&self) -> impl Iterator<Item = (u32, &Leaf)> {
        (0u32..).zip(&self.slots).filter(|(_, l)| l.id != FREE)
    }

    /// Leaves signed by `issuer` that have not expired at `now` (Unix seconds), and the last
    /// notAfter among them. A scan: for status and a revoked issuer's gauge, not for every
    /// request.
    pub fn live_under_issuer(&self, issuer: &CertId, now: i64) -> (u64, Option<i64>) {
        let Some(idx) = self.issuers.iter().position(|x| x == issuer) else {
            return (0, None);
        };
        let idx = u16::try_from(idx).unwrap_or(u16::MAX);
        self.held()
            .map(|(_, l)| l)
            .filter(|e| e.issuer == idx && i64::from(e.not_after) > now)
            .fold((0, None), |(n, last), e| {
                let na = i64::from(e.not_after);
                (n + 1, Some(last.map_or(na, |l: i64| l.max(na))))
            })
    }

    fn serial_of(&self, slot: u32, e: &Leaf) -> String {
        if e.serial_len == ODD_SERIAL {
            return self
                .odd_serials
                .get(&slot)
                .map(ToString::to_string)
                .unwrap_or_default();
        }
        hex::encode(&e.serial[..usize::from(e.serial_len.min(16))])
    }

    fn to_held(&self, slot: u32, e: &Leaf) -> HeldLeaf {
        HeldLeaf {
            serial: self.serial_of(slot, e),
            spiffe_id: self.ids.get(e.id).to_owned(),
            anchor: self.anchors[usize::from(e.anchor)].clone(),
            issued: i64::from(e.issued),
            not_after: i64::from(e.not_after),
            bundle_version: u64::from(e.version),
            via: (e.via != NONE).then(|| self.vias.get(e.via).to_owned()),
            issuer: self.issuers.get(usize::from(e.issuer)).cloned(),
            api: e.api,
        }
    }

    /// Since when the ledger knows every leaf.
    pub fn complete_since(&self) -> OffsetDateTime {
        self.complete_since
    }

    /// Marks everything before `t` unknown (the ledger was lost or may have lost a tail).
    pub fn set_complete_since(&mut self, t: OffsetDateTime) {
        self.complete_since = t;
    }

    /// From when measurements can be trusted: every leaf signed before `complete_since` has
    /// expired (it lived at most `leaf_ttl_max`, and verifiers may be `clock_skew` behind).
    pub fn trustworthy_at(&self, leaf_ttl_max: Duration, clock_skew: Duration) -> OffsetDateTime {
        self.complete_since + leaf_ttl_max + clock_skew
    }

    /// Records a leaf. It supersedes the leaf signed before it for the same instance; an older
    /// record never replaces a newer one (records may be replayed out of order). A new instance
    /// while the ledger holds `max_instances` is dropped, and the ledger is complete only from
    /// its issue time on.
    pub fn record(&mut self, r: LeafRecord) -> Recorded {
        let anchor = self.anchor_index(&r.anchor);
        let issuer = r.issuer.as_ref().map_or(u16::MAX, |i| self.issuer_index(i));
        self.put(Incoming {
            key: key(&r.spiffe_id, &r.instance),
            serial: Serial::Text(&r.serial),
            id: Name::Text(&r.spiffe_id),
            via: r.via.as_deref().map(Name::Text),
            anchor,
            issuer,
            issued: r.issued,
            not_after: r.not_after,
            version: r.bundle_version,
            api: r.api,
        })
    }

    fn hold(names: &mut names::Names, n: Name<'_>) -> u32 {
        match n {
            Name::Text(s) => names.hold(s),
            Name::Held(i) => {
                names.hold_index(i);
                i
            }
        }
    }

    fn queue(&mut self, slot: u32) {
        let l = &mut self.slots[slot as usize];
        if !l.queued {
            l.queued = true;
            self.queued.push(slot);
        }
    }

    /// Records `r` (see [`Ledger::record`]).
    fn put(&mut self, r: Incoming<'_>) -> Recorded {
        let k = r.key;
        let cap = self.limits.max_instances;
        if cap != 0 && self.len() >= cap && self.slot_of(k).is_none() {
            if let Ok(t) = OffsetDateTime::from_unix_timestamp(r.issued) {
                self.complete_since = self.complete_since.max(t);
            }
            return Recorded::DroppedFull;
        }
        let (serial, serial_len) = match r.serial {
            Serial::Text(t) => serial_bytes(t),
            Serial::Bytes(b, n) => (b, n),
        };
        let version = u32::try_from(r.version).unwrap_or(u32::MAX);
        self.change(k, |s| {
            let slot = match s.slot_of(k) {
                // Records arrive (and are replayed from the log) in signing order; a record
                // signed in an earlier second than the one held is stale.
                Some(slot) if i64::from(s.slots[slot as usize].issued) > r.issued => {
                    let l = &mut s.slots[slot as usize];
                    l.version = l.version.max(version);
                    slot
                }
                Some(slot) => {
                    let via = r.via.map_or(NONE, |v| Self::hold(&mut s.vias, v));
                    let l = &mut s.slots[slot as usize];
                    let old_via = std::mem::replace(&mut l.via, via);
                    l.version = l.version.max(version);
                    (l.serial, l.serial_len) = (serial, serial_len);
                    (l.issued, l.not_after) = (secs(r.issued), secs(r.not_after));
                    (l.anchor, l.issuer, l.api) = (r.anchor, r.issuer, r.api);
                    if old_via != NONE {
                        s.vias.release(old_via);
                    }
                    slot
                }
                None => s.insert(&r, serial, serial_len, version),
            };
            if let (ODD_SERIAL, Serial::Text(t)) = (serial_len, r.serial) {
                s.odd_serials.insert(slot, t.into());
            } else {
                s.odd_serials.remove(&slot);
            }
            s.queue(slot);
        });
        Recorded::Kept
    }

    /// Puts a new instance's leaf in a slot.
    fn insert(&mut self, r: &Incoming<'_>, serial: [u8; 16], serial_len: u8, version: u32) -> u32 {
        let leaf = Leaf {
            key: pack(r.key),
            serial,
            id: Self::hold(&mut self.ids, r.id),
            via: r.via.map_or(NONE, |v| Self::hold(&mut self.vias, v)),
            issued: secs(r.issued),
            not_after: secs(r.not_after),
            version,
            anchor: r.anchor,
            issuer: r.issuer,
            serial_len,
            api: r.api,
            queued: false,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = leaf;
                s
            }
            None => {
                self.slots.push(leaf);
                u32::try_from(self.slots.len() - 1).unwrap_or(FREE)
            }
        };
        let slots = &self.slots;
        self.index.insert_unique(key_hash(&leaf.key), slot, |&s| {
            key_hash(&slots[s as usize].key)
        });
        slot
    }

    /// Empties a slot.
    fn remove(&mut self, slot: u32) {
        let l = self.slots[slot as usize];
        if l.id == FREE {
            return;
        }
        if let Ok(e) = self.index.find_entry(key_hash(&l.key), |&s| s == slot) {
            e.remove();
        }
        self.ids.release(l.id);
        if l.via != NONE {
            self.vias.release(l.via);
        }
        self.odd_serials.remove(&slot);
        let freed = &mut self.slots[slot as usize];
        (freed.id, freed.via, freed.queued) = (FREE, NONE, false);
        self.free_slots.push(slot);
    }

    /// An authenticated bundle stream for an instance opened.
    pub fn watch_opened(&mut self, spiffe_id: &str, instance: &str) {
        let k = key(spiffe_id, instance);
        self.change(k, |s| s.watches.entry(k).or_default().open += 1);
    }

    /// Bundle `version` was sent on an instance's stream.
    pub fn watch_sent(&mut self, spiffe_id: &str, instance: &str, version: u64) {
        let k = key(spiffe_id, instance);
        self.change(k, |s| {
            if let Some(w) = s.watches.get_mut(&k) {
                w.version = w.version.max(version);
            }
            if let Some(slot) = s.slot_of(k) {
                let l = &mut s.slots[slot as usize];
                l.version = l.version.max(u32::try_from(version).unwrap_or(u32::MAX));
                s.queue(slot);
            }
        });
    }

    /// An instance's stream closed.
    pub fn watch_closed(&mut self, spiffe_id: &str, instance: &str) {
        let k = key(spiffe_id, instance);
        self.change(k, |s| {
            if let Some(w) = s.watches.get_mut(&k) {
                w.open = w.open.saturating_sub(1);
                if w.open == 0 {
                    s.watches.remove(&k);
                }
            }
        });
    }

    /// Drops leaves no verifier accepts any more (`notAfter + clock_skew <= now`); returns how
    /// many it dropped. O(dropped): they are the front of the expiry index. A queued leaf it
    /// drops is not written: a file writer writes the queue first.
    pub fn compact(&mut self, now: OffsetDateTime, clock_skew: Duration) -> usize {
        let cut = (now - clock_skew).unix_timestamp();
        if cut < 0 {
            return 0;
        }
        let gone: Vec<u32> = self
            .tally
            .expiry
            .range(..=(secs(cut), u32::MAX))
            .map(|&(_, s)| s)
            .collect();
        for &slot in &gone {
            let k = unpack(self.slots[slot as usize].key);
            self.change(k, |s| s.remove(slot));
        }
        gone.len()
    }

    /// The newest leaf of every instance (live or not yet compacted).
    pub fn records(&self) -> impl Iterator<Item = HeldLeaf> + '_ {
        self.held().map(|(s, e)| self.to_held(s, e))
    }

    /// How many instances have a record.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Whether the ledger holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Leaves changed since the file last had them.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// SPIFFE IDs with a record.
    pub fn identities(&self) -> usize {
        self.ids.len()
    }

    /// The gates' view at `now`, counting instances handed `min_version` or newer, from the
    /// incremental tally (O(anchors + bundle versions)); for a `now` earlier than a previous
    /// summary's, by a scan ([`Ledger::summary_by_scan`]).
    pub fn summary(
        &mut self,
        now: OffsetDateTime,
        leaf_ttl_max: Duration,
        clock_skew: Duration,
        min_version: u64,
    ) -> LedgerSummary {
        let cut = (now - clock_skew).unix_timestamp();
        if cut < self.tally.cut {
            return self.summary_by_scan(now, leaf_ttl_max, clock_skew, min_version);
        }
        self.advance(cut);
        let live_leaves = self
            .tally
            .by_anchor
            .iter()
            .map(|(a, n)| (self.anchors[usize::from(*a)].clone(), *n))
            .collect();
        let by_api = convergence(
            self.tally.by_version.iter().map(|(&(a, v), &n)| (a, v, n)),
            min_version,
            &self.delivered,
        );
        self.summary_of(live_leaves, by_api, leaf_ttl_max, clock_skew, min_version)
    }

    fn summary_of(
        &self,
        live_leaves: BTreeMap<CertId, u64>,
        by_api: BTreeMap<Api, ApiConvergence>,
        leaf_ttl_max: Duration,
        clock_skew: Duration,
        min_version: u64,
    ) -> LedgerSummary {
        LedgerSummary {
            complete_since: self.complete_since,
            trustworthy_at: self.trustworthy_at(leaf_ttl_max, clock_skew),
            live_leaves,
            live_workloads: by_api.values().map(|c| c.live_workloads).sum(),
            workloads_current: by_api.values().map(|c| c.workloads_current).sum(),
            min_version,
            by_api,
            partial: self.partial,
            restart_bound: RestartBound::NotTracked,
            revoked_issuers: Vec::new(),
        }
    }

    /// The same view computed by walking every instance: the reference the tally is tested
    /// against, and the answer for a time before the tally's.
    pub fn summary_by_scan(
        &self,
        now: OffsetDateTime,
        leaf_ttl_max: Duration,
        clock_skew: Duration,
        min_version: u64,
    ) -> LedgerSummary {
        let cut = (now - clock_skew).unix_timestamp();
        let mut live_leaves = BTreeMap::new();
        let mut workloads = Vec::new();
        for (_, r) in self.held() {
            let k = unpack(r.key);
            let leaf_live = i64::from(r.not_after) > cut;
            if leaf_live {
                *live_leaves
                    .entry(self.anchors[usize::from(r.anchor)].clone())
                    .or_insert(0) += 1;
            }
            let watch = self.watches.get(&k);
            if leaf_live || watch.is_some() {
                let v = u64::from(r.version).max(watch.map_or(0, |w| w.version));
                workloads.push((r.api, v, 1));
            }
        }
        for k in self.watches.keys() {
            if self.slot_of(*k).is_none() {
                workloads.push((Api::Meshca, self.watches[k].version, 1));
            }
        }
        let by_api = convergence(workloads, min_version, &self.delivered);
        self.summary_of(live_leaves, by_api, leaf_ttl_max, clock_skew, min_version)
    }
}
/// Live and current workloads per face, from `(face, bundle version, instances)` counts and
/// what each face delivered out of band.
fn convergence(
    counts: impl IntoIterator<Item = (Api, u64, u64)>,
    min_version: u64,
    delivered: &BTreeMap<Api, u64>,
) -> BTreeMap<Api, ApiConvergence> {
    let mut by_api = BTreeMap::<Api, ApiConvergence>::new();
    for (api, version, n) in counts {
        let c = by_api.entry(api).or_default();
        c.live_workloads += n;
        if version.max(delivered.get(&api).copied().unwrap_or(0)) >= min_version {
            c.workloads_current += n;
        }
    }
    by_api
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, inst: &str, anchor: &str, na: i64, v: u64) -> LeafRecord {
        LeafRecord {
            serial: format!("{id}{inst}{na}"),
            spiffe_id: id.into(),
            instance: inst.into(),
            anchor: CertId::of(anchor.as_bytes()),
            issued: v.cast_signed(),
            not_after: na,
            bundle_version: v,
            via: None,
            issuer: None,
            api: Api::Meshca,
        }
    }

    const SKEW: Duration = Duration::from_secs(300);
    const MAX: Duration = Duration::from_secs(48 * 3600);

    #[test]
    fn caps_refuse_new_instances_per_identity_and_degrade_to_time_when_full() {
        let t0 = OffsetDateTime::from_unix_timestamp(0).unwrap();
        let mut l = Ledger::new(t0);
        l.set_limits(LedgerLimits {
            max_instances: 4,
            max_per_identity: 2,
        });
        let leaf = |id: &str, inst: &str, issued: i64| LeafRecord {
            issued,
            ..rec(id, inst, "A", 100_000, 1)
        };
        assert_eq!(l.record(leaf("w", "p1", 10)), Recorded::Kept);
        assert_eq!(l.record(leaf("w", "p2", 11)), Recorded::Kept);
        // A third instance of w: refused before signing; a known one may renew.
        assert_eq!(l.admit("w", "p3").unwrap_err().held, 2);
        assert!(l.admit("w", "p1").is_ok());
        assert_eq!(l.record(leaf("w", "p1", 12)), Recorded::Kept);
        // Other identities fill the ledger; the fifth instance is dropped and the ledger is
        // complete only from its issue time (measured gates wait for time again).
        assert_eq!(l.record(leaf("x", "p1", 13)), Recorded::Kept);
        assert_eq!(l.record(leaf("y", "p1", 14)), Recorded::Kept);
        assert_eq!(l.complete_since(), t0);
        assert_eq!(l.record(leaf("z", "p1", 15)), Recorded::DroppedFull);
        assert_eq!(l.complete_since().unix_timestamp(), 15);
        assert_eq!(l.len(), 4);
        // A known instance still renews in a full ledger.
        assert_eq!(l.record(leaf("x", "p1", 16)), Recorded::Kept);
        // Expired leaves leave, and their identity's count with them.
        let later = OffsetDateTime::from_unix_timestamp(200_000).unwrap();
        assert_eq!(l.compact(later, SKEW), 4);
        assert!(l.admit("w", "p3").is_ok());
        assert_eq!(l.record(leaf("z", "p1", 17)), Recorded::Kept);
        // Unlimited: nothing refused.
        l.set_limits(LedgerLimits::default());
        for i in 0..10 {
            assert!(l.admit("w", &format!("q{i}")).is_ok());
            assert_eq!(l.record(leaf("w", &format!("q{i}"), 20)), Recorded::Kept);
        }
    }

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(s).unwrap()
    }

    #[test]
    fn newest_leaf_per_instance_counts() {
        let mut l = Ledger::new(at(0));
        l.record(rec("w", "p1", "A", 1000, 1));
        l.record(rec("w", "p1", "B", 2000, 2));
        // Replayed out of order: the older record does not win.
        l.record(rec("w", "p1", "A", 1000, 1));
        l.record(rec("w", "p2", "A", 1500, 1));
        // Same instance id, other SPIFFE ID: a different instance.
        l.record(rec("x", "p1", "A", 1500, 1));
        let s = l.summary(at(100), MAX, SKEW, 2);
        assert_eq!(s.live_under(&CertId::of(b"A")), 2);
        assert_eq!(s.live_under(&CertId::of(b"B")), 1);
        assert_eq!((s.live_workloads, s.workloads_current), (3, 1));
    }

    #[test]
    fn convergence_is_counted_per_face() {
        let mut l = Ledger::new(at(0));
        let on = |api, inst: &str, v| LeafRecord {
            api,
            ..rec("w", inst, "A", 1000, v)
        };
        l.record(on(Api::Istio, "p1", 2));
        l.record(on(Api::Istio, "p2", 1));
        l.record(on(Api::Linkerd, "p3", 0));
        l.record(on(Api::Meshca, "p4", 2));
        // A renewal on another face moves the instance there.
        l.record(LeafRecord {
            issued: 5,
            ..on(Api::Istio, "p4", 2)
        });
        l.watch_opened("v", "only-watches");
        let s = l.summary(at(100), MAX, SKEW, 2);
        let c = |api| s.by_api.get(&api).copied().unwrap_or_default();
        assert_eq!(
            c(Api::Istio),
            ApiConvergence {
                live_workloads: 3,
                workloads_current: 2
            }
        );
        assert_eq!(c(Api::Linkerd).live_workloads, 1);
        assert_eq!(c(Api::Linkerd).workloads_current, 0);
        assert_eq!(
            c(Api::Meshca).live_workloads,
            1,
            "the stream without a leaf"
        );
        assert_eq!((s.live_workloads, s.workloads_current), (5, 2));
        assert_eq!(s, l.summary_by_scan(at(100), MAX, SKEW, 2));
    }

    /// Pod certificates carry no bundle: their workloads count as current only once the face
    /// says it delivered the version out of band (the ClusterTrustBundle), and then all of them.
    #[test]
    fn a_face_that_delivers_out_of_band_counts_once_it_says_so() {
        let mut l = Ledger::new(at(0));
        let pod = |inst: &str| LeafRecord {
            api: Api::Pod,
            ..rec("w", inst, "A", 1000, 0)
        };
        l.record(pod("p1"));
        l.record(pod("p2"));
        let current = |l: &mut Ledger| {
            let s = l.summary(at(100), MAX, SKEW, 3);
            assert_eq!(s, l.summary_by_scan(at(100), MAX, SKEW, 3));
            s.by_api.get(&Api::Pod).copied().unwrap_or_default()
        };
        assert_eq!(current(&mut l).workloads_current, 0);
        l.set_delivered(Api::Pod, 2);
        assert_eq!(current(&mut l).workloads_current, 0, "v2 is not v3");
        l.set_delivered(Api::Pod, 3);
        l.set_delivered(Api::Pod, 1);
        assert_eq!(
            current(&mut l),
            ApiConvergence {
                live_workloads: 2,
                workloads_current: 2
            },
            "never lowered"
        );
    }

    #[test]
    fn a_renewal_with_a_shorter_ttl_still_supersedes() {
        let mut l = Ledger::new(at(0));
        l.record(rec("w", "p1", "A", 72_000, 1));
        l.record(rec("w", "p1", "B", 3_600, 2));
        let s = l.summary(at(100), MAX, SKEW, 2);
        assert_eq!(s.live_under(&CertId::of(b"A")), 0);
        assert_eq!(s.live_under(&CertId::of(b"B")), 1);
    }

    #[test]
    fn liveness_counts_the_clock_skew() {
        let mut l = Ledger::new(at(0));
        l.record(rec("w", "p1", "A", 1000, 1));
        assert_eq!(l.summary(at(1299), MAX, SKEW, 1).live_workloads, 1);
        assert_eq!(l.summary(at(1300), MAX, SKEW, 1).live_workloads, 0);
        assert_eq!(l.compact(at(1299), SKEW), 0);
        assert_eq!(l.compact(at(1300), SKEW), 1);
        assert!(l.is_empty());
    }

    #[test]
    fn watchers_are_live_and_carry_versions() {
        let mut l = Ledger::new(at(0));
        l.record(rec("w", "p1", "A", 1000, 1));
        l.watch_opened("w", "p1");
        l.watch_opened("v", "only-watches");
        let s = l.summary(at(100), MAX, SKEW, 2);
        assert_eq!((s.live_workloads, s.workloads_current), (2, 0));
        l.watch_sent("w", "p1", 2);
        l.watch_sent("v", "only-watches", 2);
        let s = l.summary(at(100), MAX, SKEW, 2);
        assert_eq!((s.live_workloads, s.workloads_current), (2, 2));
        // After its leaf expired, an open stream keeps the instance live.
        let s = l.summary(at(5000), MAX, SKEW, 2);
        assert_eq!((s.live_workloads, s.workloads_current), (2, 2));
        l.watch_closed("v", "only-watches");
        l.watch_closed("w", "p1");
        assert_eq!(l.summary(at(5000), MAX, SKEW, 2).live_workloads, 0);
    }

    #[test]
    fn trust_starts_after_every_unknown_leaf_expired() {
        let mut l = Ledger::new(at(1000));
        let s = l.summary(at(0), MAX, SKEW, 1);
        let t = at(1000) + MAX + SKEW;
        assert_eq!(s.trustworthy_at, t);
        assert!(!s.trustworthy(t - Duration::from_secs(1)));
        assert!(s.trustworthy(t));
    }

    /// The incremental tally answers exactly what a full scan does, after any sequence of
    /// records (renewals, stale replays), watch opens/sends/closes, compactions and summaries at
    /// times moving forward (and sometimes back, which scans).
    mod tally {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Record {
                id: u8,
                inst: u8,
                anchor: u8,
                issued: i64,
                na: i64,
                v: u64,
                api: usize,
            },
            Open {
                id: u8,
                inst: u8,
            },
            Sent {
                id: u8,
                inst: u8,
                v: u64,
            },
            Close {
                id: u8,
                inst: u8,
            },
            Compact {
                dt: i64,
            },
            Summary {
                dt: i64,
                min: u64,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0u8..4, 0u8..4, 0u8..3, 0i64..400, 0i64..600, 0u64..5, 0usize..3).prop_map(
                    |(id, inst, anchor, issued, na, v, api)| Op::Record { id, inst, anchor, issued, na, v, api }
                ),
                1 => (0u8..4, 0u8..4).prop_map(|(id, inst)| Op::Open { id, inst }),
                1 => (0u8..4, 0u8..4, 0u64..6).prop_map(|(id, inst, v)| Op::Sent { id, inst, v }),
                1 => (0u8..4, 0u8..4).prop_map(|(id, inst)| Op::Close { id, inst }),
                1 => (-20i64..60).prop_map(|dt| Op::Compact { dt }),
                3 => (-20i64..60, 0u64..6).prop_map(|(dt, min)| Op::Summary { dt, min }),
            ]
        }

        proptest! {
            #[test]
            fn the_tally_equals_a_scan(ops in proptest::collection::vec(op(), 1..120)) {
                let mut l = Ledger::new(at(0));
                let skew = Duration::from_secs(5);
                let mut now = 0i64;
                for o in ops {
                    match o {
                        Op::Record { id, inst, anchor, issued, na, v, api } => {
                            let mut r = rec(&format!("spiffe://td/ns/a/sa/{id}"), &inst.to_string(), &anchor.to_string(), na, v);
                            r.issued = issued;
                            r.api = Api::ALL[api];
                            l.record(r);
                        }
                        Op::Open { id, inst } => l.watch_opened(&format!("spiffe://td/ns/a/sa/{id}"), &inst.to_string()),
                        Op::Sent { id, inst, v } => l.watch_sent(&format!("spiffe://td/ns/a/sa/{id}"), &inst.to_string(), v),
                        Op::Close { id, inst } => l.watch_closed(&format!("spiffe://td/ns/a/sa/{id}"), &inst.to_string()),
                        Op::Compact { dt } => {
                            now = (now + dt).max(0);
                            l.compact(at(now), skew);
                        }
                        Op::Summary { dt, min } => {
                            now = (now + dt).max(0);
                            let kept = l.summary(at(now), MAX, skew, min);
                            prop_assert_eq!(kept, l.summary_by_scan(at(now), MAX, skew, min));
                        }
                    }
                }
                let kept = l.summary(at(now + 1), MAX, skew, 1);
                prop_assert_eq!(kept, l.summary_by_scan(at(now + 1), MAX, skew, 1));
            }
        }
    }
}
