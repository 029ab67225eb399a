//! Editing a network configuration: the meshcap entry in, the meshcap entry
//! out, a single plugin's `.conf` made into a list. Pure, on JSON values.

use std::path::Path;

use serde_json::{Map, Value};

use super::InstallError;
use crate::cni::PLUGIN_TYPE;

/// A configuration file's content, by the form libcni gives it by its extension.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// `.conflist`, or a `.json` with `plugins`.
    List(Map<String, Value>),
    /// `.conf`, or a `.json` with a `type`: one plugin.
    Single(Map<String, Value>),
}

pub fn parse(path: &Path, text: &str) -> Result<Parsed, InstallError> {
    let malformed = |reason: String| InstallError::Malformed { path: path.to_path_buf(), reason };
    let value: Value = serde_json::from_str(text).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(map) = value else { return Err(malformed("not a JSON object".into())) };
    let is_list = path.extension().is_some_and(|e| e == "conflist") || map.contains_key("plugins");
    if !is_list {
        return match map.get("type") {
            Some(Value::String(_)) => Ok(Parsed::Single(map)),
            _ => Err(malformed("neither a plugin list (`plugins`) nor a single plugin (`type`)".into())),
        };
    }
    let plugins = match map.get("plugins") {
        Some(Value::Array(plugins)) => plugins,
        Some(other) => return Err(malformed(format!("`plugins` is not a list: {other}"))),
        None => return Err(malformed("a .conflist without `plugins`".into())),
    };
    if plugins.is_empty() {
        return Err(malformed("`plugins` is empty: there is no primary plugin to chain after".into()));
    }
    for (i, plugin) in plugins.iter().enumerate() {
        if !plugin.get("type").is_some_and(Value::is_string) {
            return Err(malformed(format!("`plugins[{i}]` is not a plugin object with a `type`")));
        }
    }
    Ok(Parsed::List(map))
}

/// A list holding the single plugin `conf`, as libcni builds one in memory from a `.conf`.
pub fn single_to_list(conf: Map<String, Value>) -> Map<String, Value> {
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.get(key) {
            list.insert(key.into(), v.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    list
}

/// `list` with exactly one meshcap entry equal to `entry`: where the first one was (after the primary), else at
/// the end. Other plugins keep their order.
pub fn with_entry(list: &Map<String, Value>, entry: &Map<String, Value>) -> Map<String, Value> {
    let mut out = list.clone();
    let plugins = plugins(list);
    let first = plugins.iter().position(is_meshcap).filter(|&i| i > 0);
    let mut kept: Vec<Value> = plugins.iter().filter(|p| !is_meshcap(p)).cloned().collect();
    let at = first.map_or(kept.len(), |i| i.min(kept.len()));
    kept.insert(at, Value::Object(entry.clone()));
    out.insert("plugins".into(), Value::Array(kept));
    out
}

/// `list` without meshcap entries, or `None` when it had none.
pub fn without_entry(list: &Map<String, Value>) -> Option<Map<String, Value>> {
    let plugins = plugins(list);
    if !plugins.iter().any(is_meshcap) {
        return None;
    }
    let mut out = list.clone();
    out.insert("plugins".into(), Value::Array(plugins.iter().filter(|p| !is_meshcap(p)).cloned().collect()));
    Some(out)
}

pub fn cni_version(map: &Map<String, Value>) -> Option<&str> {
    map.get("cniVersion").and_then(Value::as_str)
}

fn plugins(list: &Map<String, Value>) -> &[Value] {
    list.get("plugins").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn is_meshcap(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}
