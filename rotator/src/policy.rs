//! Lifetimes and rotation points: the numbers every decision is computed from, and the pure
//! arithmetic on them. Nothing here reads a clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::{rfc3339, whole_seconds};

/// Default requested leaf lifetime.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest leaf lifetime granted.
pub const DEFAULT_LEAF_TTL_MIN: Duration = Duration::from_secs(3600);
/// Longest leaf lifetime granted.
pub const DEFAULT_LEAF_TTL_MAX: Duration = Duration::from_secs(48 * 3600);
/// How far a leaf's notBefore is back-dated, for verifiers whose clocks run behind.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Issuer (intermediate) lifetime.
pub const DEFAULT_ISSUER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Trust-anchor lifetime when meshca generates one.
pub const DEFAULT_ANCHOR_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a new bundle takes to reach every verifier that does not renew (watch delays,
/// ConfigMap propagation, restarts): added to the max leaf TTL in the time-based gates.
pub const DEFAULT_PROPAGATION_ALLOWANCE: Duration = Duration::from_secs(3600);

/// The lifetime policy of an authority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Leaf lifetime when the request asks for none.
    #[serde(with = "duration_str")]
    pub leaf_ttl_default: Duration,
    /// Shortest leaf lifetime granted; shorter requests are raised to it.
    #[serde(with = "duration_str")]
    pub leaf_ttl_min: Duration,
    /// Longest leaf lifetime granted; longer requests are clamped to it.
    #[serde(with = "duration_str")]
    pub leaf_ttl_max: Duration,
    /// Back-dating of notBefore on every certificate meshca makes.
    #[serde(with = "duration_str")]
    pub clock_skew: Duration,
    /// Lifetime of each issuer.
    #[serde(with = "duration_str")]
    pub issuer_ttl: Duration,
    /// The next issuer is prepared (key and certificate made and stored, not yet signing) when
    /// this fraction of the active issuer's lifetime remains.
    pub issuer_prepare_remaining: Fraction,
    /// The next issuer becomes the active one when this fraction of the active issuer's lifetime
    /// remains. `issuer_ttl × issuer_activate_remaining` must cover `leaf_ttl_max`.
    pub issuer_activate_remaining: Fraction,
    /// Lifetime of a trust anchor meshca generates.
    #[serde(with = "duration_str")]
    pub anchor_ttl: Duration,
    /// Time allowed for a new bundle to reach verifiers that hold no leaf from meshca.
    #[serde(with = "duration_str")]
    pub propagation_allowance: Duration,
    /// How long a key that can never be used again is kept before it is destroyed: a retired or
    /// rolled-back anchor's key after its archival, an issuer's key after the issuer expired.
    /// `0s`: destroyed at the first step after that.
    #[serde(with = "duration_str")]
    pub key_retention: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            leaf_ttl_default: DEFAULT_LEAF_TTL,
            leaf_ttl_min: DEFAULT_LEAF_TTL_MIN,
            leaf_ttl_max: DEFAULT_LEAF_TTL_MAX,
            clock_skew: DEFAULT_CLOCK_SKEW,
            issuer_ttl: DEFAULT_ISSUER_TTL,
            issuer_prepare_remaining: Fraction::new(1, 2),
            issuer_activate_remaining: Fraction::new(1, 3),
            anchor_ttl: DEFAULT_ANCHOR_TTL,
            propagation_allowance: DEFAULT_PROPAGATION_ALLOWANCE,
            key_retention: Duration::ZERO,
        }
    }
}

/// A policy whose numbers contradict each other: which setting, its value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy: {name} = {value}: {reason}")]
pub struct PolicyError {
    /// The setting at fault.
    pub name: &'static str,
    /// Its value, as configured.
    pub value: String,
    /// What it conflicts with.
    pub reason: String,
}

/// The validity window granted to one leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafWindow {
    /// `now − clock_skew`.
    pub not_before: OffsetDateTime,
    /// `min(now + ttl, issuer notAfter)`.
    pub not_after: OffsetDateTime,
    /// True when the issuer's notAfter cut the lifetime short.
    pub clamped_by_issuer: bool,
}

/// The issuer cannot sign at `now`: it has expired (or is not yet valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the active issuer is not valid at {} (valid {} to {})", rfc3339(*now), rfc3339(*not_before), rfc3339(*not_after))]
pub struct IssuerNotValid {
    /// The time of the request.
    pub now: OffsetDateTime,
    /// Issuer notBefore.
    pub not_before: OffsetDateTime,
    /// Issuer notAfter.
    pub not_after: OffsetDateTime,
}

