//! meshca-server: the network faces of meshca, the issuing core behind them, and the process
//! that runs them. The authority itself — what is trusted, which issuer signs, when to rotate —
//! lives in the `rotator` crate; this crate serves it.
//!
//! The folders are the parts, and a request runs downward through them:
//!
//! - [`faces`]: what speaks to the outside — native gRPC (`grpc`), Istio (`istio`), Linkerd
//!   (`linkerd`), the HTTP port (`http`), the admin socket (`admin`), and `codes`, which turns
//!   every typed error into a gRPC status.
//! - [`issuing`]: what decides and signs — [`issuance`] authenticates ([`auth`], node agents in
//!   [`impersonation`]), applies [`limits`], checks the CSR and signs ([`signing`]).
//! - [`authority`]: the state every request reads (a snapshot) and every change commits, and
//!   the issuance [`ledger`] the rotation gates measure.
//! - [`process`]: what runs it all — [`config`], start-up ([`server`]), rotation ([`driver`]),
//!   the TLS listener (`tls`), [`metrics`], [`disk`] health.
//! - [`federation`] and `k8s`: the SPIFFE bundle endpoint and peers; Kubernetes (TokenReview,
//!   the Secret store, Lease, bundle ConfigMaps, the pod directory).
//!
//! Faces name the issuing core, the core names the authority, never the other way round
//! (`tests/layering.rs`). The modules below are re-exported at the root by their old names, the
//! ones the binary, the end-to-end tests and the examples use.

pub mod authority;
pub mod faces;
pub mod federation;
pub mod issuing;
pub(crate) mod k8s;
pub mod process;

pub use authority::ledger;
pub use issuing::{auth, impersonation, issuance, limits, signing};
pub use process::{config, disk, driver, metrics, server};

/// The pod directory node-agent authorization reads (`k8s::pods`), for tests that run it
/// against a real API server on their own terms (a short watch timeout).
pub use k8s::pods::{Pods as PodIndex, Watching as PodWatching};
/// For programs that run lower-priority work beside a server (the abuse benchmark's attackers).
pub use process::tls::lower_this_threads_priority;

