//! SPIFFE names: trust domains, SPIFFE IDs and the authorization patterns tokens carry.
//!
//! Parse, don't validate: a [`SpiffeId`] cannot hold an invalid ID (SPIFFE-ID spec §2).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest SPIFFE ID accepted, in bytes (SPIFFE-ID spec §2.3: 2048).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a SPIFFE ID, trust domain or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string is empty.
    #[error("empty")]
    Empty,
    /// The scheme is not exactly `spiffe://`.
    #[error("scheme must be spiffe://")]
    Scheme,
    /// The trust domain is empty, too long or has a character outside `[a-z0-9._-]`.
    #[error(
        "invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only, 1-255 bytes"
    )]
    TrustDomain(String),
    /// A path segment is empty, `.`, `..` or has a character outside `[A-Za-z0-9._-]`.
    #[error("invalid path segment {0:?}")]
    Segment(String),
    /// Query, fragment, port or user info present.
    #[error("query, fragment, port and user info are not allowed")]
    Extra,
    /// Over [`MAX_ID_LEN`] bytes.
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// A pattern other than an exact ID or `spiffe://<td>/ns/<ns>/sa/*`.
    #[error("a pattern must be an exact SPIFFE ID or spiffe://<td>/ns/<ns>/sa/*")]
    Pattern,
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>` of a Kubernetes service account.
    pub fn service_account_id(&self, ns: &str, sa: &str) -> Result<SpiffeId, IdError> {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.0).parse()
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TRUST_DOMAIN_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::TrustDomain(s.to_owned()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid SPIFFE ID: `spiffe://<trust-domain><path>`, the path non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // Invariant: `uri == "spiffe://" + td + path`, both valid.
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.uri[9..9 + self.td_len].to_owned())
    }

    /// The trust domain part, borrowed.
    pub fn trust_domain_str(&self) -> &str {
        &self.uri[9..9 + self.td_len]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[9 + self.td_len..]
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Whether the path is meshca's own (`/meshca` and below: the bundle endpoint's SVID,
    /// `spiffe://<td>/meshca/server`): never issued to a workload, whatever its credential.
    pub fn is_reserved(&self) -> bool {
        let p = self.path();
        p == "/meshca" || p.starts_with("/meshca/")
    }

    /// `(namespace, service account)` when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut it = self.path()[1..].split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::Scheme)?;
        if rest.contains(['?', '#', '@']) {
            return Err(IdError::Extra);
        }
        let (td, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if td.contains(':') {
            return Err(IdError::Extra);
        }
        let td = TrustDomain::from_str(td)?;
        if path.is_empty() {
            // An ID needs a path; `spiffe://td` names the trust domain, not a workload.
            return Err(IdError::Segment(String::new()));
        }
        for seg in path[1..].split('/') {
            let ok = !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(IdError::Segment(seg.to_owned()));
            }
        }
        Ok(Self {
            td_len: td.0.len(),
            uri: s.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Which SPIFFE IDs a credential may ask for: one exact ID, or every service account of a
/// namespace (`spiffe://<td>/ns/<ns>/sa/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// `spiffe://<td>/ns/<ns>/sa/<anything>`.
    Namespace {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The namespace.
        namespace: String,
    },
}

impl IdPattern {
    /// Whether `id` is allowed by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(e) => e == id,
            Self::Namespace {
                trust_domain,
                namespace,
            } => {
                id.trust_domain_str() == trust_domain.as_str()
                    && id.service_account().is_some_and(|(ns, _)| ns == namespace)
            }
        }
    }
}

