//! Keys and CA certificates: generating keys, parsing and checking the certificates an authority
//! holds. What each certificate meshca makes looks like is [`crate::profile`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, SerialNumber};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::{Zeroize, Zeroizing};

use crate::clock::whole_seconds;

/// Why a key or certificate could not be made, parsed or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused to build or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Not a parseable private key.
    #[error("not a usable private key: {0}")]
    Key(String),
    /// Not PEM, or the wrong PEM block.
    #[error("not PEM: {0}")]
    Pem(String),
    /// Not a parseable X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Cert(String),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The key store (a PKCS#11 token) could not make, find or destroy a key: full, lost,
    /// or the key is not there; the message says which.
    #[error("key store: {0}")]
    KeyStore(String),
    /// Names a certificate profile cannot carry.
    #[error("names: {0}")]
    Names(String),
}

/// A private key. The serialized form is zeroized when the last reference is dropped; it never
/// appears in `Debug` output or logs.
#[derive(Clone)]
pub struct SecretKey(Arc<KeyInner>);

#[allow(
    clippy::large_enum_variant,
    reason = "always behind the SecretKey's Arc: one allocation per key, never moved"
)]
enum KeyInner {
    /// In memory (and in the state as PKCS#8 PEM).
    Memory(KeyPair),
    /// In a key store (a PKCS#11 token): the state holds its reference only.
    Stored(Arc<dyn crate::keys::StoredKey>),
}

impl Drop for KeyInner {
    fn drop(&mut self) {
        if let Self::Memory(pair) = self {
            pair.zeroize();
        }
    }
}

/// Where a key lives, for status lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// In the state (the state dir or the Secret).
    State,
    /// In a key store, by this reference.
    Stored(String),
}

