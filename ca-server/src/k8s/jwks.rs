//! The API server's ServiceAccount token signing keys (issue #25, item 2), so that a token whose
//! signature does not verify is refused here and never spends the shared TokenReview budget.
//!
//! The keys are the API server's own published JSON Web Key Set (`GET /openid/v1/jwks`, the
//! document its OIDC discovery names; readable through the built-in ClusterRole
//! `system:service-account-issuer-discovery`). They are fetched on first use and again when a
//! token names a key id (`kid`) not in the set — the API server rotated its key — at most once
//! per [`REFRESH_MIN`], so a flood of tokens with invented key ids costs one fetch per interval.
//! Verification is [`verify`], pure: RS256, ES256 and ES384, the algorithms Kubernetes signs
//! ServiceAccount tokens with.
//!
//! What the signature cannot tell — that the token's bound pod still exists, that the
//! ServiceAccount was not deleted — is still asked of the API server with a TokenReview.
//! When the key set cannot be had (the API server does not serve it, or meshca may not read it),
//! nothing is decided here and the TokenReview decides alone, as before.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// The least time between two fetches of the key set.
pub const REFRESH_MIN: Duration = Duration::from_secs(10);
/// The largest key set document read (a cluster publishes one or two keys, ~1 KiB each).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// At most this many keys are kept from one document.
pub const MAX_KEYS: usize = 16;
/// Where the API server publishes its key set.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Its id.
    pub kid: String,
    /// The algorithm it verifies (`RS256`, `ES256`, `ES384`).
    pub alg: &'static str,
    /// RSA: (n, e), big-endian. EC: the uncompressed point in `n`, `e` empty.
    n: Vec<u8>,
    e: Vec<u8>,
}

/// What a signature check says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed by one of the keys.
    Valid,
    /// Not signed by any of them (the reason).
    Invalid(String),
    /// Its key id is not in the set (it may be newer than the set: fetch again).
    UnknownKey(String),
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: String,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("not base64url: {e}"))
}

/// Parses a JSON Web Key Set, keeping the keys meshca can verify with (at most [`MAX_KEYS`]).
pub fn parse(doc: &[u8]) -> Result<Vec<Key>, String> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    let set: Jwks = serde_json::from_slice(doc).map_err(|e| format!("not a JWK Set: {e}"))?;
    let mut keys = Vec::new();
    for k in set.keys.into_iter().take(MAX_KEYS) {
        let key = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => Key {
                kid: k.kid,
                alg: "RS256",
                n: b64(k.n.as_deref().ok_or("an RSA key without n")?)?,
                e: b64(k.e.as_deref().ok_or("an RSA key without e")?)?,
            },
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let mut point = vec![0x04];
                point.extend(b64(k.x.as_deref().ok_or("an EC key without x")?)?);
                point.extend(b64(k.y.as_deref().ok_or("an EC key without y")?)?);
                Key {
                    kid: k.kid,
                    alg: if crv == "P-256" { "ES256" } else { "ES384" },
                    n: point,
                    e: Vec::new(),
                }
            }
            _ => continue,
        };
        if k.alg.as_deref().is_some_and(|a| a != key.alg) {
            continue;
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Whether `token`'s signature verifies with one of `keys`: the key its header's `kid` names
/// (any key of its algorithm when it names none, as legacy Secret tokens do).
pub fn verify(token: &str, keys: &[Key]) -> Verdict {
    let invalid = |why: &str| Verdict::Invalid(why.to_owned());
    let Some((signed, sig)) = token.rsplit_once('.') else {
        return invalid("not a JWT");
    };
    let Some(header) = signed
        .split('.')
        .next()
        .and_then(|h| b64(h).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return invalid("its header is not base64url JSON");
    };
    let Ok(sig) = b64(sig) else {
        return invalid("its signature is not base64url");
    };
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    let kid = header.get("kid").and_then(|k| k.as_str());
    let candidates: Vec<&Key> = keys
        .iter()
        .filter(|k| k.alg == alg && kid.is_none_or(|id| k.kid == id))
        .collect();
    if candidates.is_empty() {
        return Verdict::UnknownKey(match kid {
            Some(id) => {
                format!("signed with key {id:?} ({alg}), which the API server does not publish")
            }
            None => format!("signed with {alg}, for which the API server publishes no key"),
        });
    }
    let ok = candidates.iter().any(|k| {
        use ring::signature as s;
        let msg = signed.as_bytes();
        match k.alg {
            "RS256" => s::RsaPublicKeyComponents { n: &k.n, e: &k.e }
                .verify(&s::RSA_PKCS1_2048_8192_SHA256, msg, &sig)
                .is_ok(),
            "ES256" => s::UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, &k.n)
                .verify(msg, &sig)
                .is_ok(),
            "ES384" => s::UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, &k.n)
                .verify(msg, &sig)
                .is_ok(),
            _ => false,
        }
    });
    if ok {
        Verdict::Valid
    } else {
        invalid("its signature does not verify with the API server's key")
    }
}

