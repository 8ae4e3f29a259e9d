//! The operator API (`meshca.v1.AdminService`) on the unix socket `<state-dir>/admin.sock`.
//!
//! Reachable only by operators: the socket is 0600 inside the 0700 state dir, and a connection
//! whose peer user id is not the socket owner's is closed before it reaches tonic. There is no
//! TCP listener for it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshca_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use meshca_proto::v1::{
    AllowIdentityRequest, AnchorResponse, AnchorStepRequest, CreateIssuerCsrRequest,
    CreateIssuerCsrResponse, DenyIdentityRequest, DenyListResponse, EmergencyAnchorRequest,
    GetStatusRequest, GetStatusResponse, ImportIssuerRequest, IssuerResponse, ListDeniedRequest,
    RevokeIssuerRequest, RevokeIssuerResponse, RotateIssuerRequest, StageAnchorRequest,
};
use rotator::anchors::{NewAnchor, Step, gate};
use rotator::clock::rfc3339;
use rotator::pki::CaCert;
use rotator::state::{IssuerStatus, StateError, key_id};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::authority::Authority;
use crate::faces::codes;
use crate::process::driver::RotationHealth;

/// The socket's file name in the state dir.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// The admin service.
pub struct Admin {
    authority: Arc<Authority>,
    health: Arc<RotationHealth>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    federation: Option<Arc<crate::federation::fetch::Federation>>,
}

impl Admin {
    /// A service over `authority`; `ready` answers whether `/readyz` would say ready.
    pub fn new(
        authority: Arc<Authority>,
        health: Arc<RotationHealth>,
        ready: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Self {
            authority,
            health,
            ready,
            federation: None,
        }
    }

    /// Reports these federated trust domains' refreshes in the status document.
    pub fn with_federation(mut self, f: Arc<crate::federation::fetch::Federation>) -> Self {
        self.federation = Some(f);
        self
    }
}

