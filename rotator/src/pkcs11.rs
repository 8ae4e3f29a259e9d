//! A PKCS#11 key store (the `cryptoki` crate): anchor and issuer keys generated inside a token —
//! SoftHSM2 in tests, a YubiHSM, a network HSM or a cloud HSM's PKCS#11 module in production —
//! as P-256 key pairs that are token objects, private, sensitive and not extractable. The state
//! records `pkcs11:token=<label>;id=<hex>`; every signature is made by the token (CKM_ECDSA over
//! a SHA-256 digest computed here).
//!
//! Sessions: a small pool, each behind its own lock, handed out round-robin, so concurrent
//! signatures do not queue on one session. One login (the user PIN) serves them all.
//!
//! A lost token (the module answers that the session, the login or the device is gone: a network
//! HSM that restarted, a USB token pulled) takes the store *down*: every call fails at once with
//! the reason — the server answers `UNAVAILABLE` and `/readyz` says why — while one thread
//! reconnects with exponential backoff ([`RECONNECT_FIRST`] doubling to [`RECONNECT_MAX`], ±20 %
//! jitter): find the token by its label again, open the sessions, log in. Keys are found again
//! by their ids (object handles do not survive a reconnect). A wrong PIN on reconnect is not
//! retried: a token locks its user after a few wrong PINs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::keys::{Backend, KeyStore, KeysConfig, REFERENCE_PREFIX, StoredKey};

/// DER of the P-256 curve's OID, as CKA_EC_PARAMS holds it.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Sessions in the pool: as many signatures at once as the server has cores to ask for them.
pub const SESSIONS: usize = 4;

/// The first reconnect attempt's delay after the token was lost.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(200);
/// The longest delay between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// A logged-in token.
pub struct Pkcs11Store {
    module: PathBuf,
    pool: Arc<Pool>,
}

/// The token's sessions, shared by the store and every key it hands out.
struct Pool {
    label: String,
    pin: AuthPin,
    /// `None` while the token is lost.
    sessions: Vec<Mutex<Option<Session>>>,
    next: AtomicUsize,
    /// Bumped by every reconnect: object handles found before it are stale.
    epoch: AtomicU64,
    /// Why the store is down, while it is.
    down: Mutex<Option<Down>>,
    reconnecting: AtomicBool,
    // Last: sessions close before the library is finalised.
    ctx: Pkcs11,
}

/// The store is down: since when, why, and how reconnecting goes.
struct Down {
    since: std::time::SystemTime,
    cause: String,
    attempts: u32,
    last_attempt: Option<String>,
    next_attempt: Option<Instant>,
}

impl std::fmt::Debug for Pkcs11Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// A failed operation on the token.
enum OpError {
    /// The module's answer to `.0`.
    Ck(&'static str, CkError),
    /// Anything else (said in full).
    Other(String),
}

impl From<String> for OpError {
    fn from(s: String) -> Self {
        Self::Other(s)
    }
}

/// Whether the module's answer means the session, the login or the device is gone (reconnect),
/// rather than a refusal of this one call.
fn is_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::SlotIdInvalid
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

/// `CKR_…` answers by their short name (`SessionHandleInvalid`), the rest as cryptoki says them.
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: CKR_{rv:?}"),
        other => other.to_string(),
    }
}

