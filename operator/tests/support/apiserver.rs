//! A small in-process Kubernetes API server double: enough of the REST API for the
//! controllers to run through a real `kube::Client`.
//!
//! Serves, for any resource path (`/api/v1/...` and `/apis/<group>/<version>/...`,
//! namespaced or across namespaces): list, watch (streamed from a resource version),
//! get, create, patch (server-side apply, JSON merge patch, JSON patch) of the object
//! and of its `/status`, and delete with finalizers (a deletion timestamp until the
//! last finalizer goes). Every write gets a new resource version; `generation` moves
//! when anything but status or metadata changes. Reads that ask for
//! `PartialObjectMetadata` (kube's `Api<PartialObjectMeta<K>>`) get metadata only.
//!
//! Server-side apply keeps, per field manager and subresource, the set of fields that
//! manager applied (in `metadata.managedFields`, as `FieldsV1`): an apply sets the
//! fields it carries and removes those the same manager applied last time and leaves
//! out now, as the API server does. Lists are atomic (replaced whole).
//!
//! It records every request (verb, collection, whether metadata only, and the
//! `x-nexo-client` header of [`ApiServer::operator_client`]), so tests can say what
//! the operator asked for, and can make status writes of a collection fail.
//!
//! Simplifications, none of which the controllers rely on: server-side apply has no
//! conflicts between managers and no list merge keys, selectors are ignored, there is
//! no admission (schema, CEL), no garbage collection of owned objects and no kubelet
//! (tests set a StatefulSet's status themselves).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Which collection an object belongs to: `group/plural` (`""` for core).
type Collection = String;

#[derive(Clone, Debug)]
struct WatchEvent {
    collection: Collection,
    namespace: Option<String>,
    resource_version: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// (collection, namespace, name) → object.
    objects: BTreeMap<(Collection, String, String), Value>,
    /// Every event, so a watch can resume from any resource version.
    history: Vec<WatchEvent>,
    /// Every request served, in order.
    requests: Vec<Request>,
    /// Collections whose status writes fail (a stand-in for an API server in trouble).
    failing_status: Vec<Collection>,
}

/// One request the double served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The `x-nexo-client` header (`operator` for [`ApiServer::operator_client`]).
    pub client: Option<String>,
    /// `list`, `watch`, `get`, `create`, `patch` or `delete`.
    pub verb: &'static str,
    /// `group/plural`, `""` for core: `"nexo.dev/agents"`, `"/secrets"`.
    pub collection: String,
    /// The object's name, for requests of one object.
    pub name: Option<String>,
    /// It asked for `PartialObjectMetadata` (metadata only).
    pub metadata_only: bool,
}

/// Header [`ApiServer::operator_client`] sends, so requests of the operator can be
/// told from the test's own.
const CLIENT_HEADER: &str = "x-nexo-client";

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<WatchEvent>,
}

/// A running double.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Shared,
}

impl ApiServer {
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            store: Arc::default(),
            events,
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, app).into_future());
        Self { addr, shared }
    }

    /// A client talking to this double.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A client for the operator: its requests are recorded as `client: "operator"`.
    pub fn operator_client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.headers.push((
            axum::http::HeaderName::from_static(CLIENT_HEADER),
            axum::http::HeaderValue::from_static("operator"),
        ));
        kube::Client::try_from(config).unwrap()
    }

    /// The requests the operator's client made so far.
    pub fn operator_requests(&self) -> Vec<Request> {
        let store = self.shared.store.lock().unwrap();
        store
            .requests
            .iter()
            .filter(|r| r.client.as_deref() == Some("operator"))
            .cloned()
            .collect()
    }

    /// From now on, writes of the status of objects of `collection` fail with 500.
    pub fn fail_status_writes(&self, collection: &str) {
        let mut store = self.shared.store.lock().unwrap();
        store.failing_status.push(collection.to_owned());
    }

    /// The stored object, as the API server holds it (all fields, JSON).
    pub fn object(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        store.objects.get(&key).cloned()
    }

    /// Number of objects in a collection (`"apps/statefulsets"`, `"/configmaps"`).
    pub fn count(&self, collection: &str) -> usize {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .keys()
            .filter(|(c, _, _)| c == collection)
            .count()
    }
}