impl Policy {
    /// Checks that the numbers are consistent; the error names the setting and the conflict.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |name, value: String, reason: String| {
            Err(PolicyError {
                name,
                value,
                reason,
            })
        };
        let h = written;
        if self.leaf_ttl_min.is_zero() {
            return err(
                "leaf_ttl_min",
                h(self.leaf_ttl_min),
                "must be positive".into(),
            );
        }
        if self.leaf_ttl_min > self.leaf_ttl_max {
            return err(
                "leaf_ttl_min",
                h(self.leaf_ttl_min),
                format!("exceeds leaf_ttl_max = {}", h(self.leaf_ttl_max)),
            );
        }
        if self.leaf_ttl_default < self.leaf_ttl_min || self.leaf_ttl_default > self.leaf_ttl_max {
            return err(
                "leaf_ttl_default",
                h(self.leaf_ttl_default),
                format!(
                    "outside [leaf_ttl_min, leaf_ttl_max] = [{}, {}]",
                    h(self.leaf_ttl_min),
                    h(self.leaf_ttl_max)
                ),
            );
        }
        if !self.issuer_activate_remaining.is_proper() {
            return err(
                "issuer_activate_remaining",
                self.issuer_activate_remaining.to_string(),
                "must be a fraction strictly between 0 and 1".into(),
            );
        }
        if !self.issuer_prepare_remaining.is_proper()
            || self.issuer_prepare_remaining.as_f64() < self.issuer_activate_remaining.as_f64()
        {
            return err(
                "issuer_prepare_remaining",
                self.issuer_prepare_remaining.to_string(),
                format!(
                    "must be below 1 and at least issuer_activate_remaining = {} (prepare before activating)",
                    self.issuer_activate_remaining
                ),
            );
        }
        let left_at_handover = self.issuer_activate_remaining.of(self.issuer_ttl);
        if left_at_handover < self.leaf_ttl_max {
            return err(
                "issuer_ttl",
                h(self.issuer_ttl),
                format!(
                    "with issuer_activate_remaining = {} an issuer hands over with {} left, less than \
                     leaf_ttl_max = {}: leaves would be cut short by their issuer; raise issuer_ttl to at \
                     least {} or lower leaf_ttl_max",
                    self.issuer_activate_remaining,
                    h(left_at_handover),
                    h(self.leaf_ttl_max),
                    h(self.issuer_activate_remaining.inverse_of(self.leaf_ttl_max)),
                ),
            );
        }
        if self.anchor_ttl < self.issuer_ttl {
            return err(
                "anchor_ttl",
                h(self.anchor_ttl),
                format!("shorter than issuer_ttl = {}", h(self.issuer_ttl)),
            );
        }
        Ok(())
    }

    /// The lifetime granted for a requested one: none or zero → the default; then clamped to
    /// `[leaf_ttl_min, leaf_ttl_max]`.
    pub fn leaf_ttl(&self, requested: Option<Duration>) -> Duration {
        match requested {
            None => self.leaf_ttl_default,
            Some(d) if d.is_zero() => self.leaf_ttl_default,
            Some(d) => d.clamp(self.leaf_ttl_min, self.leaf_ttl_max),
        }
    }

    /// The window of a leaf asked for at `now`: notBefore back-dated by the clock skew,
    /// notAfter = min(now + granted TTL, issuer notAfter). Refuses when the issuer is not valid
    /// at `now`, so that no leaf is ever signed by an expired issuer.
    pub fn leaf_window(
        &self,
        now: OffsetDateTime,
        requested: Option<Duration>,
        issuer_not_before: OffsetDateTime,
        issuer_not_after: OffsetDateTime,
    ) -> Result<LeafWindow, IssuerNotValid> {
        let now = whole_seconds(now);
        if now >= issuer_not_after || now < issuer_not_before {
            return Err(IssuerNotValid {
                now,
                not_before: issuer_not_before,
                not_after: issuer_not_after,
            });
        }
        let wanted = now + self.leaf_ttl(requested);
        let clamped_by_issuer = wanted > issuer_not_after;
        Ok(LeafWindow {
            not_before: now - self.clock_skew,
            not_after: if clamped_by_issuer {
                issuer_not_after
            } else {
                wanted
            },
            clamped_by_issuer,
        })
    }
}