/// The slot holding the token labelled `label`, or which tokens there are.
fn find_slot(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot, String> {
    let mut labels = Vec::new();
    let mut found = None;
    for slot in ctx
        .get_slots_with_token()
        .map_err(|e| err("listing slots", e))?
    {
        let l = ctx
            .get_token_info(slot)
            .map_err(|e| err("token info", e))?
            .label()
            .trim()
            .to_owned();
        if l == label {
            found = Some(slot);
        }
        labels.push(l);
    }
    found.ok_or_else(|| {
        format!(
            "no PKCS#11 token labelled {label:?} in {} (tokens: {})",
            module.display(),
            if labels.is_empty() {
                "none".to_owned()
            } else {
                labels
                    .iter()
                    .map(|l| format!("{l:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    })
}

/// Why a login failed, and whether trying again could lock the token.
enum LoginError {
    WrongPin(String),
    Other(String),
}

/// `SESSIONS` read/write sessions on `slot`, logged in as the user.
fn open_sessions(
    ctx: &Pkcs11,
    slot: Slot,
    label: &str,
    pin: &AuthPin,
) -> Result<Vec<Session>, LoginError> {
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(ctx.open_rw_session(slot).map_err(|e| {
            LoginError::Other(err(
                &format!("opening a session on token {label:?}"),
                short(&e),
            ))
        })?);
    }
    match sessions[0].login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => {
            return Err(LoginError::WrongPin(format!(
                "token {label:?}: wrong PIN (keys.pkcs11_pin_file)"
            )));
        }
        Err(e) => {
            return Err(LoginError::Other(err(
                &format!("logging in to token {label:?}"),
                short(&e),
            )));
        }
    }
    fault_hook(&sessions[0]);
    // The login is the token's, shared by every session: check that it held.
    let state = sessions[0]
        .get_session_info()
        .map_err(|e| LoginError::Other(err("reading the session's state", short(&e))))?
        .session_state();
    if !matches!(state, SessionState::RwUser) {
        return Err(LoginError::Other(format!(
            "token {label:?}: logged in, but the session is {state:?} (the token did not keep the login)"
        )));
    }
    Ok(sessions)
}

/// Test builds (feature `fault-injection`): while the file `MESHCA_FAULT_PKCS11_LOGOUT` names
/// exists, every use of a session first logs the token out (C_Logout), as an HSM that restarted
/// forgets its login: the module's own answers then drive the store down and keep reconnects
/// failing. Without the feature, nothing.
fn fault_hook(s: &Session) {
    #[cfg(feature = "fault-injection")]
    if let Some(p) = std::env::var_os("MESHCA_FAULT_PKCS11_LOGOUT")
        && Path::new(&p).exists()
    {
        let _ = s.logout();
    }
    let _ = s;
}

/// Loads `module` as a PKCS#11 library (`dlopen` and `C_GetFunctionList`, no `C_Initialize`)
/// and lets it go: whether it is one, before anything is written.
pub fn load_module(module: &Path) -> Result<(), String> {
    if !module.exists() {
        return Err("no such file".into());
    }
    Pkcs11::new(module)
        .map(drop)
        .map_err(|e| format!("not a loadable PKCS#11 module: {e}"))
}

impl Pkcs11Store {
    /// Loads `module`, finds the token labelled `label` and logs in with `pin`, or says which of
    /// these failed (module not found, no such token — naming the ones there are —, wrong PIN).
    pub fn open(module: &Path, label: &str, pin: &str) -> Result<Arc<Self>, String> {
        if !module.exists() {
            return Err(format!(
                "PKCS#11 module {}: no such file (keys.pkcs11_module)",
                module.display()
            ));
        }
        let ctx = Pkcs11::new(module)
            .map_err(|e| err(&format!("loading PKCS#11 module {}", module.display()), e))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| err("C_Initialize", e))?;
        let slot = find_slot(&ctx, module, label)?;
        let pin = AuthPin::from(pin.to_owned());
        let sessions = open_sessions(&ctx, slot, label, &pin).map_err(|e| match e {
            LoginError::WrongPin(m) => format!("{m}; nothing was changed"),
            LoginError::Other(m) => m,
        })?;
        Ok(Arc::new(Self {
            module: module.to_owned(),
            pool: Arc::new(Pool {
                label: label.to_owned(),
                pin,
                sessions: sessions.into_iter().map(|s| Mutex::new(Some(s))).collect(),
                next: AtomicUsize::new(0),
                epoch: AtomicU64::new(0),
                down: Mutex::new(None),
                reconnecting: AtomicBool::new(false),
                ctx,
            }),
        }))
    }

    /// Test builds: logs the token out now, as a restarted HSM would (the next call finds the
    /// store lost and it reconnects).
    #[cfg(feature = "fault-injection")]
    pub fn lose_login(&self) {
        if let Some(s) = self.pool.sessions[0]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.logout();
        }
    }
}

impl Pool {
    /// Runs `f` on the next session of the pool; when the module answers that the token is
    /// lost, takes the store down and starts reconnecting.
    fn with_session<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&Session) -> Result<R, OpError>,
    ) -> Result<R, String> {
        self.health()?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        let guard = self.sessions[i].lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = guard.as_ref() else {
            drop(guard);
            return Err(self
                .health()
                .err()
                .unwrap_or_else(|| format!("token {:?}: reconnecting", self.label)));
        };
        fault_hook(s);
        match f(s) {
            Ok(r) => Ok(r),
            Err(OpError::Other(m)) => Err(m),
            Err(OpError::Ck(what, e)) if is_lost(&e) => {
                drop(guard);
                let cause = format!("{what}: {}", short(&e));
                self.lost(&cause);
                Err(format!(
                    "token {:?} lost ({cause}); reconnecting",
                    self.label
                ))
            }
            Err(OpError::Ck(what, e)) => Err(err(what, short(&e))),
        }
    }

    /// `Ok` while the token is reachable, else since when and why not.
    fn health(&self) -> Result<(), String> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = down.as_ref() else {
            return Ok(());
        };
        let mut m = format!(
            "token {:?} unreachable since {} ({})",
            self.label,
            crate::clock::rfc3339(time::OffsetDateTime::from(d.since)),
            d.cause
        );
        if let Some(last) = &d.last_attempt {
            m.push_str(&format!(
                "; reconnect attempt {} failed: {last}",
                d.attempts
            ));
        }
        match d.next_attempt {
            Some(at) => m.push_str(&format!(
                "; next attempt in {:.1} s",
                at.saturating_duration_since(Instant::now()).as_secs_f64()
            )),
            None if d.attempts > 0 => m.push_str("; not retried: restart meshca once fixed"),
            None => {}
        }
        Err(m)
    }

    /// The token is lost: down with `cause`, and one thread reconnecting.
    fn lost(self: &Arc<Self>, cause: &str) {
        {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            if down.is_some() {
                // Already down: a reconnect is under way, or was given up (a wrong PIN).
                return;
            }
            eprintln!(
                "meshca: PKCS#11 token {:?} lost: {cause}; reconnecting",
                self.label
            );
            *down = Some(Down {
                since: std::time::SystemTime::now(),
                cause: cause.to_owned(),
                attempts: 0,
                last_attempt: None,
                next_attempt: Some(Instant::now() + RECONNECT_FIRST),
            });
        }
        if self.reconnecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("meshca-pkcs11-reconnect".into())
            .spawn(move || pool.reconnect_loop());
        if let Err(e) = spawned {
            self.reconnecting.store(false, Ordering::SeqCst);
            eprintln!("meshca: cannot start the PKCS#11 reconnect thread: {e}");
        }
    }

    /// Reconnects with backoff until it succeeds or the PIN is refused.
    fn reconnect_loop(self: Arc<Self>) {
        let mut delay = RECONNECT_FIRST;
        loop {
            std::thread::sleep(jitter(delay));
            let outcome = self.reconnect();
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            let Some(d) = down.as_mut() else { break };
            d.attempts += 1;
            match outcome {
                Ok(()) => {
                    eprintln!(
                        "meshca: PKCS#11 token {:?} reconnected after {} attempt(s)",
                        self.label, d.attempts
                    );
                    *down = None;
                    break;
                }
                Err(LoginError::WrongPin(m)) => {
                    eprintln!(
                        "meshca: PKCS#11 reconnect: {m}: not retried (a token locks its user after a few wrong PINs)"
                    );
                    d.last_attempt = Some(m);
                    d.next_attempt = None;
                    break;
                }
                Err(LoginError::Other(m)) => {
                    delay = (delay * 2).min(RECONNECT_MAX);
                    d.last_attempt = Some(m);
                    d.next_attempt = Some(Instant::now() + delay);
                }
            }
        }
        self.reconnecting.store(false, Ordering::SeqCst);
    }

    /// One attempt: the token by its label, fresh sessions, the login; then the pool uses them.
    fn reconnect(&self) -> Result<(), LoginError> {
        // The old sessions go first (closing them may fail: they are lost anyway).
        for s in &self.sessions {
            drop(s.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
        let slot = find_slot(&self.ctx, Path::new("the module"), &self.label)
            .map_err(LoginError::Other)?;
        let fresh = open_sessions(&self.ctx, slot, &self.label, &self.pin)?;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for (cell, s) in self.sessions.iter().zip(fresh) {
            *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        }
        Ok(())
    }

    fn reference(&self, id: &[u8]) -> String {
        format!(
            "{REFERENCE_PREFIX}token={};id={}",
            self.label,
            hex::encode(id)
        )
    }

    /// The private key object with `id`.
    fn private_key(s: &Session, id: &[u8]) -> Result<Option<ObjectHandle>, OpError> {
        Ok(s.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(|e| OpError::Ck("finding a key", e))?
        .first()
        .copied())
    }

    /// The public point of the public key object with `id`.
    fn point(s: &Session, id: &[u8]) -> Result<Vec<u8>, OpError> {
        let public = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.to_vec()),
            ])
            .map_err(|e| OpError::Ck("finding the public key", e))?;
        let h = public
            .first()
            .ok_or_else(|| "the token has the private key but not its public key".to_owned())?;
        let attrs = s
            .get_attributes(*h, &[AttributeType::EcPoint])
            .map_err(|e| OpError::Ck("reading the public key", e))?;
        let Some(Attribute::EcPoint(p)) = attrs.into_iter().next() else {
            return Err("the public key has no CKA_EC_POINT".to_owned().into());
        };
        // CKA_EC_POINT is a DER OCTET STRING around the point (some modules give it bare).
        Ok(match p.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
            _ => p,
        })
    }
}