/// Parsed resource path.
struct Target {
    collection: Collection,
    api_version: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some(name.to_string()), false),
        [plural, name, "status"] => (*plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        collection: format!("{group}/{plural}"),
        api_version: if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        },
        namespace,
        name,
        status,
    })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(target) = parse(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {}", uri.path()),
        );
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (&method, &target.name) {
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    };
    // kube asks `application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    let metadata_only = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    shared.store.lock().unwrap().requests.push(Request {
        client: headers
            .get(CLIENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        verb,
        collection: target.collection.clone(),
        name: target.name.clone(),
        metadata_only,
    });
    let shown = move |object: Value| {
        if metadata_only {
            metadata_of(&object)
        } else {
            object
        }
    };
    match (method, &target.name) {
        (Method::GET, None) if watching => watch(&shared, &target, &query, shown),
        (Method::GET, None) => list(&shared, &target, shown),
        (Method::GET, Some(name)) => match get(&shared, &target, name) {
            Some(object) => axum::Json(shown(object)).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} `{name}` not found", target.collection),
            ),
        },
        (Method::POST, None) => {
            let Ok(object) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid JSON".into());
            };
            create(&shared, &target, object)
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let manager = query.get("fieldManager").map(String::as_str);
            patch(&shared, &target, name, &content_type, manager, &body)
        }
        (Method::DELETE, Some(name)) => delete(&shared, &target, name),
        (method, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} not served"),
        ),
    }
}

fn key(target: &Target, name: &str) -> (Collection, String, String) {
    (
        target.collection.clone(),
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    )
}

fn get(shared: &Shared, target: &Target, name: &str) -> Option<Value> {
    shared
        .store
        .lock()
        .unwrap()
        .objects
        .get(&key(target, name))
        .cloned()
}

/// What a metadata-only read returns of `object`.
fn metadata_of(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"],
    })
}

fn list(shared: &Shared, target: &Target, shown: impl Fn(Value) -> Value) -> Response {
    let store = shared.store.lock().unwrap();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((c, ns, _), _)| {
            *c == target.collection && target.namespace.as_ref().is_none_or(|t| t == ns)
        })
        .map(|(_, v)| shown(v.clone()))
        .collect();
    let kind = items
        .first()
        .and_then(|i| i["kind"].as_str())
        .map(|k| format!("{k}List"))
        .unwrap_or_else(|| "List".into());
    let api_version = match items.first() {
        Some(item) if item["kind"] == "PartialObjectMetadata" => json!("meta.k8s.io/v1"),
        _ => json!(target.api_version),
    };
    axum::Json(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": store.version.to_string()},
        "items": items,
    }))
    .into_response()
}

