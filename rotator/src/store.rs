//! Stores persist an [`AuthorityState`] so that a restart, or a crash at any instant, finds the
//! last committed state and nothing else.
//!
//! [`FileStore`] layout (the state dir is 0700, keys 0600):
//!
//! ```text
//! state.json            the commit record: ids, statuses, phase, generation, history
//! anchors/<id>.crt|.key trust anchors (the key is absent in upstream mode)
//! issuers/<id>.crt|.key issuers
//! bundle.pem            the current bundle, derived from state.json after every commit
//! ```
//!
//! A commit writes new certificate and key files first (named by the certificate's hash, so
//! writing one twice is harmless and an unreferenced one is inert), then replaces `state.json`
//! atomically (temp file, fsync, rename, fsync dir). The rename is the commit point: a crash
//! before it leaves the old state, after it the new one. After it, key files the state no longer
//! names (destroyed keys) are deleted; certificates are never deleted.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pki::{CaCert, CertId, SecretKey};
use crate::spiffe::TrustDomain;
use crate::state::{
    Anchor, AnchorStatus, AuthorityState, Event, Issuer, IssuerStatus, PendingKey, Phase, key_id,
};

/// The commit record's file name.
pub const STATE_FILE: &str = "state.json";
/// The bundle file's name.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// State-dir entries that belong to an authority: if any exists, the dir is not fresh.
pub const AUTHORITY_ENTRIES: &[&str] = &[
    "anchors",
    "issuers",
    BUNDLE_FILE,
    "tokens.json",
    "bootstrap-token",
    FEDERATED_DIR,
];
const FORMAT: u32 = 1;

