//! An in-test Kubernetes API server: real HTTP on `127.0.0.1:0`, exactly the endpoints meshca
//! calls, with the semantics meshca relies on — `resourceVersion` on every object, 409 on a
//! stale replace or a duplicate create, label and `metadata.name` field selectors, watches that
//! replay from a resourceVersion and then stream, TokenReview with audiences. It is not a real
//! API server (no admission, no RBAC enforcement, no etcd): see tests/README.md for what only a
//! real cluster can confirm. Every call is recorded as (verb, resource, namespaced) so tests can
//! compare what meshca calls with what its RBAC grants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// What a token proves (TokenReview).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// `system:serviceaccount:<ns>:<sa>` or any user.
    pub username: String,
    /// Audiences the token was minted for.
    pub audiences: Vec<String>,
    /// `user.extra` of the answer (a bound token's `authentication.kubernetes.io/pod-name`,
    /// `node-name`).
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    tokens: HashMap<String, TokenInfo>,
    down: bool,
    blind: bool,
    calls: Vec<Call>,
    conflicts: u64,
    history: Vec<Event>,
}

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Call {
    /// Kubernetes verb: get, list, watch, create, update, delete.
    pub verb: String,
    /// Resource: secrets, configmaps, leases, namespaces, tokenreviews.
    pub resource: String,
    /// API group ("" for core).
    pub group: String,
    /// The namespace, empty for cluster-scoped or all-namespaces calls.
    pub namespace: String,
}

/// The running fake.
#[derive(Clone)]
pub struct KubeApi {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Event>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()
        })),
    )
        .into_response()
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "secrets" => ("v1", "Secret"),
        "configmaps" => ("v1", "ConfigMap"),
        "namespaces" => ("v1", "Namespace"),
        "leases" => ("coordination.k8s.io/v1", "Lease"),
        "pods" => ("v1", "Pod"),
        "poddisruptionbudgets" => ("policy/v1", "PodDisruptionBudget"),
        _ => ("v1", "Unknown"),
    }
}

fn labels_match(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    sel.split(',').all(|p| {
        let (k, v) = p
            .split_once("==")
            .or_else(|| p.split_once('='))
            .unwrap_or((p, ""));
        labels[k.trim()].as_str() == Some(v.trim())
    })
}

fn fields_match(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|p| match p.split_once('=') {
        Some(("metadata.name", v)) => obj["metadata"]["name"].as_str() == Some(v),
        Some(("metadata.namespace", v)) => obj["metadata"]["namespace"].as_str() == Some(v),
        _ => false,
    })
}

impl KubeApi {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        let (events, _) = broadcast::channel(4096);
        let api = Self {
            inner: Default::default(),
            events,
            url: format!("http://{addr}"),
            addr,
        };
        let app = axum::Router::new().fallback(handle).with_state(api.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        api
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the token [`jwt`]`(name)`.
    pub fn add_token(&self, name: &str, username: &str, audiences: &[&str]) {
        self.lock().tokens.insert(
            jwt(name),
            TokenInfo {
                username: username.to_owned(),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                extra: BTreeMap::new(),
            },
        );
    }

    /// Registers the token [`jwt`]`(name)` as a projected token bound to pod `pod` on `node`
    /// (what the API server says about such a token since Kubernetes 1.30; `node` `None`: an
    /// older one, which names the pod only).
    pub fn add_bound_token(
        &self,
        name: &str,
        username: &str,
        audiences: &[&str],
        pod: &str,
        node: Option<&str>,
    ) {
        let mut extra = BTreeMap::new();
        extra.insert(
            "authentication.kubernetes.io/pod-name".to_owned(),
            vec![pod.to_owned()],
        );
        if let Some(n) = node {
            extra.insert(
                "authentication.kubernetes.io/node-name".to_owned(),
                vec![n.to_owned()],
            );
        }
        self.lock().tokens.insert(
            jwt(name),
            TokenInfo {
                username: username.to_owned(),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                extra,
            },
        );
    }

    /// Creates or replaces pod `namespace/name` of ServiceAccount `sa`, on `node` (`None`: not
    /// scheduled yet), in `phase` — as the scheduler and kubelet would.
    pub fn put_pod(&self, namespace: &str, name: &str, node: Option<&str>, sa: &str, phase: &str) {
        self.put(
            "pods",
            namespace,
            name,
            json!({"metadata": {}, "spec": {"containers": [{"name": "app", "image": "app"}],
                "nodeName": node, "serviceAccountName": sa}, "status": {"phase": phase}}),
        );
    }

    /// Deletes an object (as another client would); false if there was none.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut g = self.lock();
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let Some(cur) = g.objects.get(&key).cloned() else {
            return false;
        };
        self.store(&mut g, key, cur, "DELETED");
        true
    }