impl FromStr for IdPattern {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if let Some(prefix) = s.strip_suffix("/*") {
            // Validate the prefix with a placeholder service account.
            let id = SpiffeId::from_str(&format!("{prefix}/x"))?;
            return match id.service_account() {
                Some((ns, _)) => Ok(Self::Namespace {
                    trust_domain: id.trust_domain(),
                    namespace: ns.to_owned(),
                }),
                None => Err(IdError::Pattern),
            };
        }
        if s.contains('*') {
            return Err(IdError::Pattern);
        }
        SpiffeId::from_str(s).map(Self::Exact)
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => id.fmt(f),
            Self::Namespace {
                trust_domain,
                namespace,
            } => {
                write!(f, "spiffe://{trust_domain}/ns/{namespace}/sa/*")
            }
        }
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(TrustDomain);
serde_via_str!(SpiffeId);
serde_via_str!(IdPattern);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_table() {
        let valid = [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://example.org/a",
            "spiffe://td-1_x.y/a/b/c.d-e_f",
            "spiffe://a/A9",
        ];
        for s in valid {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let invalid: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://cluster.local/ns/a/sa/b", IdError::Scheme),
            ("SPIFFE://cluster.local/a", IdError::Scheme),
            (
                "spiffe://Cluster.local/a",
                IdError::TrustDomain("Cluster.local".into()),
            ),
            ("spiffe:///a", IdError::TrustDomain(String::new())),
            ("spiffe://cluster.local", IdError::Segment(String::new())),
            ("spiffe://cluster.local/", IdError::Segment(String::new())),
            (
                "spiffe://cluster.local/a//b",
                IdError::Segment(String::new()),
            ),
            ("spiffe://cluster.local/a/", IdError::Segment(String::new())),
            ("spiffe://cluster.local/./a", IdError::Segment(".".into())),
            ("spiffe://cluster.local/a/..", IdError::Segment("..".into())),
            ("spiffe://cluster.local/a b", IdError::Segment("a b".into())),
            (
                "spiffe://cluster.local/a%20b",
                IdError::Segment("a%20b".into()),
            ),
            ("spiffe://cluster.local:443/a", IdError::Extra),
            ("spiffe://user@cluster.local/a", IdError::Extra),
            ("spiffe://cluster.local/a?x=1", IdError::Extra),
            ("spiffe://cluster.local/a#f", IdError::Extra),
        ];
        for (s, want) in invalid {
            assert_eq!(s.parse::<SpiffeId>().as_ref(), Err(want), "{s:?}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(IdError::TooLong));
    }

    #[test]
    fn parts() {
        let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/api".parse().unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/prod/sa/api");
        assert_eq!(id.service_account(), Some(("prod", "api")));
        let other: SpiffeId = "spiffe://cluster.local/ns/prod/sa/api/extra"
            .parse()
            .unwrap();
        assert_eq!(other.service_account(), None);
        let td: TrustDomain = "cluster.local".parse().unwrap();
        assert_eq!(td.service_account_id("prod", "api").unwrap(), id);
    }

    #[test]
    fn patterns() {
        let p: IdPattern = "spiffe://cluster.local/ns/default/sa/*".parse().unwrap();
        let yes: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let other_ns: SpiffeId = "spiffe://cluster.local/ns/prod/sa/web".parse().unwrap();
        let other_td: SpiffeId = "spiffe://other.local/ns/default/sa/web".parse().unwrap();
        let deeper: SpiffeId = "spiffe://cluster.local/ns/default/sa/web/x"
            .parse()
            .unwrap();
        assert!(p.matches(&yes));
        assert!(!p.matches(&other_ns));
        assert!(!p.matches(&other_td));
        assert!(!p.matches(&deeper));
        assert_eq!(p.to_string(), "spiffe://cluster.local/ns/default/sa/*");

        let exact: IdPattern = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert!(exact.matches(&yes));
        assert!(!exact.matches(&other_ns));

        for bad in [
            "spiffe://cluster.local/*",
            "spiffe://cluster.local/ns/*/sa/*",
            "spiffe://cluster.local/x/y/*",
        ] {
            assert!(bad.parse::<IdPattern>().is_err(), "{bad}");
        }
    }
}

/// Serde as a string (`spiffe://td/ns/x/sa/y` or `spiffe://td/ns/x/sa/*`), for `#[serde(with)]`.
pub mod pattern_str {
    use super::IdPattern;

    /// Serializes as its text.
    pub fn serialize<S: serde::Serializer>(p: &IdPattern, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    /// Parses its text.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IdPattern, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
