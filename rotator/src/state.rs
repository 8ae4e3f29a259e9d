//! The authority state: trust anchors, issuers, the bundle and the rotation phase, plus the pure
//! transitions between states. A transition takes a state and `now` and returns the next state;
//! it performs no I/O. Whoever drives it commits the result to a store *before* acting on it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::pki::{CaCert, CertId, PkiError, SecretKey};
use crate::policy::Policy;
use crate::spiffe::TrustDomain;

/// How many transitions the state keeps in its history (the newest).
pub const HISTORY_LEN: usize = 64;

/// Where an anchor stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorStatus {
    /// In the bundle; the active issuer chains to it.
    Active,
    /// In the bundle, new: a rotation has staged it; nothing chains to it yet.
    Staged,
    /// In the bundle, old: a rotation has activated its successor; leaves may still chain to it.
    Retiring,
    /// Out of the bundle; kept on disk, never deleted.
    Archived,
}

impl AnchorStatus {
    /// Whether verifiers must trust an anchor in this status.
    pub fn in_bundle(self) -> bool {
        self != Self::Archived
    }
}

/// Where an issuer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerStatus {
    /// Key and certificate made and stored; not signing yet.
    Prepared,
    /// Signing leaves.
    Active,
    /// Signed leaves once; kept until it expires so those leaves can be accounted for.
    Retired,
}

/// The trust-anchor rotation phase (see PRODUCT.md, "Trust-anchor rotation: the contract").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Phase {
    /// One anchor in the bundle, and it signs.
    Steady,
    /// A new anchor is in the bundle beside the old one; the old one still signs.
    Staged {
        /// The new anchor.
        anchor: CertId,
        /// When it entered the bundle (or, after a rollback from `activated`, when it stopped
        /// signing).
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        /// After a rollback from `activated`: when the new anchor's issuer stopped signing. Leaves
        /// chaining to it may live until this plus the max leaf TTL.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        signed_until: Option<OffsetDateTime>,
    },
    /// The new anchor signs; the old one stays in the bundle until leaves chaining to it expire.
    Activated {
        /// The old anchor, still trusted.
        previous: CertId,
        /// When the new anchor started signing.
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
}

impl Phase {
    /// The phase's name as used in CLI output and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Staged { .. } => "staged",
            Self::Activated { .. } => "activated",
        }
    }
}

/// A trust anchor the authority knows.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// Certificate.
    pub cert: CaCert,
    /// Private key; `None` when the key lives elsewhere (upstream mode), or once destroyed
    /// after archival (see [`crate::policy::Policy::key_retention`]).
    pub key: Option<SecretKey>,
    /// Status.
    pub status: AnchorStatus,
    /// When it was archived (finished or rolled back), for its key's retention.
    pub archived: Option<OffsetDateTime>,
}

/// An issuer (intermediate CA) the authority knows.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Certificate.
    pub cert: CaCert,
    /// Private key (meshca always holds issuer keys).
    pub key: SecretKey,
    /// The anchor that signed it.
    pub anchor: CertId,
    /// Status.
    pub status: IssuerStatus,
}

/// One transition, as recorded in the state's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The generation it produced.
    pub generation: u64,
    /// What happened, e.g. `issuer_activated 1a2b…`.
    pub what: String,
}

/// Everything an authority is: the unit a store persists atomically.
#[derive(Debug, Clone)]
pub struct AuthorityState {
    /// SPIFFE trust domain.
    pub trust_domain: TrustDomain,
    /// Increases by one with every committed transition.
    pub generation: u64,
    /// Increases whenever the set of anchors in the bundle changes.
    pub bundle_version: u64,
    /// Every anchor ever held (archived ones included).
    pub anchors: Vec<Anchor>,
    /// Issuers not yet expired (and the active one even if it has).
    pub issuers: Vec<Issuer>,
    /// Trust-anchor rotation phase.
    pub phase: Phase,
    /// The newest transitions, oldest first.
    pub history: Vec<Event>,
    /// Upstream mode: the key of the next issuer, waiting for its certificate.
    pub pending_issuer_key: Option<PendingKey>,
    /// Identities refused on every face, whatever the credential (`meshca deny add`).
    pub denied: Vec<Denial>,
    /// Nodes whose agents may act for nobody (`meshca deny add --node`): compromised nodes.
    pub denied_nodes: Vec<NodeDenial>,
    /// Issuers an operator revoked (`meshca issuer revoke`): their leaves no longer renew with
    /// their own certificate. Kept until the issuer is pruned.
    pub revoked: Vec<Revocation>,
    /// Federated trust domains' bundles, as last accepted from their bundle endpoints (or their
    /// bootstrap bundles): what this authority's workloads trust peers of those domains with.
    pub federated: Vec<FederatedBundle>,
}

/// A federated trust domain's bundle (SPIFFE federation, `[[federation.trust_domains]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FederatedBundle {
    /// Its trust domain (never this authority's own).
    pub trust_domain: TrustDomain,
    /// Its anchors, PEM (public certificates).
    pub anchors_pem: String,
    /// Its endpoint's `spiffe_sequence` (0: the bootstrap bundle from the configuration).
    pub sequence: u64,
    /// When it was fetched (or bootstrapped).
    #[serde(with = "time::serde::rfc3339")]
    pub fetched: OffsetDateTime,
}

/// A revoked issuer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    /// The issuer.
    pub issuer: CertId,
    /// Why, as the operator gave it.
    pub reason: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who (the operator's uid).
    pub by: String,
}

