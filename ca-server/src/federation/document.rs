//! The SPIFFE bundle document meshca serves (on the HTTP port's `/spiffe-bundle.json` and at the
//! bundle endpoint): a JWK Set with one `x509-svid` key per anchor.

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

/// The SPIFFE bundle document of `bundle`, as an HTTP answer (the HTTP port and the bundle
/// endpoint serve the same).
pub fn spiffe_bundle_response(
    bundle: &crate::authority::Bundle,
    refresh_hint: u64,
) -> axum::response::Response {
    match spiffe_bundle_json(bundle, refresh_hint) {
        Ok(v) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("{e}\n"),
        ),
    }
    .into_response()
}

/// The bundle as a SPIFFE trust bundle (a JWK Set): one `x509-svid` key per anchor with its
/// certificate in `x5c`, `spiffe_sequence` = the bundle version.
pub fn spiffe_bundle_json(
    b: &crate::authority::Bundle,
    refresh_hint: u64,
) -> Result<serde_json::Value, String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use x509_parser::public_key::PublicKey;
    let mut keys = Vec::new();
    for der in &b.anchors {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("anchor certificate: {e}"))?;
        let spki = cert.public_key();
        let x5c = vec![STANDARD.encode(der.as_ref())];
        let key = match spki.parsed().map_err(|e| format!("anchor key: {e}"))? {
            PublicKey::EC(point) => {
                let d = point.data();
                let (crv, n) = match d.len() {
                    65 => ("P-256", 32),
                    97 => ("P-384", 48),
                    133 => ("P-521", 66),
                    l => return Err(format!("unsupported EC point of {l} bytes")),
                };
                serde_json::json!({
                    "use": "x509-svid", "kty": "EC", "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&d[1..=n]),
                    "y": URL_SAFE_NO_PAD.encode(&d[1 + n..]),
                    "x5c": x5c,
                })
            }
            PublicKey::RSA(rsa) => {
                let strip = |v: &[u8]| {
                    let i = v.iter().position(|&b| b != 0).unwrap_or(v.len());
                    v[i..].to_vec()
                };
                serde_json::json!({
                    "use": "x509-svid", "kty": "RSA",
                    "n": URL_SAFE_NO_PAD.encode(strip(rsa.modulus)),
                    "e": URL_SAFE_NO_PAD.encode(strip(rsa.exponent)),
                    "x5c": x5c,
                })
            }
            PublicKey::Unknown(_) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
                serde_json::json!({
                    "use": "x509-svid", "kty": "OKP", "crv": "Ed25519",
                    "x": URL_SAFE_NO_PAD.encode(spki.subject_public_key.data.as_ref()),
                    "x5c": x5c,
                })
            }
            _ => return Err("unsupported anchor key type".into()),
        };
        keys.push(key);
    }
    Ok(serde_json::json!({
        "keys": keys,
        "spiffe_sequence": b.version,
        "spiffe_refresh_hint": refresh_hint,
    }))
}
