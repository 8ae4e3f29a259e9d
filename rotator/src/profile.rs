//! Certificate profiles: what every certificate meshca makes looks like, in one place. Trust
//! anchors and issuers (CAs, made here), workload leaves (X.509-SVIDs, signed by `ca-server`'s
//! signing core) and the server's own TLS certificate (also signed there) are all built from
//! these parameters; nothing else sets a certificate extension.
//!
//! | profile | CA | key usage | extended key usage | subject | SANs |
//! | --- | --- | --- | --- | --- | --- |
//! | anchor | yes, no path length | keyCertSign, cRLSign | — | O=td, CN=meshca trust anchor … | — |
//! | issuer | yes, pathLen 0 | keyCertSign, cRLSign | — | O=td, CN=meshca issuer … | — |
//! | leaf | no | digitalSignature (+ keyEncipherment for RSA) | serverAuth, clientAuth | empty | [DNS identity,] one SPIFFE URI |
//! | server | no | digitalSignature | serverAuth only | CN=meshca-server | `[tls]` DNS names and IPs |
//! | bundle endpoint | no | digitalSignature | serverAuth only | empty | one SPIFFE URI (`…/meshca/server`) |
//! | DNS server (istiod) | no | digitalSignature | serverAuth only | CN = first name | DNS names only, never a URI |

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::clock::whole_seconds;
use crate::pki::{CaCert, PkiError, SecretKey, random_serial};
use crate::spiffe::TrustDomain;

/// A new self-signed trust anchor for `td`: CA, keyCertSign + cRLSign (critical), valid from
/// `now − skew` for `ttl`.
pub fn new_anchor(
    td: &TrustDomain,
    key: &SecretKey,
    now: OffsetDateTime,
    ttl: Duration,
    skew: Duration,
) -> Result<CaCert, PkiError> {
    let params = ca_params(
        td,
        // The key id keeps two anchors made in the same second apart by name: during a rotation
        // both are in the bundle, and verifiers pick candidates by subject.
        format!(
            "meshca trust anchor {} {}",
            crate::clock::rfc3339(now),
            &hex::encode(ring::digest::digest(&ring::digest::SHA256, &key.spki_der()))[..8]
        ),
        now - skew,
        now + ttl,
        BasicConstraints::Unconstrained,
    )?;
    let cert = params.self_signed(key)?;
    CaCert::from_der(cert.der().to_vec())
}

/// A new issuer signed by `anchor`: CA with pathLen 0, keyCertSign + cRLSign, valid from
/// `now − skew` to `min(now + ttl, anchor notAfter)` so that it never outlives its anchor.
pub fn new_issuer(
    td: &TrustDomain,
    key: &SecretKey,
    anchor: &CaCert,
    anchor_key: &SecretKey,
    now: OffsetDateTime,
    ttl: Duration,
    skew: Duration,
) -> Result<CaCert, PkiError> {
    let not_after = (now + ttl).min(anchor.info.not_after);
    let mut params = ca_params(
        td,
        issuer_cn(now),
        (now - skew).max(anchor.info.not_before),
        not_after,
        BasicConstraints::Constrained(0),
    )?;
    params.use_authority_key_identifier_extension = true;
    let issuer = anchor.rcgen_issuer(anchor_key.clone())?;
    let cert = params.signed_by(key, &issuer)?;
    CaCert::from_der(cert.der().to_vec())
}

/// A CSR for a new issuer whose key meshca holds but whose certificate an upstream CA signs
/// (the issuer profile's subject, CA flag and key usage; the upstream CA sets the times).
pub fn issuer_csr(
    td: &TrustDomain,
    key: &SecretKey,
    now: OffsetDateTime,
) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_subject(td, issuer_cn(now));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The names a leaf carries, in the order they are encoded.
#[derive(Debug, Clone)]
pub struct LeafNames<'a> {
    /// A DNS identity (Linkerd's `<sa>.<ns>.serviceaccount.identity.<cp-ns>.<td>`). When given
    /// it is the **first** SAN: linkerd2-proxy names a peer by the first SAN of its certificate
    /// and matches that name against Linkerd identities, so a URI-first leaf is refused under
    /// any authenticated policy. Go's x509 (Linkerd's own identity controller) emits the same
    /// order. The URI SAN follows, so the leaf stays an X.509-SVID (exactly one URI SAN).
    pub dns: Option<&'a str>,
    /// The SPIFFE ID: the leaf's one URI SAN.
    pub spiffe_id: &'a str,
}

/// A workload leaf (X.509-SVID): no CA, digitalSignature (and keyEncipherment for an RSA key),
/// serverAuth + clientAuth, empty subject (so the SAN extension is critical), the names in
/// [`LeafNames`] order, valid `not_before..not_after`, a fresh random serial.
pub fn leaf(
    names: &LeafNames<'_>,
    rsa_key: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = Vec::with_capacity(2);
    if let Some(dns) = names.dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.try_into()?));
    }
    params
        .subject_alt_names
        .push(SanType::URI(names.spiffe_id.try_into()?));
    params.key_usages = if rsa_key {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    end_entity(params, not_before, not_after)
}

