//! The authority state in one Secret (`[kubernetes] state_secret`, type Opaque, in meshca's own
//! namespace), in the flat form of [`rotator::store::encode_flat`]: `state.json` plus one entry
//! per certificate and private key.
//!
//! Every write is a create (first commit) or a replace carrying the `resourceVersion` the writer
//! last read, so the API server refuses it with 409 when anybody else wrote in between. A 409
//! becomes [`StoreError::Conflict`]: the authority re-reads the Secret and decides again from
//! what it finds (see `Authority::transition`); nothing is ever overwritten blind. A Secret
//! whose data does not decode refuses start-up naming the entry, exactly like a corrupt state
//! dir; a missing `state.json` next to certificates is never taken for "no authority yet".

use std::collections::BTreeMap;

use zeroize::Zeroize;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rotator::state::AuthorityState;
use rotator::store::{Store, StoreError, StoreFuture, decode_flat, encode_flat, flat_generation};

use super::is_conflict;

/// The authority state in a Secret.
pub struct KubeStore {
    api: Api<Secret>,
    name: String,
    origin: String,
    /// The generation and metadata (resourceVersion, others' labels and annotations) last read
    /// or written.
    seen: std::sync::Mutex<Option<(u64, ObjectMeta)>>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("secret", &self.origin)
            .finish_non_exhaustive()
    }
}

/// A copy of a Secret's data (private keys among them), zeroized when dropped.
pub struct SecretData(BTreeMap<String, Vec<u8>>);

impl std::ops::Deref for SecretData {
    type Target = BTreeMap<String, Vec<u8>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for SecretData {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

/// A Secret's data as plain bytes (a copy, zeroized when dropped).
pub fn secret_data(s: &Secret) -> SecretData {
    SecretData(
        s.data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
    )
}

/// A Secret this process holds (built to be written, or read back), whose data bytes are
/// zeroized when it is dropped: the copies of private keys meshca owns never linger in freed
/// memory. (What the Kubernetes client serializes on the way out is its own.)
pub struct Scrubbed(pub Secret);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        for v in self.0.data.iter_mut().flat_map(|d| d.values_mut()) {
            v.0.zeroize();
        }
    }
}

fn remote(what: &str, e: &kube::Error) -> StoreError {
    StoreError::Remote(format!("{what}: {e}"))
}

impl KubeStore {
    /// The Secret `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            origin: format!("secret {namespace}/{name}"),
            seen: Default::default(),
        }
    }

    /// Where the state lives, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The Secrets API and the name (for watching).
    pub fn api(&self) -> (&Api<Secret>, &str) {
        (&self.api, &self.name)
    }

    fn remember(&self, generation: u64, meta: &ObjectMeta) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = meta
            .resource_version
            .is_some()
            .then(|| (generation, meta.clone()));
    }

    /// Decodes a Secret seen on a watch (or a get) and remembers its resourceVersion.
    pub fn decode(&self, s: &Secret) -> Result<Option<AuthorityState>, StoreError> {
        let state = decode_flat(&self.origin, &secret_data(s))?;
        if let Some(st) = &state {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.as_ref().is_none_or(|(g, _)| *g <= st.generation) {
                *seen = s
                    .metadata
                    .resource_version
                    .is_some()
                    .then(|| (st.generation, s.metadata.clone()));
            }
        }
        Ok(state)
    }

    /// The committed state and the Secret's resourceVersion.
    pub async fn fetch(&self) -> Result<Option<AuthorityState>, StoreError> {
        match self.api.get_opt(&self.name).await {
            Ok(None) => Ok(None),
            Ok(Some(s)) => self.decode(&Scrubbed(s).0),
            Err(e) => Err(remote(&format!("reading {}", self.origin), &e)),
        }
    }

    async fn stored_generation(&self) -> Result<Option<(u64, ObjectMeta)>, StoreError> {
        match self.api.get_opt(&self.name).await {
            Ok(None) => Ok(None),
            Ok(Some(s)) => {
                let s = Scrubbed(s);
                Ok(Some((
                    flat_generation(&secret_data(&s.0)).unwrap_or(0),
                    s.0.metadata.clone(),
                )))
            }
            Err(e) => Err(remote(&format!("reading {}", self.origin), &e)),
        }
    }

    /// The Secret for `next`, over `base` (the metadata read: its resourceVersion makes the
    /// write conditional; labels and annotations others put there are kept).
    fn object(
        &self,
        next: &AuthorityState,
        base: Option<&ObjectMeta>,
    ) -> Result<Secret, StoreError> {
        let data = encode_flat(next)?
            .into_iter()
            .map(|(k, v)| (k, ByteString(v)))
            .collect();
        // Over what was read: its resourceVersion makes the write conditional.
        let mut metadata = base.cloned().unwrap_or_default();
        metadata.name = Some(self.name.clone());
        super::stamp(
            &mut metadata,
            ("meshca.io/generation", next.generation.to_string()),
        );
        Ok(Secret {
            metadata,
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        })
    }

    async fn conflict(&self, expected: Option<u64>) -> StoreError {
        let found = match self.stored_generation().await {
            Ok(g) => g.map_or(0, |(g, _)| g),
            Err(e) => return e,
        };
        StoreError::Conflict {
            expected: expected.unwrap_or(0),
            found,
        }
    }
}

impl Store for KubeStore {
    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn load(&self) -> StoreFuture<'_, Option<AuthorityState>> {
        Box::pin(self.fetch())
    }

    fn commit<'a>(&'a self, base: Option<u64>, next: &'a AuthorityState) -> StoreFuture<'a, ()> {
        Box::pin(self.commit_conditionally(base, next))
    }
}

impl KubeStore {
    /// A create (`base` None) or a replace carrying the resourceVersion of generation `base`.
    async fn commit_conditionally(
        &self,
        base: Option<u64>,
        next: &AuthorityState,
    ) -> Result<(), StoreError> {
        let pp = PostParams {
            field_manager: Some("meshca".into()),
            ..Default::default()
        };
        let written = match base {
            None => match self
                .api
                .create(&pp, &Scrubbed(self.object(next, None)?).0)
                .await
            {
                Ok(s) => Scrubbed(s),
                Err(e) if is_conflict(&e) => return Err(self.conflict(None).await),
                Err(e) => return Err(remote(&format!("creating {}", self.origin), &e)),
            },
            Some(b) => {
                let known = self
                    .seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .filter(|(g, _)| *g == b)
                    .map(|(_, m)| m);
                let meta = match known {
                    Some(m) => m,
                    None => match self.stored_generation().await? {
                        Some((g, m)) if g == b => m,
                        Some((g, _)) => {
                            return Err(StoreError::Conflict {
                                expected: b,
                                found: g,
                            });
                        }
                        None => {
                            return Err(StoreError::Conflict {
                                expected: b,
                                found: 0,
                            });
                        }
                    },
                };
                match self
                    .api
                    .replace(
                        &self.name,
                        &pp,
                        &Scrubbed(self.object(next, Some(&meta))?).0,
                    )
                    .await
                {
                    Ok(s) => Scrubbed(s),
                    Err(e) if is_conflict(&e) => return Err(self.conflict(Some(b)).await),
                    Err(e) => return Err(remote(&format!("writing {}", self.origin), &e)),
                }
            }
        };
        self.remember(next.generation, &written.0.metadata);
        Ok(())
    }
}