/// An identity (or a namespace's, `spiffe://<td>/ns/<ns>/sa/*`) that meshca refuses to issue
/// for: a compromised workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    /// The SPIFFE ID or pattern.
    #[serde(with = "crate::spiffe::pattern_str")]
    pub pattern: crate::spiffe::IdPattern,
    /// Why, as the operator gave it (said in every refusal).
    pub reason: String,
    /// When it was added.
    #[serde(with = "time::serde::rfc3339")]
    pub added: OffsetDateTime,
    /// Until when it applies (`None`: until removed).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub until: Option<OffsetDateTime>,
    /// Who added it (the operator's uid, as the admin socket saw it).
    pub by: String,
}

/// A node whose node agents (ztunnel) may no longer request certificates for anyone: a
/// compromised node. Its own workloads' certificates are not affected (deny those by identity).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeDenial {
    /// The Kubernetes node name.
    pub node: String,
    /// Why, as the operator gave it (said in every refusal).
    pub reason: String,
    /// When it was added.
    #[serde(with = "time::serde::rfc3339")]
    pub added: OffsetDateTime,
    /// Until when it applies (`None`: until removed).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub until: Option<OffsetDateTime>,
    /// Who added it.
    pub by: String,
}

impl NodeDenial {
    /// Whether it applies at `now`.
    pub fn active(&self, now: OffsetDateTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

/// What every denial needs, of an identity or of a node: a reason, and an `until` (if any) in
/// the future.
fn check_denial(
    reason: &str,
    until: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<(), StateError> {
    if reason.trim().is_empty() {
        return Err(StateError::Unusable(
            "a denial needs a reason (--reason)".into(),
        ));
    }
    match until {
        Some(u) if u <= now => Err(StateError::Unusable(format!(
            "--until {} is not in the future",
            rfc3339(u)
        ))),
        _ => Ok(()),
    }
}

impl Denial {
    /// Whether it applies at `now`.
    pub fn active(&self, now: OffsetDateTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

impl AuthorityState {
    /// The bundle held for federated trust domain `td`, if any.
    pub fn federated_bundle(&self, td: &TrustDomain) -> Option<&FederatedBundle> {
        self.federated.iter().find(|b| &b.trust_domain == td)
    }

    /// Forgets the sequence held for federated trust domain `td` (`meshca federation reset`),
    /// keeping its anchors, so that the next bundle its endpoint publishes is accepted whatever
    /// its sequence: the way out when a peer reset its sequence, or once published a huge one.
    pub fn reset_federated_sequence(
        &self,
        now: OffsetDateTime,
        td: &TrustDomain,
    ) -> Result<(Self, u64), StateError> {
        let Some(held) = self.federated_bundle(td) else {
            return Err(StateError::NotFound(format!(
                "no bundle is held for federated trust domain {td}"
            )));
        };
        let previous = held.sequence;
        let mut s = self.clone();
        for b in s.federated.iter_mut().filter(|b| &b.trust_domain == td) {
            b.sequence = 0;
        }
        s.record(
            now,
            format!("federation_reset {td}: sequence {previous} forgotten"),
        );
        Ok((s, previous))
    }

    /// Holds `bundle` for its trust domain from now on (replacing the one held). Refused for this
    /// authority's own trust domain, without anchors, or with a sequence lower than the held one.
    pub fn set_federated(
        &self,
        now: OffsetDateTime,
        bundle: FederatedBundle,
    ) -> Result<Self, StateError> {
        if bundle.trust_domain == self.trust_domain {
            return Err(StateError::Unusable(format!(
                "{} is this authority's own trust domain, not a federated one",
                bundle.trust_domain
            )));
        }
        if !bundle.anchors_pem.contains("BEGIN CERTIFICATE") {
            return Err(StateError::Unusable(format!(
                "the bundle of {} has no anchor",
                bundle.trust_domain
            )));
        }
        if let Some(held) = self.federated_bundle(&bundle.trust_domain)
            && bundle.sequence < held.sequence
        {
            return Err(StateError::Unusable(format!(
                "the bundle of {} goes back from sequence {} to {}",
                bundle.trust_domain, held.sequence, bundle.sequence
            )));
        }
        let mut s = self.clone();
        s.record(
            now,
            format!(
                "federated_bundle {} sequence {}",
                bundle.trust_domain, bundle.sequence
            ),
        );
        s.federated
            .retain(|b| b.trust_domain != bundle.trust_domain);
        s.federated.push(bundle);
        s.federated
            .sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
        Ok(s)
    }

    /// Drops the bundles of trust domains not in `keep` (no longer federated); `None` when there
    /// are none.
    pub fn retain_federated(&self, now: OffsetDateTime, keep: &[TrustDomain]) -> Option<Self> {
        let gone: Vec<_> = self
            .federated
            .iter()
            .filter(|b| !keep.contains(&b.trust_domain))
            .map(|b| b.trust_domain.to_string())
            .collect();
        if gone.is_empty() {
            return None;
        }
        let mut s = self.clone();
        s.federated.retain(|b| keep.contains(&b.trust_domain));
        s.record(now, format!("federation_ended {}", gone.join(", ")));
        Some(s)
    }

    /// The denial in force for `id` at `now`, if any.
    pub fn denial_for(&self, id: &crate::spiffe::SpiffeId, now: OffsetDateTime) -> Option<&Denial> {
        self.denied
            .iter()
            .find(|d| d.active(now) && d.pattern.matches(id))
    }

    /// Denies `pattern` from now on (replacing an earlier denial of the same pattern).
    pub fn deny(
        &self,
        now: OffsetDateTime,
        pattern: crate::spiffe::IdPattern,
        reason: String,
        until: Option<OffsetDateTime>,
        by: String,
    ) -> Result<Self, StateError> {
        check_denial(&reason, until, now)?;
        let mut s = self.clone();
        // A denial of the same pattern is replaced (the caller says so); lapsed ones go.
        s.denied.retain(|d| d.pattern != pattern && d.active(now));
        s.record(now, format!("identity_denied {pattern}: {reason}"));
        s.denied.push(Denial {
            pattern,
            reason,
            added: crate::clock::whole_seconds(now),
            until,
            by,
        });
        Ok(s)
    }

    /// Revokes issuer `id`: it signs nothing more, and leaves it signed can no longer renew with
    /// their own certificate. If it was the active issuer, a fresh one takes over at once — made
    /// under the active anchor in local mode; in upstream mode a prepared (imported) one, and
    /// without one the revocation is refused with what the operator must do first (meshca will
    /// not leave itself nothing to sign with).
    pub fn revoke_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        id: &CertId,
        reason: String,
        by: String,
    ) -> Result<Self, StateError> {
        if reason.trim().is_empty() {
            return Err(StateError::Unusable(
                "a revocation needs a reason (--reason)".into(),
            ));
        }
        let issuer = self
            .issuer(id)
            .ok_or_else(|| StateError::NotFound(format!("no issuer {id}")))?;
        if self.revoked.iter().any(|r| &r.issuer == id) {
            return Err(StateError::Unusable(format!(
                "issuer {id} is already revoked"
            )));
        }
        let mut s = match issuer.status {
            IssuerStatus::Active => self.replace_active_issuer(policy, now, id)?,
            IssuerStatus::Prepared | IssuerStatus::Retired => self.clone(),
        };
        for i in &mut s.issuers {
            if i.cert.id() == id && i.status == IssuerStatus::Prepared {
                i.status = IssuerStatus::Retired;
            }
        }
        s.revoked.push(Revocation {
            issuer: id.clone(),
            reason: reason.clone(),
            at: crate::clock::whole_seconds(now),
            by,
        });
        s.record(now, format!("issuer_revoked {id}: {reason}"));
        Ok(s)
    }

    /// A successor for the active issuer `id`, active now.
    fn replace_active_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        id: &CertId,
    ) -> Result<Self, StateError> {
        let anchor = self.active_anchor().ok_or_else(no_active_anchor)?;
        let anchor_id = anchor.cert.id().clone();
        if anchor.key.is_some() {
            let s = self.prepare_issuer(policy, now, &anchor_id)?;
            let fresh = s
                .issuers
                .last()
                .map(|i| i.cert.id().clone())
                .ok_or_else(|| StateError::Invariant("no issuer after preparing one".into()))?;
            return s.activate_issuer(now, &fresh);
        }
        let prepared = self
            .issuers
            .iter()
            .find(|i| {
                i.status == IssuerStatus::Prepared && i.anchor == anchor_id && i.cert.id() != id
            })
            .map(|i| i.cert.id().clone());
        match prepared {
            Some(p) => self.activate_issuer(now, &p),
            None => Err(StateError::Upstream(format!(
                "upstream mode: meshca cannot make the replacement for issuer {id} (the anchor key is not here). \
                 Run `meshca issuer csr`, have the CSR signed by your upstream CA, `meshca issuer import` it, then \
                 revoke {id}: revoking it now would leave nothing to sign with"
            ))),
        }
    }

    /// Denies node `node` from now on (replacing an earlier denial of it): its node agents act
    /// for nobody.
    pub fn deny_node(
        &self,
        now: OffsetDateTime,
        node: &str,
        reason: String,
        until: Option<OffsetDateTime>,
        by: String,
    ) -> Result<Self, StateError> {
        let valid = !node.is_empty()
            && node.len() <= 253
            && node
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(StateError::Unusable(format!(
                "{node:?} is not a Kubernetes node name (lowercase letters, digits, '-' and '.')"
            )));
        }
        check_denial(&reason, until, now)?;
        let mut s = self.clone();
        s.denied_nodes.retain(|d| d.node != node && d.active(now));
        s.record(now, format!("node_denied {node}: {reason}"));
        s.denied_nodes.push(NodeDenial {
            node: node.to_owned(),
            reason,
            added: crate::clock::whole_seconds(now),
            until,
            by,
        });
        Ok(s)
    }

    /// Lifts the denial of node `node`; none is an error.
    pub fn undeny_node(&self, now: OffsetDateTime, node: &str) -> Result<Self, StateError> {
        if !self
            .denied_nodes
            .iter()
            .any(|d| d.node == node && d.active(now))
        {
            return Err(StateError::NotFound(format!("node {node} is not denied")));
        }
        let mut s = self.clone();
        s.denied_nodes.retain(|d| d.node != node && d.active(now));
        s.record(now, format!("node_allowed {node}"));
        Ok(s)
    }

    /// Lifts the denial of exactly `pattern`; none is an error.
    pub fn undeny(
        &self,
        now: OffsetDateTime,
        pattern: &crate::spiffe::IdPattern,
    ) -> Result<Self, StateError> {
        if !self
            .denied
            .iter()
            .any(|d| &d.pattern == pattern && d.active(now))
        {
            return Err(StateError::NotFound(format!("{pattern} is not denied")));
        }
        let mut s = self.clone();
        s.denied.retain(|d| &d.pattern != pattern && d.active(now));
        s.record(now, format!("identity_allowed {pattern}"));
        Ok(s)
    }

    /// Every key the state holds that lives in a key store, by reference: anchors' (while kept),
    /// issuers' and the pending issuer key.
    pub fn stored_keys(&self) -> std::collections::BTreeMap<String, SecretKey> {
        let keys = self
            .anchors
            .iter()
            .filter_map(|a| a.key.as_ref())
            .chain(self.issuers.iter().map(|i| &i.key))
            .chain(self.pending_issuer_key.iter().map(|p| &p.key));
        keys.filter_map(|k| match k.location() {
            crate::pki::KeyLocation::Stored(r) => Some((r, k.clone())),
            crate::pki::KeyLocation::State => None,
        })
        .collect()
    }
}

/// A key made for an issuer whose certificate an upstream CA signs.
#[derive(Debug, Clone)]
pub struct PendingKey {
    /// The key (never leaves the store).
    pub key: SecretKey,
    /// When it was made.
    pub created: OffsetDateTime,
}

/// A short id of a key: the first 8 bytes of SHA-256 over its SubjectPublicKeyInfo, hex.
pub fn key_id(key: &SecretKey) -> String {
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, &key.spki_der()).as_ref()[..8])
}