/// `d` ± 20 %.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    if crate::pki::random_bytes(&mut b).is_err() {
        return d;
    }
    let f = 0.8 + 0.4 * f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(f)
}

impl KeyStore for Pkcs11Store {
    fn generate(&self) -> Result<Arc<dyn StoredKey>, String> {
        let pool = &self.pool;
        let mut id = [0u8; 16];
        crate::pki::random_bytes(&mut id).map_err(|e| e.to_string())?;
        let label = format!("meshca-{}", hex::encode(&id[..4]));
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.clone().into_bytes()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.into_bytes()),
        ];
        let (handle, point) = pool.with_session(|s| {
            let (_, private) = s
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                .map_err(|e| match e {
                    CkError::Pkcs11(RvError::DeviceMemory, _) => OpError::Other(format!(
                        "generating a P-256 key in token {:?}: the token is full (CKR_DEVICE_MEMORY): \
                         free room in it (retired keys are destroyed as they expire)",
                        pool.label
                    )),
                    e if is_lost(&e) => OpError::Ck("generating a key", e),
                    e => OpError::Other(format!(
                        "generating a P-256 key in token {:?} failed (is it full?): {}",
                        pool.label,
                        short(&e)
                    )),
                })?;
            Ok((private, Pool::point(s, &id)?))
        })?;
        Ok(Arc::new(TokenKey {
            pool: pool.clone(),
            id: id.to_vec(),
            handle: Mutex::new((pool.epoch.load(Ordering::SeqCst), handle)),
            point,
        }))
    }

    fn find(&self, reference: &str) -> Result<Arc<dyn StoredKey>, String> {
        let rest = reference
            .strip_prefix(REFERENCE_PREFIX)
            .ok_or_else(|| format!("{reference:?} is not a PKCS#11 key reference"))?;
        let mut token = None;
        let mut id = None;
        for part in rest.trim().split(';') {
            match part.split_once('=') {
                Some(("token", v)) => token = Some(v),
                Some(("id", v)) => id = hex::decode(v).ok(),
                _ => {}
            }
        }
        let (Some(token), Some(id)) = (token, id) else {
            return Err(format!(
                "{reference:?}: expected pkcs11:token=<label>;id=<hex>"
            ));
        };
        let pool = &self.pool;
        if token != pool.label {
            return Err(format!(
                "the state names a key in token {token:?}, but keys.pkcs11_token_label is {:?}",
                pool.label
            ));
        }
        let epoch = pool.epoch.load(Ordering::SeqCst);
        let (handle, point) = pool.with_session(|s| {
            let h = Pool::private_key(s, &id)?.ok_or_else(|| {
                format!(
                    "token {token:?} has no key with id {} (the state names it: was the token re-initialised, \
                     or is this the wrong token?)",
                    hex::encode(&id)
                )
            })?;
            Ok((h, Pool::point(s, &id)?))
        })?;
        Ok(Arc::new(TokenKey {
            pool: pool.clone(),
            id,
            handle: Mutex::new((epoch, handle)),
            point,
        }))
    }

    fn owns(&self, reference: &str) -> bool {
        reference.starts_with(REFERENCE_PREFIX)
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 token {:?} ({})",
            self.pool.label,
            self.module.display()
        )
    }

    fn health(&self) -> Result<(), String> {
        self.pool.health()
    }
}

