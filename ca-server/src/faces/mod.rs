//! The faces: what speaks to the outside. Each translates its protocol's request into an
//! [`crate::issuance::IssueRequest`] (or an admin step) and the answer back; `codes` maps every
//! typed error to its gRPC status in one place.

pub(crate) mod admin;
pub(crate) mod codes;
pub(crate) mod grpc;
pub(crate) mod http;
pub(crate) mod istio;
pub(crate) mod linkerd;
