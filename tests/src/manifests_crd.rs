//! Validates custom resources against the openAPIV3Schema of their published CRD (vendored under
//! tests/fixtures/crds), as the API server would with strict field validation:
//! - structural-schema pruning is turned into rejection: an object schema with `properties` accepts no other
//!   field unless it says `x-kubernetes-preserve-unknown-fields` (a misspelled field is an error, not dropped);
//! - `nullable` becomes a `null` type; other `x-kubernetes-*` extensions are dropped (CEL rules in
//!   `x-kubernetes-validations` are not evaluated here: the API server does that);
//! - the remaining keywords (type, enum, pattern, min/max, items, anyOf, ...) mean the same in JSON Schema
//!   draft 4, which validates them.
//!
//! Compiled into tests/tests/manifests.rs (`#[path]`).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::strict::Doc;

pub struct CrdSchema {
    pub group: String,
    pub kind: String,
    /// (version name, validator)
    versions: Vec<(String, jsonschema::Validator)>,
}

impl CrdSchema {
    pub fn load(path: &Path) -> Result<CrdSchema, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let crd: Value = serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let spec = &crd["spec"];
        let str_at = |v: &Value| v.as_str().map(str::to_string).ok_or(format!("{}: incomplete CRD", path.display()));
        let mut versions = Vec::new();
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"] != Value::Bool(true) {
                continue;
            }
            let schema = to_json_schema(&v["schema"]["openAPIV3Schema"], true);
            let validator = jsonschema::draft4::new(&schema)
                .map_err(|e| format!("{}: version {}: schema does not compile: {e}", path.display(), v["name"]))?;
            versions.push((str_at(&v["name"])?, validator));
        }
        Ok(CrdSchema { group: str_at(&spec["group"])?, kind: str_at(&spec["names"]["kind"])?, versions })
    }

    /// Every violation of the served version the document's apiVersion names.
    pub fn validate(&self, doc: &Doc) -> Result<(), String> {
        let (group, version) = doc.api_version().split_once('/').unwrap_or(("", doc.api_version()));
        if group != self.group || doc.kind() != self.kind {
            return Err(format!("{doc}: this CRD defines {}/{}", self.group, self.kind));
        }
        let Some((_, validator)) = self.versions.iter().find(|(v, _)| v == version) else {
            return Err(format!("{doc}: version {version} is not served by the {} CRD", self.kind));
        };
        let errors: Vec<String> =
            validator.iter_errors(&doc.value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{doc}: {}", errors.join("; ")))
        }
    }
}

fn to_json_schema(s: &Value, root: bool) -> Value {
    let Some(obj) = s.as_object() else { return s.clone() };
    let mut out = Map::new();
    for (k, v) in obj {
        let v = match k.as_str() {
            k if k.starts_with("x-kubernetes-") => continue,
            "nullable" | "description" | "example" | "externalDocs" => continue,
            "properties" | "patternProperties" | "definitions" => Value::Object(
                v.as_object().into_iter().flatten().map(|(n, p)| (n.clone(), to_json_schema(p, false))).collect(),
            ),
            "items" | "additionalProperties" | "not" if v.is_object() => to_json_schema(v, false),
            "allOf" | "anyOf" | "oneOf" => {
                Value::Array(v.as_array().into_iter().flatten().map(|p| to_json_schema(p, false)).collect())
            }
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    if obj.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(t) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        }
    }
    let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if root {
        // Every object has these; the metadata itself is checked as ObjectMeta elsewhere.
        let props = out.entry("properties").or_insert_with(|| json!({}));
        if let Some(props) = props.as_object_mut() {
            props.insert("apiVersion".into(), json!({"type": "string"}));
            props.insert("kind".into(), json!({"type": "string"}));
            props.insert("metadata".into(), json!({"type": "object"}));
        }
    }
    if out.contains_key("properties") && !out.contains_key("additionalProperties") && !preserves {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}
