//! The follower: a replica that does not hold the rotation Lease still serves, and must serve
//! what the Lease holder commits. It watches the state Secret and adopts every newer generation
//! within moments ([`Authority::adopt`]); the authority itself knows nothing of Kubernetes.

use std::sync::Arc;

use futures::StreamExt as _;
use kube::api::{WatchEvent, WatchParams};
use tokio::sync::watch;

use super::store::KubeStore;
use crate::authority::Authority;

/// Follows the Secret: every state another replica commits is adopted within moments (a watch,
/// re-established with a full re-read whenever it ends or fails).
pub async fn follow(
    authority: Arc<Authority>,
    remote: Arc<KubeStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (api, name) = remote.api();
    loop {
        if let Err(e) = authority.resync().await {
            tracing::warn!(target: "meshca::store", "re-reading {}: {e}", remote.origin());
        }
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let stream = match api.watch(&wp, "0").await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "meshca::store", "watching {}: {e}; retrying", remote.origin());
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = shutdown.changed() => return,
            };
            match ev {
                Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                    match remote.decode(&super::store::Scrubbed(s).0) {
                        Ok(Some(theirs)) => {
                            if let Err(e) = authority.adopt(theirs).await {
                                tracing::error!(target: "meshca::store", "{} holds a state this replica cannot serve, keeping its own: {e}", remote.origin());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(target: "meshca::store", "{} does not decode, keeping the state this replica has: {e}", remote.origin())
                        }
                    }
                }
                Some(Ok(WatchEvent::Deleted(_))) => tracing::error!(
                    target: "meshca::store",
                    "{} was deleted; this replica keeps serving the state it has and will re-create nothing on its own",
                    remote.origin()
                ),
                Some(Ok(WatchEvent::Bookmark(_))) => {}
                Some(Ok(WatchEvent::Error(e))) => {
                    tracing::debug!(target: "meshca::store", "watch ended: {e}");
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(target: "meshca::store", "watch failed: {e}");
                    break;
                }
                None => break,
            }
        }
    }
}