/// Why a transition cannot apply, or why a state is inconsistent. Each variant is one kind of
/// refusal, so that the service boundary maps it to a status code without reading messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The step does not apply in the current phase; `next` says what does.
    #[error("`{step}` does not apply in phase {phase}{next}")]
    WrongPhase {
        /// The step asked for (`stage`, `activate`, `finish`, `rollback`).
        step: &'static str,
        /// The current phase.
        phase: &'static str,
        /// What may be done instead (`: the next step is …`), or empty.
        next: &'static str,
    },
    /// A trust-anchor gate is closed and the step was not forced.
    #[error(
        "gate closed, `{}` refused: {}. To skip it: --force (risk: {})",
        .0.step.name(),
        .0.explain(),
        .0.risk
    )]
    GateClosed(Box<crate::gate::Gate>),
    /// The anchor's key is held upstream (not here), so meshca cannot sign with it; the message
    /// says what the operator must do instead.
    #[error("{0}")]
    Upstream(String),
    /// No issuer key is pending, so there is nothing an imported issuer could be for.
    #[error("no issuer key is pending: run `meshca issuer csr` first and have its CSR signed")]
    NoPendingKey,
    /// An anchor or issuer the step names is not in the state, or not in the status it needs.
    #[error("{0}")]
    NotFound(String),
    /// A certificate or key offered to the authority (an imported anchor or issuer) is refused;
    /// the message says why.
    #[error("{0}")]
    Unusable(String),
    /// A structural invariant is broken (see [`AuthorityState::check`]).
    #[error("{0}")]
    Invariant(String),
    /// Making a key or certificate failed (the RNG, or a bug): not the request's fault.
    #[error("{0}")]
    Pki(String),
    /// The key store cannot make or find a key now (a full or lost token): nothing changed;
    /// the same step can succeed once it can.
    #[error("{0}")]
    KeyStore(String),
}