    /// While `down`, every request answers 503.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Negative controls only: replaces ignore `resourceVersion` (a store without optimistic
    /// concurrency), so the last writer silently wins.
    pub fn set_ignore_resource_versions(&self, blind: bool) {
        self.lock().blind = blind;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The distinct calls so far.
    pub fn distinct_calls(&self) -> BTreeSet<Call> {
        self.lock().calls.iter().cloned().collect()
    }

    /// How many calls of `verb` on `resource`.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource)
            .count()
    }

    /// Every stored version of every object, oldest first: (namespace, name, object).
    pub fn history(&self) -> Vec<(String, String, Value)> {
        self.lock()
            .history
            .iter()
            .filter(|e| e.kind != "DELETED")
            .map(|e| {
                (
                    e.namespace.clone(),
                    e.object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    e.object.clone(),
                )
            })
            .collect()
    }

    /// How many 409s were answered.
    pub fn conflicts(&self) -> u64 {
        self.lock().conflicts
    }

    /// Creates or relabels a namespace.
    pub fn set_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}});
        let mut g = self.lock();
        let key = ("namespaces".to_owned(), String::new(), name.to_owned());
        let kind = if g.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.store(&mut g, key, obj, kind);
    }

    /// An object, if present.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A Secret's `data`, base64-decoded.
    pub fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
        use base64::Engine as _;
        let s = self.get("secrets", namespace, name)?;
        s["data"]
            .as_object()?
            .iter()
            .map(|(k, v)| {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str()?)
                    .ok()?;
                Some((k.clone(), b))
            })
            .collect()
    }

    /// All objects of `resource` (namespace, name, object).
    pub fn list(&self, resource: &str) -> Vec<(String, String, Value)> {
        self.lock()
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|((_, ns, n), v)| (ns.clone(), n.clone(), v.clone()))
            .collect()
    }

    /// Writes an object directly (as another client would), bumping its resourceVersion.
    pub fn put(&self, resource: &str, namespace: &str, name: &str, mut obj: Value) {
        let (api_version, kind) = kind_of(resource);
        obj["apiVersion"] = api_version.into();
        obj["kind"] = kind.into();
        obj["metadata"]["name"] = name.into();
        if !namespace.is_empty() {
            obj["metadata"]["namespace"] = namespace.into();
        }
        let mut g = self.lock();
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let ev = if g.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.store(&mut g, key, obj, ev);
    }

    fn store(
        &self,
        g: &mut Inner,
        key: (String, String, String),
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        g.rv += 1;
        obj["metadata"]["resourceVersion"] = g.rv.to_string().into();
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = format!("uid-{}", g.rv).into();
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        let ev = Event {
            rv: g.rv,
            resource: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            object: obj.clone(),
        };
        if kind == "DELETED" {
            g.objects.remove(&key);
        } else {
            g.objects.insert(key, obj.clone());
        }
        g.history.push(ev.clone());
        let _ = self.events.send(ev);
        obj
    }
}

