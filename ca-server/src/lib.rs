//! meshca-server: the network faces of meshca (gRPC over TLS, HTTP), authentication, and the
//! signing core. The authority itself — what is trusted, which issuer signs, when to rotate —
//! lives in the `rotator` crate; this crate serves it.
//!
//! Request path: [`tls`] accepts the connection (client certificate checked against the live
//! bundle) → [`grpc`] translates the request → [`issuance`] authenticates ([`auth`]), checks the
//! CSR and signs ([`signing`]) with the issuer in the [`authority`] snapshot → [`grpc`] answers.

pub mod admin;
pub mod auth;
pub mod authority;
pub mod config;
pub mod grpc;
pub mod http;
pub mod issuance;
pub mod istio;
pub mod k8s;
pub mod ledger;
pub mod linkerd;
pub mod metrics;
pub mod rotation;
pub mod server;
pub mod signing;
pub mod tls;