impl SecretKey {
    /// A new ECDSA P-256 key in memory, the only type meshca generates: for leaves and the
    /// server's own TLS key. CA keys come from [`generate_ca`](Self::generate_ca).
    pub fn generate_p256() -> Result<Self, PkiError> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Ok(Self(Arc::new(KeyInner::Memory(pair))))
    }

    /// A new anchor or issuer key: in the CA key store when one is set
    /// ([`crate::keys::set_ca_key_store`]), else in memory.
    pub fn generate_ca() -> Result<Self, PkiError> {
        match crate::keys::ca_key_store() {
            Some(store) => Ok(Self(Arc::new(KeyInner::Stored(
                store.generate().map_err(PkiError::KeyStore)?,
            )))),
            None => Self::generate_p256(),
        }
    }

    /// Where it lives.
    pub fn location(&self) -> KeyLocation {
        match &*self.0 {
            KeyInner::Memory(_) => KeyLocation::State,
            KeyInner::Stored(k) => KeyLocation::Stored(k.reference()),
        }
    }

    /// Destroys a stored key in its store (a retired key); a key in memory goes with the state.
    pub fn destroy(&self) -> Result<(), PkiError> {
        match &*self.0 {
            KeyInner::Memory(_) => Ok(()),
            KeyInner::Stored(k) => k.destroy().map_err(PkiError::KeyStore),
        }
    }

    /// Reads a PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`, as `openssl` and
    /// `step` write them) or PKCS#1 (`RSA PRIVATE KEY`). Encrypted keys are refused with the
    /// command that decrypts them.
    /// A key store's reference (`pkcs11:…`, as [`to_pem`](Self::to_pem) writes it for a stored
    /// key) is looked up in the CA key store; none set, or the key missing there, is an error
    /// naming it.
    pub fn from_pem(pem_text: &str) -> Result<Self, PkiError> {
        let text = pem_text.trim();
        if text.starts_with(crate::keys::REFERENCE_PREFIX) {
            let store = crate::keys::ca_key_store().ok_or_else(|| {
                PkiError::Key(format!(
                    "the state names a key in a PKCS#11 token ({text}), but no token is configured \
                     ([keys] backend = \"pkcs11\")"
                ))
            })?;
            let key = store.find(text).map_err(PkiError::KeyStore)?;
            return Ok(Self(Arc::new(KeyInner::Stored(key))));
        }
        let block = pem::parse(pem_text).map_err(|e| PkiError::Pem(e.to_string()))?;
        let contents = Zeroizing::new(block.contents().to_vec());
        let pkcs8 = match block.tag() {
            "PRIVATE KEY" => contents,
            "EC PRIVATE KEY" => Zeroizing::new(der::sec1_to_pkcs8(&contents)?),
            "RSA PRIVATE KEY" => Zeroizing::new(der::pkcs1_to_pkcs8(&contents)),
            "ENCRYPTED PRIVATE KEY" => {
                return Err(PkiError::Key(
                    "the key is encrypted; decrypt it first (`openssl pkcs8 -in KEY -out PLAIN.key`, or \
                     `step crypto change-pass KEY --out PLAIN.key --no-password --insecure`)"
                        .into(),
                ));
            }
            other => {
                return Err(PkiError::Pem(format!(
                    "expected a PRIVATE KEY block, found {other}"
                )));
            }
        };
        let pair = KeyPair::try_from(pkcs8.as_slice()).map_err(|e| PkiError::Key(e.to_string()))?;
        Ok(Self(Arc::new(KeyInner::Memory(pair))))
    }

    /// What the state holds for it: the key as PKCS#8 PEM (in memory that is zeroized when
    /// dropped), or a stored key's reference (no key material).
    pub fn to_pem(&self) -> Zeroizing<String> {
        match &*self.0 {
            KeyInner::Memory(pair) => Zeroizing::new(pair.serialize_pem()),
            KeyInner::Stored(k) => Zeroizing::new(format!("{}\n", k.reference())),
        }
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }

    /// The key as PKCS#8 DER, for a key in memory (what rustls takes); a stored key has none to
    /// give.
    pub fn pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, PkiError> {
        self.key_pair()
            .map(|p| Zeroizing::new(p.serialize_der()))
            .ok_or_else(|| PkiError::Key("a key in a key store cannot be exported".into()))
    }

    /// The underlying rcgen key pair, for a key in memory (a stored key has none to give).
    pub fn key_pair(&self) -> Option<&KeyPair> {
        match &*self.0 {
            KeyInner::Memory(pair) => Some(pair),
            KeyInner::Stored(_) => None,
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl rcgen::PublicKeyData for SecretKey {
    fn der_bytes(&self) -> &[u8] {
        match &*self.0 {
            KeyInner::Memory(pair) => pair.der_bytes(),
            KeyInner::Stored(k) => k.public_point(),
        }
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match &*self.0 {
            KeyInner::Memory(pair) => pair.algorithm(),
            KeyInner::Stored(_) => &PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for SecretKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match &*self.0 {
            KeyInner::Memory(pair) => pair.sign(msg),
            KeyInner::Stored(k) => k.sign(msg).map_err(|e| {
                tracing_free_log(&e);
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// rcgen's error for a remote key carries no text: the reason goes to stderr once per failure
/// (it names the token and the PKCS#11 return value, never key material).
fn tracing_free_log(e: &str) {
    eprintln!("meshca: signing with a stored key failed: {e}");
}

/// Just enough DER to re-wrap SEC1 and PKCS#1 keys as PKCS#8 (RFC 5208), which is what ring reads.
mod der {
    use super::PkiError;

    const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const RSA_ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let bytes: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .skip_while(|&b| b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }

    /// Splits one TLV off the front of `b`: `(tag, body, rest)`.
    fn next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        let (len, b) = if first < 0x80 {
            (usize::from(first), b)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            (
                b[..n]
                    .iter()
                    .fold(0usize, |a, &x| (a << 8) | usize::from(x)),
                &b[n..],
            )
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }

    fn pkcs8(alg: &[u8], key: &[u8]) -> Vec<u8> {
        let mut body = vec![0x02, 0x01, 0x00];
        body.extend_from_slice(alg);
        body.extend(tlv(0x04, key));
        tlv(0x30, &body)
    }

    /// SEC1 `ECPrivateKey` → PKCS#8. The curve comes from its `[0]` parameters, or from the
    /// private key's length when they are absent.
    pub fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, PkiError> {
        let bad = || PkiError::Key("malformed EC PRIVATE KEY".into());
        let (tag, mut body, _) = next(sec1).ok_or_else(bad)?;
        if tag != 0x30 {
            return Err(bad());
        }
        let mut curve = None;
        let mut key_len = 0;
        while let Some((t, v, rest)) = next(body) {
            match t {
                0x04 => key_len = v.len(),
                0xa0 => curve = Some(v),
                _ => {}
            }
            body = rest;
        }
        let curve = match (curve, key_len) {
            (Some(c), _) if c == OID_P256 => OID_P256,
            (Some(c), _) if c == OID_P384 => OID_P384,
            (None, 32) => OID_P256,
            (None, 48) => OID_P384,
            (None, 0) => return Err(bad()),
            _ => {
                return Err(PkiError::Key(
                    "EC key on a curve other than P-256 or P-384".into(),
                ));
            }
        };
        let mut alg = OID_EC_PUBLIC_KEY.to_vec();
        alg.extend_from_slice(curve);
        Ok(pkcs8(&tlv(0x30, &alg), sec1))
    }

    /// PKCS#1 `RSAPrivateKey` → PKCS#8.
    pub fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
        pkcs8(RSA_ALG, pkcs1)
    }
}

/// A short, stable identifier of a certificate: the first 8 bytes of SHA-256 over its DER, hex.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct CertId(String);

impl CertId {
    /// The id of the certificate `der`.
    pub fn of(der: &[u8]) -> Self {
        Self(hex::encode(&digest(&SHA256, der).as_ref()[..8]))
    }

    /// The id as a string (16 lowercase hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id `s` names, if it has an id's shape (16 lowercase hex digits).
    pub fn parse(s: &str) -> Option<Self> {
        Self::is_well_formed(s).then(|| Self(s.to_owned()))
    }

    /// Whether `s` has the shape of an id (so it is safe as a file name).
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl fmt::Display for CertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// What meshca needs to know about a certificate, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Subject, RFC 4514 style.
    pub subject: String,
    /// Issuer, RFC 4514 style.
    pub issuer: String,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
    /// keyUsage has keyCertSign.
    pub key_cert_sign: bool,
    /// The subject public key, DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Self-signed (issuer name equals subject name and the signature verifies with its own key).
    pub self_signed: bool,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        let (rest, x) =
            X509Certificate::from_der(der).map_err(|e| PkiError::Cert(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::Cert(
                "trailing bytes after the certificate".into(),
            ));
        }
        let ts = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| PkiError::Cert(format!("time out of range: {e}")))
        };
        let bc = x
            .basic_constraints()
            .map_err(|e| PkiError::Cert(e.to_string()))?;
        let ku = x.key_usage().map_err(|e| PkiError::Cert(e.to_string()))?;
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = x.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::URI(u) => uris.push((*u).to_owned()),
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        dns_names.push((*d).to_owned())
                    }
                    _ => {}
                }
            }
        }
        let self_signed =
            x.subject().as_raw() == x.issuer().as_raw() && x.verify_signature(None).is_ok();
        Ok(Self {
            serial: hex::encode(x.raw_serial()),
            subject: x.subject().to_string(),
            issuer: x.issuer().to_string(),
            not_before: ts(x.validity().not_before.timestamp())?,
            not_after: ts(x.validity().not_after.timestamp())?,
            is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
            path_len: bc.and_then(|b| b.value.path_len_constraint),
            key_cert_sign: ku.is_some_and(|k| k.value.key_cert_sign()),
            spki_der: x.public_key().raw.to_vec(),
            uris,
            dns_names,
            self_signed,
        })
    }

    /// Whether the certificate is valid at `now` (notBefore ≤ now < notAfter, whole seconds).
    pub fn valid_at(&self, now: OffsetDateTime) -> bool {
        let now = whole_seconds(now);
        self.not_before <= now && now < self.not_after
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: OffsetDateTime) -> Duration {
        (self.not_after - now).try_into().unwrap_or(Duration::ZERO)
    }

    /// Lifetime, notBefore to notAfter.
    pub fn lifetime(&self) -> Duration {
        (self.not_after - self.not_before)
            .try_into()
            .unwrap_or(Duration::ZERO)
    }
}