impl From<PkiError> for StateError {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::KeyStore(_) => Self::KeyStore(e.to_string()),
            e => Self::Pki(e.to_string()),
        }
    }
}

impl AuthorityState {
    /// A brand-new authority: a generated anchor, an issuer it signs, bundle version 1.
    pub fn genesis(
        td: TrustDomain,
        policy: &Policy,
        now: OffsetDateTime,
    ) -> Result<Self, StateError> {
        let anchor_key = SecretKey::generate_ca()?;
        let anchor = crate::profile::new_anchor(
            &td,
            &anchor_key,
            now,
            policy.anchor_ttl,
            policy.clock_skew,
        )?;
        Self::with_anchor(td, anchor, Some(anchor_key), policy, now)
    }

    /// A brand-new authority around an existing anchor (imported, or upstream with `key: None`).
    /// With the anchor's key an issuer is made at once; without it the authority has no issuer
    /// until one is imported.
    pub fn with_anchor(
        td: TrustDomain,
        anchor: CaCert,
        key: Option<SecretKey>,
        policy: &Policy,
        now: OffsetDateTime,
    ) -> Result<Self, StateError> {
        if let Some(k) = &key
            && !anchor.matches_key(k)
        {
            return Err(StateError::Unusable(
                "the anchor key does not match the anchor certificate".into(),
            ));
        }
        if !anchor.info.self_signed {
            return Err(StateError::Unusable(
                "the anchor certificate is not self-signed".into(),
            ));
        }
        if !anchor.info.valid_at(now) {
            return Err(StateError::Unusable(format!(
                "the anchor certificate is not valid now (valid {} to {})",
                rfc3339(anchor.info.not_before),
                rfc3339(anchor.info.not_after)
            )));
        }
        let id = anchor.id().clone();
        let mut s = Self {
            trust_domain: td,
            generation: 0,
            bundle_version: 1,
            anchors: vec![Anchor {
                cert: anchor,
                key,
                status: AnchorStatus::Active,
                archived: None,
            }],
            issuers: Vec::new(),
            phase: Phase::Steady,
            history: Vec::new(),
            pending_issuer_key: None,
            denied: Vec::new(),
            denied_nodes: Vec::new(),
            federated: Vec::new(),
            revoked: Vec::new(),
        };
        s.record(now, format!("anchor_created {id}"));
        if s.anchors[0].key.is_some() {
            s = s.prepare_issuer(policy, now, &id)?;
            let next = s.issuers[0].cert.id().clone();
            s = s.activate_issuer(now, &next)?;
        }
        Ok(s)
    }

    /// The issuer that signs leaves, if any.
    pub fn active_issuer(&self) -> Option<&Issuer> {
        self.issuers
            .iter()
            .find(|i| i.status == IssuerStatus::Active)
    }

