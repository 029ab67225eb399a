//! The fake API server's HTTP side: the paths, query parameters, status objects and watch streams of the real one,
//! for the requests the agent makes.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tokio_stream::{wrappers::UnboundedReceiverStream, StreamExt as _};

use super::store::{Resource, Selectors, Store, WatchLine};

pub struct Shared {
    pub store: Mutex<Store>,
    pub down: AtomicBool,
    pub token: String,
    /// `security.istio.io` versions PeerAuthentication is served under.
    pub peer_auth_versions: Vec<String>,
    /// Every request, `GET /path?query`, in order.
    pub requests: Mutex<Vec<String>>,
    /// Paths answered with an error status instead, by path prefix (whole segments).
    pub refusals: Mutex<Vec<(String, StatusCode)>>,
}

/// The agent's identity as the API server names it in a refusal.
const USER: &str = "system:serviceaccount:meshcap:meshcap-agent";

/// The Status the API server sends for a request it refuses with `code`: for 403 the RBAC wording, naming the
/// user, verb, resource, group and scope.
fn refused(code: StatusCode, path: &str, watch: bool) -> Response {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => ("", &parts[..0]),
    };
    let (namespace, resource, name) = match rest {
        ["namespaces", ns, resource, name] => (Some(*ns), *resource, Some(*name)),
        ["namespaces", ns, resource] => (Some(*ns), *resource, None),
        [resource] => (None, *resource, None),
        _ => (None, "", None),
    };
    let qualified = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    let target = match name {
        Some(name) => format!("{qualified} \"{name}\""),
        None => qualified,
    };
    let reason = code.canonical_reason().unwrap_or("Failure").replace(' ', "");
    let message = match code {
        StatusCode::FORBIDDEN => {
            let verb = if watch {
                "watch"
            } else if name.is_some() {
                "get"
            } else {
                "list"
            };
            let scope = match namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".into(),
            };
            format!(
                "{target} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" in API group \
                 \"{group}\" {scope}"
            )
        }
        StatusCode::NOT_FOUND => format!("{target} not found"),
        _ => format!("{target}: {reason}"),
    };
    status(code, &reason, message)
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    s.requests.lock().expect("lock").push(format!("{method} {uri}"));
    if s.down.load(Ordering::SeqCst) {
        return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the server is shutting down".into());
    }
    let authorized = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", s.token).as_str());
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into());
    }
    let refusal = s.refusals.lock().expect("lock").iter().find_map(|(prefix, code)| {
        let path = uri.path();
        (path == prefix || path.strip_prefix(prefix.as_str()).is_some_and(|r| r.starts_with('/'))).then_some(*code)
    });
    if let Some(code) = refusal {
        return refused(code, uri.path(), matches!(q.get("watch").map(String::as_str), Some("true" | "1")));
    }
    if method != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} is not served here"));
    }
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "pods"] => collection(&s, Resource::Pods, "v1", &q),
        ["api", "v1", "configmaps"] => collection(&s, Resource::ConfigMaps, "v1", &q),
        ["api", "v1", "namespaces", ns, "pods", name] => {
            let store = s.store.lock().expect("lock");
            match store.get(Resource::Pods, ns, name) {
                Some(obj) => {
                    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], obj.to_string()).into_response()
                }
                None => status(StatusCode::NOT_FOUND, "NotFound", format!("pods \"{name}\" not found")),
            }
        }
        ["apis", "security.istio.io", version, "peerauthentications"]
            if s.peer_auth_versions.iter().any(|v| v == version) =>
        {
            collection(&s, Resource::PeerAuthentications, &format!("security.istio.io/{version}"), &q)
        }
        // The API server answers unknown group versions in plain text, not with a Status.
        _ => (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain")], "404 page not found\n").into_response(),
    }
}

/// Objects are stored as written; served under another version, their apiVersion says the one asked for (the
/// API server converts).
fn as_version(mut obj: Value, resource: Resource, api_version: &str) -> Value {
    if resource == Resource::PeerAuthentications {
        obj["apiVersion"] = json!(api_version);
    }
    obj
}

fn collection(s: &Shared, resource: Resource, api_version: &str, q: &HashMap<String, String>) -> Response {
    let selectors = match Selectors::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    ) {
        Ok(sel) => sel,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let kind = match resource {
        Resource::Pods => "PodList",
        Resource::PeerAuthentications => "PeerAuthenticationList",
        Resource::ConfigMaps => "ConfigMapList",
    };
    let mut store = s.store.lock().expect("lock");
    if !matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let items: Vec<Value> =
            store.list(resource, &selectors).into_iter().map(|o| as_version(o, resource, api_version)).collect();
        let body = json!({
            "kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": store.resource_version().to_string()}, "items": items
        });
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    }
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid resource version {rv:?}")),
        },
    };
    let bookmarks = matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let from = from.unwrap_or_else(|| {
        // "Any version": the current state as ADDED events first.
        for obj in store.list(resource, &selectors) {
            let _ = tx.send(WatchLine::Event(json!({"type": "ADDED", "object": obj})));
        }
        store.resource_version()
    });
    store.watch(resource, selectors, from, bookmarks, tx);
    drop(store);
    let version = api_version.to_string();
    let lines = UnboundedReceiverStream::new(rx).take_while(|l| matches!(l, WatchLine::Event(_))).map(move |l| {
        let WatchLine::Event(mut event) = l else { unreachable!("take_while stops at the end") };
        if event["type"] != "ERROR" {
            event["object"] = as_version(event["object"].take(), resource, &version);
        }
        Ok::<_, Infallible>(Bytes::from(format!("{event}\n")))
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(lines)).into_response()
}