/// A fraction `num/den`, written `"1/3"` or `"0.25"` in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    num: u32,
    den: u32,
}

impl Fraction {
    /// `num/den`. A zero denominator is stored as 1 (never divides by zero).
    pub const fn new(num: u32, den: u32) -> Self {
        Self {
            num,
            den: if den == 0 { 1 } else { den },
        }
    }

    /// `self × d`, exact to the nanosecond.
    pub fn of(self, d: Duration) -> Duration {
        let n = d.as_nanos() * u128::from(self.num) / u128::from(self.den);
        Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// The `x` for which `self × x = d`, rounded up.
    pub fn inverse_of(self, d: Duration) -> Duration {
        if self.num == 0 {
            return Duration::MAX;
        }
        let n = (d.as_nanos() * u128::from(self.den)).div_ceil(u128::from(self.num));
        Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// The value as a float, for display and comparisons.
    pub fn as_f64(self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }

    fn is_proper(self) -> bool {
        self.num > 0 && self.num < self.den
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

impl FromStr for Fraction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a fraction (\"1/3\" or \"0.25\")");
        if let Some((n, d)) = s.split_once('/') {
            let n = n.trim().parse().map_err(|_| bad())?;
            let d: u32 = d.trim().parse().map_err(|_| bad())?;
            if d == 0 {
                return Err(bad());
            }
            return Ok(Self::new(n, d));
        }
        let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
        if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let int: u32 = int.parse().map_err(|_| bad())?;
        let den = 10u32.pow(frac.len() as u32);
        let frac_n: u32 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| bad())?
        };
        int.checked_mul(den)
            .and_then(|n| n.checked_add(frac_n))
            .map(|n| Self::new(n, den))
            .ok_or_else(bad)
    }
}

impl Serialize for Fraction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `d` exactly, as a person would write it in the configuration: days, hours, minutes,
/// seconds and milliseconds, each only when not zero (`365d`, `1d 12h`, `90s`, `1h 30m`,
/// `500ms`; `0s`). Never months or years, whose length humantime guesses (`365d` would read
/// `11months 30days 3h 50m 24s`). `humantime::parse_duration` reads it back unchanged.
pub fn written(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let parts = [
        (s / 86400, "d"),
        ((s % 86400) / 3600, "h"),
        ((s % 3600) / 60, "m"),
        (s % 60, "s"),
        (u64::from(d.subsec_millis()), "ms"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text.join(" ")
    }
}

/// Serde for durations as human strings (`"24h"`, `"7d"`, `"90s"`), written by [`written`].
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as [`super::written`] does.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::written(*d))
    }

    /// Reads a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

