//! meshca-server: the network faces of meshca (gRPC over TLS, HTTP), authentication, and the
//! signing core. The authority itself — what is trusted, which issuer signs, when to rotate —
//! lives in the `rotator` crate; this crate serves it.
//!
//! Request path: `tls` accepts the connection (client certificate checked against the live
//! bundle) → a face (`grpc` for meshca.v1, `istio`, `linkerd`) translates the request →
//! [`issuance`] authenticates ([`auth`]), checks the CSR and signs ([`signing`]) with the issuer
//! in the [`authority`] snapshot → the face answers; every error becomes a gRPC status in
//! `codes`. [`server`] starts it all; [`driver`] rotates.
//!
//! Public modules are those the binary, the end-to-end tests and the examples use; the rest are
//! this crate's own.

pub(crate) mod admin;
pub mod auth;
pub mod authority;
pub(crate) mod codes;
pub mod config;
pub mod disk;
pub mod driver;
pub(crate) mod grpc;
pub(crate) mod http;
pub mod issuance;
pub(crate) mod istio;
pub(crate) mod k8s;
pub mod ledger;
pub mod limits;
pub(crate) mod linkerd;
pub mod metrics;
pub mod server;
pub mod signing;
pub(crate) mod tls;
