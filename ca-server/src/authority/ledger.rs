//! The issuance ledger on disk: `<state-dir>/ledger.log`, written in batches by a background
//! task so that no disk write is on the signing path. The format (version 2, binary: fixed-size
//! leaf records, each string written once) is [`rotator::ledger::file`]'s; a version-1 file
//! (one JSON line per leaf, before #28) is read at start and rewritten as version 2.
//!
//! The signing path only locks a mutex to update the in-memory [`Ledger`], which queues the
//! changed leaf. [`LedgerHandle::flush`] (every [`FLUSH_EVERY`], and at shutdown) appends the
//! queued leaves as one checksummed frame and fsyncs; when the file holds more than twice the
//! live records it is rewritten with only the live ones (atomic replace). A clean shutdown
//! appends a closing frame.
//!
//! Loading is conservative: a missing, unreadable or uncleanly closed log (a crash may have
//! lost the last batch) makes the ledger *complete only from now*, so the gates fall back to
//! time until every leaf signed before has expired — and say so.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rotator::ledger::{LeafRecord, Ledger, LedgerSummary, Recorded, TooManyInstances};
use rotator::pki::CertId;
use rotator::store::write_atomic;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The ledger's file name in the state dir.
pub const LEDGER_FILE: &str = "ledger.log";
/// How often queued records are written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How long a scrape's ledger summary is reused.
pub const SCRAPE_SUMMARY_MAX_AGE: Duration = Duration::from_secs(1);

/// A version-1 file's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    ledger: u32,
    complete_since: i64,
}

/// A version-1 file's closing line.
#[derive(Debug, Serialize, Deserialize)]
struct Closed {
    closed: bool,
}

/// How the ledger was found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// A new authority: complete from its creation.
    New,
    /// Cleanly closed last time: complete since it says.
    Clean {
        /// Records read.
        records: usize,
    },
    /// Found but not usable as complete (missing, unreadable, not closed): the reason.
    Incomplete(String),
}

struct Inner {
    ledger: Ledger,
    file: Option<File>,
    records_in_file: usize,
    /// A write failed: the file may lack records, so the next flush rewrites it.
    needs_rewrite: bool,
}

/// The ledger of a running server.
pub struct LedgerHandle {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// The last summary made for a scrape: (when, for which bundle version, the summary).
    scraped: Mutex<Option<(tokio::time::Instant, u64, LedgerSummary)>>,
    summaries: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read_log(path: &Path) -> Result<(Ledger, bool, usize), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    read_bytes(&bytes)
}

/// Replays a ledger file of either version: the ledger, whether it was closed cleanly, how
/// many records.
pub(crate) fn read_bytes(bytes: &[u8]) -> Result<(Ledger, bool, usize), String> {
    if bytes.starts_with(rotator::ledger::file::MAGIC) {
        let r = rotator::ledger::file::read(bytes)?;
        return Ok((r.ledger, r.closed, r.records));
    }
    parse_log(bytes)
}

/// Replays a version-1 file's lines: the ledger, whether it was closed cleanly, how many records.
pub(crate) fn parse_log(r: impl BufRead) -> Result<(Ledger, bool, usize), String> {
    let mut lines = r.lines();
    let first = lines.next().ok_or("empty")?.map_err(|e| e.to_string())?;
    let h: Header = serde_json::from_str(&first).map_err(|e| format!("header: {e}"))?;
    if h.ledger != 1 {
        return Err(format!("format {} is not supported", h.ledger));
    }
    let since = OffsetDateTime::from_unix_timestamp(h.complete_since).map_err(|e| e.to_string())?;
    let mut l = Ledger::new(since);
    let (mut closed, mut n) = (false, 0);
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if closed {
            return Err(format!("line {}: records after the closing line", i + 2));
        }
        if let Ok(r) = serde_json::from_str::<LeafRecord>(&line) {
            let ids = std::iter::once(&r.anchor).chain(r.issuer.as_ref());
            if let Some(bad) = ids.map(CertId::as_str).find(|s| !CertId::is_well_formed(s)) {
                return Err(format!("line {}: {bad:?} is not a certificate id", i + 2));
            }
            l.record(r);
            n += 1;
        } else if serde_json::from_str::<Closed>(&line).is_ok_and(|c| c.closed) {
            closed = true;
        } else {
            // A torn last line is what a crash mid-append leaves; anything else is corruption.
            // Either way the ledger is incomplete.
            return Err(format!("line {} is not a ledger record", i + 2));
        }
    }
    Ok((l, closed, n))
}

