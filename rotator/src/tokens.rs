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

use time::OffsetDateTime;

use crate::spiffe::{IdPattern, TrustDomain};
use crate::store::{StoreError, write_atomic};

/// The tokens file in the state dir.
pub const TOKENS_FILE: &str = "tokens.json";
/// The bootstrap token written on first start.
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";
/// The lock taken around every change of the tokens file.
pub const TOKENS_LOCK_FILE: &str = "tokens.lock";

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
    /// When it stops being accepted (RFC 3339); absent: never.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires: Option<OffsetDateTime>,
    /// A node agent's grant (`meshca token add --node-agent --may-request PATTERN`): the SPIFFE
    /// IDs it may request *for the workloads it serves* (Istio's `ImpersonatedIdentity`). Empty:
    /// not a node agent, and any request naming another identity is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub may_request: Vec<IdPattern>,
}

/// What a new token may do.
#[derive(Debug, Clone, Default)]
pub struct TokenGrant {
    /// SPIFFE IDs or patterns it may request for itself.
    pub allow: Vec<IdPattern>,
    /// As a node agent: the SPIFFE IDs it may request for others (empty: not a node agent).
    pub may_request: Vec<IdPattern>,
    /// When it stops being accepted (`None`: never).
    pub expires: Option<OffsetDateTime>,
}

impl TokenEntry {
    /// Whether it has expired at `now`.
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
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
        Self::index(read_file(dir)?).map_err(|reason| TokensError {
            path: dir.join(TOKENS_FILE),
            reason,
        })
    }

    /// Parses the text of a tokens file.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::index(serde_json::from_str(text).map_err(|e| e.to_string())?)
    }

    fn index(file: TokensFile) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        for t in file.tokens {
            let mut h = [0u8; 32];
            hex::decode_to_slice(&t.sha256, &mut h)
                .map_err(|_| format!("token {:?}: sha256 is not 64 hex digits", t.name))?;
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
pub fn add_token(
    dir: &Path,
    name: &str,
    allow: Vec<IdPattern>,
    expires: Option<OffsetDateTime>,
) -> Result<String, TokensError> {
    add_token_granting(
        dir,
        name,
        TokenGrant {
            allow,
            may_request: Vec::new(),
            expires,
        },
    )
}

/// [`add_token`] with every part of the grant (a node agent's `may_request`).
pub fn add_token_granting(
    dir: &Path,
    name: &str,
    grant: TokenGrant,
) -> Result<String, TokensError> {
    let token = new_token().map_err(|_| TokensError {
        path: dir.join(TOKENS_FILE),
        reason: "random number generator failed".into(),
    })?;
    register_token(dir, name, grant, &token)?;
    Ok(token)
}

/// Reads `<dir>/tokens.json`, lets `f` change it, and writes it back — all under an exclusive lock
/// (`<dir>/tokens.lock`, `flock`), so that two `meshca token` commands never lose each other's
/// change. The file is replaced atomically; nothing is written when `f` fails.
fn update_tokens<R>(
    dir: &Path,
    f: impl FnOnce(&mut Vec<TokenEntry>) -> Result<R, String>,
) -> Result<R, TokensError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(TOKENS_FILE);
    let err = |reason: String| TokensError {
        path: path.clone(),
        reason,
    };
    let lock_path = dir.join(TOKENS_LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| err(format!("{}: {e}", lock_path.display())))?;
    lock.lock()
        .map_err(|e| err(format!("{}: {e}", lock_path.display())))?;
    let mut file = read_file(dir)?;
    let r = f(&mut file.tokens).map_err(err)?;
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| err(e.to_string()))?;
    json.push(b'\n');
    write_atomic(&path, &json, 0o600).map_err(|e: StoreError| err(e.to_string()))?;
    drop(lock);
    Ok(r)
}

/// The tokens in `<dir>/tokens.json` (hashes, names, patterns, expiry), in file order.
pub fn list_tokens(dir: &Path) -> Result<Vec<TokenEntry>, TokensError> {
    read_file(dir).map(|f| f.tokens)
}