    /// The anchor with this id.
    pub fn anchor(&self, id: &CertId) -> Option<&Anchor> {
        self.anchors.iter().find(|a| a.cert.id() == id)
    }

    /// The issuer with this id.
    pub fn issuer(&self, id: &CertId) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.cert.id() == id)
    }

    /// The anchor new issuers are signed by (status `Active`).
    pub fn active_anchor(&self) -> Option<&Anchor> {
        self.anchors
            .iter()
            .find(|a| a.status == AnchorStatus::Active)
    }

    /// The anchors verifiers must trust right now, in a stable order (oldest first).
    pub fn bundle(&self) -> impl Iterator<Item = &Anchor> {
        self.anchors.iter().filter(|a| a.status.in_bundle())
    }

    /// A new issuer, signed by `anchor` and stored as `Prepared`.
    pub fn prepare_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        anchor: &CertId,
    ) -> Result<Self, StateError> {
        let a = self
            .anchor(anchor)
            .ok_or_else(|| StateError::NotFound(format!("no anchor {anchor}")))?;
        let Some(anchor_key) = &a.key else {
            return Err(StateError::Upstream(format!(
                "anchor {anchor} is held upstream (no key here): an issuer must be imported"
            )));
        };
        let key = SecretKey::generate_ca()?;
        let cert = crate::profile::new_issuer(
            &self.trust_domain,
            &key,
            &a.cert,
            anchor_key,
            now,
            policy.issuer_ttl,
            policy.clock_skew,
        )?;
        let id = cert.id().clone();
        let mut s = self.clone();
        s.issuers.push(Issuer {
            cert,
            key,
            anchor: anchor.clone(),
            status: IssuerStatus::Prepared,
        });
        s.record(now, format!("issuer_prepared {id} under anchor {anchor}"));
        Ok(s)
    }

    /// The key for the next issuer in upstream mode, made now unless one is already pending.
    /// `Ok(None)`: one was pending already (it is reused, so a CSR can be re-made).
    pub fn with_pending_issuer_key(&self, now: OffsetDateTime) -> Result<Option<Self>, StateError> {
        if self.pending_issuer_key.is_some() {
            return Ok(None);
        }
        let mut s = self.clone();
        let key = SecretKey::generate_ca()?;
        let id = key_id(&key);
        s.pending_issuer_key = Some(PendingKey {
            key,
            created: crate::clock::whole_seconds(now),
        });
        s.record(now, format!("issuer_key_pending {id}"));
        Ok(Some(s))
    }

    /// Installs an issuer certificate signed elsewhere for the pending key. It must be a CA that
    /// may sign, for the pending key, chain to an anchor in the bundle without outliving it, be
    /// valid now and have at least `leaf_ttl_max` left. It becomes the active issuer at once when
    /// it chains to the active anchor (the bundle does not change, so switching is always safe),
    /// otherwise it stays prepared. Every refusal says why, and changes nothing.
    pub fn import_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        cert: CaCert,
    ) -> Result<Self, StateError> {
        let pending = self
            .pending_issuer_key
            .as_ref()
            .ok_or(StateError::NoPendingKey)?;
        if !cert.matches_key(&pending.key) {
            return Err(StateError::Unusable(format!(
                "the certificate's key is not the pending issuer key {} (was it signed from another CSR?)",
                key_id(&pending.key)
            )));
        }
        let mut s =
            self.install_issuer(policy, now, cert, pending.key.clone(), "issuer_imported")?;
        s.pending_issuer_key = None;
        Ok(s)
    }

    /// An issuer whose certificate *and* key come from outside (cert-manager renewing a
    /// `kubernetes.io/tls` Secret), checked as [`import_issuer`](Self::import_issuer) checks
    /// one: the key must be the certificate's, it must chain to an anchor in the bundle, be
    /// valid now, outlive `leaf_ttl_max` and not its anchor. Active at once under the active
    /// anchor, as an import is.
    pub fn adopt_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        cert: CaCert,
        key: SecretKey,
    ) -> Result<Self, StateError> {
        if !cert.matches_key(&key) {
            return Err(StateError::Unusable(
                "the private key is not the certificate's".into(),
            ));
        }
        self.install_issuer(policy, now, cert, key, "issuer_adopted")
    }

    /// The checks and the install shared by an import and an adoption.
    fn install_issuer(
        &self,
        policy: &Policy,
        now: OffsetDateTime,
        cert: CaCert,
        key: SecretKey,
        what: &str,
    ) -> Result<Self, StateError> {
        if self.issuer(cert.id()).is_some() {
            return Err(StateError::Unusable(format!(
                "issuer {} is already installed",
                cert.id()
            )));
        }
        let anchor = self
            .bundle()
            .find(|a| cert.verify_issued_by(&a.cert).is_ok())
            .ok_or_else(|| {
                StateError::Unusable(
                    "the certificate is not signed by any anchor in the bundle".into(),
                )
            })?;
        if !cert.info.valid_at(now) {
            return Err(StateError::Unusable(format!(
                "the certificate is not valid now (valid {} to {})",
                rfc3339(cert.info.not_before),
                rfc3339(cert.info.not_after)
            )));
        }
        let left = cert.info.remaining(now);
        if left < policy.leaf_ttl_max {
            return Err(StateError::Unusable(format!(
                "the certificate has {} left, less than leaf_ttl_max = {}: have it signed for longer",
                human(left),
                human(policy.leaf_ttl_max)
            )));
        }
        if cert.info.not_after > anchor.cert.info.not_after {
            return Err(StateError::Unusable(format!(
                "the certificate outlives its anchor {} (notAfter {} > {})",
                anchor.cert.id(),
                rfc3339(cert.info.not_after),
                rfc3339(anchor.cert.info.not_after)
            )));
        }
        let id = cert.id().clone();
        let anchor_id = anchor.cert.id().clone();
        let activate = anchor.status == AnchorStatus::Active;
        let mut s = self.clone();
        s.issuers.push(Issuer {
            cert,
            key,
            anchor: anchor_id.clone(),
            status: IssuerStatus::Prepared,
        });
        s.record(now, format!("{what} {id} under anchor {anchor_id}"));
        if activate {
            s.activate_issuer(now, &id)
        } else {
            Ok(s)
        }
    }

    /// Makes the prepared issuer `id` the active one; the previous active issuer is retired.
    pub fn activate_issuer(&self, now: OffsetDateTime, id: &CertId) -> Result<Self, StateError> {
        let mut s = self.clone();
        let Some(next) = s.issuers.iter().position(|i| i.cert.id() == id) else {
            return Err(StateError::NotFound(format!("no issuer {id}")));
        };
        if s.issuers[next].status != IssuerStatus::Prepared {
            return Err(StateError::NotFound(format!("issuer {id} is not prepared")));
        }
        if let Some(r) = s.revoked.iter().find(|r| &r.issuer == id) {
            return Err(StateError::Unusable(format!(
                "issuer {id} was revoked ({}): it never signs again",
                r.reason
            )));
        }
        if !s.issuers[next].cert.info.valid_at(now) {
            return Err(StateError::NotFound(format!(
                "issuer {id} is not valid now"
            )));
        }
        let anchor_ok = s
            .anchor(&s.issuers[next].anchor)
            .is_some_and(|a| a.status == AnchorStatus::Active);
        if !anchor_ok {
            return Err(StateError::NotFound(format!(
                "issuer {id} is not signed by the active anchor"
            )));
        }
        for i in &mut s.issuers {
            if i.status == IssuerStatus::Active {
                i.status = IssuerStatus::Retired;
            }
        }
        s.issuers[next].status = IssuerStatus::Active;
        s.record(now, format!("issuer_activated {id}"));
        Ok(s)
    }

    /// When each key that can never be used again is due for destruction: a retired or
    /// prepared issuer's at its expiry (its leaves have expired too), an archived anchor's at its
    /// archival — each plus `retention`. Only keys still held are listed.
    fn keys_due(
        &self,
        retention: std::time::Duration,
    ) -> impl Iterator<Item = OffsetDateTime> + '_ {
        let issuers = self
            .issuers
            .iter()
            .filter(|i| i.status != IssuerStatus::Active)
            .map(move |i| i.cert.info.not_after + retention);
        let anchors = self
            .anchors
            .iter()
            .filter(|a| a.status == AnchorStatus::Archived && a.key.is_some())
            .map(move |a| a.archived.unwrap_or(OffsetDateTime::UNIX_EPOCH) + retention);
        issuers.chain(anchors)
    }

    /// Whether [`AuthorityState::prune_expired_issuers`] has something to do at `now`.
    pub fn prune_due(&self, retention: std::time::Duration, now: OffsetDateTime) -> bool {
        self.keys_due(retention).any(|t| t <= now)
    }

    /// The next time [`AuthorityState::prune_due`] becomes true, if any.
    pub fn next_prune(&self, retention: std::time::Duration) -> Option<OffsetDateTime> {
        self.keys_due(retention).min()
    }

    /// Destroys the keys that can never be used again, `retention` after that became so: drops
    /// retired and prepared issuers that expired (their leaves have too), and the keys of
    /// archived anchors. The store deletes the key files the state no longer names.
    pub fn prune_expired_issuers(
        &self,
        retention: std::time::Duration,
        now: OffsetDateTime,
    ) -> Option<Self> {
        if !self.prune_due(retention, now) {
            return None;
        }
        let expired = |i: &Issuer| {
            i.status != IssuerStatus::Active && i.cert.info.not_after + retention <= now
        };
        let mut s = self.clone();
        let gone: Vec<String> = s
            .issuers
            .iter()
            .filter(|i| expired(i))
            .map(|i| i.cert.id().to_string())
            .collect();
        s.issuers.retain(|i| !expired(i));
        let kept: Vec<CertId> = s.issuers.iter().map(|i| i.cert.id().clone()).collect();
        s.revoked.retain(|r| kept.contains(&r.issuer));
        let mut destroyed = Vec::new();
        for a in &mut s.anchors {
            if a.status == AnchorStatus::Archived
                && a.key.is_some()
                && a.archived.unwrap_or(OffsetDateTime::UNIX_EPOCH) + retention <= now
            {
                a.key = None;
                destroyed.push(a.cert.id().to_string());
            }
        }
        let mut what = Vec::new();
        if !gone.is_empty() {
            what.push(format!("issuers_pruned {}", gone.join(",")));
        }
        if !destroyed.is_empty() {
            what.push(format!("anchor_keys_destroyed {}", destroyed.join(",")));
        }
        s.record(now, what.join(" "));
        Some(s)
    }

    /// Federated bundles: none for this trust domain, at most one per trust domain.
    fn check_federated(&self) -> Result<(), StateError> {
        for (i, b) in self.federated.iter().enumerate() {
            if b.trust_domain == self.trust_domain {
                return Err(StateError::Invariant(format!(
                    "a federated bundle for the authority's own trust domain {}",
                    b.trust_domain
                )));
            }
            if self.federated[..i]
                .iter()
                .any(|o| o.trust_domain == b.trust_domain)
            {
                return Err(StateError::Invariant(format!(
                    "two federated bundles for {}",
                    b.trust_domain
                )));
            }
        }
        Ok(())
    }

    /// Checks the structural invariants that hold at every instant, whatever the time:
    /// keys match certificates, every issuer chains to its anchor and does not outlive it, at most
    /// one issuer is active and it chains to the active anchor, the bundle is not empty, the
    /// phase names anchors in the right status, federated bundles are of other trust domains.
    pub fn check(&self) -> Result<(), StateError> {
        let fail = |m: String| Err(StateError::Invariant(m));
        if self.bundle().next().is_none() {
            return fail("the bundle is empty".into());
        }
        self.check_federated()?;
        let actives = self
            .anchors
            .iter()
            .filter(|a| a.status == AnchorStatus::Active)
            .count();
        if actives != 1 {
            return fail(format!("{actives} anchors are active; exactly one must be"));
        }
        for a in &self.anchors {
            if let Some(k) = &a.key
                && !a.cert.matches_key(k)
            {
                return fail(format!(
                    "anchor {}: the key does not match the certificate",
                    a.cert.id()
                ));
            }
            if !a.cert.info.self_signed {
                return fail(format!(
                    "anchor {}: not a self-signed certificate",
                    a.cert.id()
                ));
            }
        }
        self.check_issuers()?;
        self.check_phase()
    }

    /// Every issuer: its key, its anchor (known, signed it, outlived by it), at most one active,
    /// and that one under the active anchor.
    fn check_issuers(&self) -> Result<(), StateError> {
        let fail = |m: String| Err(StateError::Invariant(m));
        let mut active_issuers = 0;
        for i in &self.issuers {
            let id = i.cert.id();
            if !i.cert.matches_key(&i.key) {
                return fail(format!(
                    "issuer {id}: the key does not match the certificate"
                ));
            }
            let Some(a) = self.anchor(&i.anchor) else {
                return fail(format!("issuer {id}: its anchor {} is unknown", i.anchor));
            };
            if let Err(e) = i.cert.verify_issued_by(&a.cert) {
                return fail(format!("issuer {id}: {e}"));
            }
            if i.cert.info.not_after > a.cert.info.not_after {
                return fail(format!("issuer {id} outlives its anchor {}", i.anchor));
            }
            if i.status == IssuerStatus::Active {
                active_issuers += 1;
                if a.status != AnchorStatus::Active {
                    return fail(format!(
                        "the active issuer {id} chains to anchor {} which is {:?}, not active",
                        i.anchor, a.status
                    ));
                }
            }
        }
        if active_issuers > 1 {
            return fail(format!(
                "{active_issuers} issuers are active; at most one may be"
            ));
        }
        Ok(())
    }

    /// The phase agrees with the anchors' statuses.
    fn check_phase(&self) -> Result<(), StateError> {
        let fail = |m: String| Err(StateError::Invariant(m));
        let status_of = |id: &CertId| self.anchor(id).map(|a| a.status);
        let in_bundle = |st: AnchorStatus| self.anchors.iter().filter(|a| a.status == st).count();
        let (staged, retiring) = (
            in_bundle(AnchorStatus::Staged),
            in_bundle(AnchorStatus::Retiring),
        );
        match &self.phase {
            Phase::Steady => {
                if staged + retiring != 0 {
                    return fail(format!(
                        "phase steady, yet {staged} staged and {retiring} retiring anchors are in the bundle"
                    ));
                }
            }
            Phase::Staged { anchor, .. } => {
                if status_of(anchor) != Some(AnchorStatus::Staged) {
                    return fail(format!(
                        "phase staged names anchor {anchor}, which is not staged"
                    ));
                }
                if staged != 1 || retiring != 0 {
                    return fail(format!(
                        "phase staged, yet {staged} staged and {retiring} retiring anchors are in the bundle"
                    ));
                }
            }
            Phase::Activated { previous, .. } => {
                if status_of(previous) != Some(AnchorStatus::Retiring) {
                    return fail(format!(
                        "phase activated names previous anchor {previous}, which is not retiring"
                    ));
                }
                if staged != 0 || retiring != 1 {
                    return fail(format!(
                        "phase activated, yet {staged} staged and {retiring} retiring anchors are in the bundle"
                    ));
                }
            }
        }
        Ok(())
    }

    /// What is wrong with the state at `now` that time alone caused (expiry), for start-up
    /// checks and status output. Structural problems are [`Self::check`]'s.
    pub fn expiry_problems(&self, now: OffsetDateTime) -> Vec<String> {
        let mut out = Vec::new();
        for a in self.bundle() {
            if a.cert.info.not_after <= now {
                out.push(format!(
                    "anchor {} in the bundle expired at {}",
                    a.cert.id(),
                    rfc3339(a.cert.info.not_after)
                ));
            }
        }
        if let Some(i) = self.active_issuer()
            && i.cert.info.not_after <= now
        {
            out.push(format!(
                "the active issuer {} expired at {}",
                i.cert.id(),
                rfc3339(i.cert.info.not_after)
            ));
        }
        out
    }

    /// Appends to the history and bumps the generation.
    pub(crate) fn record(&mut self, now: OffsetDateTime, what: String) {
        self.generation += 1;
        self.history.push(Event {
            at: crate::clock::whole_seconds(now),
            generation: self.generation,
            what,
        });
        if self.history.len() > HISTORY_LEN {
            let extra = self.history.len() - HISTORY_LEN;
            self.history.drain(..extra);
        }
    }
}

