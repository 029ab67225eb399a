//! What the fake API server holds: objects by resource, a change log with increasing resourceVersions (one
//! counter for everything, as etcd's), and the running watches with their selectors.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    PeerAuthentications,
    ConfigMaps,
}

/// `labelSelector` / `fieldSelector` terms, `key=value` (or `==`) and `key!=value`, as the API server reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    labels: Vec<(String, bool, String)>,
    fields: Vec<(String, bool, String)>,
}

impl Selectors {
    /// Errors are the API server's own wording for a selector it cannot parse.
    pub fn parse(label_selector: Option<&str>, field_selector: Option<&str>) -> Result<Selectors, String> {
        let terms = |s: Option<&str>, what: &str| -> Result<Vec<(String, bool, String)>, String> {
            let mut out = Vec::new();
            for term in s.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let parsed = if let Some((k, v)) = term.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                    (k, true, v)
                } else {
                    return Err(format!("unable to parse requirement: {what} {term:?}: only = and != are served here"));
                };
                out.push((parsed.0.trim().to_string(), parsed.1, parsed.2.trim().to_string()));
            }
            Ok(out)
        };
        let fields = terms(field_selector, "field selector")?;
        for (field, _, _) in &fields {
            if !["spec.nodeName", "metadata.name", "metadata.namespace", "status.phase"].contains(&field.as_str()) {
                return Err(format!("field label not supported: {field}"));
            }
        }
        Ok(Selectors { labels: terms(label_selector, "label selector")?, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let label_ok = self.labels.iter().all(|(k, eq, v)| {
            let have = obj["metadata"]["labels"][k.as_str()].as_str();
            if *eq {
                have == Some(v.as_str())
            } else {
                have != Some(v.as_str())
            }
        });
        let field_ok = self.fields.iter().all(|(path, eq, v)| {
            let have = path.split('.').fold(obj, |o, part| &o[part]).as_str().unwrap_or("");
            (have == v) == *eq
        });
        label_ok && field_ok
    }
}

/// One line of a watch stream, or its end.
pub enum WatchLine {
    Event(Value),
    End,
}

struct Change {
    rv: u64,
    resource: Resource,
    old: Option<Value>,
    new: Option<Value>,
}

struct Watcher {
    resource: Resource,
    selectors: Selectors,
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
    tx: UnboundedSender<WatchLine>,
}

#[derive(Default)]
pub struct Store {
    rv: u64,
    /// Watches from before this resourceVersion are answered 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    /// Served to a GET by name only: in no list or watch (a pod the watches have not delivered yet).
    unlisted: BTreeMap<(Resource, String, String), Value>,
    log: Vec<Change>,
    watchers: Vec<Watcher>,
}

fn key_of(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (meta["namespace"].as_str().unwrap_or("default").to_string(), meta["name"].as_str().unwrap_or("").to_string())
}

/// The event a watcher with `selectors` sees for a change from `old` to `new`: an object leaving the selection is
/// DELETED for it, one entering it ADDED, as the API server does.
fn event_for(selectors: &Selectors, old: Option<&Value>, new: Option<&Value>) -> Option<Value> {
    let was = old.is_some_and(|o| selectors.matches(o));
    let is = new.is_some_and(|n| selectors.matches(n));
    match (was, is, new) {
        (false, true, Some(n)) => Some(json!({"type": "ADDED", "object": n})),
        (true, true, Some(n)) => Some(json!({"type": "MODIFIED", "object": n})),
        (true, false, Some(n)) => Some(json!({"type": "DELETED", "object": n})),
        (true, _, None) => old.map(|o| json!({"type": "DELETED", "object": o})),
        _ => None,
    }
}