/// A key in the token.
struct TokenKey {
    pool: Arc<Pool>,
    id: Vec<u8>,
    /// Its handle, and the pool's epoch it was found in.
    handle: Mutex<(u64, ObjectHandle)>,
    point: Vec<u8>,
}

impl TokenKey {
    /// The key's handle in the current epoch (found again by id after a reconnect).
    fn handle(&self, s: &Session) -> Result<ObjectHandle, OpError> {
        let epoch = self.pool.epoch.load(Ordering::SeqCst);
        let mut cached = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != epoch {
            let h = Pool::private_key(s, &self.id)?.ok_or_else(|| {
                format!(
                    "token {:?} no longer has the key {} (after a reconnect)",
                    self.pool.label,
                    hex::encode(&self.id)
                )
            })?;
            *cached = (epoch, h);
        }
        Ok(cached.1)
    }
}

impl StoredKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let raw = self.pool.with_session(|s| {
            s.sign(&Mechanism::Ecdsa, self.handle(s)?, digest.as_ref())
                .map_err(|e| OpError::Ck("signing in the token", e))
        })?;
        der_signature(&raw)
    }

    fn public_point(&self) -> &[u8] {
        &self.point
    }

    fn reference(&self) -> String {
        self.pool.reference(&self.id)
    }

    fn destroy(&self) -> Result<(), String> {
        self.pool.with_session(|s| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                for h in s
                    .find_objects(&[Attribute::Class(class), Attribute::Id(self.id.clone())])
                    .map_err(|e| OpError::Ck("finding a key to destroy", e))?
                {
                    s.destroy_object(h)
                        .map_err(|e| OpError::Ck("destroying a key", e))?;
                }
            }
            Ok(())
        })
    }
}

