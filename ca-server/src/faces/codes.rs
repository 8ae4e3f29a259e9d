//! Every error from the core that reaches a gRPC caller becomes a `Status` here, and only here.
//! The faces and the admin API call these functions at their boundary; the rest of the crate
//! returns typed errors and never builds a status. (A request field a face decodes itself — a
//! missing Linkerd token, a negative TTL, an admin request's PEM that does not parse — is refused
//! with `INVALID_ARGUMENT` right where that field is read.)
//!
//! | error | meshca.v1 / Istio | Linkerd | admin |
//! | --- | --- | --- | --- |
//! | no / malformed / unknown credential | `UNAUTHENTICATED` | `FAILED_PRECONDITION` | — |
//! | credential not allowed this identity, or another trust domain; an identity an operator denied | `PERMISSION_DENIED` | `FAILED_PRECONDITION` | — |
//! | a node agent that is not one, or asks for a workload it may not serve | `PERMISSION_DENIED` | — | — |
//! | token backend down, no valid issuer; a node agent's workload not (yet) on its node | `UNAVAILABLE` | `UNAVAILABLE` | — |
//! | CSR names do not match the identity | `INVALID_ARGUMENT` | `FAILED_PRECONDITION` | — |
//! | any other CSR problem | `INVALID_ARGUMENT` | `INVALID_ARGUMENT` | — |
//! | wrong phase, gate closed, upstream anchor, unknown id, no pending key, a broken invariant | — | — | `FAILED_PRECONDITION` |
//! | an imported certificate or key is refused | — | — | `INVALID_ARGUMENT` |
//! | the store refused the write | — | — | `UNAVAILABLE` |
//! | a watch stream, the caller's issue rate or its identity's ledger instances over a `[limits]` cap | `RESOURCE_EXHAUSTED` (with `grpc-retry-pushback-ms` when known) | `RESOURCE_EXHAUSTED` | — |
//! | a bug or an RNG failure | `INTERNAL` | `INTERNAL` | `INTERNAL` |
//!
//! Linkerd's column is Linkerd's identity controller's own choice of codes (what its proxies
//! expect), kept as one named mapping, [`Mapping::Linkerd`].

use rotator::state::StateError;
use tonic::Status;

use crate::authority::TransitionError;
use crate::issuing::auth::AuthError;
use crate::issuing::issuance::{Face, IssueError};
use crate::issuing::signing::CsrError;

/// Which column of the table a face answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// meshca.v1 and Istio: gRPC's codes as they are meant.
    Standard,
    /// Linkerd's identity controller: `FAILED_PRECONDITION` for anything about who asks for what
    /// (credentials, and CSR names that do not match the identity).
    Linkerd,
}

impl From<Face> for Mapping {
    fn from(f: Face) -> Self {
        match f {
            Face::Meshca | Face::Istio | Face::Pod => Mapping::Standard,
            Face::Linkerd => Mapping::Linkerd,
        }
    }
}