pub fn gone(rv: u64, compacted: u64) -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv} ({compacted})"), "reason": "Expired", "code": 410
    }})
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces the object (its metadata.resourceVersion is set here); returns the new version.
    pub fn put(&mut self, resource: Resource, mut obj: Value) -> u64 {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let (ns, name) = key_of(&obj);
        self.unlisted.remove(&(resource, ns.clone(), name.clone()));
        let old = self.objects.insert((resource, ns, name), obj.clone());
        self.record(resource, old, Some(obj));
        self.rv
    }

    /// Stores the object for GETs by name only: lists and watches never show it, and no watcher hears of it.
    pub fn put_unlisted(&mut self, resource: Resource, mut obj: Value) -> u64 {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let (ns, name) = key_of(&obj);
        self.unlisted.insert((resource, ns, name), obj);
        self.rv
    }

    pub fn delete(&mut self, resource: Resource, namespace: &str, name: &str) -> Option<u64> {
        self.unlisted.remove(&(resource, namespace.to_string(), name.to_string()));
        let mut old = self.objects.remove(&(resource, namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        old["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(resource, Some(old), None);
        Some(self.rv)
    }

    fn record(&mut self, resource: Resource, old: Option<Value>, new: Option<Value>) {
        self.watchers.retain(|w| {
            if w.resource != resource {
                return !w.tx.is_closed();
            }
            match event_for(&w.selectors, old.as_ref(), new.as_ref()) {
                Some(event) => w.tx.send(WatchLine::Event(event)).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.log.push(Change { rv: self.rv, resource, old, new });
    }

    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<&Value> {
        let key = (resource, namespace.to_string(), name.to_string());
        self.objects.get(&key).or_else(|| self.unlisted.get(&key))
    }

    pub fn list(&self, resource: Resource, selectors: &Selectors) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, _, _), obj)| *r == resource && selectors.matches(obj))
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Starts a watch from `from`: the changes after it are sent first, then the live ones. A version older than
    /// the compaction is answered with an ERROR 410 event and the end of the stream, as the API server does.
    pub fn watch(
        &mut self,
        resource: Resource,
        selectors: Selectors,
        from: u64,
        bookmarks: bool,
        tx: UnboundedSender<WatchLine>,
    ) {
        if from < self.compacted {
            let _ = tx.send(WatchLine::Event(gone(from, self.compacted)));
            let _ = tx.send(WatchLine::End);
            return;
        }
        for change in self.log.iter().filter(|c| c.resource == resource && c.rv > from) {
            if let Some(event) = event_for(&selectors, change.old.as_ref(), change.new.as_ref()) {
                let _ = tx.send(WatchLine::Event(event));
            }
        }
        self.watchers.push(Watcher { resource, selectors, bookmarks, tx });
    }

    /// Forgets history up to now: running watches get ERROR 410 and end; resuming from before now is refused.
    pub fn expire(&mut self) {
        self.compacted = self.rv;
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchLine::Event(gone(self.rv, self.compacted)));
            let _ = w.tx.send(WatchLine::End);
        }
    }

    /// A BOOKMARK with the current resourceVersion to every running watch that asked for bookmarks.
    pub fn bookmark(&mut self) {
        let rv = self.rv.to_string();
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let (api_version, kind) = match w.resource {
                Resource::Pods => ("v1", "Pod"),
                Resource::PeerAuthentications => ("security.istio.io/v1", "PeerAuthentication"),
                Resource::ConfigMaps => ("v1", "ConfigMap"),
            };
            let object = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}});
            w.tx.send(WatchLine::Event(json!({"type": "BOOKMARK", "object": object}))).is_ok()
        });
    }

    /// Ends every running watch cleanly (as the server's watch timeout does).
    pub fn close_watches(&mut self) {
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchLine::End);
        }
    }

    /// Ends the running watches of one resource cleanly.
    pub fn close_watches_of(&mut self, resource: Resource) {
        self.watchers.retain(|w| {
            if w.resource != resource {
                return true;
            }
            let _ = w.tx.send(WatchLine::End);
            false
        });
    }

    pub fn running_watches(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels}, "spec": {"nodeName": node}})
    }

    #[test]
    fn selectors_read_as_the_api_server_does() {
        let s = Selectors::parse(Some("a=1,b!=2"), Some("spec.nodeName=n1")).unwrap();
        assert!(s.matches(&pod("x", "n1", json!({"a": "1"}))));
        assert!(!s.matches(&pod("x", "n1", json!({"a": "1", "b": "2"}))));
        assert!(!s.matches(&pod("x", "n2", json!({"a": "1"}))));
        assert!(Selectors::parse(Some("a in (1)"), None).unwrap_err().contains("only = and !="));
        assert!(Selectors::parse(None, Some("spec.schedulerName=x")).unwrap_err().contains("not supported"));
    }

    #[test]
    fn watches_replay_from_their_version_and_see_objects_leave_their_selection() {
        let mut store = Store::default();
        let first = store.put(Resource::Pods, pod("a", "n1", json!({"mesh": "true"})));
        store.put(Resource::Pods, pod("b", "n1", json!({"mesh": "true"})));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store.watch(Resource::Pods, Selectors::parse(Some("mesh=true"), None).unwrap(), first, false, tx);
        store.put(Resource::Pods, pod("b", "n1", json!({})));
        let types: Vec<String> = std::iter::from_fn(|| match rx.try_recv().ok()? {
            WatchLine::Event(e) => Some(format!("{} {}", e["type"].as_str()?, e["object"]["metadata"]["name"])),
            WatchLine::End => Some("end".into()),
        })
        .collect();
        assert_eq!(types, ["ADDED \"b\"", "DELETED \"b\""]);
        store.expire();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store.watch(Resource::Pods, Selectors::default(), first, false, tx);
        let Ok(WatchLine::Event(e)) = rx.try_recv() else { panic!("an ERROR event") };
        assert_eq!((e["type"].as_str(), e["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
    }
}