impl fmt::Display for AnchorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Active => "active",
            Self::Staged => "staged",
            Self::Retiring => "retiring",
            Self::Archived => "archived",
        };
        f.pad(s)
    }
}

impl fmt::Display for IssuerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retired => "retired",
        };
        f.pad(s)
    }
}

/// A state with no active anchor breaks an invariant (`check` refuses it); a step that finds
/// one says so rather than panic.
pub(crate) fn no_active_anchor() -> StateError {
    StateError::Invariant("no active anchor".into())
}

/// `d` in the largest whole units that read well: `3d 4h`, `5h 12m`, `42s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m {}s", s % 60),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    #[test]
    fn genesis_is_consistent() {
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis(td(), &Policy::default(), now).unwrap();
        s.check().unwrap();
        assert!(s.expiry_problems(now).is_empty());
        assert_eq!(s.bundle_version, 1);
        assert_eq!(s.bundle().count(), 1);
        let i = s.active_issuer().unwrap();
        assert_eq!(&i.anchor, s.active_anchor().unwrap().cert.id());
        assert_eq!(s.generation, 3, "{:?}", s.history);
        assert_eq!(s.history.len(), 3);
    }

    #[test]
    fn revoking_the_active_issuer_replaces_it_and_upstream_mode_refuses_without_a_successor() {
        let p = Policy::default();
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis(td(), &p, now).unwrap();
        let old = s.active_issuer().unwrap().cert.id().clone();
        let r = s
            .revoke_issuer(&p, now, &old, "leaked".into(), "uid 0".into())
            .unwrap();
        r.check().unwrap();
        let new = r.active_issuer().unwrap().cert.id().clone();
        assert_ne!(new, old);
        assert_eq!(r.issuer(&old).unwrap().status, IssuerStatus::Retired);
        assert_eq!(r.revoked.len(), 1);
        assert_eq!(
            r.bundle_version, s.bundle_version,
            "the bundle does not change"
        );
        for (id, reason, says) in [
            (&old, "again", "already revoked"),
            (&new, " ", "needs a reason"),
        ] {
            let e = r
                .revoke_issuer(&p, now, id, reason.into(), "uid 0".into())
                .unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        // Upstream mode: the anchor key is elsewhere and nothing is prepared: refused, saying
        // what to import first.
        let mut up = s.clone();
        up.anchors[0].key = None;
        let e = up
            .revoke_issuer(&p, now, &old, "leaked".into(), "uid 0".into())
            .unwrap_err();
        assert!(matches!(e, StateError::Upstream(_)), "{e}");
        assert!(e.to_string().contains("meshca issuer import"), "{e}");
    }

    #[test]
    fn issuer_rotation_keeps_the_bundle() {
        let now = OffsetDateTime::now_utc();
        let p = Policy::default();
        let s = AuthorityState::genesis(td(), &p, now).unwrap();
        let old = s.active_issuer().unwrap().cert.id().clone();
        let anchor = s.active_anchor().unwrap().cert.id().clone();
        let s2 = s.prepare_issuer(&p, now, &anchor).unwrap();
        assert_eq!(
            s2.active_issuer().unwrap().cert.id(),
            &old,
            "preparing does not activate"
        );
        let next = s2
            .issuers
            .iter()
            .find(|i| i.status == IssuerStatus::Prepared)
            .unwrap()
            .cert
            .id()
            .clone();
        let s3 = s2.activate_issuer(now, &next).unwrap();
        s3.check().unwrap();
        assert_eq!(s3.active_issuer().unwrap().cert.id(), &next);
        assert_eq!(s3.issuer(&old).unwrap().status, IssuerStatus::Retired);
        assert_eq!(s3.bundle_version, s.bundle_version);
        assert!(
            s3.activate_issuer(now, &next).is_err(),
            "an active issuer cannot be activated again"
        );
    }

    #[test]
    fn check_catches_broken_states() {
        let now = OffsetDateTime::now_utc();
        let p = Policy::default();
        let s = AuthorityState::genesis(td(), &p, now).unwrap();

        let mut wrong_key = s.clone();
        wrong_key.issuers[0].key = SecretKey::generate_p256().unwrap();
        assert!(
            wrong_key
                .check()
                .unwrap_err()
                .to_string()
                .contains("key does not match")
        );

        let other = AuthorityState::genesis(td(), &p, now).unwrap();
        let mut foreign = s.clone();
        foreign.issuers[0].cert = other.issuers[0].cert.clone();
        foreign.issuers[0].key = other.issuers[0].key.clone();
        // Anchor names carry a key id, so the name check catches it before the signature would.
        let e = foreign.check().unwrap_err().to_string();
        assert!(e.contains("is not the subject"), "{e}");

        let mut empty = s.clone();
        empty.anchors[0].status = AnchorStatus::Archived;
        assert!(
            empty
                .check()
                .unwrap_err()
                .to_string()
                .contains("bundle is empty")
        );

        let mut two = s.clone();
        let mut extra = s.issuers[0].clone();
        extra.status = IssuerStatus::Active;
        two.issuers.push(extra);
        assert!(
            two.check()
                .unwrap_err()
                .to_string()
                .contains("issuers are active")
        );
    }

    #[test]
    fn expiry_is_reported() {
        let now = OffsetDateTime::now_utc();
        let s = AuthorityState::genesis(td(), &Policy::default(), now).unwrap();
        let later = now + Duration::from_secs(8 * 86400);
        let p = s.expiry_problems(later);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("active issuer"));
        assert_eq!(
            s.expiry_problems(now + Duration::from_secs(400 * 86400))
                .len(),
            2
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(125)), "2m 5s");
        assert_eq!(human(Duration::from_secs(5 * 3600 + 720)), "5h 12m");
        assert_eq!(
            human(Duration::from_secs(3 * 86400 + 4 * 3600 + 59)),
            "3d 4h"
        );
    }
}