/// Entry points for the fuzz targets in `fuzz/` (cargo fuzz), one per parser of outside input,
/// each fed bytes as the server (or `meshca`) would be. `tests/tests/fuzz_corpus.rs` replays the
/// committed corpus through the same functions on every test run. Not an API: a target panics
/// only where the code under test broke a promise (a parsed value that does not round-trip).
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    use prost::Message;
    use rotator::spiffe::{IdPattern, SpiffeId, TrustDomain};

    /// A target: its name (`fuzz/fuzz_targets/<name>.rs`, `fuzz/corpus/<name>/`) and body.
    pub type Target = (&'static str, fn(&[u8]));

    /// The targets.
    pub const TARGETS: [Target; 9] = [
        ("csr", csr),
        ("spiffe", spiffe),
        ("linkerd_identity", linkerd_identity),
        ("istio_request", istio_request),
        ("state_flat", state_flat),
        ("ledger_log", ledger_log),
        ("tokens_json", tokens_json),
        ("config_toml", config_toml),
        ("federated_bundle", federated_bundle),
    ];

    /// A CSR as the native and Istio faces take it (DER or PEM), and as the Linkerd face does.
    pub fn csr(data: &[u8]) {
        if let Ok(v) = crate::issuing::signing::parse_csr(data) {
            let again: SpiffeId = v.id.as_str().parse().expect("an accepted ID parses again");
            assert_eq!(again, v.id);
        }
        if let Ok(id) = "spiffe://cluster.local/ns/a/sa/b".parse() {
            let _ = crate::issuing::signing::parse_dns_csr(
                data,
                "b.a.serviceaccount.identity.linkerd.cluster.local",
                id,
            );
        }
    }

    /// SPIFFE IDs, trust domains and token patterns from text; what parses round-trips, and a
    /// pattern matches the ID it was made from when that is an exact ID.
    pub fn spiffe(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(id) = text.parse::<SpiffeId>() {
            let again: SpiffeId = id.as_str().parse().expect("an ID round-trips");
            assert_eq!(again, id);
            if let Ok(p) = id.as_str().parse::<IdPattern>() {
                assert!(p.matches(&id), "an exact pattern matches its ID");
            }
        }
        if let Ok(td) = text.parse::<TrustDomain>() {
            let _ = td
                .to_string()
                .parse::<TrustDomain>()
                .expect("a domain round-trips");
        }
        if let Ok(p) = text.parse::<IdPattern>() {
            let _ = p
                .to_string()
                .parse::<IdPattern>()
                .expect("a pattern round-trips");
        }
    }

    /// The Linkerd face's identity → SPIFFE ID mapping: input `identity\ncontrol-plane-ns`.
    pub fn linkerd_identity(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let (identity, ns) = text.split_once('\n').unwrap_or((text, "linkerd"));
        if let Ok(id) = crate::faces::linkerd::spiffe_id_of(identity, ns, "cluster.local") {
            let again: SpiffeId = id.as_str().parse().expect("a mapped ID parses");
            assert_eq!(again, id);
        }
    }

    /// An Istio `CreateCertificate` request as the server decodes it: the protobuf message, its
    /// CSR (PEM text), its validity and metadata.
    pub fn istio_request(data: &[u8]) {
        let Ok(req) = meshca_proto::istio::IstioCertificateRequest::decode(data) else {
            return;
        };
        let _ = u64::try_from(req.validity_duration);
        let _ = crate::issuing::signing::parse_csr(req.csr.as_bytes());
        if let Some(meta) = &req.metadata {
            for (k, v) in &meta.fields {
                let _ = (k.len(), format!("{v:?}").len());
            }
        }
    }

    /// A valid authority in flat form (what a Secret holds), made once.
    fn baseline() -> &'static BTreeMap<String, Vec<u8>> {
        static B: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
        B.get_or_init(|| {
            let s = rotator::state::AuthorityState::genesis(
                "cluster.local".parse().expect("literal"),
                &rotator::policy::Policy::default(),
                time::OffsetDateTime::now_utc(),
            )
            .expect("genesis");
            rotator::store::encode_flat(&s).expect("encode")
        })
    }

    /// `state.json` and the flat (Secret) codec: the input is a whole flat form —
    /// `name 0xFF value 0xFF name 0xFF value …` — or, with no 0xFF, a `state.json` put in place of
    /// a valid authority's. Whatever decodes must pass the state's invariants.
    pub fn state_flat(data: &[u8]) {
        let mut map = BTreeMap::new();
        if data.contains(&0xFF) {
            let mut parts = data.split(|b| *b == 0xFF);
            while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                map.insert(String::from_utf8_lossy(k).into_owned(), v.to_vec());
            }
        } else {
            map = baseline().clone();
            map.insert("state.json".into(), data.to_vec());
        }
        if let Ok(Some(s)) = rotator::store::decode_flat("fuzz", &map) {
            s.check().expect("a decoded state holds its invariants");
        }
    }

    /// A `ledger.log` replayed at start-up, as either version (the bytes as they are, and
    /// after the version-2 magic); what reads must be written back and read again the same.
    pub fn ledger_log(data: &[u8]) {
        let mut v2 = rotator::ledger::file::MAGIC.to_vec();
        v2.extend_from_slice(data);
        for bytes in [data, &v2[..]] {
            if let Ok((mut l, _, _)) = crate::authority::ledger::read_bytes(bytes) {
                let mut out = Vec::new();
                l.write_all(&mut out);
                let (again, _, _) =
                    crate::authority::ledger::read_bytes(&out).expect("a rewrite reads back");
                let held = |l: &rotator::ledger::Ledger| {
                    let mut v: Vec<String> = l.records().map(|r| format!("{r:?}")).collect();
                    v.sort();
                    v
                };
                assert_eq!(held(&l), held(&again), "a rewrite keeps every leaf");
            }
        }
    }

    /// A `tokens.json` as the server (re)loads it.
    pub fn tokens_json(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = rotator::tokens::StaticTokens::parse(text);
        }
    }

    /// A federated peer's bundle document, as fetched from its endpoint (for `b.example`): an
    /// accepted one's anchors parse again and are all CA certificates.
    pub fn federated_bundle(data: &[u8]) {
        let td: TrustDomain = "b.example".parse().expect("literal trust domain");
        if let Ok(pem) = crate::federation::fetch::parse_anchors(data, &td) {
            let again = rotator::client::parse_pem_certs(&pem);
            assert!(!again.is_empty(), "an accepted bundle has anchors");
        }
    }

    /// A TOML configuration file, parsed and validated.
    pub fn config_toml(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data)
            && let Ok(c) = crate::process::config::Config::from_toml(text)
        {
            let _ = c.validate();
        }
    }
}