/// meshca's own TLS server certificate: no CA, digitalSignature, serverAuth **only** (it must
/// never pass as a workload's client certificate), CN `meshca-server`, the configured names.
pub fn server(
    dns_names: &[String],
    ip_addresses: &[std::net::IpAddr],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "meshca-server");
    params.distinguished_name = dn;
    for n in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(n.as_str().try_into()?));
    }
    for ip in ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    end_entity(params, not_before, not_after)
}

/// A serving certificate for a control-plane server meshca keeps one for (istiod's
/// `istiod-tls`): no CA, digitalSignature, serverAuth only, CN the first name, **DNS names only**.
/// A name that is not a DNS name (a `spiffe://` URI, an IP) is refused, so such a certificate
/// can never pass as a workload's SVID.
pub fn dns_server(
    dns_names: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let is_dns = |n: &str| {
        !n.is_empty()
            && n.len() <= 253
            && n.split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let first = dns_names
        .first()
        .ok_or_else(|| PkiError::Names("a DNS server certificate needs a name".into()))?;
    if let Some(n) = dns_names.iter().find(|n| !is_dns(n)) {
        return Err(PkiError::Names(format!("{n:?} is not a DNS name")));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, first.as_str());
    params.distinguished_name = dn;
    for n in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(n.as_str().try_into()?));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    end_entity(params, not_before, not_after)
}

/// The SVID of meshca's SPIFFE bundle endpoint (`https_spiffe` profile): no CA,
/// digitalSignature, serverAuth only, exactly one URI SAN — `id`
/// (`spiffe://<trust-domain>/meshca/server`), which federated peers check instead of a host name.
pub fn bundle_endpoint(
    id: &crate::spiffe::SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params
        .subject_alt_names
        .push(SanType::URI(id.to_string().try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    end_entity(params, not_before, not_after)
}

/// When a certificate meshca holds for itself (the server certificate) is renewed: two thirds
/// into its remaining life from `now`, so that a third is left to retry in.
pub fn renew_at(now: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    now + (not_after - now) * 2 / 3
}

/// What every end-entity certificate shares: not a CA, AKI, the window, a random serial.
fn end_entity(
    mut params: CertificateParams,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn issuer_cn(now: OffsetDateTime) -> String {
    format!("meshca issuer {}", crate::clock::rfc3339(now))
}

fn ca_subject(td: &TrustDomain, cn: String) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(
    td: &TrustDomain,
    cn: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    constraints: BasicConstraints,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_subject(td, cn);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = whole_seconds(not_before);
    params.not_after = whole_seconds(not_after);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "cluster.local".parse().unwrap()
    }

    #[test]
    fn anchor_and_issuer_profiles() {
        let now = OffsetDateTime::now_utc();
        let ak = SecretKey::generate_p256().unwrap();
        let anchor = new_anchor(
            &td(),
            &ak,
            now,
            Duration::from_secs(86400 * 365),
            Duration::from_secs(300),
        )
        .unwrap();
        assert!(anchor.info.is_ca && anchor.info.key_cert_sign && anchor.info.self_signed);
        assert_eq!(anchor.info.path_len, None);
        assert!(anchor.matches_key(&ak));
        anchor.verify_issued_by(&anchor).unwrap();

        let ik = SecretKey::generate_p256().unwrap();
        let issuer = new_issuer(
            &td(),
            &ik,
            &anchor,
            &ak,
            now,
            Duration::from_secs(86400 * 7),
            Duration::from_secs(300),
        )
        .unwrap();
        assert!(issuer.info.is_ca && issuer.info.key_cert_sign && !issuer.info.self_signed);
        assert_eq!(issuer.info.path_len, Some(0));
        assert!(issuer.matches_key(&ik) && !issuer.matches_key(&ak));
        issuer.verify_issued_by(&anchor).unwrap();
        assert!(anchor.verify_issued_by(&issuer).is_err());
        assert_eq!(issuer.info.lifetime(), Duration::from_secs(86400 * 7 + 300));
        assert_ne!(anchor.id(), issuer.id());
    }

    #[test]
    fn issuer_never_outlives_its_anchor() {
        let now = OffsetDateTime::now_utc();
        let ak = SecretKey::generate_p256().unwrap();
        let anchor =
            new_anchor(&td(), &ak, now, Duration::from_secs(86400), Duration::ZERO).unwrap();
        let ik = SecretKey::generate_p256().unwrap();
        let issuer = new_issuer(
            &td(),
            &ik,
            &anchor,
            &ak,
            now,
            Duration::from_secs(86400 * 7),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(issuer.info.not_after, anchor.info.not_after);
    }

    #[test]
    fn renewal_is_two_thirds_into_the_remaining_life() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let end = now + time::Duration::hours(24);
        assert_eq!(renew_at(now, end), now + time::Duration::hours(16));
        assert_eq!(renew_at(now, now), now);
    }
}