async fn handle(
    State(api): State<KubeApi>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // (group, resource, namespace (None: cluster-wide or all), name)
    let (group, resource, ns, name): (&str, &str, Option<&str>, Option<&str>) =
        match segs.as_slice() {
            ["api", "v1", "namespaces"] => ("", "namespaces", None, None),
            ["api", "v1", "namespaces", n] => ("", "namespaces", None, Some(*n)),
            ["api", "v1", "namespaces", ns, r] => ("", *r, Some(*ns), None),
            ["api", "v1", "namespaces", ns, r, n] => ("", *r, Some(*ns), Some(*n)),
            ["api", "v1", r] => ("", *r, None, None),
            ["apis", g, "v1", "namespaces", ns, r] => (*g, *r, Some(*ns), None),
            ["apis", g, "v1", "namespaces", ns, r, n] => (*g, *r, Some(*ns), Some(*n)),
            ["apis", g, "v1", r] => (*g, *r, None, None),
            _ => return status(StatusCode::NOT_FOUND, "NotFound", "no such path"),
        };
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, name, watch) {
        (&Method::GET, Some(_), _) => "get",
        (&Method::GET, None, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, _, _) => "delete",
        _ => "other",
    };
    {
        let mut g = api.lock();
        g.calls.push(Call {
            verb: verb.into(),
            resource: resource.into(),
            group: group.into(),
            namespace: ns.unwrap_or_default().into(),
        });
        if g.down {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the API server is down (test)",
            );
        }
    }
    if resource == "tokenreviews" {
        return token_review(&api, &body);
    }
    if ![
        "secrets",
        "configmaps",
        "leases",
        "namespaces",
        "pods",
        "poddisruptionbudgets",
    ]
    .contains(&resource)
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "resource not served by the fake",
        );
    }
    let nskey = ns.unwrap_or_default().to_owned();
    match verb {
        "get" => match api.get(resource, &nskey, name.unwrap_or_default()) {
            Some(o) => axum::Json(o).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{resource} {:?} not found", name.unwrap_or_default()),
            ),
        },
        "list" => list(&api, resource, ns, &q),
        "watch" => watch_stream(&api, resource, ns.map(str::to_owned), &q),
        "create" => create(&api, resource, &nskey, &body),
        "update" => update(&api, resource, &nskey, name.unwrap_or_default(), &body),
        "delete" => delete(&api, resource, nskey, name.unwrap_or_default()),
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served by the fake",
        ),
    }
}

/// `list`: the objects of `resource` (in `ns`, or everywhere) matching the selectors.
fn list(api: &KubeApi, resource: &str, ns: Option<&str>, q: &HashMap<String, String>) -> Response {
    let nskey = ns.unwrap_or_default().to_owned();
    let g = api.lock();
    let items: Vec<Value> = g
        .objects
        .iter()
        .filter(|((r, n, _), o)| {
            r == resource
                && (ns.is_none() || *n == nskey)
                && labels_match(o, q.get("labelSelector").map(String::as_str))
                && fields_match(o, q.get("fieldSelector").map(String::as_str))
        })
        .map(|(_, o)| o.clone())
        .collect();
    let (av, kind) = kind_of(resource);
    axum::Json(json!({"apiVersion": av, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": g.rv.to_string()}, "items": items}))
    .into_response()
}

/// `create`: AlreadyExists when the name is taken.
fn create(api: &KubeApi, resource: &str, nskey: &str, body: &[u8]) -> Response {
    let nskey = nskey.to_owned();
    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
    };
    let Some(n) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name required",
        );
    };
    let mut g = api.lock();
    let key = (resource.to_owned(), nskey.clone(), n.clone());
    if g.objects.contains_key(&key) {
        g.conflicts += 1;
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{resource} {n:?} already exists"),
        );
    }
    if !nskey.is_empty() {
        obj["metadata"]["namespace"] = nskey.clone().into();
    }
    let (av, kind) = kind_of(resource);
    obj["apiVersion"] = av.into();
    obj["kind"] = kind.into();
    let stored = api.store(&mut g, key, obj, "ADDED");
    (StatusCode::CREATED, axum::Json(stored)).into_response()
}

/// `update`: a stale resourceVersion is a 409 Conflict (unless the test made the server blind).
fn update(api: &KubeApi, resource: &str, nskey: &str, name: &str, body: &[u8]) -> Response {
    let nskey = nskey.to_owned();
    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
    };
    let n = name.to_owned();
    let mut g = api.lock();
    let key = (resource.to_owned(), nskey.clone(), n.clone());
    let Some(cur) = g.objects.get(&key) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{resource} {n:?} not found"),
        );
    };
    let have = cur["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let uid = cur["metadata"]["uid"].clone();
    match obj["metadata"]["resourceVersion"].as_str() {
        Some(rv) if rv != have && !g.blind => {
            g.conflicts += 1;
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {resource} {n:?}: the object has been modified; please apply your changes to the latest version and try again"
                ),
            );
        }
        _ => {}
    }
    if !nskey.is_empty() {
        obj["metadata"]["namespace"] = nskey.clone().into();
    }
    obj["metadata"]["uid"] = uid;
    let (av, kind) = kind_of(resource);
    obj["apiVersion"] = av.into();
    obj["kind"] = kind.into();
    let stored = api.store(&mut g, key, obj, "MODIFIED");
    axum::Json(stored).into_response()
}

