//! meshca-server: the network faces of meshca (gRPC over TLS, HTTP), authentication, and the
//! signing core. The authority itself — what is trusted, which issuer signs, when to rotate —
//! lives in the `rotator` crate; this crate only serves it.

pub mod signing;