/// `<dir>/tokens.json` as written; a missing file holds no tokens.
fn read_file(dir: &Path) -> Result<TokensFile, TokensError> {
    let path = dir.join(TOKENS_FILE);
    let parsed = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
        Err(e) => Err(e.to_string()),
    };
    parsed.map_err(|reason| TokensError { path, reason })
}

/// Removes every token named `name` (a name, or the first 8 or more hex digits of a token's
/// SHA-256 as `meshca token list` shows it); returns how many. None matching is an error and
/// changes nothing.
pub fn revoke_token(dir: &Path, name: &str) -> Result<usize, TokensError> {
    update_tokens(dir, |tokens| {
        let before = tokens.len();
        let by_hash = name.len() >= 8 && name.bytes().all(|b| b.is_ascii_hexdigit());
        tokens.retain(|t| t.name != name && !(by_hash && t.sha256.starts_with(name)));
        match before - tokens.len() {
            0 => Err(format!("no token named {name:?}")),
            n => Ok(n),
        }
    })
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
    grant: TokenGrant,
    token: &str,
) -> Result<(), TokensError> {
    update_tokens(dir, |tokens| {
        tokens.push(TokenEntry {
            name: name.into(),
            sha256: hex::encode(digest(&SHA256, token.as_bytes())),
            allow: grant.allow,
            expires: grant.expires,
            may_request: grant.may_request,
        });
        Ok(())
    })
}

/// Writes the bootstrap token for `spiffe://<td>/ns/default/sa/*` to `<dir>/bootstrap-token`
/// (0600) and registers it in `tokens.json`, valid until `expires` (`None`: until revoked).
/// Called once, when a new authority is created.
pub fn write_bootstrap_token(
    dir: &Path,
    td: &TrustDomain,
    expires: Option<OffsetDateTime>,
) -> Result<PathBuf, TokensError> {
    let pattern: IdPattern = format!("spiffe://{td}/ns/default/sa/*")
        .parse()
        .map_err(|e| TokensError {
            path: dir.join(TOKENS_FILE),
            reason: format!("{e}"),
        })?;
    let token = zeroize::Zeroizing::new(add_token(dir, "bootstrap", vec![pattern], expires)?);
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
        let path = write_bootstrap_token(dir.path(), &td, None).unwrap();
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

    #[test]
    fn concurrent_adds_lose_nothing_and_revoke_removes_by_name_or_hash() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let d = dir.path().to_owned();
                std::thread::spawn(move || add_token(&d, &format!("t{i}"), vec![], None).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let listed = list_tokens(dir.path()).unwrap();
        assert_eq!(listed.len(), 16, "every concurrent add kept");
        assert_eq!(revoke_token(dir.path(), "t3").unwrap(), 1);
        // File order follows the threads' race: pick one that is not t3 (already revoked).
        let other = listed.iter().find(|t| t.name != "t3").unwrap();
        let hash = other.sha256[..12].to_owned();
        assert_eq!(revoke_token(dir.path(), &hash).unwrap(), 1);
        let err = revoke_token(dir.path(), "nobody").unwrap_err();
        assert!(err.reason.contains("no token named \"nobody\""), "{err}");
        assert_eq!(list_tokens(dir.path()).unwrap().len(), 14);
    }

    #[test]
    fn an_expiry_is_kept_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let t = add_token(
            dir.path(),
            "short",
            vec![],
            Some(now + time::Duration::hours(1)),
        )
        .unwrap();
        let tokens = StaticTokens::load(dir.path()).unwrap();
        let e = tokens.lookup(&t).unwrap();
        assert!(!e.expired(now));
        assert!(e.expired(now + time::Duration::hours(2)));
        // A file from before expiries loads (no field: never expires).
        std::fs::write(
            dir.path().join(TOKENS_FILE),
            r#"{"tokens":[{"name":"old","sha256":"00000000000000000000000000000000000000000000000000000000000000aa","allow":[]}]}"#,
        )
        .unwrap();
        assert_eq!(list_tokens(dir.path()).unwrap()[0].expires, None);
    }
}