/// `delete`: the object goes, and watchers hear DELETED.
fn delete(api: &KubeApi, resource: &str, nskey: String, name: &str) -> Response {
    let n = name.to_owned();
    let mut g = api.lock();
    let key = (resource.to_owned(), nskey, n.clone());
    let Some(cur) = g.objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{resource} {n:?} not found"),
        );
    };
    let stored = api.store(&mut g, key, cur, "DELETED");
    axum::Json(stored).into_response()
}

fn token_review(api: &KubeApi, body: &[u8]) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
    };
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let info = api.lock().tokens.get(token).cloned();
    let status_v = match info {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) => {
            let both: Vec<&String> = if wanted.is_empty() {
                t.audiences.iter().collect()
            } else {
                wanted.iter().filter(|w| t.audiences.contains(w)).collect()
            };
            if both.is_empty() {
                json!({"authenticated": false,
                    "error": format!("token audiences {:?} is invalid for the target audiences {:?}", t.audiences, wanted)})
            } else {
                json!({"authenticated": true, "audiences": both,
                    "user": {"username": t.username, "uid": "u-1", "groups": ["system:serviceaccounts"],
                        "extra": t.extra}})
            }
        }
    };
    // Like the real API server: the spec comes back with the status (the token included).
    (
        StatusCode::CREATED,
        axum::Json(
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": null}, "spec": req["spec"], "status": status_v}),
        ),
    )
        .into_response()
}

fn watch_stream(
    api: &KubeApi,
    resource: &str,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let labels = q.get("labelSelector").cloned();
    let fields = q.get("fieldSelector").cloned();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64)
        .min(300);
    let resource = resource.to_owned();
    let matches = move |e: &Event| {
        e.resource == resource
            && ns.as_ref().is_none_or(|n| *n == e.namespace)
            && labels_match(&e.object, labels.as_deref())
            && fields_match(&e.object, fields.as_deref())
    };
    // Subscribe before reading the backlog so nothing falls between them.
    let mut rx = api.events.subscribe();
    let (backlog, last) = {
        let g = api.lock();
        let backlog: Vec<Event> = if from == 0 {
            g.objects
                .iter()
                .map(|((r, n, _), o)| Event {
                    rv: g.rv,
                    resource: r.clone(),
                    namespace: n.clone(),
                    kind: "ADDED",
                    object: o.clone(),
                })
                .filter(&matches)
                .collect()
        } else {
            g.history
                .iter()
                .filter(|e| e.rv > from)
                .filter(|e| matches(e))
                .cloned()
                .collect()
        };
        (backlog, g.rv)
    };
    let line = |e: &Event| {
        let mut s =
            serde_json::to_vec(&json!({"type": e.kind, "object": e.object})).unwrap_or_default();
        s.push(b'\n');
        Ok::<_, std::io::Error>(s)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let stream = async_stream(backlog.iter().map(line).collect(), move |tx| async move {
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tokio::time::sleep_until(deadline) => return,
            };
            match ev {
                Ok(e) if e.rv > last && matches(&e) => {
                    if tx.send(line(&e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "response",
            )
        })
}

/// A body stream: `first` lines, then whatever `more` sends.
fn async_stream<F, Fut>(
    first: Vec<Result<Vec<u8>, std::io::Error>>,
    more: F,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let fut = more(tx);
    tokio::spawn(fut);
    futures::stream::iter(first).chain(tokio_stream_from(rx))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

use futures::StreamExt as _;

/// A token shaped like a ServiceAccount JWT (header, claims, signature; base64url), named `name`.
/// The in-test API server knows tokens by their exact bytes, as the real one knows them by their
/// signature; meshca refuses anything that is not JWT-shaped before asking the API server.
pub fn jwt(name: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"in-test"}"#),
        b64(format!(r#"{{"iss":"kubernetes/serviceaccount","sub":"{name}"}}"#).as_bytes()),
        b64(name.as_bytes())
    )
}
