//! The process: [`config`] (plain data, naming no other module), start-up ([`server`]), the
//! rotation driver ([`driver`]), the TLS listener (`tls`), [`metrics`] and [`disk`] health.

pub mod config;
pub mod disk;
pub mod driver;
pub mod metrics;
pub mod server;
pub(crate) mod tls;
