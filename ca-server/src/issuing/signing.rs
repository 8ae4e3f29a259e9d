//! The signing core: a CSR (DER or PEM) and a validity window in, an X.509-SVID out.
//!
//! What a CSR may ask for is narrow (linkerd2's `checkCSR` is the model): exactly one URI SAN
//! holding a SPIFFE ID, a CN that is empty or that same ID, and no extension beyond SAN, KU, EKU
//! and a non-CA basicConstraints. Nothing is copied from the CSR except the public key and the
//! SPIFFE ID (and, on the Linkerd face, the DNS identity): the leaf's profile is fixed in
//! [`rotator::profile::leaf`] (SPIFFE X.509-SVID spec §4): basicConstraints CA:false (critical),
//! keyUsage digitalSignature (+ keyEncipherment for RSA, critical), EKU serverAuth + clientAuth,
//! the SANs (critical: the subject is empty), SKI and AKI, a random positive 127-bit serial.

use rcgen::SignatureAlgorithm;
use rotator::pki::SecretKey;
use rotator::policy::LeafWindow;
use rotator::profile::LeafNames;
use rotator::spiffe::{IdError, SpiffeId};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_PKCS9_EXTENSION_REQUEST, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused. Every variant maps to `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// PEM input without a CERTIFICATE REQUEST block.
    #[error("CSR is PEM but holds no CERTIFICATE REQUEST block")]
    Pem,
    /// Not a DER PKCS#10 request.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// Signed with an algorithm meshca does not accept (SHA-1, unknown).
    #[error(
        "CSR signature algorithm {0} is not accepted (ECDSA with SHA-256/384, Ed25519, RSA with SHA-256/384/512 or PSS)"
    )]
    SignatureAlgorithm(String),
    /// The signature does not verify with the CSR's own key.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// A key type other than P-256, P-384, Ed25519 or RSA.
    #[error(
        "key type not accepted: {0} (ECDSA P-256/P-384, Ed25519 or RSA >= {MIN_RSA_BITS} bits)"
    )]
    KeyType(String),
    /// An RSA key under [`MIN_RSA_BITS`].
    #[error("RSA key of {0} bits is too weak (minimum {MIN_RSA_BITS})")]
    WeakRsa(usize),
    /// No URI SAN.
    #[error("CSR has no URI SAN: it must carry exactly one, the SPIFFE ID")]
    NoUriSan,
    /// More than one URI SAN.
    #[error("CSR has {0} URI SANs: it must carry exactly one, the SPIFFE ID")]
    ManyUriSans(usize),
    /// A DNS, IP, email or other SAN.
    #[error("CSR has a {0} SAN: only the SPIFFE URI SAN is allowed")]
    OtherSan(&'static str),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN {0:?} is not a SPIFFE ID: {1}")]
    NotSpiffe(String, IdError),
    /// A CN other than the SPIFFE ID.
    #[error("CSR subject CN {0:?} must be empty or equal to the SPIFFE ID")]
    CommonName(String),
    /// basicConstraints cA = true.
    #[error("CSR requests a CA certificate (basicConstraints cA=true)")]
    CaRequested,
    /// keyUsage keyCertSign or cRLSign.
    #[error("CSR requests keyCertSign or cRLSign key usage")]
    CaKeyUsage,
    /// Any extension besides SAN, KU, EKU and basicConstraints.
    #[error(
        "CSR requests extension {0}, which is not allowed (only SAN, KU, EKU, basicConstraints)"
    )]
    Extension(String),
    /// An attribute other than extensionRequest.
    #[error("CSR carries attribute {0}, which is not allowed")]
    Attribute(String),
    /// The same extension twice.
    #[error("CSR requests extension {0} twice")]
    DuplicateExtension(String),
    /// A DNS-identity CSR (Linkerd) without exactly one DNS SAN.
    #[error("CSR has {0} DNS SANs: it must carry exactly one, the identity")]
    DnsSans(usize),
    /// A DNS-identity CSR (Linkerd) with a URI SAN.
    #[error("CSR has a URI SAN: a Linkerd identity CSR carries only the DNS identity")]
    UriSanInDnsCsr,
    /// A DNS-identity CSR (Linkerd) with a key that is not ECDSA.
    #[error("Linkerd identity CSRs must use an ECDSA key, not {0}")]
    NotEcdsa(String),
    /// The CSR's identity is not the one the request names.
    #[error("CSR is for {csr:?} but the request names {requested:?}")]
    IdentityMismatch {
        /// In the CSR.
        csr: String,
        /// In the request.
        requested: String,
    },
}

/// The public key of an accepted CSR.
#[derive(Debug, Clone)]
pub struct CsrKey {
    alg: &'static SignatureAlgorithm,
    bits: Vec<u8>,
    rsa: bool,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.bits
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A CSR that passed every check: the SPIFFE ID it asks for and its key.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    /// The one SPIFFE ID asked for (authorization is the caller's business).
    pub id: SpiffeId,
    /// The subject key.
    pub key: CsrKey,
    /// A DNS identity the leaf carries too (Linkerd's `<sa>.<ns>.serviceaccount.identity…`).
    pub dns: Option<String>,
}

/// What a CSR asks for, after every check that does not depend on the kind of identity.
struct Parsed {
    key: CsrKey,
    uris: Vec<String>,
    dns: Vec<String>,
    other_san: Option<&'static str>,
    cns: Vec<String>,
}

/// Parses and checks a CSR, DER or PEM, for a SPIFFE ID (exactly one URI SAN).
pub fn parse_csr(input: &[u8]) -> Result<ValidCsr, CsrError> {
    let mut p = parse_common(input)?;
    if !p.dns.is_empty() {
        return Err(CsrError::OtherSan("DNS"));
    }
    if let Some(kind) = p.other_san {
        return Err(CsrError::OtherSan(kind));
    }
    let uri = match p.uris.len() {
        0 => return Err(CsrError::NoUriSan),
        1 => p.uris.remove(0),
        n => return Err(CsrError::ManyUriSans(n)),
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| CsrError::NotSpiffe(uri.clone(), e))?;
    if let Some(cn) = p.cns.iter().find(|cn| *cn != id.as_str()) {
        return Err(CsrError::CommonName(cn.clone()));
    }
    Ok(ValidCsr {
        id,
        key: p.key,
        dns: None,
    })
}

/// Parses and checks a Linkerd identity CSR, DER: exactly one DNS SAN equal to `identity`, no
/// other SAN, CN empty or equal, an ECDSA key. `id` is the SPIFFE ID the identity maps to (it is
/// what authorization checks, and the leaf carries it as its URI SAN).
pub fn parse_dns_csr(input: &[u8], identity: &str, id: SpiffeId) -> Result<ValidCsr, CsrError> {
    let mut p = parse_common(input)?;
    if !p.uris.is_empty() {
        return Err(CsrError::UriSanInDnsCsr);
    }
    if let Some(kind) = p.other_san {
        return Err(CsrError::OtherSan(kind));
    }
    let dns = match p.dns.len() {
        1 => p.dns.remove(0),
        n => return Err(CsrError::DnsSans(n)),
    };
    if !dns.eq_ignore_ascii_case(identity) {
        return Err(CsrError::IdentityMismatch {
            csr: dns,
            requested: identity.to_owned(),
        });
    }
    if let Some(cn) = p.cns.iter().find(|cn| !cn.eq_ignore_ascii_case(identity)) {
        return Err(CsrError::CommonName(cn.clone()));
    }
    if p.key.rsa || std::ptr::eq(p.key.alg, &rcgen::PKCS_ED25519) {
        return Err(CsrError::NotEcdsa(
            if p.key.rsa { "RSA" } else { "Ed25519" }.into(),
        ));
    }
    Ok(ValidCsr {
        id,
        key: p.key,
        dns: Some(identity.to_ascii_lowercase()),
    })
}

fn parse_common(input: &[u8]) -> Result<Parsed, CsrError> {
    let der = der_of(input)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    let sig = &csr.signature_algorithm.algorithm;
    if !ACCEPTED_SIGNATURES.contains(sig) {
        return Err(CsrError::SignatureAlgorithm(sig.to_id_string()));
    }
    let info = &csr.certification_request_info;
    let key = csr_key(&info.subject_pki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let names = requested_names(info)?;
    let mut cns = Vec::new();
    for cn in info.subject.iter_common_name() {
        cns.push(
            cn.as_str()
                .map_err(|_| CsrError::CommonName("<not a string>".into()))?
                .to_owned(),
        );
    }
    Ok(Parsed {
        key,
        uris: names.uris,
        dns: names.dns,
        other_san: names.other_san,
        cns,
    })
}

/// Signature algorithms a CSR may be signed with (no SHA-1, no MD5).
const ACCEPTED_SIGNATURES: [x509_parser::der_parser::oid::Oid<'static>; 7] = [
    OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ED25519,
    OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA,
    OID_PKCS1_RSASSAPSS,
];

/// The DER of a CSR given as DER or as one PEM `CERTIFICATE REQUEST` block.
fn der_of(input: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CsrError> {
    if !input.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Ok(std::borrow::Cow::Borrowed(input));
    }
    let block = pem::parse(input).map_err(|_| CsrError::Pem)?;
    if !matches!(
        block.tag(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CsrError::Pem);
    }
    Ok(std::borrow::Cow::Owned(block.into_contents()))
}

/// The names a CSR's extension request asks for.
#[derive(Default)]
struct Names {
    uris: Vec<String>,
    dns: Vec<String>,
    other_san: Option<&'static str>,
}

/// Reads the CSR's attributes: only an extensionRequest, with each extension at most once and
/// only SAN, a non-CA basicConstraints, a non-CA keyUsage and EKU; returns the SANs asked for.
fn requested_names(
    info: &x509_parser::certification_request::X509CertificationRequestInfo<'_>,
) -> Result<Names, CsrError> {
    let mut names = Names::default();
    let mut seen = Vec::new();
    for attr in info.iter_attributes() {
        if attr.oid != OID_PKCS9_EXTENSION_REQUEST {
            return Err(CsrError::Attribute(attr.oid.to_id_string()));
        }
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            return Err(CsrError::Malformed(
                "unparseable extensionRequest attribute".into(),
            ));
        };
        for ext in &req.extensions {
            let oid = ext.oid.to_id_string();
            if seen.contains(&oid) {
                return Err(CsrError::DuplicateExtension(oid));
            }
            seen.push(oid.clone());
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        names.add(name);
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CsrError::CaRequested);
                }
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(CsrError::CaKeyUsage);
                }
                ParsedExtension::BasicConstraints(_)
                | ParsedExtension::KeyUsage(_)
                | ParsedExtension::ExtendedKeyUsage(_) => {}
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::Malformed(format!("extension {oid}: {error}")));
                }
                _ => return Err(CsrError::Extension(oid)),
            }
        }
    }
    Ok(names)
}

impl Names {
    fn add(&mut self, name: &GeneralName<'_>) {
        let other = match name {
            GeneralName::URI(u) => return self.uris.push((*u).to_owned()),
            GeneralName::DNSName(d) => return self.dns.push((*d).to_owned()),
            GeneralName::IPAddress(_) => "IP",
            GeneralName::RFC822Name(_) => "email",
            _ => "non-URI",
        };
        self.other_san = self.other_san.or(Some(other));
    }
}

/// The subject key a PodCertificateRequest carries: a PKIX SubjectPublicKeyInfo (`v1beta1`'s
/// `pkixPublicKey`), or the key of its stub PKCS#10 request (`stubPKCS10Request`; the API server
/// verified the request's signature at admission). Kubernetes allows RSA 3072/4096, ECDSA
/// P-256/P-384/P-521 and Ed25519; meshca signs P-256, P-384, Ed25519 and RSA of 3072 bits or
/// more, and says which otherwise.
pub fn pod_request_key(spki: Option<&[u8]>, stub_csr: Option<&[u8]>) -> Result<CsrKey, CsrError> {
    let key = match (stub_csr.filter(|c| !c.is_empty()), spki) {
        (Some(csr), _) => {
            let (_, csr) = X509CertificationRequest::from_der(csr)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            csr_key(&csr.certification_request_info.subject_pki)?
        }
        (None, Some(der)) => {
            let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            csr_key(&spki)?
        }
        (None, None) => return Err(CsrError::Malformed("no public key in the request".into())),
    };
    if key.rsa && key.bits.len() < 300 {
        // A 2048-bit modulus (meshca's floor elsewhere): Kubernetes does not allow it here.
        return Err(CsrError::KeyType("RSA below 3072 bits".into()));
    }
    Ok(key)
}

fn csr_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<CsrKey, CsrError> {
    let alg_oid = &spki.algorithm.algorithm;
    let bits = spki.subject_public_key.data.to_vec();
    if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let alg = match curve {
            Some(c) if c == OID_EC_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Some(c) if c == OID_NIST_EC_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Some(c) => return Err(CsrError::KeyType(format!("EC curve {}", c.to_id_string()))),
            None => return Err(CsrError::KeyType("EC key without a named curve".into())),
        };
        return Ok(CsrKey {
            alg,
            bits,
            rsa: false,
        });
    }
    if *alg_oid == OID_SIG_ED25519 {
        return Ok(CsrKey {
            alg: &rcgen::PKCS_ED25519,
            bits,
            rsa: false,
        });
    }
    if *alg_oid == OID_PKCS1_RSAENCRYPTION {
        let modulus_bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                let m = rsa.modulus;
                let m = &m[m.iter().position(|&b| b != 0).unwrap_or(m.len())..];
                m.first()
                    .map_or(0, |b| (m.len() - 1) * 8 + (8 - b.leading_zeros() as usize))
            }
            _ => return Err(CsrError::Malformed("unparseable RSA public key".into())),
        };
        if modulus_bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsa(modulus_bits));
        }
        return Ok(CsrKey {
            alg: &rcgen::PKCS_RSA_SHA256,
            bits,
            rsa: true,
        });
    }
    Err(CsrError::KeyType(alg_oid.to_id_string()))
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// DER.
    pub der: Vec<u8>,
    /// Serial, lowercase hex.
    pub serial: String,
}

/// Signing failed for a reason that is not the request's fault (a bug or an RNG failure).
#[derive(Debug, thiserror::Error)]
#[error("signing failed: {0}")]
pub struct SignError(String);

/// Signs an X.509-SVID for `csr` valid over `window`, issued by `issuer`, with the leaf profile
/// ([`rotator::profile::leaf`]): nothing from the CSR but its key and its names as checked.
pub fn sign_leaf(
    csr: &ValidCsr,
    window: &LeafWindow,
    issuer: &rcgen::Issuer<'_, SecretKey>,
) -> Result<Leaf, SignError> {
    let names = LeafNames {
        dns: csr.dns.as_deref(),
        spiffe_id: csr.id.as_str(),
    };
    let params = rotator::profile::leaf(&names, csr.key.rsa, window.not_before, window.not_after)
        .map_err(|e| SignError(e.to_string()))?;
    let serial_hex = params
        .serial_number
        .as_ref()
        .map(|s| hex::encode(s.as_ref()))
        .unwrap_or_default();
    let cert = params
        .signed_by(&csr.key, issuer)
        .map_err(|e| SignError(e.to_string()))?;
    Ok(Leaf {
        der: cert.der().to_vec(),
        serial: serial_hex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rotator::client::make_csr;
    use rotator::policy::Policy;
    use rotator::state::AuthorityState;
    use std::time::Duration;
    use time::OffsetDateTime;
    use x509_parser::prelude::X509Certificate;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn id() -> SpiffeId {
        ID.parse().unwrap()
    }

    /// A CSR built with rcgen from `params` and `key`.
    fn csr_with(params: CertificateParams, key: &KeyPair) -> Vec<u8> {
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn uri_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn accepts_every_allowed_key_type() {
        let keys = [
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
            KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
            rsa_key(2048),
        ];
        for k in &keys {
            let v = parse_csr(&csr_with(uri_params(&[ID]), k)).unwrap();
            assert_eq!(v.id, id());
        }
    }

    fn rsa_key(bits: usize) -> KeyPair {
        // ring cannot generate RSA keys; the fixture script beside them (tests/fixtures/make.sh)
        // made these with openssl.
        let pem = match bits {
            2048 => include_str!("../../../tests/fixtures/rsa2048.key"),
            _ => unreachable!(),
        };
        KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256).unwrap()
    }

    #[test]
    fn pem_input_is_accepted() {
        let der = make_csr(&id(), &SecretKey::generate_p256().unwrap()).unwrap();
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert_eq!(parse_csr(pem.as_bytes()).unwrap().id, id());
        let wrong = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert_eq!(parse_csr(wrong.as_bytes()).unwrap_err(), CsrError::Pem);
    }

    // One test per rejection reason.

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_csr(b"\x30\x03\x01\x02\x03"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(parse_csr(b""), Err(CsrError::Malformed(_))));
        let mut der = make_csr(&id(), &SecretKey::generate_p256().unwrap()).unwrap();
        der.push(0);
        assert!(matches!(parse_csr(&der), Err(CsrError::Malformed(m)) if m.contains("trailing")));
    }

    #[test]
    fn rejects_a_bad_signature() {
        let mut der = make_csr(&id(), &SecretKey::generate_p256().unwrap()).unwrap();
        let n = der.len();
        der[n - 5] ^= 0x55; // inside the signature value
        assert_eq!(parse_csr(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn rejects_two_uri_sans() {
        let der = csr_with(
            uri_params(&[ID, "spiffe://cluster.local/ns/default/sa/other"]),
            &p256(),
        );
        assert_eq!(parse_csr(&der).unwrap_err(), CsrError::ManyUriSans(2));
    }

    #[test]
    fn rejects_no_uri_san() {
        assert_eq!(
            parse_csr(&csr_with(uri_params(&[]), &p256())).unwrap_err(),
            CsrError::NoUriSan
        );
    }

    #[test]
    fn rejects_a_dns_san() {
        let mut p = uri_params(&[ID]);
        p.subject_alt_names
            .push(SanType::DnsName("web.default.svc".try_into().unwrap()));
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::OtherSan("DNS")
        );
    }

    #[test]
    fn rejects_an_ip_san() {
        let mut p = uri_params(&[ID]);
        p.subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::OtherSan("IP")
        );
    }

    #[test]
    fn rejects_an_email_san() {
        let mut p = uri_params(&[ID]);
        p.subject_alt_names
            .push(SanType::Rfc822Name("a@b.c".try_into().unwrap()));
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::OtherSan("email")
        );
    }

    #[test]
    fn rejects_a_uri_that_is_not_spiffe() {
        let der = csr_with(uri_params(&["https://example.com/x"]), &p256());
        assert!(matches!(
            parse_csr(&der),
            Err(CsrError::NotSpiffe(_, IdError::Scheme))
        ));
    }

    #[test]
    fn rejects_a_foreign_common_name() {
        let mut p = uri_params(&[ID]);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "admin");
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::CommonName("admin".into())
        );
        let mut ok = uri_params(&[ID]);
        ok.distinguished_name.push(rcgen::DnType::CommonName, ID);
        assert_eq!(parse_csr(&csr_with(ok, &p256())).unwrap().id, id());
    }

    #[test]
    fn rejects_a_ca_request() {
        let mut p = uri_params(&[ID]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::CaRequested
        );
        let mut not_ca = uri_params(&[ID]);
        not_ca.is_ca = IsCa::ExplicitNoCa;
        assert!(parse_csr(&csr_with(not_ca, &p256())).is_ok());
    }

    #[test]
    fn rejects_key_cert_sign() {
        let mut p = uri_params(&[ID]);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert_eq!(
            parse_csr(&csr_with(p, &p256())).unwrap_err(),
            CsrError::CaKeyUsage
        );
    }

    #[test]
    fn rejects_other_extensions() {
        let mut p = uri_params(&[ID]);
        // 1.3.6.1.5.5.7.1.1 authorityInfoAccess, with an empty body.
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 5, 5, 7, 1, 1],
            vec![0x30, 0x00],
        )];
        assert!(
            matches!(parse_csr(&csr_with(p, &p256())), Err(CsrError::Extension(o)) if o == "1.3.6.1.5.5.7.1.1")
        );
    }

    #[test]
    fn rejects_weak_rsa() {
        // ring refuses to sign with RSA-1024, so this CSR comes from openssl (fixtures/make.sh).
        let pem = include_bytes!("../../../tests/fixtures/rsa1024.csr");
        assert_eq!(parse_csr(pem).unwrap_err(), CsrError::WeakRsa(1024));
    }

    #[test]
    fn rejects_sha1_signatures() {
        // An RSA-1024/SHA-1 CSR made by `openssl req` (tests/fixtures/make.sh).
        let pem = include_bytes!("../../../tests/fixtures/sha1.csr");
        assert!(
            matches!(parse_csr(pem), Err(CsrError::SignatureAlgorithm(o)) if o == "1.2.840.113549.1.1.5")
        );
    }

    #[test]
    fn rejects_other_key_types() {
        // A P-521 key (tests/fixtures/make.sh): ECDSA, but not a curve meshca accepts.
        let pem = include_bytes!("../../../tests/fixtures/p521.csr");
        assert!(
            matches!(parse_csr(pem), Err(CsrError::KeyType(k)) if k.contains("1.3.132.0.35")),
            "{:?}",
            parse_csr(pem)
        );
    }

    #[test]
    fn leaf_has_the_svid_profile() {
        let now = OffsetDateTime::now_utc();
        let policy = Policy::default();
        let state =
            AuthorityState::genesis("cluster.local".parse().unwrap(), &policy, now).unwrap();
        let issuer = state.active_issuer().unwrap();
        let rissuer = issuer.cert.rcgen_issuer(issuer.key.clone()).unwrap();
        for (key, rsa) in [(p256(), false), (rsa_key(2048), true)] {
            let csr = parse_csr(&csr_with(uri_params(&[ID]), &key)).unwrap();
            let window = policy
                .leaf_window(
                    now,
                    Some(Duration::from_secs(3600 * 100)),
                    issuer.cert.info.not_before,
                    issuer.cert.info.not_after,
                )
                .unwrap();
            let leaf = sign_leaf(&csr, &window, &rissuer).unwrap();
            let (_, x) = X509Certificate::from_der(&leaf.der).unwrap();
            assert!(x.subject().as_raw().len() <= 2, "empty subject");
            let bc = x.basic_constraints().unwrap().unwrap();
            assert!(bc.critical && !bc.value.ca);
            let ku = x.key_usage().unwrap().unwrap();
            assert!(ku.critical && ku.value.digital_signature());
            assert_eq!(ku.value.key_encipherment(), rsa);
            assert!(!ku.value.key_cert_sign());
            let eku = x.extended_key_usage().unwrap().unwrap();
            assert!(eku.value.server_auth && eku.value.client_auth);
            let san = x.subject_alternative_name().unwrap().unwrap();
            assert!(san.critical);
            assert_eq!(san.value.general_names, vec![GeneralName::URI(ID)]);
            let exts: Vec<String> = x
                .extensions()
                .iter()
                .map(|e| e.oid.to_id_string())
                .collect();
            assert!(exts.contains(&"2.5.29.14".to_string()), "SKI");
            assert!(exts.contains(&"2.5.29.35".to_string()), "AKI");
            assert_eq!(exts.len(), 6, "{exts:?}");
            assert!(x.raw_serial().len() >= 8 && x.raw_serial()[0] & 0x80 == 0);
            assert_eq!(leaf.serial, hex::encode(x.raw_serial()));
            assert_eq!(
                x.validity().not_after.timestamp(),
                (rotator::clock::whole_seconds(now) + Duration::from_secs(48 * 3600))
                    .unix_timestamp()
            );
            assert_eq!(
                x.validity().not_before.timestamp(),
                (rotator::clock::whole_seconds(now) - Duration::from_secs(300)).unix_timestamp()
            );
            x.verify_signature(Some(
                &x509_parser::parse_x509_certificate(issuer.cert.der())
                    .unwrap()
                    .1
                    .tbs_certificate
                    .subject_pki,
            ))
            .unwrap();
        }
    }

    /// The tags of the GeneralNames in a leaf's subjectAltName extension, in encoded order (read
    /// from the DER itself, not from a parsed set): `0x82` dNSName, `0x86` uniformResourceIdentifier.
    fn san_tags_in_der_order(leaf_der: &[u8]) -> Vec<(u8, String)> {
        // A short DER reader: (tag, content, rest). Lengths here fit the long form's 1-2 bytes.
        fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
            let (tag, l0) = (b[0], b[1] as usize);
            let (len, hdr) = match l0 {
                0..=0x7f => (l0, 2),
                0x81 => (b[2] as usize, 3),
                0x82 => ((b[2] as usize) << 8 | b[3] as usize, 4),
                _ => panic!("length form {l0:#x}"),
            };
            (tag, &b[hdr..hdr + len], &b[hdr + len..])
        }
        let (_, x) = X509Certificate::from_der(leaf_der).unwrap();
        let ext = x
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "2.5.29.17")
            .expect("a SAN extension");
        let (tag, mut names, rest) = tlv(ext.value);
        assert_eq!((tag, rest.len()), (0x30, 0), "GeneralNames is one SEQUENCE");
        let mut out = Vec::new();
        while !names.is_empty() {
            let (tag, content, rest) = tlv(names);
            out.push((tag, String::from_utf8(content.to_vec()).unwrap()));
            names = rest;
        }
        out
    }

    #[test]
    fn linkerd_leaf_names_the_dns_identity_first() {
        const DNS: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
        let now = OffsetDateTime::now_utc();
        let policy = Policy::default();
        let state =
            AuthorityState::genesis("cluster.local".parse().unwrap(), &policy, now).unwrap();
        let issuer = state.active_issuer().unwrap();
        let rissuer = issuer.cert.rcgen_issuer(issuer.key.clone()).unwrap();
        let window = policy
            .leaf_window(
                now,
                None,
                issuer.cert.info.not_before,
                issuer.cert.info.not_after,
            )
            .unwrap();
        let key = p256();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::DnsName(DNS.try_into().unwrap())];
        let csr = parse_dns_csr(&csr_with(p, &key), DNS, id()).unwrap();
        let leaf = sign_leaf(&csr, &window, &rissuer).unwrap();
        assert_eq!(
            san_tags_in_der_order(&leaf.der),
            vec![(0x82, DNS.to_owned()), (0x86, ID.to_owned())],
            "dNSName first, then the one URI SAN"
        );
        // And a SPIFFE-only CSR still gets exactly one SAN, the URI.
        let csr = parse_csr(&csr_with(uri_params(&[ID]), &key)).unwrap();
        let leaf = sign_leaf(&csr, &window, &rissuer).unwrap();
        assert_eq!(
            san_tags_in_der_order(&leaf.der),
            vec![(0x86, ID.to_owned())]
        );
    }
}