fn issuer_response(
    a: &rotator::state::AuthorityState,
    id: &rotator::pki::CertId,
    replaced: Option<String>,
) -> IssuerResponse {
    let i = a.issuer(id);
    IssuerResponse {
        id: id.to_string(),
        not_after: i
            .map(|i| rfc3339(i.cert.info.not_after))
            .unwrap_or_default(),
        status: i.map(|i| i.status.to_string()).unwrap_or_default(),
        replaced: replaced.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let now = self.authority.clock().now();
        let policy = self.authority.policy().clone();
        let summary = self.authority.ledger_summary().await;
        let mut doc = self
            .authority
            .read(|s| rotator::status::document(s, &policy, Some(&summary), now))
            .await;
        doc.server = Some(rotator::status::ServerEntry {
            version: env!("CARGO_PKG_VERSION").into(),
            ready: (self.ready)(),
            rotation_failures_consecutive: self.health.consecutive_failures(),
            last_rotation_error: self.health.last_error(),
        });
        if let Some(f) = &self.federation {
            let statuses = f.statuses();
            for e in &mut doc.federation {
                let Some(st) = statuses
                    .iter()
                    .find(|(td, _)| td.as_str() == e.trust_domain)
                else {
                    continue;
                };
                if !st.1.refreshing {
                    continue;
                }
                let last = st.1.last_success.map_or(e.fetched, |t| t.max(e.fetched));
                e.age_seconds = Some((now - last).whole_seconds().max(0));
                e.consecutive_failures = Some(st.1.consecutive_failures);
                e.last_error.clone_from(&st.1.last_error);
            }
        }
        let json = serde_json::to_string(&doc)
            .map_err(|e| Status::internal(format!("status document: {e}")))?;
        Ok(Response::new(GetStatusResponse { json }))
    }

    async fn rotate_issuer(
        &self,
        _: Request<RotateIssuerRequest>,
    ) -> Result<Response<IssuerResponse>, Status> {
        let policy = self.authority.policy().clone();
        let mut prepared = None;
        // Two committed transitions, as the driver would do them: prepared, then activated.
        self.authority
            .transition(|s, now| {
                let anchor = s
                    .active_anchor()
                    .ok_or_else(|| StateError::Invariant("no active anchor".into()))?;
                if anchor.key.is_none() {
                    return Err(StateError::Upstream(
                        "upstream mode: the anchor's key is not here, so meshca cannot sign an issuer; use \
                         `meshca issuer csr` and `meshca issuer import`"
                            .into(),
                    ));
                }
                let next = s.prepare_issuer(&policy, now, anchor.cert.id())?;
                prepared = next.issuers.last().map(|i| i.cert.id().clone());
                Ok(Some(next))
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let id = prepared.ok_or_else(|| Status::internal("no issuer was prepared"))?;
        let mut replaced = None;
        self.authority
            .transition(|s, now| {
                replaced = s.active_issuer().map(|i| i.cert.id().to_string());
                s.activate_issuer(now, &id).map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let resp = self
            .authority
            .read(|s| issuer_response(s, &id, replaced))
            .await;
        tracing::info!(target: "meshca::audit", issuer = %resp.id, replaced = %resp.replaced, "issuer rotated by an operator");
        Ok(Response::new(resp))
    }

    async fn create_issuer_csr(
        &self,
        _: Request<CreateIssuerCsrRequest>,
    ) -> Result<Response<CreateIssuerCsrResponse>, Status> {
        let mut new_key = false;
        self.authority
            .transition(|s, now| {
                let next = s.with_pending_issuer_key(now)?;
                new_key = next.is_some();
                Ok(next)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let now = self.authority.clock().now();
        let (csr, id) = self
            .authority
            .read(|s| {
                let p = s
                    .pending_issuer_key
                    .as_ref()
                    .ok_or_else(|| Status::internal("no pending key after commit"))?;
                let csr = rotator::profile::issuer_csr(&s.trust_domain, &p.key, now)
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok::<_, Status>((csr, key_id(&p.key)))
            })
            .await?;
        tracing::info!(target: "meshca::audit", key = %id, new_key, "issuer CSR made");
        Ok(Response::new(CreateIssuerCsrResponse {
            csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
            key_id: id,
            new_key,
        }))
    }

    async fn import_issuer(
        &self,
        request: Request<ImportIssuerRequest>,
    ) -> Result<Response<IssuerResponse>, Status> {
        let cert = CaCert::from_pem(&request.into_inner().cert_pem).map_err(|e| {
            Status::invalid_argument(format!("the issuer certificate is unusable: {e}"))
        })?;
        let id = cert.id().clone();
        if self
            .authority
            .read(|s| s.pending_issuer_key.is_none())
            .await
        {
            return Err(codes::state(&StateError::NoPendingKey));
        }
        let policy = self.authority.policy().clone();
        let mut replaced = None;
        self.authority
            .transition(|s, now| {
                replaced = s.active_issuer().map(|i| i.cert.id().to_string());
                s.import_issuer(&policy, now, cert.clone()).map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let resp = self
            .authority
            .read(|s| {
                let active = s
                    .issuer(&id)
                    .is_some_and(|i| i.status == IssuerStatus::Active);
                issuer_response(s, &id, if active { replaced } else { None })
            })
            .await;
        tracing::info!(target: "meshca::audit", issuer = %resp.id, status = %resp.status, "issuer imported");
        Ok(Response::new(resp))
    }

    async fn stage_anchor(
        &self,
        request: Request<StageAnchorRequest>,
    ) -> Result<Response<AnchorResponse>, Status> {
        let r = request.into_inner();
        let new = if r.cert_pem.is_empty() {
            if !r.key_pem.is_empty() {
                return Err(Status::invalid_argument(
                    "a key without a certificate: give the anchor certificate too",
                ));
            }
            NewAnchor::Generate
        } else {
            let cert = CaCert::from_pem(&r.cert_pem).map_err(|e| {
                Status::invalid_argument(format!("the anchor certificate is unusable: {e}"))
            })?;
            let key = if r.key_pem.is_empty() {
                None
            } else {
                Some(rotator::pki::SecretKey::from_pem(&r.key_pem).map_err(|e| {
                    Status::invalid_argument(format!("the anchor key is unusable: {e}"))
                })?)
            };
            NewAnchor::Import(Box::new(cert), key)
        };
        self.anchor_step(Step::Stage, false, Some(new))
            .await
            .map(Response::new)
    }

    async fn activate_anchor(
        &self,
        request: Request<AnchorStepRequest>,
    ) -> Result<Response<AnchorResponse>, Status> {
        self.anchor_step(Step::Activate, step_force(request), None)
            .await
            .map(Response::new)
    }

    async fn finish_anchor(
        &self,
        request: Request<AnchorStepRequest>,
    ) -> Result<Response<AnchorResponse>, Status> {
        self.anchor_step(Step::Finish, step_force(request), None)
            .await
            .map(Response::new)
    }

    async fn rollback_anchor(
        &self,
        request: Request<AnchorStepRequest>,
    ) -> Result<Response<AnchorResponse>, Status> {
        self.anchor_step(Step::Rollback, step_force(request), None)
            .await
            .map(Response::new)
    }

    async fn deny_identity(
        &self,
        request: Request<DenyIdentityRequest>,
    ) -> Result<Response<DenyListResponse>, Status> {
        let r = request.into_inner();
        let until = match r.until_unix {
            0 => None,
            t => Some(
                time::OffsetDateTime::from_unix_timestamp(t)
                    .map_err(|e| Status::invalid_argument(format!("until {t}: {e}")))?,
            ),
        };
        let by = operator();
        let reason = r.reason.trim().to_owned();
        if !r.node.is_empty() {
            if !r.pattern.is_empty() {
                return Err(Status::invalid_argument(
                    "a denial names a node or an identity, not both",
                ));
            }
            let mut previous = None;
            self.authority
                .transition(|s, now| {
                    previous = node_denial(s, &r.node, now);
                    s.deny_node(now, &r.node, reason.clone(), until, by.clone())
                        .map(Some)
                })
                .await
                .map_err(|e| codes::transition(&e))?;
            tracing::warn!(target: "meshca::audit", operator = %by, node = %crate::issuing::issuance::log_safe(&r.node),
                reason = %crate::issuing::issuance::log_safe(&reason), until = %until.map(rfc3339).unwrap_or_default(),
                replaced = previous.is_some(), "node denied by an operator: its node agents act for nobody");
            return Ok(self
                .changed(Target::Node(&r.node), previous, "denied")
                .await);
        }
        let pattern = self.pattern(&r.pattern).await?;
        let mut previous = None;
        self.authority
            .transition(|s, now| {
                previous = identity_denial(s, &pattern, now);
                s.deny(now, pattern.clone(), reason.clone(), until, by.clone())
                    .map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        tracing::warn!(target: "meshca::audit", operator = %by, pattern = %pattern, reason = %reason,
            until = %until.map(rfc3339).unwrap_or_default(), replaced = previous.is_some(),
            "identity denied by an operator");
        Ok(self
            .changed(Target::Pattern(&pattern.to_string()), previous, "denied")
            .await)
    }

    async fn allow_identity(
        &self,
        request: Request<AllowIdentityRequest>,
    ) -> Result<Response<DenyListResponse>, Status> {
        let r = request.into_inner();
        if !r.node.is_empty() {
            let mut previous = None;
            self.authority
                .transition(|s, now| {
                    previous = node_denial(s, &r.node, now);
                    s.undeny_node(now, &r.node).map(Some)
                })
                .await
                .map_err(|e| codes::transition(&e))?;
            tracing::warn!(target: "meshca::audit", operator = %operator(), node = %crate::issuing::issuance::log_safe(&r.node),
                "node denial lifted by an operator");
            return Ok(self
                .changed(Target::Node(&r.node), previous, "lifted")
                .await);
        }
        let pattern = self.pattern(&r.pattern).await?;
        let mut previous = None;
        self.authority
            .transition(|s, now| {
                previous = identity_denial(s, &pattern, now);
                s.undeny(now, &pattern).map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        tracing::warn!(target: "meshca::audit", operator = %operator(), pattern = %pattern,
            "identity denial lifted by an operator");
        Ok(self
            .changed(Target::Pattern(&pattern.to_string()), previous, "lifted")
            .await)
    }

    async fn list_denied(
        &self,
        _: Request<ListDeniedRequest>,
    ) -> Result<Response<DenyListResponse>, Status> {
        Ok(Response::new(self.denied_document().await))
    }

    async fn reset_federation(
        &self,
        request: Request<meshca_proto::v1::ResetFederationRequest>,
    ) -> Result<Response<meshca_proto::v1::ResetFederationResponse>, Status> {
        let raw = request.into_inner().trust_domain;
        let td: rotator::spiffe::TrustDomain = raw.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "{}: not a trust domain ({e})",
                crate::issuing::issuance::log_safe(&raw)
            ))
        })?;
        let mut previous = 0;
        self.authority
            .transition(|s, now| {
                let (next, p) = s.reset_federated_sequence(now, &td)?;
                previous = p;
                Ok(Some(next))
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        tracing::warn!(target: "meshca::audit", operator = %operator(), trust_domain = %td,
            previous_sequence = previous, "federated bundle sequence reset by an operator");
        Ok(Response::new(meshca_proto::v1::ResetFederationResponse {
            json: serde_json::json!({
                "trust_domain": td.to_string(), "previous_sequence": previous,
            })
            .to_string(),
        }))
    }

    async fn emergency_anchor(
        &self,
        request: Request<EmergencyAnchorRequest>,
    ) -> Result<Response<AnchorResponse>, Status> {
        let reason = request.into_inner().reason.trim().to_owned();
        let policy = self.authority.policy().clone();
        let summary = self.authority.ledger_summary().await;
        let by = operator();
        self.authority
            .transition(|s, now| {
                s.emergency_anchor_rotation(&policy, Some(&summary), now, &reason, &by)
                    .map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        // The risk, from the ledger as it stood: every live workload holds a bundle without the
        // new anchor until it fetches one.
        let watching = summary.live_workloads;
        let risk = format!(
            "{watching} live workloads hold a bundle without the new anchor: leaves the new issuer signs will not \
             verify there until they fetch the new bundle (bundle watchers get it at once, with renew_now; the \
             others at their next renewal). Leaves of the old anchor keep verifying until `meshca anchors finish`."
        );
        let resp = self
            .authority
            .read(|s| AnchorResponse {
                phase: s.phase.name().into(),
                bundle_version: s.bundle_version,
                anchor: s
                    .active_anchor()
                    .map(|a| a.cert.id().to_string())
                    .unwrap_or_default(),
                gate: "skipped: emergency".into(),
                risk: risk.clone(),
                issuer: s
                    .active_issuer()
                    .map(|i| i.cert.id().to_string())
                    .unwrap_or_default(),
            })
            .await;
        tracing::warn!(target: "meshca::audit", operator = %by, reason = %reason, anchor = %resp.anchor,
            bundle_version = resp.bundle_version, risk = %risk, "EMERGENCY anchor rotation");
        Ok(Response::new(resp))
    }

    async fn revoke_issuer(
        &self,
        request: Request<RevokeIssuerRequest>,
    ) -> Result<Response<RevokeIssuerResponse>, Status> {
        let r = request.into_inner();
        let id = rotator::pki::CertId::parse(r.id.trim()).ok_or_else(|| {
            Status::invalid_argument(format!(
                "issuer id {:?}: 16 lowercase hex digits, as `meshca status` shows it",
                r.id
            ))
        })?;
        let policy = self.authority.policy().clone();
        let (by, reason) = (operator(), r.reason.trim().to_owned());
        // The leaves it signed that are live at the moment of revocation: counted before the
        // commit, since its watchers are told to renew as soon as it is published and their
        // renewals supersede those leaves within milliseconds.
        let now = self.authority.clock().now().unix_timestamp();
        let (live, last) = self
            .authority
            .ledger()
            .with(|l| l.live_under_issuer(&id, now));
        self.authority
            .transition(|s, now| {
                s.revoke_issuer(&policy, now, &id, reason.clone(), by.clone())
                    .map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let active = self
            .authority
            .read(|s| s.active_issuer().map(|i| i.cert.id().to_string()))
            .await;
        tracing::warn!(target: "meshca::audit", operator = %by, issuer = %id, reason = %reason,
            active = %active.clone().unwrap_or_default(), "issuer revoked by an operator");
        Ok(Response::new(RevokeIssuerResponse {
            json: serde_json::json!({
                "revoked": id.to_string(),
                "active": active,
                "live_leaves": live,
                "last_expires": last
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                    .map(rfc3339),
            })
            .to_string(),
        }))
    }
}

/// A live leaf in the deny and revocation lists.
fn leaf_json(r: &rotator::ledger::HeldLeaf) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": r.spiffe_id, "serial": r.serial,
        "not_after": time::OffsetDateTime::from_unix_timestamp(r.not_after)
            .map(rfc3339).unwrap_or_default(),
    })
}

/// Who is asking on the admin socket: it admits only the server's own user, so that uid.
fn operator() -> String {
    format!("uid {}", rustix::process::getuid().as_raw())
}

impl Admin {
    /// A deny pattern in this authority's trust domain, or INVALID_ARGUMENT saying why.
    async fn pattern(&self, text: &str) -> Result<rotator::spiffe::IdPattern, Status> {
        let p: rotator::spiffe::IdPattern = text.trim().parse().map_err(|e| {
            Status::invalid_argument(format!(
                "{text:?}: {e} (a SPIFFE ID, or spiffe://<td>/ns/<ns>/sa/*)"
            ))
        })?;
        let td = self.authority.snapshot().bundle.trust_domain.to_string();
        let in_td = match &p {
            rotator::spiffe::IdPattern::Exact(id) => id.trust_domain_str() == td,
            rotator::spiffe::IdPattern::Namespace { trust_domain, .. } => {
                trust_domain.as_str() == td
            }
        };
        if !in_td {
            return Err(Status::invalid_argument(format!(
                "{p} is not in this authority's trust domain {td}: meshca issues nothing there to deny"
            )));
        }
        Ok(p)
    }

    /// The denials with the live leaves each matches (the issuance ledger: this replica's).
    /// What a deny or remove changed: `{"changed": {"action", "denial", "previous"}}` —
    /// `denial` as it stands now (with its live leaves; `null` once lifted), `previous` the one
    /// it replaced or lifted (`null` when there was none).
    async fn changed(
        &self,
        target: Target<'_>,
        previous: Option<serde_json::Value>,
        action: &str,
    ) -> Response<DenyListResponse> {
        let doc = self.denied_value().await;
        let (list, key, name) = match target {
            Target::Node(n) => ("denied_nodes", "node", n),
            Target::Pattern(p) => ("denied", "pattern", p),
        };
        let now = doc[list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d[key] == name)
            .cloned();
        let action = match (action, &previous) {
            ("denied", Some(_)) => "replaced",
            (a, _) => a,
        };
        Response::new(DenyListResponse {
            json: serde_json::json!({
                "changed": {"action": action, key: name, "denial": now, "previous": previous},
            })
            .to_string(),
        })
    }

    async fn denied_document(&self) -> DenyListResponse {
        DenyListResponse {
            json: self.denied_value().await.to_string(),
        }
    }

    /// The denials in force (lapsed ones are not listed), the revoked issuers and the denied
    /// nodes, each with the live leaves it matches.
    async fn denied_value(&self) -> serde_json::Value {
        let now = self.authority.clock().now();
        let (denied, revoked, nodes) = self
            .authority
            .read(|s| (s.denied.clone(), s.revoked.clone(), s.denied_nodes.clone()))
            .await;
        let records = self.authority.ledger().with(|l| {
            l.records()
                .filter(|r| r.not_after > now.unix_timestamp())
                .collect::<Vec<_>>()
        });
        let rows: Vec<serde_json::Value> = denied
            .iter()
            .filter(|d| d.active(now))
            .map(|d| {
                let live: Vec<serde_json::Value> = records
                    .iter()
                    .filter(|r| {
                        r.spiffe_id
                            .parse::<rotator::spiffe::SpiffeId>()
                            .is_ok_and(|id| d.pattern.matches(&id))
                    })
                    .map(leaf_json)
                    .collect();
                denial_row(d, now, live)
            })
            .collect();
        // Revoked issuers, with their leaves not yet expired (the ledger records each leaf's
        // issuer).
        let revoked_rows: Vec<serde_json::Value> = revoked
            .iter()
            .map(|r| {
                let live: Vec<serde_json::Value> = records
                    .iter()
                    .filter(|l| l.issuer.as_ref() == Some(&r.issuer))
                    .map(leaf_json)
                    .collect();
                serde_json::json!({
                    "issuer": r.issuer.to_string(), "reason": r.reason, "at": rfc3339(r.at),
                    "by": r.by, "live_leaves": live,
                })
            })
            .collect();
        let node_rows: Vec<serde_json::Value> = nodes
            .iter()
            .filter(|d| d.active(now))
            .map(|d| node_row(d, now))
            .collect();
        serde_json::json!({
            "denied": rows, "revoked_issuers": revoked_rows, "denied_nodes": node_rows,
        })
    }
}

/// What a deny or remove names.
enum Target<'a> {
    Node(&'a str),
    Pattern(&'a str),
}

/// The denial of `node` in force in `s`, as `meshca deny` shows it.
fn node_denial(
    s: &rotator::state::AuthorityState,
    node: &str,
    now: time::OffsetDateTime,
) -> Option<serde_json::Value> {
    s.denied_nodes
        .iter()
        .find(|d| d.node == node && d.active(now))
        .map(|d| node_row(d, now))
}

/// The denial of exactly `pattern` in force in `s`, as `meshca deny` shows it.
fn identity_denial(
    s: &rotator::state::AuthorityState,
    pattern: &rotator::spiffe::IdPattern,
    now: time::OffsetDateTime,
) -> Option<serde_json::Value> {
    s.denied
        .iter()
        .find(|d| &d.pattern == pattern && d.active(now))
        .map(|d| denial_row(d, now, Vec::new()))
}

/// A denial as `meshca deny` shows it.
fn denial_row(
    d: &rotator::state::Denial,
    now: time::OffsetDateTime,
    live: Vec<serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "pattern": d.pattern.to_string(), "reason": d.reason,
        "added": rfc3339(d.added), "until": d.until.map(rfc3339), "by": d.by,
        "active": d.active(now), "live_leaves": live,
    })
}

/// A node denial as `meshca deny` shows it.
fn node_row(d: &rotator::state::NodeDenial, now: time::OffsetDateTime) -> serde_json::Value {
    serde_json::json!({
        "node": d.node, "reason": d.reason, "added": rfc3339(d.added),
        "until": d.until.map(rfc3339), "by": d.by, "active": d.active(now),
    })
}

impl Admin {
    /// Takes one anchor step: checks the phase (FAILED_PRECONDITION), then the gate with the
    /// ledger's view, then commits. Every outcome is one audit line.
    async fn anchor_step(
        &self,
        step: Step,
        force: bool,
        new: Option<NewAnchor>,
    ) -> Result<AnchorResponse, Status> {
        let policy = self.authority.policy().clone();
        let summary = self.authority.ledger_summary().await;
        let now = self.authority.clock().now();
        let g = self
            .authority
            .read(|s| gate(s, &policy, Some(&summary), now, step))
            .await
            .map_err(|e| codes::state(&e))?;
        if !g.open && !force {
            tracing::warn!(target: "meshca::audit", step = step.name(), gate = %g.explain(), "anchor step refused: gate closed");
            return Err(codes::state(&StateError::GateClosed(Box::new(g))));
        }
        self.authority
            .transition(|s, now| {
                let l = Some(&summary);
                match step {
                    Step::Stage => {
                        s.stage_anchor(&policy, now, new.clone().unwrap_or(NewAnchor::Generate))
                    }
                    Step::Activate => s.activate_anchor(&policy, l, now, force),
                    Step::Finish => s.finish_anchor(&policy, l, now, force),
                    Step::Rollback => s.rollback_anchor(&policy, l, now, force),
                }
                .map(Some)
            })
            .await
            .map_err(|e| codes::transition(&e))?;
        let risk = if g.open {
            String::new()
        } else {
            g.risk.clone()
        };
        let resp = self
            .authority
            .read(|s| AnchorResponse {
                phase: s.phase.name().into(),
                bundle_version: s.bundle_version,
                anchor: match (&s.phase, step) {
                    (rotator::state::Phase::Staged { anchor, .. }, _) => anchor.to_string(),
                    (_, Step::Finish | Step::Rollback) => s
                        .anchors
                        .iter()
                        .rev()
                        .find(|a| a.status == rotator::state::AnchorStatus::Archived)
                        .map(|a| a.cert.id().to_string())
                        .unwrap_or_default(),
                    _ => s
                        .active_anchor()
                        .map(|a| a.cert.id().to_string())
                        .unwrap_or_default(),
                },
                gate: g.explain(),
                risk: risk.clone(),
                issuer: s
                    .active_issuer()
                    .map(|i| i.cert.id().to_string())
                    .unwrap_or_default(),
            })
            .await;
        if risk.is_empty() {
            tracing::info!(target: "meshca::audit", step = step.name(), phase = %resp.phase, bundle_version = resp.bundle_version, anchor = %resp.anchor, gate = %resp.gate, "anchor step taken");
        } else {
            tracing::warn!(target: "meshca::audit", step = step.name(), phase = %resp.phase, bundle_version = resp.bundle_version, anchor = %resp.anchor, risk = %risk, "anchor step FORCED past a closed gate");
        }
        Ok(resp)
    }
}

fn step_force(r: Request<AnchorStepRequest>) -> bool {
    r.into_inner().force
}

/// Binds `<dir>/admin.sock` (0600) and serves `admin` on it until `shutdown` flips; the socket
/// file is removed on the way out. A stale socket from a crashed server is replaced (the state
/// dir's lock already guarantees no other server runs here).
pub async fn serve(
    dir: &Path,
    admin: Admin,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(PathBuf, tokio::task::JoinHandle<()>)> {
    let path = dir.join(ADMIN_SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!("removed a stale {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(&path)?.uid();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<UnixStream, std::io::Error>>(16);
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("admin socket accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == owner => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(c) => {
                    tracing::warn!(target: "meshca::audit", uid = c.uid(), "admin connection from another user refused")
                }
                Err(e) => tracing::warn!("admin connection without peer credentials refused: {e}"),
            }
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let socket = path.clone();
    let task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(AdminServiceServer::new(admin))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("admin server stopped: {e}");
        }
        let _ = std::fs::remove_file(&socket);
    });
    Ok((path, task))
}