/// Why a store could not load or commit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file exists but does not hold what the state says it should.
    #[error("{}: {problem}", path.display())]
    Corrupt {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another process holds the state dir.
    #[error("{}: another meshca-server is using this state dir (it holds the lock)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A remote store (the Kubernetes API) could not be read or written.
    #[error("{0}")]
    Remote(String),
    /// Another writer committed first (optimistic concurrency); re-read and decide again.
    #[error("conflict: the stored generation is {found}, expected {expected}")]
    Conflict {
        /// The generation this writer based its change on.
        expected: u64,
        /// The generation found in the store.
        found: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, problem: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// A store operation's future (boxed, so that [`Store`] is object-safe).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where the authority state is committed: the one seam between the authority and its
/// persistence. The authority owns an `Arc<dyn Store>` whatever the backend — [`FileStore`]
/// (a state dir) or the Kubernetes Secret store (`ca_server::k8s::store`) — and a new backend
/// is a new file implementing these four methods. `commit` is atomic: after a crash, `load`
/// finds the last committed state and nothing else.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where the state lives, for messages: a directory, or `secret <namespace>/<name>`.
    fn origin(&self) -> String;
    /// Whether other processes commit to this store too (replicas sharing one Secret). A commit
    /// may then meet [`StoreError::Conflict`], which re-reading and deciding again resolves, a
    /// newer state may appear at any moment, and no one process sees every issued leaf. A state
    /// dir is never shared: its lock keeps it to one server.
    fn shared(&self) -> bool;
    /// The last committed state, or `None` when the store has never held one.
    fn load(&self) -> StoreFuture<'_, Option<AuthorityState>>;
    /// Makes `next` the committed state. `base` is the generation `next` was derived from
    /// (`None` for the first commit); a store that holds another generation answers `Conflict`.
    fn commit<'a>(&'a self, base: Option<u64>, next: &'a AuthorityState) -> StoreFuture<'a, ()>;
}

/// The local state dir as an output beside whatever [`Store`] holds the state: `bundle.pem`
/// (for operators and workloads that read files) and the issuance ledger live here in every
/// mode, the Kubernetes one included.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `bundle.pem` from `state` if its content differs.
    pub fn write_bundle(&self, state: &AuthorityState) -> Result<(), StoreError> {
        let pem: String = state.bundle().map(|a| a.cert.pem()).collect();
        let path = self.dir.join(BUNDLE_FILE);
        if fs::read_to_string(&path).ok().as_deref() != Some(pem.as_str()) {
            write_atomic(&path, pem.as_bytes(), 0o644)?;
        }
        self.write_federated(state)
    }

    /// `federated/<trust-domain>.pem`: each federated trust domain's anchors, for workloads
    /// that read files; a file whose trust domain is no longer federated is removed.
    fn write_federated(&self, state: &AuthorityState) -> Result<(), StoreError> {
        let dir = self.dir.join(FEDERATED_DIR);
        if state.federated.is_empty() && !dir.exists() {
            return Ok(());
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        for b in &state.federated {
            let path = dir.join(format!("{}.pem", b.trust_domain));
            if fs::read_to_string(&path).ok().as_deref() != Some(b.anchors_pem.as_str()) {
                write_atomic(&path, b.anchors_pem.as_bytes(), 0o644)?;
            }
        }
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let held = name.strip_suffix(".pem").is_some_and(|td| {
                state
                    .federated
                    .iter()
                    .any(|b| b.trust_domain.as_str() == td)
            });
            if !held {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// The directory under the state dir that holds federated trust domains' bundles.
pub const FEDERATED_DIR: &str = "federated";

/// Authority state in a local directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// Test builds: commits that are still to fail, as a full disk would make them.
    #[cfg(feature = "fault-injection")]
    fail_commits: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    trust_domain: TrustDomain,
    generation: u64,
    bundle_version: u64,
    phase: Phase,
    anchors: Vec<AnchorMeta>,
    issuers: Vec<IssuerMeta>,
    #[serde(default)]
    history: Vec<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_issuer_key: Option<PendingMeta>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    denied: Vec<crate::state::Denial>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    denied_nodes: Vec<crate::state::NodeDenial>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked: Vec<crate::state::Revocation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    federated: Vec<crate::state::FederatedBundle>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingMeta {
    id: String,
    #[serde(with = "time::serde::rfc3339")]
    created: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnchorMeta {
    id: CertId,
    status: AnchorStatus,
    key_held: bool,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    archived: Option<OffsetDateTime>,
    serial: String,
    #[serde(with = "time::serde::rfc3339")]
    not_after: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerMeta {
    id: CertId,
    anchor: CertId,
    status: IssuerStatus,
    serial: String,
    #[serde(with = "time::serde::rfc3339")]
    not_after: OffsetDateTime,
}

impl FileStore {
    /// A store in the state dir `dir`, created (mode 0700) if missing; an existing dir is
    /// tightened to 0700, or, when it belongs to another user, the store is `dir/meshca`
    /// ([`resolve_state_dir`]). [`FileStore::dir`] says where it is.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = resolve_state_dir(&dir.into())?;
        Ok(Self::read_only(dir))
    }

    /// Takes the state dir's exclusive lock (`<dir>/lock`, an advisory `flock` held until the
    /// returned file is dropped; the kernel releases it if the process dies): one server per
    /// state dir.
    pub fn lock(&self) -> Result<File, StoreError> {
        let path = self.dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match f.try_lock() {
            Ok(()) => {
                // Holding the lock, no writer is mid-commit: temp files are leftovers of a crash.
                for sub in [
                    self.dir.clone(),
                    self.dir.join("anchors"),
                    self.dir.join("issuers"),
                ] {
                    for e in fs::read_dir(&sub).into_iter().flatten().flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with('.') && name.contains(".tmp.") {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
                Ok(f)
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// A store over `dir` for reading only: nothing is created or changed.
    pub fn read_only(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            #[cfg(feature = "fault-injection")]
            fail_commits: Default::default(),
        }
    }

    /// Test builds: the next `n` commits fail with "no space left on device" and write nothing.
    #[cfg(feature = "fault-injection")]
    pub fn inject_commit_failures(&self, n: u32) {
        self.fail_commits
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and checks the committed state. `Ok(None)` only for a fresh directory: one with no
    /// `state.json` and none of [`AUTHORITY_ENTRIES`]. Anything else that is missing, unreadable
    /// or inconsistent is `Corrupt`, naming the file and the problem.
    pub fn load_sync(&self) -> Result<Option<AuthorityState>, StoreError> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let found: Vec<&str> = AUTHORITY_ENTRIES
                    .iter()
                    .copied()
                    .filter(|n| self.dir.join(n).exists())
                    .collect();
                if found.is_empty() {
                    return Ok(None);
                }
                return Err(corrupt(
                    &path,
                    format!(
                        "missing, but {} exist: this is an existing authority whose state file is gone; \
                         refusing to generate a new trust anchor over it (restore {STATE_FILE} from a \
                         backup, or move the directory away to start afresh)",
                        found.join(", ")
                    ),
                ));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        decode(&text, &path, self)
    }

    /// Commits `next` (see the module docs for the order of writes). `bundle.pem` is the caller's
    /// to write next ([`FileStore::write_bundle`]): it is an output, and failing to write it must
    /// not look like a failed commit.
    ///
    /// An error means the commit may or may not have happened: one after the rename of
    /// `state.json` (its directory's fsync) leaves the new state visible. Callers re-read the
    /// store to learn which (`Authority::transition` does).
    pub fn commit_sync(&self, base: Option<u64>, next: &AuthorityState) -> Result<(), StoreError> {
        #[cfg(feature = "fault-injection")]
        if self
            .fail_commits
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(StoreError::Io {
                path: self.dir.join(STATE_FILE),
                source: io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (injected)",
                ),
            });
        }
        next.check().map_err(|e| {
            corrupt(
                &self.dir.join(STATE_FILE),
                format!("refusing to commit an inconsistent state: {e}"),
            )
        })?;
        let found = self.stored_generation()?;
        if found != base {
            return Err(StoreError::Conflict {
                expected: base.unwrap_or(0),
                found: found.unwrap_or(0),
            });
        }
        for (sub, der, id, key) in next
            .anchors
            .iter()
            .map(|a| ("anchors", a.cert.der(), a.cert.id(), a.key.as_ref()))
            .chain(
                next.issuers
                    .iter()
                    .map(|i| ("issuers", i.cert.der(), i.cert.id(), Some(&i.key))),
            )
        {
            let dir = self.dir.join(sub);
            create_private_dir(&dir)?;
            let crt = dir.join(format!("{id}.crt"));
            if !crt.exists() {
                write_atomic(&crt, crate::pki::pem_cert(der).as_bytes(), 0o644)?;
            }
            if let Some(k) = key {
                let kp = dir.join(format!("{id}.key"));
                if !kp.exists() {
                    write_atomic(&kp, k.to_pem().as_bytes(), 0o600)?;
                }
            }
        }
        let file = StateFile::of(next);
        if let Some(p) = &next.pending_issuer_key {
            let dir = self.dir.join("issuers");
            create_private_dir(&dir)?;
            let kp = dir.join(format!("pending-{}.key", key_id(&p.key)));
            if !kp.exists() {
                write_atomic(&kp, p.key.to_pem().as_bytes(), 0o600)?;
            }
        }
        let mut json = serde_json::to_vec_pretty(&file)
            .map_err(|e| corrupt(&self.dir.join(STATE_FILE), e.to_string()))?;
        json.push(b'\n');
        fault_point("commit:after-files");
        write_atomic(&self.dir.join(STATE_FILE), &json, 0o644)?;
        fault_point("commit:after-state");
        self.destroy_unnamed_keys(next);
        Ok(())
    }

    /// Deletes the key files the committed `state` no longer names: keys destroyed by
    /// [`AuthorityState::prune_expired_issuers`] (expired issuers, archived anchors past their
    /// retention), and keys written for a commit that never happened. Best effort, after the
    /// commit point: a file that cannot be removed now goes at the next commit. (Unlinking does not
    /// scrub the disk blocks; on a journaling filesystem or an SSD nothing a process can do
    /// reliably does. Keys that must never touch a disk belong in an HSM.)
    fn destroy_unnamed_keys(&self, state: &AuthorityState) {
        let mut named = HashSet::new();
        for a in state.anchors.iter().filter(|a| a.key.is_some()) {
            named.insert(format!("anchors/{}.key", a.cert.id()));
        }
        for i in &state.issuers {
            named.insert(format!("issuers/{}.key", i.cert.id()));
        }
        if let Some(p) = &state.pending_issuer_key {
            named.insert(format!("issuers/pending-{}.key", key_id(&p.key)));
        }
        for sub in ["anchors", "issuers"] {
            for e in fs::read_dir(self.dir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".key") && !named.contains(&format!("{sub}/{name}")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Writes `bundle.pem` from `state` if its content differs.
    pub fn write_bundle(&self, state: &AuthorityState) -> Result<(), StoreError> {
        self.state_dir().write_bundle(state)
    }

    /// The directory as a local output ([`StateDir`]), whichever store holds the state.
    pub fn state_dir(&self) -> StateDir {
        StateDir {
            dir: self.dir.clone(),
        }
    }

    fn stored_generation(&self) -> Result<Option<u64>, StoreError> {
        #[derive(Deserialize)]
        struct Gen {
            generation: u64,
        }
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Gen>(&b)
                .map(|g| Some(g.generation))
                .map_err(|e| corrupt(&path, format!("not valid state JSON: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

impl StateFile {
    fn of(next: &AuthorityState) -> Self {
        Self {
            format: FORMAT,
            trust_domain: next.trust_domain.clone(),
            generation: next.generation,
            bundle_version: next.bundle_version,
            phase: next.phase.clone(),
            anchors: next
                .anchors
                .iter()
                .map(|a| AnchorMeta {
                    id: a.cert.id().clone(),
                    status: a.status,
                    key_held: a.key.is_some(),
                    archived: a.archived,
                    serial: a.cert.info.serial.clone(),
                    not_after: a.cert.info.not_after,
                })
                .collect(),
            issuers: next
                .issuers
                .iter()
                .map(|i| IssuerMeta {
                    id: i.cert.id().clone(),
                    anchor: i.anchor.clone(),
                    status: i.status,
                    serial: i.cert.info.serial.clone(),
                    not_after: i.cert.info.not_after,
                })
                .collect(),
            history: next.history.clone(),
            denied: next.denied.clone(),
            denied_nodes: next.denied_nodes.clone(),
            revoked: next.revoked.clone(),
            federated: next.federated.clone(),
            pending_issuer_key: next.pending_issuer_key.as_ref().map(|p| PendingMeta {
                id: key_id(&p.key),
                created: p.created,
            }),
        }
    }
}

/// The flat form of a committed state: one entry per file, named `state.json`,
/// `anchors.<id>.crt`, `anchors.<id>.key`, `issuers.<id>.crt|.key`, `issuers.pending-<id>.key`.
/// This is what a Kubernetes Secret's `data` holds (its keys allow `[-._a-zA-Z0-9]` only).
pub fn encode_flat(next: &AuthorityState) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    next.check().map_err(|e| {
        corrupt(
            Path::new(STATE_FILE),
            format!("refusing to commit an inconsistent state: {e}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for a in &next.anchors {
        let id = a.cert.id();
        out.insert(format!("anchors.{id}.crt"), a.cert.pem().into_bytes());
        if let Some(k) = &a.key {
            out.insert(format!("anchors.{id}.key"), k.to_pem().as_bytes().to_vec());
        }
    }
    for i in &next.issuers {
        let id = i.cert.id();
        out.insert(format!("issuers.{id}.crt"), i.cert.pem().into_bytes());
        out.insert(
            format!("issuers.{id}.key"),
            i.key.to_pem().as_bytes().to_vec(),
        );
    }
    if let Some(p) = &next.pending_issuer_key {
        out.insert(
            format!("issuers.pending-{}.key", key_id(&p.key)),
            p.key.to_pem().as_bytes().to_vec(),
        );
    }
    let mut json = serde_json::to_vec_pretty(&StateFile::of(next))
        .map_err(|e| corrupt(Path::new(STATE_FILE), e.to_string()))?;
    json.push(b'\n');
    out.insert(STATE_FILE.to_owned(), json);
    Ok(out)
}

/// Decodes and checks a flat state (see [`encode_flat`]); `origin` names where it came from in
/// errors (e.g. `secret meshca/meshca-authority`). `Ok(None)` when `data` is empty; anything
/// else that is missing or inconsistent is `Corrupt`.
pub fn decode_flat(
    origin: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<AuthorityState>, StoreError> {
    let flat = Flat { origin, data };
    let path = flat.path("", STATE_FILE);
    let Some(text) = data.get(STATE_FILE) else {
        if data.is_empty() {
            return Ok(None);
        }
        return Err(corrupt(
            &path,
            format!(
                "missing, but {} other entries exist: refusing to generate a new trust anchor over \
                 an existing authority (restore the object from a backup, or delete it to start afresh)",
                data.len()
            ),
        ));
    };
    let text = std::str::from_utf8(text).map_err(|_| corrupt(&path, "not UTF-8"))?;
    decode(text, &path, &flat)
}

/// The generation recorded in a flat state's `state.json`, if it has one.
pub fn flat_generation(data: &BTreeMap<String, Vec<u8>>) -> Option<u64> {
    #[derive(Deserialize)]
    struct Gen {
        generation: u64,
    }
    let b = data.get(STATE_FILE)?;
    serde_json::from_slice::<Gen>(b).ok().map(|g| g.generation)
}

struct Flat<'a> {
    origin: &'a str,
    data: &'a BTreeMap<String, Vec<u8>>,
}

impl Flat<'_> {
    fn key(sub: &str, name: &str) -> String {
        if sub.is_empty() {
            name.to_owned()
        } else {
            format!("{sub}.{name}")
        }
    }
}

impl Files for Flat<'_> {
    fn path(&self, sub: &str, name: &str) -> PathBuf {
        PathBuf::from(format!("{}: {}", self.origin, Self::key(sub, name)))
    }

    fn read(&self, sub: &str, name: &str, what: &str) -> Result<String, StoreError> {
        let path = self.path(sub, name);
        let b = self
            .data
            .get(&Self::key(sub, name))
            .ok_or_else(|| corrupt(&path, format!("missing: {STATE_FILE} lists this {what}")))?;
        String::from_utf8(b.clone()).map_err(|_| corrupt(&path, "not text (not PEM)"))
    }

    fn read_key(&self, sub: &str, name: &str) -> Result<SecretKey, StoreError> {
        let text = zeroize::Zeroizing::new(self.read(sub, name, "private key")?);
        SecretKey::from_pem(&text).map_err(|e| corrupt(&self.path(sub, name), e.to_string()))
    }
}

/// Where the files of a committed state are read from: a state dir, or a flat map (a Kubernetes
/// Secret's data).
trait Files {
    /// Where `sub/name` lives, for error messages.
    fn path(&self, sub: &str, name: &str) -> PathBuf;
    /// The text of `sub/name`, which `state.json` says exists.
    fn read(&self, sub: &str, name: &str, what: &str) -> Result<String, StoreError>;
    /// A private key's text (a file store also checks the file's mode).
    fn read_key(&self, sub: &str, name: &str) -> Result<SecretKey, StoreError>;
}

/// Decodes and checks a committed state whose `state.json` text is `text`.
fn decode(
    text: &str,
    path: &Path,
    files: &impl Files,
) -> Result<Option<AuthorityState>, StoreError> {
    let file: StateFile = serde_json::from_str(text)
        .map_err(|e| corrupt(path, format!("not valid state JSON: {e}")))?;
    if file.format != FORMAT {
        return Err(corrupt(
            path,
            format!(
                "format {} is not supported (this meshca reads format {FORMAT})",
                file.format
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut anchors = Vec::new();
    for m in &file.anchors {
        check_id(path, &m.id, &mut seen)?;
        let cert = read_cert(files, "anchors", &m.id, &m.serial, m.not_after)?;
        let key = if m.key_held {
            Some(read_key(files, "anchors", &m.id, &cert)?)
        } else {
            None
        };
        anchors.push(Anchor {
            cert,
            key,
            status: m.status,
            archived: m.archived,
        });
    }
    let mut issuers = Vec::new();
    for m in &file.issuers {
        check_id(path, &m.id, &mut seen)?;
        let cert = read_cert(files, "issuers", &m.id, &m.serial, m.not_after)?;
        let key = read_key(files, "issuers", &m.id, &cert)?;
        issuers.push(Issuer {
            cert,
            key,
            anchor: m.anchor.clone(),
            status: m.status,
        });
    }
    let pending_issuer_key = match &file.pending_issuer_key {
        None => None,
        Some(m) => {
            if !CertId::is_well_formed(&m.id) {
                return Err(corrupt(path, format!("{:?} is not a key id", m.id)));
            }
            let kp = files.path("issuers", &format!("pending-{}.key", m.id));
            let key = files.read_key("issuers", &format!("pending-{}.key", m.id))?;
            if key_id(&key) != m.id {
                return Err(corrupt(
                    &kp,
                    format!(
                        "holds key {} where {STATE_FILE} expects {}",
                        key_id(&key),
                        m.id
                    ),
                ));
            }
            Some(PendingKey {
                key,
                created: m.created,
            })
        }
    };
    let state = AuthorityState {
        trust_domain: file.trust_domain,
        generation: file.generation,
        bundle_version: file.bundle_version,
        anchors,
        issuers,
        phase: file.phase,
        history: file.history,
        pending_issuer_key,
        denied: file.denied,
        denied_nodes: file.denied_nodes,
        revoked: file.revoked,
        federated: file.federated,
    };
    state
        .check()
        .map_err(|e| corrupt(path, format!("inconsistent: {e}")))?;
    Ok(Some(state))
}

fn read_cert(
    files: &impl Files,
    sub: &str,
    id: &CertId,
    serial: &str,
    not_after: OffsetDateTime,
) -> Result<CaCert, StoreError> {
    let name = format!("{id}.crt");
    let path = files.path(sub, &name);
    let text = files.read(sub, &name, "certificate")?;
    let cert = CaCert::from_pem(&text).map_err(|e| corrupt(&path, e.to_string()))?;
    if cert.id() != id {
        return Err(corrupt(
            &path,
            format!(
                "holds certificate {} where {STATE_FILE} expects {id}: the file was changed",
                cert.id()
            ),
        ));
    }
    if cert.info.serial != serial || cert.info.not_after != not_after {
        return Err(corrupt(
            &path,
            format!("serial or notAfter differ from {STATE_FILE}"),
        ));
    }
    Ok(cert)
}

fn read_key(
    files: &impl Files,
    sub: &str,
    id: &CertId,
    cert: &CaCert,
) -> Result<SecretKey, StoreError> {
    let name = format!("{id}.key");
    let key = files.read_key(sub, &name)?;
    if !cert.matches_key(&key) {
        return Err(corrupt(
            &files.path(sub, &name),
            format!("this key does not belong to certificate {id}"),
        ));
    }
    Ok(key)
}

impl Files for FileStore {
    fn path(&self, sub: &str, name: &str) -> PathBuf {
        self.dir.join(sub).join(name)
    }

    fn read(&self, sub: &str, name: &str, what: &str) -> Result<String, StoreError> {
        read_existing(&self.path(sub, name), what)
    }

    fn read_key(&self, sub: &str, name: &str) -> Result<SecretKey, StoreError> {
        let path = self.path(sub, name);
        let text = zeroize::Zeroizing::new(read_existing(&path, "private key")?);
        let mode = fs::metadata(&path)
            .map_err(io_err(&path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(corrupt(
                &path,
                format!(
                    "private key is readable by group or others (mode {:o}); run chmod 600",
                    mode & 0o777
                ),
            ));
        }
        SecretKey::from_pem(&text).map_err(|e| corrupt(&path, e.to_string()))
    }
}

impl Store for FileStore {
    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn shared(&self) -> bool {
        false
    }

    // Small local files: reading and writing them inline is cheaper than a blocking-pool hop.
    fn load(&self) -> StoreFuture<'_, Option<AuthorityState>> {
        Box::pin(std::future::ready(self.load_sync()))
    }

    fn commit<'a>(&'a self, base: Option<u64>, next: &'a AuthorityState) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.commit_sync(base, next)))
    }
}

fn check_id(state: &Path, id: &CertId, seen: &mut HashSet<CertId>) -> Result<(), StoreError> {
    if !CertId::is_well_formed(id.as_str()) {
        return Err(corrupt(state, format!("{id:?} is not a certificate id")));
    }
    if !seen.insert(id.clone()) {
        return Err(corrupt(state, format!("certificate {id} is listed twice")));
    }
    Ok(())
}

fn read_existing(path: &Path, what: &str) -> Result<String, StoreError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(corrupt(
            path,
            format!("missing: {STATE_FILE} lists this {what}"),
        )),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(corrupt(path, "not text (not PEM)"))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Creates `dir` (and parents) if missing and sets it to mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// The directory meshca keeps its own files in when the configured state dir belongs to another
/// user: `<state dir>/meshca`.
pub const PRIVATE_SUBDIR: &str = "meshca";

/// Where the files of the state dir `dir` live, creating that directory (mode 0700) if needed.
///
/// - `dir` is missing, or owned by this process's user: `dir` itself, tightened to 0700 (a state
///   dir on a laptop, or one a previous start created).
/// - `dir` belongs to another user — a Kubernetes emptyDir is root-owned, group = fsGroup, mode
///   2777, and meshca runs as uid 65532, so it cannot chmod it: `dir/meshca`, a directory this user
///   creates and owns with mode 0700. An existing `dir/meshca` must be a real directory (not a
///   symlink) owned by this user, so another user of the shared dir cannot plant one.
///
/// Every caller (the server, `meshca` run by the same user) resolves the same path, and
/// [`locate_state_dir`] finds it again without creating anything.
pub fn resolve_state_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    let me = rustix::process::geteuid().as_raw();
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir(dir)?;
            return Ok(dir.to_owned());
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    if !meta.is_dir() {
        return Err(corrupt(dir, "the state dir is not a directory"));
    }
    if meta.uid() == me {
        create_private_dir(dir)?;
        return Ok(dir.to_owned());
    }
    let private = dir.join(PRIVATE_SUBDIR);
    match fs::DirBuilder::new().mode(0o700).create(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(corrupt(
                dir,
                format!(
                    "the state dir belongs to uid {} (mode {:o}) and uid {me} may not create its \
                     own directory {PRIVATE_SUBDIR}/ in it: make the state dir writable by this \
                     user (an emptyDir with fsGroup is), or owned by it",
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        Err(e) => return Err(io_err(&private)(e)),
    }
    check_own_private_dir(&private, me)?;
    create_private_dir(&private)?;
    Ok(private)
}

/// Where the files of the state dir `dir` are, without creating or changing anything: `dir/meshca`
/// when `dir` belongs to another user and that directory exists, else `dir` (see
/// [`resolve_state_dir`]).
pub fn locate_state_dir(dir: &Path) -> PathBuf {
    let me = rustix::process::geteuid().as_raw();
    let private = dir.join(PRIVATE_SUBDIR);
    let foreign = fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() != me);
    let exists = fs::symlink_metadata(&private).is_ok_and(|m| m.is_dir());
    if foreign && exists {
        private
    } else {
        dir.to_owned()
    }
}

fn check_own_private_dir(private: &Path, me: u32) -> Result<(), StoreError> {
    let meta = fs::symlink_metadata(private).map_err(io_err(private))?;
    if !meta.is_dir() {
        return Err(corrupt(
            private,
            "not a directory (a symlink or a file): meshca keeps its keys only in a directory \
             it created itself; remove it",
        ));
    }
    if meta.uid() != me {
        return Err(corrupt(
            private,
            format!(
                "owned by uid {}, not by this process's uid {me}: meshca keeps its keys only in \
                 a directory it owns",
                meta.uid()
            ),
        ));
    }
    Ok(())
}

static TEMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically: a temp file in the same dir (created with `mode`),
/// fsync, rename over `path`, fsync the dir. Readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A fresh name, created exclusively: with O_CREAT|O_EXCL an existing file or a planted
    // symlink there fails the open (EEXIST) instead of being written through.
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask on creation; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        io_faults::hit(path, io_faults::Stage::Write)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fault_point("write:before-rename");
        fs::rename(&tmp, path)?;
        io_faults::hit(path, io_faults::Stage::AfterRename)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Test-only crash points: when the process was started with `MESHCA_FAULT_POINT=<name>` (or
/// `<name>@<n>`: the n-th time that point is reached), it aborts right there, as a crash would.
/// Compiled only with the `fault-injection` feature, which only the end-to-end test crate turns
/// on (so `cargo test --workspace` builds binaries with it; `cargo run --release --bin
/// meshca-server`, `cargo build -p meshca-server` and installs never do).
///
/// Points: `write:before-rename` (a temp file is written and synced, not yet renamed),
/// `commit:after-files` (new certificate and key files written, `state.json` not yet),
/// `commit:after-state` (`state.json` replaced, `bundle.pem` not yet), and in the server
/// `transition:after-commit` (committed, not yet published to the request path).
pub fn fault_point(name: &str) {
    #[cfg(feature = "fault-injection")]
    {
        use std::sync::atomic::{AtomicU32, Ordering};
        static HITS: AtomicU32 = AtomicU32::new(0);
        if let Ok(spec) = std::env::var("MESHCA_FAULT_POINT") {
            let (point, nth) = spec
                .split_once('@')
                .map_or((spec.as_str(), 1), |(p, n)| (p, n.parse().unwrap_or(1)));
            if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                eprintln!("meshca: fault point {spec}: aborting");
                std::process::abort();
            }
        }
    }
    let _ = name;
}

/// Injected write errors (test builds, feature `fault-injection`): a write of a file under a
/// given directory whose name ends with a given suffix fails with a given errno, at a given stage
/// of [`write_atomic`] (or of an append that calls [`io_faults::hit`]), until cleared. Scoped by
/// directory so that tests running in parallel in one process do not see each other's faults.
/// A child process takes one fault from `MESHCA_IO_FAULT=<suffix>:<write|after-rename>:<errno>`.
/// Without the feature every check is a no-op.
pub mod io_faults {
    use std::io;
    use std::path::Path;
    #[cfg(feature = "fault-injection")]
    use std::path::PathBuf;

    /// Where in a write the fault strikes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Stage {
        /// Before any byte is written (the temp file exists): ENOSPC, EIO.
        Write,
        /// After the rename made the new content visible (the directory's fsync fails).
        AfterRename,
    }

    #[cfg(feature = "fault-injection")]
    struct Fault {
        under: PathBuf,
        suffix: String,
        stage: Stage,
        errno: i32,
    }

    #[cfg(feature = "fault-injection")]
    static FAULTS: std::sync::Mutex<Vec<Fault>> = std::sync::Mutex::new(Vec::new());

    /// From now on, writes of files under `under` named `*suffix` fail at `stage` with `errno`.
    #[cfg(feature = "fault-injection")]
    pub fn inject(under: &Path, suffix: &str, stage: Stage, errno: i32) {
        FAULTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Fault {
                under: under.to_owned(),
                suffix: suffix.to_owned(),
                stage,
                errno,
            });
    }

    /// Clears every fault under `under`: the disk is healthy again.
    #[cfg(feature = "fault-injection")]
    pub fn clear(under: &Path) {
        FAULTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|f| !f.under.starts_with(under));
    }

    /// The injected error for a write of `path` at `stage`, if any.
    pub fn hit(path: &Path, stage: Stage) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let from_env = std::env::var("MESHCA_IO_FAULT").ok().and_then(|spec| {
                let mut it = spec.splitn(3, ':');
                let (suffix, at, errno) = (it.next()?, it.next()?, it.next()?.parse().ok()?);
                let at = match at {
                    "write" => Stage::Write,
                    "after-rename" => Stage::AfterRename,
                    _ => return None,
                };
                (at == stage && name.ends_with(suffix)).then_some(errno)
            });
            let injected = from_env.or_else(|| {
                FAULTS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|f| {
                        f.stage == stage && path.starts_with(&f.under) && name.ends_with(&f.suffix)
                    })
                    .map(|f| f.errno)
            });
            if let Some(errno) = injected {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        let _ = (path, stage);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::state::AnchorStatus;

    fn genesis() -> AuthorityState {
        AuthorityState::genesis(
            "cluster.local".parse().unwrap(),
            &Policy::default(),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn flat_round_trip_and_refusals() {
        let s = genesis();
        let flat = encode_flat(&s).unwrap();
        assert!(flat.contains_key(STATE_FILE));
        for k in flat.keys() {
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
                "{k} is not a valid Secret data key"
            );
        }
        let back = decode_flat("secret ns/x", &flat).unwrap().unwrap();
        assert_eq!(back.generation, s.generation);
        assert_eq!(back.anchors[0].cert, s.anchors[0].cert);
        assert_eq!(flat_generation(&flat), Some(s.generation));
        assert!(
            decode_flat("secret ns/x", &BTreeMap::new())
                .unwrap()
                .is_none()
        );

        // A key entry gone: corrupt, naming the entry.
        let mut missing = flat.clone();
        let key = missing
            .keys()
            .find(|k| k.starts_with("issuers.") && k.ends_with(".key"))
            .unwrap()
            .clone();
        missing.remove(&key);
        let e = decode_flat("secret ns/x", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&key) && e.contains("missing"), "{e}");
        // state.json gone while certificates remain: refuse, never "fresh".
        let mut headless = flat.clone();
        headless.remove(STATE_FILE);
        let e = decode_flat("secret ns/x", &headless)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to generate a new trust anchor"), "{e}");
        // A key swapped for another's: corrupt.
        let mut swapped = flat;
        let other = SecretKey::generate_p256()
            .unwrap()
            .to_pem()
            .as_bytes()
            .to_vec();
        swapped.insert(key.clone(), other);
        let e = decode_flat("secret ns/x", &swapped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn round_trip_with_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = FileStore::open(&dir).unwrap();
        assert!(store.load_sync().unwrap().is_none());
        let s = genesis();
        store.commit_sync(None, &s).unwrap();
        assert!(
            !dir.join(BUNDLE_FILE).exists(),
            "the bundle is the caller's to write"
        );
        store.write_bundle(&s).unwrap();
        let back = store.load_sync().unwrap().unwrap();
        assert_eq!(back.generation, s.generation);
        assert_eq!(
            back.active_issuer().unwrap().cert,
            s.active_issuer().unwrap().cert
        );
        assert_eq!(
            back.active_anchor().unwrap().cert,
            s.active_anchor().unwrap().cert
        );
        assert_eq!(mode(&dir), 0o700);
        let a = s.active_anchor().unwrap().cert.id();
        assert_eq!(mode(&dir.join(format!("anchors/{a}.key"))), 0o600);
        assert_eq!(mode(&dir.join("anchors")), 0o700);
        let bundle = fs::read_to_string(dir.join(BUNDLE_FILE)).unwrap();
        assert_eq!(bundle, s.active_anchor().unwrap().cert.pem());
    }

    #[test]
    fn stale_writer_gets_a_conflict() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let s = genesis();
        store.commit_sync(None, &s).unwrap();
        assert!(matches!(
            store.commit_sync(None, &s),
            Err(StoreError::Conflict { .. })
        ));
        let p = Policy::default();
        let s2 = s
            .prepare_issuer(
                &p,
                OffsetDateTime::now_utc(),
                s.active_anchor().unwrap().cert.id(),
            )
            .unwrap();
        store.commit_sync(Some(s.generation), &s2).unwrap();
        assert!(matches!(
            store.commit_sync(Some(s.generation), &s2),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn lost_state_file_is_never_taken_for_a_fresh_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let s = genesis();
        store.commit_sync(None, &s).unwrap();
        store.write_bundle(&s).unwrap();
        fs::remove_file(tmp.path().join(STATE_FILE)).unwrap();
        let e = store.load_sync().unwrap_err().to_string();
        assert!(
            e.contains("state.json: missing, but anchors, issuers, bundle.pem exist"),
            "{e}"
        );
        assert!(e.contains("refusing to generate a new trust anchor"), "{e}");
    }

    #[test]
    fn every_kind_of_corruption_names_the_file() {
        let s = genesis();
        let a = s.active_anchor().unwrap().cert.id().to_string();
        let i = s.active_issuer().unwrap().cert.id().to_string();
        let other = genesis();
        let other_key = other
            .active_anchor()
            .unwrap()
            .key
            .as_ref()
            .unwrap()
            .to_pem();
        type Damage = Box<dyn Fn(&Path)>;
        let cases: Vec<(String, Damage, &str)> = vec![
            (
                STATE_FILE.into(),
                Box::new(|d: &Path| fs::write(d.join(STATE_FILE), "{not json").unwrap()),
                "not valid state JSON",
            ),
            (
                format!("anchors/{a}.crt"),
                Box::new({
                    let a = a.clone();
                    move |d: &Path| {
                        fs::write(d.join(format!("anchors/{a}.crt")), "garbage").unwrap()
                    }
                }),
                "not PEM",
            ),
            (
                format!("anchors/{a}.key"),
                Box::new({
                    let a = a.clone();
                    move |d: &Path| fs::remove_file(d.join(format!("anchors/{a}.key"))).unwrap()
                }),
                "missing",
            ),
            (
                format!("issuers/{i}.key"),
                Box::new({
                    let i = i.clone();
                    let k = other_key.to_string();
                    move |d: &Path| fs::write(d.join(format!("issuers/{i}.key")), &k).unwrap()
                }),
                "does not belong",
            ),
            (
                format!("issuers/{i}.key"),
                Box::new({
                    let i = i.clone();
                    move |d: &Path| {
                        fs::set_permissions(
                            d.join(format!("issuers/{i}.key")),
                            fs::Permissions::from_mode(0o644),
                        )
                        .unwrap()
                    }
                }),
                "readable by group or others",
            ),
            (
                format!("issuers/{i}.crt"),
                Box::new({
                    let i = i.clone();
                    let c = other.active_issuer().unwrap().cert.pem();
                    move |d: &Path| fs::write(d.join(format!("issuers/{i}.crt")), &c).unwrap()
                }),
                "the file was changed",
            ),
        ];
        for (file, damage, want) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let store = FileStore::open(tmp.path()).unwrap();
            store.commit_sync(None, &s).unwrap();
            damage(tmp.path());
            let e = store.load_sync().unwrap_err().to_string();
            assert!(e.contains(&file), "{file}: {e}");
            assert!(e.contains(want), "{file}: want {want:?} in {e}");
        }
    }

    #[test]
    fn inconsistent_state_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        store.commit_sync(None, &genesis()).unwrap();
        let path = tmp.path().join(STATE_FILE);
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        v["anchors"][0]["status"] = "archived".into();
        fs::write(&path, v.to_string()).unwrap();
        let e = store.load_sync().unwrap_err().to_string();
        assert!(e.contains("state.json: inconsistent"), "{e}");
    }

    /// #15: keys that can never be used again are destroyed — an archived anchor's after its
    /// archival, a rolled-back one's too, an expired issuer's — each `key_retention` later, and
    /// the store deletes their files at the commit that drops them (certificates stay).
    #[test]
    fn retired_keys_are_destroyed_after_their_retention() {
        use crate::anchors::NewAnchor;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = FileStore::open(dir).unwrap();
        let p = Policy {
            key_retention: std::time::Duration::from_secs(3600),
            ..Policy::default()
        };
        let t0 = crate::clock::whole_seconds(OffsetDateTime::now_utc());
        let s = AuthorityState::genesis("cluster.local".parse().unwrap(), &p, t0).unwrap();
        store.commit_sync(None, &s).unwrap();
        let old = s.active_anchor().unwrap().cert.id().clone();
        let old_issuer = s.active_issuer().unwrap().cert.id().clone();
        let key_file = |sub: &str, id: &CertId| dir.join(format!("{sub}/{id}.key"));
        let mut s2 = s.stage_anchor(&p, t0, NewAnchor::Generate).unwrap();
        s2 = s2.activate_anchor(&p, None, t0, true).unwrap();
        let t1 = t0 + time::Duration::minutes(1);
        s2 = s2.finish_anchor(&p, None, t1, true).unwrap();
        store.commit_sync(Some(s.generation), &s2).unwrap();
        let archived = s2.anchors.iter().find(|a| a.cert.id() == &old).unwrap();
        assert_eq!(archived.status, AnchorStatus::Archived);
        assert_eq!(archived.archived, Some(t1));
        assert!(archived.key.is_some(), "kept during its retention");
        assert!(key_file("anchors", &old).exists());
        // Not before its retention ends.
        let t2 = t1 + time::Duration::minutes(59);
        assert!(s2.prune_expired_issuers(p.key_retention, t2).is_none());
        assert_eq!(
            s2.next_prune(p.key_retention),
            Some(t1 + time::Duration::hours(1))
        );
        let t3 = t1 + time::Duration::hours(1);
        let s3 = s2.prune_expired_issuers(p.key_retention, t3).unwrap();
        s3.check().unwrap();
        store.commit_sync(Some(s2.generation), &s3).unwrap();
        assert!(!key_file("anchors", &old).exists(), "anchor key destroyed");
        assert!(
            dir.join(format!("anchors/{old}.crt")).exists(),
            "its certificate stays"
        );
        let back = store.load_sync().unwrap().unwrap();
        let a = back.anchors.iter().find(|a| a.cert.id() == &old).unwrap();
        assert!(a.key.is_none());
        assert_eq!(a.archived, Some(t1), "archival time survives a reload");
        assert!(back.active_anchor().unwrap().key.is_some());
        // The old anchor's issuer, retired by the rotation, goes once expired + retention.
        assert!(key_file("issuers", &old_issuer).exists());
        let expiry = s.active_issuer().unwrap().cert.info.not_after;
        let s4 = back
            .prune_expired_issuers(p.key_retention, expiry + time::Duration::hours(1))
            .unwrap();
        store.commit_sync(Some(back.generation), &s4).unwrap();
        assert!(
            !key_file("issuers", &old_issuer).exists(),
            "issuer key destroyed"
        );
        for i in &s4.issuers {
            assert!(
                key_file("issuers", i.cert.id()).exists(),
                "live issuers keep theirs"
            );
        }
    }
}