/// PKCS#11's raw `r || s` as the DER `ECDSA-Sig-Value` X.509 carries.
fn der_signature(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.len() != 64 {
        return Err(format!(
            "the token returned a {}-byte ECDSA signature, expected 64",
            raw.len()
        ));
    }
    let int = |b: &[u8]| {
        let b = &b[b.iter().take_while(|x| **x == 0).count().min(31)..];
        let mut v = Vec::with_capacity(b.len() + 3);
        v.push(0x02);
        if b[0] & 0x80 != 0 {
            v.push(u8::try_from(b.len() + 1).unwrap_or(0));
            v.push(0);
        } else {
            v.push(u8::try_from(b.len()).unwrap_or(0));
        }
        v.extend_from_slice(b);
        v
    };
    let (r, s) = (int(&raw[..32]), int(&raw[32..]));
    let mut out = vec![0x30, u8::try_from(r.len() + s.len()).unwrap_or(0)];
    out.extend(r);
    out.extend(s);
    Ok(out)
}

/// Checks what can be checked of `[keys]` before anything starts, as (setting, value, reason): with
/// `pkcs11`, every setting given, the module a loadable PKCS#11 library, the PIN file
/// readable. (The token and the PIN are tried when the key store opens.)
pub fn check_config(cfg: &KeysConfig) -> Result<(), (&'static str, String, String)> {
    if cfg.backend == Backend::File {
        return Ok(());
    }
    let shown = |p: &std::path::Path| p.display().to_string();
    for (name, value, empty) in [
        (
            "keys.pkcs11_module",
            shown(&cfg.pkcs11_module),
            cfg.pkcs11_module.as_os_str().is_empty(),
        ),
        (
            "keys.pkcs11_token_label",
            cfg.pkcs11_token_label.clone(),
            cfg.pkcs11_token_label.is_empty(),
        ),
        (
            "keys.pkcs11_pin_file",
            shown(&cfg.pkcs11_pin_file),
            cfg.pkcs11_pin_file.as_os_str().is_empty(),
        ),
    ] {
        if empty {
            return Err((
                name,
                value,
                "must be set with keys.backend = \"pkcs11\"".into(),
            ));
        }
    }
    load_module(&cfg.pkcs11_module)
        .map_err(|reason| ("keys.pkcs11_module", shown(&cfg.pkcs11_module), reason))?;
    std::fs::File::open(&cfg.pkcs11_pin_file).map_err(|e| {
        (
            "keys.pkcs11_pin_file",
            shown(&cfg.pkcs11_pin_file),
            e.to_string(),
        )
    })?;
    Ok(())
}

/// Opens the key store `[keys]` configures (`None` for the file backend), or says what is wrong:
/// a setting missing, the PIN file unreadable, the module, the token or the PIN.
pub fn open_configured(cfg: &KeysConfig) -> Result<Option<Arc<dyn KeyStore>>, String> {
    if cfg.backend == Backend::File {
        return Ok(None);
    }
    check_config(cfg).map_err(|(name, value, reason)| format!("{name} {value}: {reason}"))?;
    let pin =
        zeroize::Zeroizing::new(std::fs::read_to_string(&cfg.pkcs11_pin_file).map_err(|e| {
            format!(
                "keys.pkcs11_pin_file {}: {e}",
                cfg.pkcs11_pin_file.display()
            )
        })?);
    let store = Pkcs11Store::open(&cfg.pkcs11_module, &cfg.pkcs11_token_label, pin.trim_end())?;
    Ok(Some(store))
}
