//! Renders a Helm chart without helm: Go templates through `gtmpl` (Go's text/template for Rust) with the
//! built-in objects `.Values`, `.Release` and `.Chart`, and the few Sprig/Helm functions the meshcap chart uses:
//! `toYaml`, `indent`, `nindent`, `quote`, `default`. deploy/charts/meshcap/README.md documents this subset;
//! a template using anything else fails here by name, so the chart stays renderable by this test.
//!
//! Compiled into tests/tests/manifests.rs (`#[path]`).

use std::{collections::HashMap, path::Path};

use gtmpl::{Context, FuncError, Template, Value as G};
use serde_json::Value;

/// A rendered template file.
pub struct Rendered {
    pub name: String,
    pub text: String,
}

pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// Renders every file of `<chart>/templates` (`*.yaml`, and `NOTES.txt`) with the chart's values.yaml, then
/// each override file in order merged over them (as `helm template -f`).
pub fn render_chart(chart: &Path, overrides: &[Value], release: &Release) -> Result<Vec<Rendered>, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let yaml = |p: &Path| -> Result<Value, String> {
        serde_norway::from_str(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))
    };
    let chart_meta = yaml(&chart.join("Chart.yaml"))?;
    let mut values = yaml(&chart.join("values.yaml"))?;
    for o in overrides {
        merge(&mut values, o);
    }
    let field = |k: &str| chart_meta[k].as_str().unwrap_or_default().to_string();
    let root = serde_json::json!({
        "Values": values,
        "Release": { "Name": release.name, "Namespace": release.namespace, "Service": "Helm",
                     "IsInstall": true, "IsUpgrade": false },
        "Chart": { "Name": field("name"), "Version": field("version"), "AppVersion": field("appVersion") },
    });
    let ctx = Context::from(to_gtmpl(&root));

    let dir = chart.join("templates");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        if !(name.ends_with(".yaml") || name == "NOTES.txt") {
            return Err(format!(
                "{}: unexpected file {name} (this renderer knows *.yaml and NOTES.txt)",
                dir.display()
            ));
        }
        let mut tmpl = Template::default();
        tmpl.add_funcs(&[
            ("toYaml", to_yaml as gtmpl::Func),
            ("indent", indent as gtmpl::Func),
            ("nindent", nindent as gtmpl::Func),
            ("quote", quote as gtmpl::Func),
            ("default", default as gtmpl::Func),
        ]);
        tmpl.parse(read(&dir.join(&name))?).map_err(|e| format!("templates/{name}: {e}"))?;
        let text = tmpl.render(&ctx).map_err(|e| format!("templates/{name}: {e}"))?;
        out.push(Rendered { name, text });
    }
    Ok(out)
}

/// Helm's value merge: maps merge key by key, anything else is replaced.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn to_gtmpl(v: &Value) -> G {
    match v {
        Value::Null => G::Nil,
        Value::Bool(b) => G::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => G::from(i),
            (None, Some(u)) => G::from(u),
            _ => G::from(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => G::String(s.clone()),
        Value::Array(a) => G::Array(a.iter().map(to_gtmpl).collect()),
        Value::Object(m) => G::Map(m.iter().map(|(k, v)| (k.clone(), to_gtmpl(v))).collect::<HashMap<_, _>>()),
    }
}

fn to_json(v: &G) -> Result<Value, FuncError> {
    Ok(match v {
        G::Nil | G::NoValue => Value::Null,
        G::Bool(b) => Value::Bool(*b),
        G::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (None, None, Some(f)) => Value::from(f),
            _ => return Err(FuncError::Generic(format!("unrepresentable number {n:?}"))),
        },
        G::String(s) => Value::String(s.clone()),
        G::Array(a) => Value::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        G::Map(m) | G::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| Ok((k.clone(), to_json(v)?))).collect::<Result<_, FuncError>>()?)
        }
        G::Function(_) => return Err(FuncError::Generic("a function is not data".into())),
    })
}

fn arg<'a>(args: &'a [G], i: usize, func: &str) -> Result<&'a G, FuncError> {
    args.get(i).ok_or_else(|| FuncError::Generic(format!("{func}: missing argument {}", i + 1)))
}

fn int_arg(args: &[G], i: usize, func: &str) -> Result<usize, FuncError> {
    match arg(args, i, func)? {
        G::Number(n) => n.as_u64().map(|n| n as usize),
        _ => None,
    }
    .ok_or_else(|| FuncError::Generic(format!("{func}: argument {} is not a count", i + 1)))
}

/// Go's `fmt.Sprint` of a value, as Helm's string functions see it.
fn plain(v: &G) -> String {
    match v {
        G::String(s) => s.clone(),
        G::Nil | G::NoValue => String::new(),
        other => other.to_string(),
    }
}

fn to_yaml(args: &[G]) -> Result<G, FuncError> {
    let v = to_json(arg(args, 0, "toYaml")?)?;
    let text = serde_norway::to_string(&v).map_err(|e| FuncError::Generic(format!("toYaml: {e}")))?;
    // Helm trims the trailing newline.
    Ok(G::String(text.trim_end_matches('\n').to_string()))
}

fn indent_by(n: usize, s: &str) -> String {
    let pad = " ".repeat(n);
    s.split('\n').map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n")
}

fn indent(args: &[G]) -> Result<G, FuncError> {
    Ok(G::String(indent_by(int_arg(args, 0, "indent")?, &plain(arg(args, 1, "indent")?))))
}

fn nindent(args: &[G]) -> Result<G, FuncError> {
    Ok(G::String(format!("\n{}", indent_by(int_arg(args, 0, "nindent")?, &plain(arg(args, 1, "nindent")?)))))
}

/// Sprig's quote: each argument as a Go double-quoted string, space-separated.
fn quote(args: &[G]) -> Result<G, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|a| !matches!(a, G::Nil | G::NoValue))
        .map(|a| serde_json::to_string(&plain(a)).expect("a string serializes"))
        .collect();
    Ok(G::String(quoted.join(" ")))
}

/// Sprig's default: the last argument unless it is empty (nil, "", 0, false, empty list or map).
fn default(args: &[G]) -> Result<G, FuncError> {
    let fallback = arg(args, 0, "default")?;
    let given = args.get(1).unwrap_or(&G::Nil);
    let empty = match given {
        G::Nil | G::NoValue => true,
        G::Bool(b) => !b,
        G::String(s) => s.is_empty(),
        G::Number(n) => n.as_i64() == Some(0) || n.as_f64() == Some(0.0),
        G::Array(a) => a.is_empty(),
        G::Map(m) | G::Object(m) => m.is_empty(),
        G::Function(_) => false,
    };
    Ok(if empty { fallback.clone() } else { given.clone() })
}