/// Serde for optional durations as human strings; absent means `None`.
pub mod duration_opt_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as a humantime string, or nothing.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&super::written(*d)),
            None => s.serialize_none(),
        }
    }

    /// Reads a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_people_write_them_and_read_back() {
        let d = |s: u64| Duration::from_secs(s);
        for (dur, text) in [
            (d(365 * 86400), "365d"),
            (d(90 * 86400), "90d"),
            (d(86400 + 12 * 3600), "1d 12h"),
            (d(5400), "1h 30m"),
            (d(90), "1m 30s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::ZERO, "0s"),
            (d(2 * 86400 + 61), "2d 1m 1s"),
        ] {
            assert_eq!(written(dur), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), dur, "{text}");
        }
    }
    use proptest::prelude::*;
    use time::macros::datetime;

    const H: u64 = 3600;

    #[test]
    fn defaults_are_the_product_defaults_and_valid() {
        let p = Policy::default();
        p.validate().unwrap();
        assert_eq!(p.leaf_ttl(None), Duration::from_secs(24 * H));
        assert_eq!(
            p.leaf_ttl(Some(Duration::ZERO)),
            Duration::from_secs(24 * H)
        );
        assert_eq!(
            p.leaf_ttl(Some(Duration::from_secs(100 * H))),
            Duration::from_secs(48 * H)
        );
        assert_eq!(
            p.leaf_ttl(Some(Duration::from_secs(60))),
            Duration::from_secs(H)
        );
        assert_eq!(
            p.leaf_ttl(Some(Duration::from_secs(5 * H))),
            Duration::from_secs(5 * H)
        );
        // 7 d × 1/3 = 56 h left at hand-over, which covers a 48 h leaf.
        assert_eq!(
            p.issuer_activate_remaining.of(p.issuer_ttl),
            Duration::from_secs(56 * H)
        );
    }

    #[test]
    fn validation_names_the_conflict() {
        let p = Policy {
            issuer_ttl: Duration::from_secs(5 * 24 * H),
            ..Policy::default()
        };
        let e = p.validate().unwrap_err();
        assert_eq!(e.name, "issuer_ttl");
        assert!(e.reason.contains("leaf_ttl_max = 2d:"), "{e}");
        assert!(e.reason.contains("at least 6d "), "{e}");

        let p = Policy {
            leaf_ttl_min: Duration::from_secs(49 * H),
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "leaf_ttl_min");
        let p = Policy {
            leaf_ttl_default: Duration::from_secs(49 * H),
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "leaf_ttl_default");
        let p = Policy {
            issuer_prepare_remaining: Fraction::new(1, 4),
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "issuer_prepare_remaining");
        let p = Policy {
            issuer_activate_remaining: Fraction::new(1, 1),
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "issuer_activate_remaining");
        let p = Policy {
            anchor_ttl: Duration::from_secs(H),
            ..Policy::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "anchor_ttl");
    }

    #[test]
    fn fractions_parse() {
        assert_eq!("1/3".parse::<Fraction>().unwrap(), Fraction::new(1, 3));
        assert_eq!(
            "0.25"
                .parse::<Fraction>()
                .unwrap()
                .of(Duration::from_secs(100)),
            Duration::from_secs(25)
        );
        assert_eq!("0.5".parse::<Fraction>().unwrap().as_f64(), 0.5);
        for bad in ["", "1/0", "a", "0.1234567", "-1/3", "1/x"] {
            assert!(bad.parse::<Fraction>().is_err(), "{bad}");
        }
    }

    #[test]
    fn leaf_window_at_the_issuer_boundary() {
        let p = Policy::default();
        let nb = datetime!(2026-01-01 00:00 UTC);
        let na = datetime!(2026-01-08 00:00 UTC);
        // One second before the issuer expires: a 1-second leaf, clamped.
        let w = p
            .leaf_window(na - Duration::from_secs(1), None, nb, na)
            .unwrap();
        assert_eq!(w.not_after, na);
        assert!(w.clamped_by_issuer);
        // At expiry: refused.
        assert!(p.leaf_window(na, None, nb, na).is_err());
        // Before the issuer's notBefore: refused.
        assert!(
            p.leaf_window(nb - Duration::from_secs(1), None, nb, na)
                .is_err()
        );
        // Far from expiry: the full default, back-dated by the skew.
        let now = datetime!(2026-01-02 12:00:00.7 UTC);
        let w = p.leaf_window(now, None, nb, na).unwrap();
        assert_eq!(w.not_before, datetime!(2026-01-02 11:55 UTC));
        assert_eq!(w.not_after, datetime!(2026-01-03 12:00 UTC));
        assert!(!w.clamped_by_issuer);
    }

    proptest! {
        // For any request at any time at which the issuer is valid:
        // notBefore < notAfter <= issuer notAfter, and the lifetime never exceeds the max TTL.
        #[test]
        fn leaf_window_is_always_inside_the_issuer(
            issuer_start in 0i64..2_000_000_000,
            issuer_life in 1u64..(400 * 24 * H),
            at in 0.0f64..1.0,
            nanos in 0u32..1_000_000_000,
            requested in proptest::option::of(0u64..(1000 * 24 * H)),
        ) {
            let p = Policy::default();
            let nb = OffsetDateTime::from_unix_timestamp(issuer_start).unwrap();
            let na = nb + Duration::from_secs(issuer_life);
            let offset = ((issuer_life as f64) * at) as u64;
            let now = (nb + Duration::from_secs(offset)).replace_nanosecond(nanos).unwrap();
            let w = p.leaf_window(now, requested.map(Duration::from_secs), nb, na);
            if whole_seconds(now) >= na {
                prop_assert!(w.is_err());
            } else {
                let w = w.unwrap();
                prop_assert!(w.not_before < w.not_after);
                prop_assert!(w.not_after <= na);
                prop_assert!(w.not_after - whole_seconds(now) <= p.leaf_ttl_max);
                prop_assert!(w.not_after > now);
            }
        }
    }
}
