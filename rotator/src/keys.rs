//! Where anchor and issuer keys live. The file backend (the default) keeps them as PKCS#8 PEM in
//! the state (the state dir, 0600, or the Kubernetes Secret); a *key store* keeps them elsewhere
//! — in a PKCS#11 token ([`crate::pkcs11`]) — and the state records only a reference to each.
//!
//! The seam: a [`KeyStore`] makes and finds [`StoredKey`]s; a stored key signs and can be
//! destroyed, and never hands out its private half. A cloud KMS with its own API would be one
//! more `KeyStore` (its own file), nothing else changes: [`crate::pki::SecretKey`] wraps a stored
//! key as it wraps an in-memory one, so the state machine, rcgen and every signer are unaware.
//!
//! The store for CA keys is process-wide ([`set_ca_key_store`]): the server sets it from
//! `[keys]` before it opens the authority, so that keys the state names can be found and new
//! ones are made there.

use std::sync::{Arc, RwLock};

/// A private key held by a key store: signs, describes itself, never exports.
pub trait StoredKey: Send + Sync {
    /// An ECDSA P-256 / SHA-256 signature of `msg`, DER-encoded (as X.509 carries it).
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String>;
    /// The public key: the uncompressed EC point (`04 || x || y`).
    fn public_point(&self) -> &[u8];
    /// What the state records to find it again (`pkcs11:token=<label>;id=<hex>`).
    fn reference(&self) -> String;
    /// Destroys it in the store (a retired key, on the file backend's schedule).
    fn destroy(&self) -> Result<(), String>;
}

/// Makes and finds keys.
pub trait KeyStore: Send + Sync {
    /// A new P-256 key, generated inside the store (sensitive, not extractable).
    fn generate(&self) -> Result<Arc<dyn StoredKey>, String>;
    /// The key `reference` names, or why it cannot be had (missing from the token, another
    /// token, the token unreachable).
    fn find(&self, reference: &str) -> Result<Arc<dyn StoredKey>, String>;
    /// Whether `reference` is one of this store's (a prefix check).
    fn owns(&self, reference: &str) -> bool;
    /// For status lines: `pkcs11 token "meshca" (/usr/lib/softhsm/libsofthsm2.so)`.
    fn describe(&self) -> String;
    /// `Ok` while the store can sign, else since when and why not (a lost token while it
    /// reconnects): `/readyz` says it, issuance answers `UNAVAILABLE` with it.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The prefix of every reference a key store writes where a PEM key would be.
pub const REFERENCE_PREFIX: &str = "pkcs11:";

static CA_KEYS: RwLock<Option<Arc<dyn KeyStore>>> = RwLock::new(None);

/// Makes new anchor and issuer keys in `store` from now on, and finds the keys the state names
/// there (`None`: back to in-memory keys).
pub fn set_ca_key_store(store: Option<Arc<dyn KeyStore>>) {
    *CA_KEYS.write().unwrap_or_else(|p| p.into_inner()) = store;
}

/// The key store for CA keys, if one is set.
pub fn ca_key_store() -> Option<Arc<dyn KeyStore>> {
    CA_KEYS.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Which backend holds CA keys (`[keys]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// PKCS#8 PEM in the state (the state dir, or the Kubernetes Secret).
    #[default]
    File,
    /// A PKCS#11 token.
    Pkcs11,
}

/// `[keys]`: where anchor and issuer keys live.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// `file` (the default) or `pkcs11`.
    pub backend: Backend,
    /// The PKCS#11 module (a shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub pkcs11_module: std::path::PathBuf,
    /// The label of the token to use.
    pub pkcs11_token_label: String,
    /// A file holding the token's user PIN (trailing whitespace ignored; keep it 0600).
    pub pkcs11_pin_file: std::path::PathBuf,
}
