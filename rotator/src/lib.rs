//! meshca's authority: what a CA for a service mesh *is* (trust anchors, issuers, the trust
//! bundle, the rotation phase), the pure decisions that move it forward in time, and the stores
//! that keep it across restarts and crashes.
//!
//! Domain apart from I/O: [`state`], [`policy`], [`pki`] and [`spiffe`] never read a clock or
//! touch a disk; time comes in as an argument (see [`clock`]). [`store`] persists a state
//! atomically. [`client`] is the workload side of the gRPC API, shared by the `meshca` CLI and the
//! end-to-end tests.

pub mod anchors;
pub mod client;
pub mod clock;
pub mod gate;
pub mod keys;
pub mod ledger;
pub mod pkcs11;
pub mod pki;
pub mod policy;
pub mod profile;
pub mod rotation;
pub mod spiffe;
pub mod state;
pub mod status;
pub mod store;
pub mod tokens;
