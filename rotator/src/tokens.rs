//! Static bearer tokens: `<state-dir>/tokens.json` holds each token's SHA-256, a name for audit
//! logs, and the SPIFFE IDs (or `spiffe://<td>/ns/<ns>/sa/*` patterns) it may request. The token
//! itself is never stored; it is shown once, when made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::spiffe::{IdPattern, TrustDomain};
use crate::store::{StoreError, write_atomic};

/// The tokens file in the state dir.
pub const TOKENS_FILE: &str = "tokens.json";
/// The bootstrap token written on first start.
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";

/// One token in `tokens.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A name for audit logs.
    pub name: String,
    /// SHA-256 of the token, lowercase hex. The token itself is never stored.
    pub sha256: String,
    /// SPIFFE IDs or `spiffe://<td>/ns/<ns>/sa/*` patterns it may request.
    pub allow: Vec<IdPattern>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// The static tokens, indexed by hash.
#[derive(Debug, Default)]
pub struct StaticTokens {
    by_hash: HashMap<[u8; 32], Arc<TokenEntry>>,
}

/// The tokens file is unreadable or invalid.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TokensError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl StaticTokens {
    /// Reads `<dir>/tokens.json`; a missing file means no tokens.
    pub fn load(dir: &Path) -> Result<Self, TokensError> {
        let path = dir.join(TOKENS_FILE);
        let err = |reason: String| TokensError {
            path: path.clone(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let file: TokensFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut by_hash = HashMap::new();
        for t in file.tokens {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&t.sha256, &mut h)
                .map_err(|_| err(format!("token {:?}: sha256 is not 64 hex digits", t.name)))?;
            by_hash.insert(h, Arc::new(t));
        }
        Ok(Self { by_hash })
    }

    /// How many tokens are known.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no token is known.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The entry for `token`, if it is known.
    pub fn lookup(&self, token: &str) -> Option<&Arc<TokenEntry>> {
        let h: [u8; 32] = digest(&SHA256, token.as_bytes()).as_ref().try_into().ok()?;
        self.by_hash.get(&h)
    }
}

/// Makes a new random token (`mca_` + 43 base64url characters, 256 bits).
pub fn new_token() -> Result<String, ring::error::Unspecified> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b)?;
    Ok(format!(
        "mca_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

/// Adds a new random token to `<dir>/tokens.json` (created if missing) and returns it. Only its
/// hash is kept.
pub fn add_token(dir: &Path, name: &str, allow: Vec<IdPattern>) -> Result<String, TokensError> {
    let token = new_token().map_err(|_| TokensError {
        path: dir.join(TOKENS_FILE),
        reason: "random number generator failed".into(),
    })?;
    register_token(dir, name, allow, &token)?;
    Ok(token)
}

/// Writes `token` to `path` (0600) exactly as it is: no trailing newline. Clients such as ztunnel
/// send a token file's bytes unchanged in the `authorization` header, where a newline makes the
/// header invalid (projected ServiceAccount token files have none either); readers here trim
/// surrounding whitespace all the same.
pub fn write_token_file(path: &Path, token: &str) -> Result<(), StoreError> {
    write_atomic(path, token.as_bytes(), 0o600)
}

/// Registers `token` (its hash only) in `<dir>/tokens.json`, created if missing.
pub fn register_token(
    dir: &Path,
    name: &str,
    allow: Vec<IdPattern>,
    token: &str,
) -> Result<(), TokensError> {
    let path = dir.join(TOKENS_FILE);
    let err = |reason: String| TokensError {
        path: path.clone(),
        reason,
    };
    let mut file = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str::<TokensFile>(&t).map_err(|e| err(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokensFile::default(),
        Err(e) => return Err(err(e.to_string())),
    };
    file.tokens.push(TokenEntry {
        name: name.into(),
        sha256: hex::encode(digest(&SHA256, token.as_bytes())),
        allow,
    });
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| err(e.to_string()))?;
    json.push(b'\n');
    write_atomic(&path, &json, 0o600).map_err(|e: StoreError| err(e.to_string()))
}

/// Writes the bootstrap token for `spiffe://<td>/ns/default/sa/*` to `<dir>/bootstrap-token`
/// (0600) and registers it in `tokens.json`. Called once, when a new authority is created.
pub fn write_bootstrap_token(dir: &Path, td: &TrustDomain) -> Result<PathBuf, TokensError> {
    let pattern: IdPattern = format!("spiffe://{td}/ns/default/sa/*")
        .parse()
        .map_err(|e| TokensError {
            path: dir.join(TOKENS_FILE),
            reason: format!("{e}"),
        })?;
    let token = zeroize::Zeroizing::new(add_token(dir, "bootstrap", vec![pattern])?);
    let path = dir.join(BOOTSTRAP_TOKEN_FILE);
    write_token_file(&path, token.as_str()).map_err(|e| TokensError {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_token_is_private_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let path = write_bootstrap_token(dir.path(), &td).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(TOKENS_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let token = std::fs::read_to_string(&path).unwrap();
        assert!(token.starts_with("mca_") && token.len() == 47, "{token:?}");
        // The exact bytes a client may send as a header value: no newline, no whitespace.
        assert!(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "token file holds only the token: {token:?}"
        );
        let stored = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!stored.contains(&token), "only the hash is stored");
        let t = StaticTokens::load(dir.path()).unwrap();
        let e = t.lookup(&token).unwrap();
        assert_eq!(e.name, "bootstrap");
        assert_eq!(
            e.allow[0].to_string(),
            "spiffe://cluster.local/ns/default/sa/*"
        );
        assert!(t.lookup("mca_other").is_none());
    }
}