/// A CA certificate (anchor or issuer) with its parsed facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    der: CertificateDer<'static>,
    id: CertId,
    /// Parsed facts.
    pub info: CertInfo,
}

impl CaCert {
    /// Parses `der` and checks that it is a CA certificate that may sign certificates.
    pub fn from_der(der: Vec<u8>) -> Result<Self, PkiError> {
        let info = CertInfo::parse(&der)?;
        if !info.is_ca {
            return Err(PkiError::Cert(
                "not a CA certificate (basicConstraints cA is not true)".into(),
            ));
        }
        if !info.key_cert_sign {
            return Err(PkiError::Cert("keyUsage does not allow keyCertSign".into()));
        }
        Ok(Self {
            id: CertId::of(&der),
            der: CertificateDer::from(der),
            info,
        })
    }

    /// Parses one PEM certificate.
    pub fn from_pem(text: &str) -> Result<Self, PkiError> {
        let block = pem::parse(text).map_err(|e| PkiError::Pem(e.to_string()))?;
        if block.tag() != "CERTIFICATE" {
            return Err(PkiError::Pem(format!(
                "expected CERTIFICATE, found {}",
                block.tag()
            )));
        }
        Self::from_der(block.into_contents())
    }

    /// DER bytes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// PEM text.
    pub fn pem(&self) -> String {
        pem_cert(&self.der)
    }