impl LedgerHandle {
    /// Loads `<dir>/ledger.log`. `created` says the authority was created by this start (nothing
    /// was ever signed before `now`). The file is rewritten at once (compacted, not closed).
    pub fn open(
        dir: &Path,
        created: bool,
        now: OffsetDateTime,
        clock_skew: Duration,
    ) -> Result<(Self, Loaded), String> {
        let path = dir.join(LEDGER_FILE);
        let (mut ledger, loaded) = if created {
            // Nothing was signed before the authority existed, so the ledger is as good as
            // complete since long enough ago that no unknown leaf can be live: measurements are
            // trustworthy at once.
            let max = Duration::from_secs(365 * 86400);
            (Ledger::new(now - max - clock_skew), Loaded::New)
        } else {
            match read_log(&path) {
                Ok((l, true, records)) => (l, Loaded::Clean { records }),
                Ok((mut l, false, _)) => {
                    l.set_complete_since(now);
                    (
                        l,
                        Loaded::Incomplete(
                            "the previous run did not close it (a crash may have lost its last batch)".into(),
                        ),
                    )
                }
                Err(e) => {
                    let why = if path.exists() {
                        format!("unreadable ({e})")
                    } else {
                        "missing".to_owned()
                    };
                    (Ledger::new(now), Loaded::Incomplete(why))
                }
            }
        };
        ledger.compact(now, clock_skew);
        let h = Self {
            path,
            scraped: Mutex::default(),
            summaries: Default::default(),
            inner: Mutex::new(Inner {
                ledger,
                file: None,
                records_in_file: 0,
                needs_rewrite: false,
            }),
        };
        h.rewrite()
            .map_err(|e| format!("{}: {e}", h.path.display()))?;
        Ok((h, loaded))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a leaf (memory only; the ledger queues it and the next flush writes it). A leaf
    /// the full ledger drops is not written either (the ledger is complete only from then on,
    /// in memory and, through the next rewrite's header, on disk).
    pub fn record(&self, r: LeafRecord) -> Recorded {
        let mut i = self.lock();
        let kept = i.ledger.record(r);
        if kept != Recorded::Kept {
            i.needs_rewrite = true;
        }
        kept
    }

    /// Whether a leaf for `(spiffe_id, instance)` may be signed (its identity's instance cap).
    pub fn admit(&self, spiffe_id: &str, instance: &str) -> Result<(), TooManyInstances> {
        self.lock().ledger.admit(spiffe_id, instance)
    }

    /// Runs `f` on the in-memory ledger (watch bookkeeping).
    pub fn with<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.lock().ledger)
    }

    /// The gates' view, from the ledger's incremental tally (O(anchors + bundle versions)) under
    /// the lock the signing path takes: the gates ask for it when they decide, and scrapes through
    /// [`summary_for_scrape`](Self::summary_for_scrape).
    pub fn summary(
        &self,
        now: OffsetDateTime,
        leaf_ttl_max: Duration,
        clock_skew: Duration,
        min_version: u64,
    ) -> LedgerSummary {
        self.summaries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock()
            .ledger
            .summary(now, leaf_ttl_max, clock_skew, min_version)
    }

    /// The view `/metrics` shows: a summary at most [`SCRAPE_SUMMARY_MAX_AGE`] old for the same
    /// bundle version is reused. A summary is cheap now (the ledger keeps its tally
    /// incrementally: O(anchors + bundle versions)), but `/metrics` is unauthenticated and each
    /// one still takes the mutex the signing path takes, so a flood of scrapes takes it at most
    /// once per that interval (Prometheus scrapes every 15-60 s, so it always sees a fresh one).
    pub fn summary_for_scrape(
        &self,
        now: OffsetDateTime,
        leaf_ttl_max: Duration,
        clock_skew: Duration,
        min_version: u64,
    ) -> LedgerSummary {
        let at = tokio::time::Instant::now();
        let mut last = self.scraped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, v, s)) = last.as_ref()
            && *v == min_version
            && at.duration_since(*t) < SCRAPE_SUMMARY_MAX_AGE
        {
            return s.clone();
        }
        let s = self.summary(now, leaf_ttl_max, clock_skew, min_version);
        *last = Some((at, min_version, s.clone()));
        s
    }

    /// Summaries computed so far (each takes the ledger's lock).
    pub fn summaries_computed(&self) -> u64 {
        self.summaries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Instances with a record (live or awaiting compaction).
    pub fn len(&self) -> usize {
        self.lock().ledger.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the whole ledger afresh (header + every held leaf), atomically.
    fn rewrite(&self) -> std::io::Result<()> {
        let mut i = self.lock();
        let mut out = Vec::with_capacity(64 + i.ledger.len() * 64);
        let n = i.ledger.write_all(&mut out);
        write_atomic(&self.path, &out, 0o600).map_err(std::io::Error::other)?;
        i.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        i.records_in_file = n;
        i.needs_rewrite = false;
        Ok(())
    }

    /// Drops expired records, then appends the queued ones as one frame (append +
    /// fdatasync), or rewrites the file when it holds more than twice the live records.
    /// Blocking: call from a blocking task.
    pub fn flush(&self, now: OffsetDateTime, clock_skew: Duration) -> std::io::Result<()> {
        let (buf, n, file) = {
            let mut i = self.lock();
            // The queue first: a renewal the compaction then drops is in the file as it was
            // last, not as the one before it.
            let mut buf = Vec::new();
            let n = i.ledger.write_queued(&mut buf);
            i.ledger.compact(now, clock_skew);
            let rewrite = i.needs_rewrite || i.records_in_file + n > 2 * i.ledger.len() + 1024;
            if rewrite {
                drop(i);
                let r = self.rewrite();
                if r.is_err() {
                    self.lock().needs_rewrite = true;
                }
                return r;
            }
            (buf, n, i.file.as_ref().map(File::try_clone).transpose())
        };
        if n == 0 {
            return Ok(());
        }
        let r = file
            .and_then(|f| f.ok_or_else(|| std::io::Error::other("the ledger file is not open")))
            .and_then(|mut f| {
                rotator::store::io_faults::hit(
                    &self.path,
                    rotator::store::io_faults::Stage::Write,
                )?;
                f.write_all(&buf)?;
                f.sync_data()
            });
        let mut i = self.lock();
        match r {
            Ok(()) => i.records_in_file += n,
            // The leaves are no longer queued: the rewrite writes them all.
            Err(_) => i.needs_rewrite = true,
        }
        r
    }

    /// Flushes and appends the closing frame: the next start may trust the ledger as complete.
    pub fn close(&self, now: OffsetDateTime, clock_skew: Duration) -> std::io::Result<()> {
        self.flush(now, clock_skew)?;
        let file = self.lock().file.take();
        if let Some(mut f) = file {
            f.write_all(&rotator::ledger::file::closed_frame())?;
            f.sync_data()?;
        }
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use rotator::pki::CertId;

    use super::*;

    /// A record as the signing path makes it: 16-byte hex serial, a typical Kubernetes SPIFFE ID,
    /// a pod UID as the instance.
    pub(crate) fn record(i: usize, now: OffsetDateTime) -> LeafRecord {
        LeafRecord {
            serial: format!("{:032x}", i * 7_919 + 1),
            spiffe_id: format!("spiffe://cluster.local/ns/team-{}/sa/service-{i}", i % 50),
            instance: format!("5f0c8e1a-3b7d-4c2e-9a1f-{i:012x}"),
            anchor: CertId::of(b"anchor"),
            issued: now.unix_timestamp(),
            not_after: (now + Duration::from_secs(86400)).unix_timestamp(),
            bundle_version: 7,
            via: None,
            issuer: None,
            api: rotator::ledger::Api::Meshca,
        }
    }

    #[test]
    fn a_hundred_thousand_live_leaves_stay_far_under_fifty_megabytes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (l, loaded) =
            LedgerHandle::open(dir.path(), true, now, Duration::from_secs(300)).unwrap();
        assert_eq!(loaded, Loaded::New);
        for i in 0..100_000 {
            l.record(record(i, now));
        }
        l.flush(now, Duration::from_secs(300)).unwrap();
        let size = std::fs::metadata(l.path()).unwrap().len();
        println!("{} bytes per leaf", size / 100_000);
        // A leaf is 60 bytes; each of these has its own SPIFFE ID (~50 bytes, written once).
        assert!(size < 100_000 * 120, "{size} bytes");
        assert!(
            size > 100_000 * 100,
            "every record and identity is on disk: {size} bytes"
        );
        l.close(now, Duration::from_secs(300)).unwrap();
        let (again, loaded) =
            LedgerHandle::open(dir.path(), false, now, Duration::from_secs(300)).unwrap();
        assert_eq!(loaded, Loaded::Clean { records: 100_000 });
        assert_eq!(again.len(), 100_000);
    }

    #[test]
    fn renewals_compact_the_file_and_expiry_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let skew = Duration::from_secs(300);
        let (l, _) = LedgerHandle::open(dir.path(), true, now, skew).unwrap();
        // 10 instances renewing 500 times: the file must not keep every superseded leaf.
        for round in 0..500 {
            for i in 0..10 {
                let mut r = record(i, now);
                r.not_after += round;
                l.record(r);
            }
            l.flush(now, skew).unwrap();
        }
        let (_, _, records) = read_bytes(&std::fs::read(l.path()).unwrap()).unwrap();
        assert!(
            (10..2 * 10 + 1024 + 20).contains(&records),
            "{records} records in the file for 10 live ones"
        );
        assert_eq!(l.len(), 10);
        let later = now + Duration::from_secs(3 * 86400);
        l.flush(later, skew).unwrap();
        assert!(l.is_empty(), "expired leaves are dropped");
    }

    /// A `ledger.log` as meshca wrote it before #28 (version 1: a JSON line per leaf) is read
    /// at start, as complete as it was, and rewritten in version 2.
    #[test]
    fn a_version_one_file_is_read_and_rewritten_as_version_two() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let skew = Duration::from_secs(300);
        let since = now - Duration::from_secs(7200);
        let mut v1 = format!(
            "{{\"ledger\":1,\"complete_since\":{}}}\n",
            since.unix_timestamp()
        );
        let mut written = Vec::new();
        for i in 0..50 {
            let mut r = record(i, now);
            r.via = (i % 5 == 0).then(|| "k8s:istio-system/ztunnel@node-a".to_owned());
            r.issuer = (i % 2 == 0).then(|| CertId::of(b"issuer"));
            r.api = rotator::ledger::Api::ALL[i % 4];
            v1.push_str(&serde_json::to_string(&r).unwrap());
            v1.push('\n');
            written.push(r);
        }
        v1.push_str("{\"closed\":true}\n");
        std::fs::write(dir.path().join(LEDGER_FILE), &v1).unwrap();

        let (l, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
        assert_eq!(loaded, Loaded::Clean { records: 50 });
        let bytes = std::fs::read(l.path()).unwrap();
        assert!(
            bytes.starts_with(rotator::ledger::file::MAGIC),
            "rewritten as version 2"
        );
        assert!(
            bytes.len() < v1.len() * 6 / 10,
            "{} bytes, {} before",
            bytes.len(),
            v1.len()
        );
        let mut held: Vec<_> = l.with(|l| l.records().collect());
        held.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        written.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        assert_eq!(held.len(), 50);
        for (h, w) in held.iter().zip(&written) {
            assert_eq!(
                (&h.serial, &h.spiffe_id, &h.anchor, h.issued, h.not_after),
                (&w.serial, &w.spiffe_id, &w.anchor, w.issued, w.not_after)
            );
            assert_eq!(
                (h.bundle_version, &h.via, &h.issuer, h.api),
                (w.bundle_version, &w.via, &w.issuer, w.api)
            );
        }
        assert_eq!(
            l.summary(now, Duration::from_secs(3600), skew, 1)
                .complete_since
                .unix_timestamp(),
            since.unix_timestamp(),
            "as complete as the old file said"
        );
        l.close(now, skew).unwrap();
        let (again, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
        assert_eq!(loaded, Loaded::Clean { records: 50 });
        assert_eq!(again.len(), 50);
    }

    #[test]
    fn a_torn_or_unclosed_log_is_incomplete_and_a_garbled_one_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let skew = Duration::from_secs(300);
        let (l, _) = LedgerHandle::open(dir.path(), true, now, skew).unwrap();
        l.record(record(1, now));
        l.flush(now, skew).unwrap();
        drop(l);
        let (l, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
        assert!(
            matches!(loaded, Loaded::Incomplete(ref w) if w.contains("did not close")),
            "{loaded:?}"
        );
        assert_eq!(l.len(), 1, "flushed records still count");
        assert_eq!(
            l.summary(now, Duration::from_secs(3600), skew, 1)
                .complete_since,
            now
        );
        drop(l);
        std::fs::write(
            dir.path().join(LEDGER_FILE),
            "{\"ledger\":1,\"complete_since\":0}\ngarbage\n",
        )
        .unwrap();
        let (l, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
        assert!(
            matches!(loaded, Loaded::Incomplete(ref w) if w.contains("unreadable")),
            "{loaded:?}"
        );
        assert!(l.is_empty());
        std::fs::remove_file(dir.path().join(LEDGER_FILE)).unwrap();
        let (_, loaded) = LedgerHandle::open(dir.path(), false, now, skew).unwrap();
        assert_eq!(loaded, Loaded::Incomplete("missing".into()));
    }
}
