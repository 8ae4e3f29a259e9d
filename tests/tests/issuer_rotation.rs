//! Issuer rotation in virtual time, and what happens when it fails.
//!
//! These run the real driver (`ca_server::driver::drive`), the real file store and the real
//! signing path, on tokio's paused clock with certificate times following it (`TokioClock`), so
//! 60 days pass in seconds. Chains are checked with rustls-webpki at each virtual instant.

#![allow(clippy::unwrap_used)] // Test code: a panic is how a failure is reported.

use std::sync::Arc;
use std::time::Duration;

use ca_server::auth::Authenticator;
use ca_server::authority::{Authority, OpenOptions, Storage};
use ca_server::driver::{self, RotationHealth, UNREADY_AFTER_FAILURES};
use ca_server::issuance::{IssueError, SigningCore};
use ca_server::metrics::Metrics;
use ca_server::signing::parse_csr;
use rotator::client::{make_csr, verify_svid};
use rotator::clock::{Clock, TokioClock};
use rotator::pki::{CertInfo, SecretKey};
use rotator::policy::Policy;
use rotator::store::FileStore;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::sync::watch;

struct Rig {
    authority: Arc<Authority>,
    /// The state dir's store, shared with the authority (for injected commit failures).
    store: FileStore,
    issuer: SigningCore,
    health: Arc<RotationHealth>,
    clock: Arc<dyn Clock>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn rig(policy: Policy) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
    let store = FileStore::open(dir.path().join("state")).unwrap();
    let how = OpenOptions {
        trust_domain: None,
        default_trust_domain: "cluster.local".parse().unwrap(),
        upstream_anchor: None,
    };
    let (authority, _) = Authority::open(Storage::files(store.clone()), how, policy, clock.clone())
        .await
        .unwrap();
    let authority = Arc::new(authority);
    let metrics = Arc::new(Metrics::new());
    let auth = Arc::new(Authenticator::load(&dir.path().join("state")).unwrap());
    let issuer = SigningCore::new(authority.clone(), auth, metrics.clone());
    let health = Arc::new(RotationHealth::default());
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(driver::drive(
        authority.clone(),
        health.clone(),
        metrics,
        rotator::anchors::Automation::default(),
        stop_rx,
    ));
    Rig {
        authority,
        store,
        issuer,
        health,
        clock,
        _stop: stop,
        _dir: dir,
    }
}

fn unix(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp().try_into().unwrap()))
}

/// A small deterministic generator (xorshift), so a failing run can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[derive(Debug)]
struct Stats {
    steps: u64,
    issued: u64,
    verified: u64,
    issuers: usize,
}