/// The status a face answers an issuance failure with; the message always says why.
pub fn issue(e: &IssueError, face: Face) -> Status {
    let msg = e.to_string();
    match (Mapping::from(face), e) {
        (
            _,
            IssueError::Auth(AuthError::Unavailable(_) | AuthError::ImpersonationPending { .. })
            | IssueError::Unavailable(_),
        ) => Status::unavailable(msg),
        (_, IssueError::Internal(_)) => Status::internal(msg),
        (_, IssueError::Limited(r)) => {
            let mut st = Status::resource_exhausted(msg);
            // gRPC's retry pushback: a client that honours it waits this long.
            if let Some(wait) = r.retry_after
                && let Ok(v) = wait.as_millis().max(1).to_string().parse()
            {
                st.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            st
        }
        (
            Mapping::Standard,
            IssueError::Auth(
                AuthError::Denied { .. }
                | AuthError::ForeignTrustDomain { .. }
                | AuthError::NotANodeAgent { .. }
                | AuthError::ImpersonationDenied { .. }
                | AuthError::IdentityDenied { .. }
                | AuthError::Reserved { .. },
            ),
        ) => Status::permission_denied(msg),
        (Mapping::Standard, IssueError::Auth(_)) => Status::unauthenticated(msg),
        (Mapping::Standard, IssueError::Csr(_)) => Status::invalid_argument(msg),
        (Mapping::Linkerd, IssueError::Auth(_)) => Status::failed_precondition(msg),
        (
            Mapping::Linkerd,
            IssueError::Csr(
                CsrError::IdentityMismatch { .. }
                | CsrError::DnsSans(_)
                | CsrError::UriSanInDnsCsr
                | CsrError::OtherSan(_)
                | CsrError::CommonName(_),
            ),
        ) => Status::failed_precondition(msg),
        (Mapping::Linkerd, IssueError::Csr(_)) => Status::invalid_argument(msg),
    }
}

/// The status for a request over one of `[limits]`: `RESOURCE_EXHAUSTED`, naming the cap.
pub fn limit(e: &crate::issuing::limits::WatchRefused) -> Status {
    Status::resource_exhausted(e.to_string())
}

/// The status the admin API answers a refused or failed transition with.
pub fn transition(e: &TransitionError) -> Status {
    match e {
        TransitionError::State(e) => state(e),
        TransitionError::Store(e) => {
            Status::unavailable(format!("the store refused the write, nothing changed: {e}"))
        }
    }
}

/// The status for a state-machine refusal: the operator's request was understood but the
/// authority is not in a state to do it (`FAILED_PRECONDITION`), or something offered to it is
/// refused (`INVALID_ARGUMENT`, prefixed `refused:`), or meshca itself failed (`INTERNAL`).
pub fn state(e: &StateError) -> Status {
    match e {
        StateError::Unusable(_) => Status::invalid_argument(format!("refused: {e}")),
        StateError::Pki(_) => Status::internal(e.to_string()),
        // A full or lost token: nothing changed, and the step can be retried once it can.
        StateError::KeyStore(_) => Status::unavailable(format!("nothing changed: {e}")),
        // A refusal of what the state allows now; `StateError` is non-exhaustive, and a new
        // kind of refusal is a precondition until it is given its own code here.
        _ => Status::failed_precondition(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn linkerd_codes_differ_only_where_linkerd_does() {
        let denied = IssueError::Auth(AuthError::Denied {
            caller: "token:a".into(),
            id: "spiffe://td/ns/a/sa/b".into(),
            allowed: String::new(),
        });
        let mismatch = IssueError::Csr(CsrError::UriSanInDnsCsr);
        let bad_key = IssueError::Csr(CsrError::NotEcdsa("RSA".into()));
        let compromised = IssueError::Auth(AuthError::IdentityDenied {
            id: "spiffe://td/ns/a/sa/b".into(),
            reason: "compromised".into(),
            since: "2026-11-26T00:00:00Z".into(),
        });
        let cases = [
            (&denied, Code::PermissionDenied, Code::FailedPrecondition),
            (
                &compromised,
                Code::PermissionDenied,
                Code::FailedPrecondition,
            ),
            (
                &IssueError::Auth(AuthError::Missing),
                Code::Unauthenticated,
                Code::FailedPrecondition,
            ),
            (&mismatch, Code::InvalidArgument, Code::FailedPrecondition),
            (&bad_key, Code::InvalidArgument, Code::InvalidArgument),
            (
                &IssueError::Unavailable("no issuer".into()),
                Code::Unavailable,
                Code::Unavailable,
            ),
            (
                &IssueError::Auth(AuthError::Unavailable("api down".into())),
                Code::Unavailable,
                Code::Unavailable,
            ),
            (
                &IssueError::Internal("rng".into()),
                Code::Internal,
                Code::Internal,
            ),
        ];
        for (e, standard, linkerd) in cases {
            for face in [Face::Meshca, Face::Istio] {
                assert_eq!(issue(e, face).code(), standard, "{e} on {face}");
            }
            assert_eq!(issue(e, Face::Linkerd).code(), linkerd, "{e} on linkerd");
            assert_eq!(issue(e, Face::Linkerd).message(), e.to_string());
        }
    }

    #[test]
    fn state_refusals_map_by_kind() {
        assert_eq!(
            state(&StateError::Unusable("not self-signed".into())).code(),
            Code::InvalidArgument
        );
        assert!(
            state(&StateError::Unusable("x".into()))
                .message()
                .starts_with("refused: ")
        );
        for e in [
            StateError::NoPendingKey,
            StateError::Upstream("held upstream".into()),
            StateError::NotFound("no issuer x".into()),
            StateError::Invariant("no active anchor".into()),
            StateError::WrongPhase {
                step: "finish",
                phase: "steady",
                next: "",
            },
        ] {
            assert_eq!(state(&e).code(), Code::FailedPrecondition, "{e}");
        }
        assert_eq!(state(&StateError::Pki("rng".into())).code(), Code::Internal);
        assert_eq!(
            state(&StateError::KeyStore("key store: the token is full".into())).code(),
            Code::Unavailable
        );
    }
}
