//! A PKCS#11 key store (the `cryptoki` crate): anchor and issuer keys generated inside a token —
//! SoftHSM2 in tests, a YubiHSM, a network HSM or a cloud HSM's PKCS#11 module in production —
//! as P-256 key pairs that are token objects, private, sensitive and not extractable. The state
//! records `pkcs11:token=<label>;id=<hex>`; every signature is made by the token (CKM_ECDSA over
//! a SHA-256 digest computed here).
//!
//! Sessions: a small pool, each behind its own lock, handed out round-robin, so concurrent
//! signatures do not queue on one session. One login (the user PIN) serves them all.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::keys::{KeyStore, REFERENCE_PREFIX, StoredKey};

/// DER of the P-256 curve's OID, as CKA_EC_PARAMS holds it.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Sessions in the pool: as many signatures at once as the server has cores to ask for them.
pub const SESSIONS: usize = 4;

/// A logged-in token.
pub struct Pkcs11Store {
    module: PathBuf,
    pool: Arc<Pool>,
}

/// The token's sessions, shared by the store and every key it hands out.
struct Pool {
    label: String,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    // Last: sessions close before the library is finalised.
    _ctx: Pkcs11,
}

impl std::fmt::Debug for Pkcs11Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
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
        let slot: Slot = found.ok_or_else(|| {
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
        })?;
        let mut sessions = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            sessions.push(
                ctx.open_rw_session(slot)
                    .map_err(|e| err(&format!("opening a session on token {label:?}"), e))?,
            );
        }
        let pin = AuthPin::from(pin.to_owned());
        match sessions[0].login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::PinIncorrect, _)) => {
                return Err(format!(
                    "token {label:?}: wrong PIN (keys.pkcs11_pin_file); nothing was changed"
                ));
            }
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => return Err(err(&format!("logging in to token {label:?}"), e)),
        }
        Ok(Arc::new(Self {
            module: module.to_owned(),
            pool: Arc::new(Pool {
                label: label.to_owned(),
                sessions: sessions.into_iter().map(Mutex::new).collect(),
                next: AtomicUsize::new(0),
                _ctx: ctx,
            }),
        }))
    }
}

impl Pool {
    /// Runs `f` on the next session of the pool.
    fn with_session<R>(&self, f: impl FnOnce(&Session) -> R) -> R {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        let s = self.sessions[i].lock().unwrap_or_else(|p| p.into_inner());
        f(&s)
    }

    fn reference(&self, id: &[u8]) -> String {
        format!(
            "{REFERENCE_PREFIX}token={};id={}",
            self.label,
            hex::encode(id)
        )
    }

    /// The public point of the public key object with `id`.
    fn point(s: &Session, id: &[u8]) -> Result<Vec<u8>, String> {
        let public = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.to_vec()),
            ])
            .map_err(|e| err("finding the public key", e))?;
        let h = public
            .first()
            .ok_or_else(|| "the token has the private key but not its public key".to_owned())?;
        let attrs = s
            .get_attributes(*h, &[AttributeType::EcPoint])
            .map_err(|e| err("reading the public key", e))?;
        let Some(Attribute::EcPoint(p)) = attrs.into_iter().next() else {
            return Err("the public key has no CKA_EC_POINT".into());
        };
        // CKA_EC_POINT is a DER OCTET STRING around the point (some modules give it bare).
        Ok(match p.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
            _ => p,
        })
    }
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
                .map_err(|e| {
                    err(
                        &format!(
                            "generating a P-256 key in token {:?} (is it full?)",
                            pool.label
                        ),
                        e,
                    )
                })?;
            Ok::<_, String>((private, Pool::point(s, &id)?))
        })?;
        Ok(Arc::new(TokenKey {
            pool: pool.clone(),
            id: id.to_vec(),
            handle,
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
        let (handle, point) = pool.with_session(|s| {
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Id(id.clone()),
                ])
                .map_err(|e| err("finding a key", e))?;
            let h = *found.first().ok_or_else(|| {
                format!(
                    "token {token:?} has no key with id {} (the state names it: was the token re-initialised, \
                     or is this the wrong token?)",
                    hex::encode(&id)
                )
            })?;
            Ok::<_, String>((h, Pool::point(s, &id)?))
        })?;
        Ok(Arc::new(TokenKey {
            pool: pool.clone(),
            id,
            handle,
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
}

/// A key in the token.
struct TokenKey {
    pool: Arc<Pool>,
    id: Vec<u8>,
    handle: ObjectHandle,
    point: Vec<u8>,
}

impl StoredKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let raw = self
            .pool
            .with_session(|s| s.sign(&Mechanism::Ecdsa, self.handle, digest.as_ref()))
            .map_err(|e| err("signing in the token", e))?;
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
                    .map_err(|e| err("finding a key to destroy", e))?
                {
                    s.destroy_object(h)
                        .map_err(|e| err("destroying a key", e))?;
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