/// The key set, fetched from the API server and refreshed on an unknown key id.
pub struct SigningKeys {
    client: kube::Client,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    keys: Option<std::sync::Arc<Vec<Key>>>,
    fetched: Option<Instant>,
    fetches: u64,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys").finish_non_exhaustive()
    }
}

impl SigningKeys {
    /// Keys to be read through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Fetches of the key set so far.
    pub async fn fetches(&self) -> u64 {
        self.state.lock().await.fetches
    }

    /// `Some(verdict)` on `token`'s signature, after at most one fetch (on first use or an
    /// unknown key id, no sooner than [`REFRESH_MIN`] after the last); `None` when the key set
    /// cannot be had, and the TokenReview must decide alone.
    pub async fn check(&self, token: &str) -> Option<Verdict> {
        // Verified outside the lock: only a fetch holds it across an await.
        let keys = self.state.lock().await.keys.clone();
        let verdict = keys.as_deref().map(|k| verify(token, k));
        if !matches!(verdict, None | Some(Verdict::UnknownKey(_))) {
            return verdict;
        }
        let mut st = self.state.lock().await;
        if st.fetched.is_none_or(|t| t.elapsed() >= REFRESH_MIN) {
            st.fetched = Some(Instant::now());
            st.fetches += 1;
            match self.fetch().await {
                Ok(keys) => {
                    tracing::info!(target: "meshca::auth", keys = keys.len(), "ServiceAccount token signing keys read from the API server");
                    st.keys = Some(std::sync::Arc::new(keys));
                }
                Err(e) => {
                    tracing::warn!(target: "meshca::auth", "ServiceAccount token signing keys unavailable ({e}); tokens go to TokenReview unverified");
                }
            }
        }
        let keys = st.keys.clone();
        drop(st);
        keys.as_deref().map(|k| verify(token, k))
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let req = http::Request::get(JWKS_PATH)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let text = tokio::time::timeout(Duration::from_secs(5), self.client.request_text(req))
            .await
            .map_err(|_| "no answer within 5s".to_owned())?
            .map_err(|e| format!("GET {JWKS_PATH}: {e}"))?;
        parse(text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A P-256 key as a JWK and a token it signs.
    fn es256(kid: &str, claims: &str) -> (Key, String) {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let p = kp.public_key().as_ref();
        let doc = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"{kid}","alg":"ES256","use":"sig","x":"{}","y":"{}"}}]}}"#,
            enc(&p[1..33]),
            enc(&p[33..])
        );
        let key = parse(doc.as_bytes()).unwrap().remove(0);
        let signed = format!(
            "{}.{}",
            enc(format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#).as_bytes()),
            enc(claims.as_bytes())
        );
        let sig = kp.sign(&rng, signed.as_bytes()).unwrap();
        (key, format!("{signed}.{}", enc(sig.as_ref())))
    }

    #[test]
    fn signatures_verify_only_with_the_published_key() {
        let (key, token) = es256("k1", r#"{"sub":"system:serviceaccount:a:b"}"#);
        assert_eq!(verify(&token, std::slice::from_ref(&key)), Verdict::Valid);
        // A forged payload under the same signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = enc(br#"{"sub":"system:serviceaccount:kube-system:admin"}"#);
        parts[1] = &forged_claims;
        let forged = parts.join(".");
        assert!(matches!(
            verify(&forged, std::slice::from_ref(&key)),
            Verdict::Invalid(_)
        ));
        // Signed by another key with the same id.
        let (_, other) = es256("k1", r#"{"sub":"x"}"#);
        assert!(matches!(
            verify(&other, std::slice::from_ref(&key)),
            Verdict::Invalid(_)
        ));
        // A key id the set does not have: fetch again before deciding.
        let (_, unknown) = es256("k2", r#"{"sub":"x"}"#);
        assert!(matches!(
            verify(&unknown, std::slice::from_ref(&key)),
            Verdict::UnknownKey(_)
        ));
        // Another algorithm than the key's.
        let hs = format!("{}.e30.c2ln", enc(br#"{"alg":"HS256","kid":"k1"}"#));
        assert!(matches!(verify(&hs, &[key]), Verdict::UnknownKey(_)));
    }

    #[test]
    fn key_sets_are_bounded_and_skip_what_cannot_verify() {
        assert!(parse(&vec![b' '; MAX_JWKS_BYTES + 1]).is_err());
        assert!(parse(b"[]").is_err());
        let doc = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}]}"#;
        assert_eq!(parse(doc).unwrap(), Vec::new());
        let many = format!(
            r#"{{"keys":[{}]}}"#,
            vec![r#"{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB"}"#; 40].join(",")
        );
        assert_eq!(parse(many.as_bytes()).unwrap().len(), MAX_KEYS);
    }
}