/// Runs `days` of virtual time under `policy`, issuing leaves at random moments with random TTLs
/// and checking at every step: every unexpired leaf verifies to the bundle (rustls-webpki), no
/// leaf outlives its issuer, the active issuer has at least `leaf_ttl_max` left, the bundle never
/// changes. Returns the first violation.
async fn simulate(policy: Policy, days: u64, seed: u64) -> Result<Stats, String> {
    let r = rig(policy.clone()).await;
    let id = "spiffe://cluster.local/ns/default/sa/sim".parse().unwrap();
    let key = SecretKey::generate_p256().unwrap();
    let csr = parse_csr(&make_csr(&id, &key).unwrap()).unwrap();
    let end = r.clock.now() + Duration::from_secs(days * 86400);
    let mut rng = Rng(seed);
    let mut live: Vec<(Vec<CertificateDer<'static>>, OffsetDateTime)> = Vec::new();
    let mut st = Stats {
        steps: 0,
        issued: 0,
        verified: 0,
        issuers: 0,
    };
    let mut issuers_seen = std::collections::BTreeSet::new();
    let bundle_version = r.authority.snapshot().bundle.version;
    while r.clock.now() < end {
        // Leaves at random moments: the next step is 10 min to 4 h away.
        tokio::time::sleep(Duration::from_secs(600 + rng.next(4 * 3600 - 600))).await;
        st.steps += 1;
        let now = r.clock.now();
        for _ in 0..rng.next(3) {
            // Random TTLs, some beyond the max and below the min, to exercise clamping.
            let ttl = Duration::from_secs(60 + rng.next(60 * 3600));
            let leaf = r
                .issuer
                .sign(&csr, Some(ttl))
                .map_err(|e| format!("at {now}: cannot sign: {e}"))?;
            let info = CertInfo::parse(&leaf.chain[0]).unwrap();
            let issuer_info = CertInfo::parse(&leaf.chain[1]).unwrap();
            if info.not_after > issuer_info.not_after {
                return Err(format!("at {now}: a leaf outlives its issuer"));
            }
            issuers_seen.insert(issuer_info.serial.clone());
            live.push((leaf.chain, info.not_after));
            st.issued += 1;
        }
        live.retain(|(_, not_after)| *not_after > now);
        let snap = r.authority.snapshot();
        if snap.bundle.version != bundle_version {
            return Err(format!("at {now}: issuer rotation changed the bundle"));
        }
        for (chain, _) in &live {
            verify_svid(
                chain,
                &snap.bundle.anchors,
                unix(now),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(|e| format!("at {now}: an unexpired leaf does not verify: {e}"))?;
            st.verified += 1;
        }
        let active = snap.issuer.as_ref().ok_or("no active issuer")?;
        let left: Duration = (active.not_after - now).try_into().unwrap_or_default();
        if left < policy.leaf_ttl_max {
            return Err(format!(
                "at {now}: the active issuer has only {left:?} left"
            ));
        }
    }
    if r.health.consecutive_failures() != 0 {
        return Err(format!("rotation failures: {:?}", r.health.last_error()));
    }
    st.issuers = issuers_seen.len();
    Ok(st)
}

#[tokio::test(start_paused = true)]
async fn sixty_days_of_issuer_rotation_keep_every_leaf_verifiable() {
    let st = simulate(Policy::default(), 60, 0x5eed_1234_abcd_9876)
        .await
        .unwrap();
    // 60 days of 7-day issuers rotated every 3.5 days (prepared at half life): 17 or so.
    assert!(
        st.issuers >= 12,
        "only {} issuers signed leaves",
        st.issuers
    );
    eprintln!("60 days: {st:?}");
}

/// Negative control: a schedule that hands over with less than the max leaf TTL left (config
/// validation refuses it; this builds it directly) is caught by the same checks.
#[tokio::test(start_paused = true)]
async fn the_simulation_catches_a_late_hand_over() {
    use rotator::policy::Fraction;
    let broken = Policy {
        issuer_prepare_remaining: Fraction::new(1, 10),
        issuer_activate_remaining: Fraction::new(1, 20),
        ..Policy::default()
    };
    assert!(
        broken.validate().is_err(),
        "config validation refuses this policy"
    );
    let e = simulate(broken, 20, 0x5eed_1234_abcd_9876)
        .await
        .unwrap_err();
    assert!(e.contains("the active issuer has only"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn failing_rotation_keeps_signing_backs_off_and_turns_unready_after_ten() {
    let policy = Policy::default();
    let r = rig(policy.clone()).await;
    let first = r.authority.snapshot().issuer.as_ref().unwrap().id.clone();
    let id = "spiffe://cluster.local/ns/default/sa/x".parse().unwrap();
    let csr = parse_csr(&make_csr(&id, &SecretKey::generate_p256().unwrap()).unwrap()).unwrap();
    // Every commit fails from now on, as with a full disk.
    r.store.inject_commit_failures(u32::MAX);
    let prepare_at = rotator::rotation::schedule(
        &r.authority
            .read(|s| s.active_issuer().unwrap().cert.info.clone())
            .await,
        &policy,
    )
    .prepare_at;
    let wait: Duration = (prepare_at - r.clock.now()).try_into().unwrap();
    tokio::time::sleep(wait + Duration::from_millis(500)).await;
    assert_eq!(
        r.health.consecutive_failures(),
        1,
        "first attempt right at the prepare point"
    );
    // Backoff 1, 2, 4, ... s: ten failures take 1+2+...+256 s = 511 s after the first.
    tokio::time::sleep(Duration::from_secs(510)).await;
    assert_eq!(r.health.consecutive_failures(), UNREADY_AFTER_FAILURES - 1);
    assert!(r.health.healthy());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.health.consecutive_failures(), UNREADY_AFTER_FAILURES);
    assert!(!r.health.healthy(), "unready after ten failures in a row");
    assert!(
        r.health
            .last_error()
            .unwrap()
            .contains("no space left on device")
    );
    // Still signing with the current issuer, which is still valid.
    let leaf = r.issuer.sign(&csr, None).unwrap();
    assert_eq!(rotator::pki::CertId::of(&leaf.chain[1]), first);

    // The backoff is capped at 5 min: across an hour, ~12 more attempts, not thousands.
    let before = r.health.consecutive_failures();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let attempts = r.health.consecutive_failures() - before;
    assert!(
        (11..=14).contains(&attempts),
        "{attempts} attempts in an hour"
    );

    // Run the clock past the issuer's expiry: never signed with an expired issuer.
    let expiry = r.authority.snapshot().issuer.as_ref().unwrap().not_after;
    let wait: Duration = (expiry - r.clock.now()).try_into().unwrap();
    tokio::time::sleep(wait + Duration::from_secs(1)).await;
    match r.issuer.sign(&csr, None) {
        Err(IssueError::Unavailable(m)) => assert!(m.contains("not valid at"), "{m}"),
        other => panic!("signed with an expired issuer: {other:?}"),
    }

    // The disk recovers: the next attempt (within the 5 min cap) succeeds and all is well.
    r.store.inject_commit_failures(0);
    tokio::time::sleep(Duration::from_secs(301)).await;
    assert_eq!(r.health.consecutive_failures(), 0);
    assert!(r.health.healthy());
    let leaf = r.issuer.sign(&csr, None).unwrap();
    assert_ne!(
        rotator::pki::CertId::of(&leaf.chain[1]),
        first,
        "a new issuer signs"
    );
}