    /// Stable id.
    pub fn id(&self) -> &CertId {
        &self.id
    }

    /// Whether `key` is the private key of this certificate.
    pub fn matches_key(&self, key: &SecretKey) -> bool {
        self.info.spki_der == key.spki_der()
    }

    /// Checks that `self` was issued by `parent`: names chain and the signature verifies.
    pub fn verify_issued_by(&self, parent: &CaCert) -> Result<(), String> {
        let (_, child) = X509Certificate::from_der(&self.der).map_err(|e| e.to_string())?;
        let (_, p) = X509Certificate::from_der(&parent.der).map_err(|e| e.to_string())?;
        if child.issuer().as_raw() != p.subject().as_raw() {
            return Err(format!(
                "issuer name {} is not the subject {} of {}",
                child.issuer(),
                p.subject(),
                parent.id
            ));
        }
        child.verify_signature(Some(p.public_key())).map_err(|e| {
            format!(
                "signature does not verify with the key of {}: {e}",
                parent.id
            )
        })
    }

    /// An rcgen issuer that signs with `key` under this certificate's name and key identifier.
    pub fn rcgen_issuer(
        &self,
        key: SecretKey,
    ) -> Result<rcgen::Issuer<'static, SecretKey>, PkiError> {
        Ok(rcgen::Issuer::from_ca_cert_der(&self.der, key)?)
    }
}

/// PEM text of one DER certificate.
pub fn pem_cert(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Fills `out` with bytes from the operating system's CSPRNG, taken from a per-thread buffer
/// that is refilled 4 KiB at a time: one `getrandom` call per 256 serial numbers instead of one
/// per certificate. Each byte is handed out once and then overwritten.
pub fn random_bytes(out: &mut [u8]) -> Result<(), PkiError> {
    use std::cell::RefCell;
    const BUF: usize = 4096;
    thread_local! {
        static POOL: RefCell<(Box<[u8; BUF]>, usize)> = RefCell::new((Box::new([0u8; BUF]), BUF));
    }
    if out.len() > BUF {
        return SystemRandom::new().fill(out).map_err(|_| PkiError::Random);
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let (buf, used) = &mut *p;
        if BUF - *used < out.len() {
            SystemRandom::new()
                .fill(&mut buf[..])
                .map_err(|_| PkiError::Random)?;
            *used = 0;
        }
        let end = *used + out.len();
        out.copy_from_slice(&buf[*used..end]);
        buf[*used..end].zeroize();
        *used = end;
        Ok(())
    })
}

/// A random positive serial number with 127 bits of entropy (RFC 5280: at most 20 octets;
/// CA/B forum: at least 64 bits of entropy).
pub fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    // Positive and without a leading zero octet: top bit clear, some bit of the first byte set.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pem_round_trip_and_redaction() {
        let k = SecretKey::generate_p256().unwrap();
        let pem = k.to_pem();
        let k2 = SecretKey::from_pem(&pem).unwrap();
        assert_eq!(k.spki_der(), k2.spki_der());
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");
        assert!(
            SecretKey::from_pem(
                "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n"
            )
            .unwrap_err()
            .to_string()
            .contains("malformed EC PRIVATE KEY")
        );
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA==\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(
            SecretKey::from_pem(enc)
                .unwrap_err()
                .to_string()
                .contains("decrypt it first")
        );
    }

    #[test]
    fn legacy_key_forms_are_read() {
        // fixtures/make.sh: the same key as SEC1 / PKCS#1 and as PKCS#8, converted by openssl.
        let fx = |n: &str| {
            std::fs::read_to_string(format!(
                "{}/../tests/fixtures/{n}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        for (legacy, pkcs8) in [
            ("ec-sec1.key", "ec-sec1.pkcs8.key"),
            ("rsa-pkcs1.key", "rsa-pkcs1.pkcs8.key"),
        ] {
            let a = SecretKey::from_pem(&fx(legacy)).unwrap_or_else(|e| panic!("{legacy}: {e}"));
            let b = SecretKey::from_pem(&fx(pkcs8)).unwrap();
            assert_eq!(a.spki_der(), b.spki_der(), "{legacy}");
        }
    }

    #[test]
    fn serials_are_positive_and_random() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_ref().len(), 16);
        assert!(a.as_ref()[0] & 0x80 == 0 && a.as_ref()[0] != 0);
    }
}