fn watch(
    shared: &Shared,
    target: &Target,
    query: &BTreeMap<String, String>,
    shown: impl Fn(Value) -> Value + Send + 'static,
) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let collection = target.collection.clone();
    let namespace = target.namespace.clone();
    let matches = move |e: &WatchEvent| {
        e.collection == collection
            && e.resource_version > from
            && namespace
                .as_ref()
                .is_none_or(|n| e.namespace.as_ref() == Some(n))
    };
    // Subscribe before reading the history, so nothing falls between the two.
    let live = shared.events.subscribe();
    let past: Vec<WatchEvent> = shared
        .store
        .lock()
        .unwrap()
        .history
        .iter()
        .filter(|e| matches(e))
        .cloned()
        .collect();
    let last = past.last().map(|e| e.resource_version).unwrap_or(from);
    let live = live_events(live).filter(move |e| {
        let keep = matches(e) && e.resource_version > last;
        async move { keep }
    });
    let stream = futures::stream::iter(past).chain(live).map(move |e| {
        let object = shown(e.object);
        let mut line = serde_json::to_vec(&json!({"type": e.kind, "object": object})).unwrap();
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    let timeout: u64 = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290);
    let stream = stream.take_until(tokio::time::sleep(std::time::Duration::from_secs(timeout)));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Live events as a stream; a lagging watcher skips what it missed (the test
/// buffers are large enough that this does not happen in practice).
fn live_events(
    receiver: broadcast::Receiver<WatchEvent>,
) -> impl futures::Stream<Item = WatchEvent> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => return Some((event, receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// Stores `object` and announces it. The caller holds no lock.
fn commit(
    shared: &Shared,
    target: &Target,
    name: &str,
    mut object: Value,
    kind: &'static str,
) -> Value {
    let mut store = shared.store.lock().unwrap();
    store.version += 1;
    let version = store.version;
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    let key = key(target, name);
    if kind == "DELETED" {
        store.objects.remove(&key);
    } else {
        store.objects.insert(key, object.clone());
    }
    let event = WatchEvent {
        collection: target.collection.clone(),
        namespace: target.namespace.clone(),
        resource_version: version,
        kind,
        object: object.clone(),
    };
    store.history.push(event.clone());
    let _ = shared.events.send(event);
    object
}

fn create(shared: &Shared, target: &Target, mut object: Value) -> Response {
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name is required".into(),
        );
    };
    if get(shared, target, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("`{name}` already exists"),
        );
    }
    initialize(&mut object, target, &name);
    (
        StatusCode::CREATED,
        axum::Json(commit(shared, target, &name, object, "ADDED")),
    )
        .into_response()
}

fn initialize(object: &mut Value, target: &Target, name: &str) {
    let meta = &mut object["metadata"];
    meta["name"] = json!(name);
    if let Some(ns) = &target.namespace {
        meta["namespace"] = json!(ns);
    }
    meta["uid"] = json!(format!("uid-{}", uuid_like(name)));
    meta["generation"] = json!(1);
    meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    if object.get("apiVersion").is_none() {
        object["apiVersion"] = json!(target.api_version);
    }
}

fn uuid_like(name: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(name.as_bytes()))
}

fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    manager: Option<&str>,
    body: &[u8],
) -> Response {
    let failing = shared
        .store
        .lock()
        .unwrap()
        .failing_status
        .contains(&target.collection);
    if target.status && failing {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("status writes of {} fail (test)", target.collection),
        );
    }
    let applying = content_type.starts_with("application/apply-patch");
    let current = get(shared, target, name);
    let mut object = match (&current, applying) {
        (Some(current), _) => current.clone(),
        (None, true) => {
            let mut fresh = json!({"metadata": {}});
            initialize(&mut fresh, target, name);
            fresh
        }
        (None, false) => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("`{name}` not found"),
            );
        }
    };
    let before = object.clone();
    let result = if content_type.starts_with("application/json-patch") {
        serde_json::from_slice::<json_patch::Patch>(body)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                // Like the API server, `test` of a missing path against null passes.
                let ops: Vec<_> =
                    p.0.into_iter()
                        .filter(|op| match op {
                            json_patch::PatchOperation::Test(t) => {
                                !(t.value.is_null() && object.pointer(t.path.as_str()).is_none())
                            }
                            _ => true,
                        })
                        .collect();
                json_patch::patch(&mut object, &ops).map_err(|e| e.to_string())
            })
    } else {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| e.to_string())
            .and_then(|mut p| {
                if target.status {
                    // A status write changes only the status.
                    p = json!({"status": p.get("status").cloned().unwrap_or(json!({}))});
                } else if let Some(map) = p.as_object_mut() {
                    // The object endpoint ignores status (status subresource).
                    if current.is_some() {
                        map.remove("status");
                    }
                }
                if !applying {
                    json_patch::merge(&mut object, &p);
                    return Ok(());
                }
                let manager = manager.ok_or("an apply needs a fieldManager")?;
                apply(&mut object, &p, manager, target);
                Ok(())
            })
    };
    if let Err(message) = result {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    }
    // The identity of an object never changes.
    for field in ["uid", "creationTimestamp", "name", "namespace"] {
        if let Some(value) = before["metadata"].get(field) {
            object["metadata"][field] = value.clone();
        }
    }
    if current.is_some() && changed_beyond_status_and_metadata(&before, &object) {
        let generation = before["metadata"]["generation"].as_i64().unwrap_or(1);
        object["metadata"]["generation"] = json!(generation + 1);
    }
    let deleting = object["metadata"].get("deletionTimestamp").is_some();
    let finalizers_left = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let kind = match current {
        None => "ADDED",
        Some(_) if deleting && !finalizers_left => "DELETED",
        Some(_) if before == object => return axum::Json(object).into_response(),
        Some(_) => "MODIFIED",
    };
    axum::Json(commit(shared, target, name, object, kind)).into_response()
}

