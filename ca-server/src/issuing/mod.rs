//! The issuing core: who is asking ([`auth`], node agents acting for pods in
//! [`impersonation`]), whether they may ([`limits`], the deny list), what to sign ([`signing`]:
//! CSR checks and the leaf profile). [`issuance`] runs these steps for every face and records
//! each leaf in the authority's ledger. It names the authority, never a face.

pub mod auth;
pub mod impersonation;
pub mod issuance;
pub mod limits;
pub mod signing;