/// Server-side apply of `applied` by `manager`: the fields `manager` applied last time
/// (to the same subresource) and leaves out now go, then `applied` is merged in, and
/// its fields become what `manager` owns.
fn apply(object: &mut Value, applied: &Value, manager: &str, target: &Target) {
    let subresource = target.status.then_some("status");
    let owned = field_set(applied, true);
    let entries = object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (mine, others): (Vec<Value>, Vec<Value>) = entries.into_iter().partition(|e| {
        e["manager"] == manager
            && e["operation"] == "Apply"
            && e["subresource"].as_str() == subresource
    });
    if let Some(previous) = mine.first() {
        remove_unapplied(object, &previous["fieldsV1"], &owned);
    }
    json_patch::merge(object, applied);
    let mut entry = json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": applied.get("apiVersion").cloned().unwrap_or(json!(target.api_version)),
        "fieldsType": "FieldsV1",
        "fieldsV1": owned,
    });
    if let Some(subresource) = subresource {
        entry["subresource"] = json!(subresource);
    }
    let mut entries = others;
    entries.push(entry);
    object["metadata"]["managedFields"] = json!(entries);
}

/// The fields `value` sets, as `FieldsV1` (`{"f:status": {"f:replicas": {}}}`). Lists
/// and scalars are leaves; the type and the identity of the object are nobody's.
fn field_set(value: &Value, top: bool) -> Value {
    let Some(map) = value.as_object() else {
        return json!({});
    };
    let mut fields = serde_json::Map::new();
    for (key, child) in map {
        let identity = top && ["apiVersion", "kind"].contains(&key.as_str());
        if identity {
            continue;
        }
        let mut set = field_set(child, false);
        if top
            && key == "metadata"
            && let Some(meta) = set.as_object_mut()
        {
            for field in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "managedFields",
            ] {
                meta.remove(&format!("f:{field}"));
            }
        }
        fields.insert(format!("f:{key}"), set);
    }
    Value::Object(fields)
}

/// Removes from `object` the fields of `previous` that `now` does not have.
fn remove_unapplied(object: &mut Value, previous: &Value, now: &Value) {
    let (Some(previous), Some(map)) = (previous.as_object(), object.as_object_mut()) else {
        return;
    };
    for (key, previous_child) in previous {
        let Some(field) = key.strip_prefix("f:") else {
            continue;
        };
        match now.get(key) {
            None => {
                map.remove(field);
            }
            Some(now_child) => {
                if let Some(child) = map.get_mut(field) {
                    remove_unapplied(child, previous_child, now_child);
                }
            }
        }
    }
}

fn changed_beyond_status_and_metadata(before: &Value, after: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("status");
            map.remove("metadata");
        }
        v
    };
    strip(before) != strip(after)
}

fn delete(shared: &Shared, target: &Target, name: &str) -> Response {
    let Some(mut object) = get(shared, target, name) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("`{name}` not found"),
        );
    };
    let has_finalizers = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if object["metadata"].get("deletionTimestamp").is_none() {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
            object = commit(shared, target, name, object, "MODIFIED");
        }
        return axum::Json(object).into_response();
    }
    axum::Json(commit(shared, target, name, object, "DELETED")).into_response()
}
