//! `meshcap-agent status`: asks the running agent's admin endpoint.

use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use serde_json::Value;

use crate::cli::StatusArgs;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no meshcap agent answering at {addr} ({source}); is it running, and is --admin-addr right?")]
    Unreachable { addr: SocketAddr, source: std::io::Error },
    #[error("agent at {addr}: {what}")]
    Protocol { addr: SocketAddr, what: String },
}

/// Returns the process exit code: 0 when the agent answered, 1 otherwise.
pub fn run(args: &StatusArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshcap-agent status: cannot start a runtime: {e}");
            return 1;
        }
    };
    let answer = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), fetch(args.admin_addr, "/status"))
            .await
            .unwrap_or_else(|_| {
                Err(StatusError::Protocol {
                    addr: args.admin_addr,
                    what: "no answer within 10s (agent wedged?)".into(),
                })
            })
    });
    match answer {
        Ok(v) if args.json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Ok(v) => {
            print!("{}", render(&v));
            0
        }
        Err(e) => {
            eprintln!("meshcap-agent status: {e}");
            1
        }
    }
}

pub async fn fetch(addr: SocketAddr, path: &str) -> Result<Value, StatusError> {
    let proto = |what: String| StatusError::Protocol { addr, what };
    let stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|source| StatusError::Unreachable { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| proto(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| proto(e.to_string()))?;
    let code = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| proto(e.to_string()))?.to_bytes();
    if !code.is_success() {
        return Err(proto(format!("{path} answered {code}")));
    }
    serde_json::from_slice(&body).map_err(|e| proto(format!("{path}: not JSON: {e}")))
}

/// Human tables: pods, maps, kernel counters.
pub fn render(v: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let mut out = String::new();
    out.push_str(&format!("ready: {}    source: {}    mesh pods: {}\n", v["ready"], s(&v["source"]), v["mesh_pods"]));
    if let Some(err) = v["source_error"].as_str() {
        out.push_str(&format!("source error: {err}\n"));
    }
    match v["kubelet_probe_cgroup"].as_str() {
        Some(cg) => out.push_str(&format!("kubelet probes exempted from capture: {cg}\n")),
        None => out.push_str("kubelet probes: no exemption (STRICT pods' probes must speak mTLS)\n"),
    }
    out.push_str(&format!(
        "\n{:<32} {:<24} {:<30} {:<6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}\n",
        "POD", "CAPTURED", "IPS", "HOOKS", "OUT", "OUT-FAIL", "OUT-ON", "IN", "IN-FAIL", "IN-ON"
    ));
    for p in v["pods"].as_array().into_iter().flatten() {
        let ips: Vec<String> = p["ips"].as_array().into_iter().flatten().map(s).collect();
        let hooks = p["hooks"].as_array().map_or(0, Vec::len);
        let captured = if p["captured"].as_bool() == Some(true) {
            "yes".to_string()
        } else if p["error"].is_string() {
            "FAILED".to_string()
        } else {
            s(&p["enrollment"]).replace('_', " ")
        };
        let n = |dir: &str, k: &str| p[dir][k].as_u64().map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<32} {:<24} {:<30} {:<6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>6}\n",
            format!("{}/{}", s(&p["namespace"]), s(&p["name"])),
            captured,
            ips.join(","),
            format!("{hooks}/{}", crate::capture::POD_HOOKS.len()),
            n("outbound", "relayed"),
            n("outbound", "failed"),
            n("outbound", "active"),
            n("inbound", "relayed"),
            n("inbound", "failed"),
            n("inbound", "active"),
        ));
        if let Some(id) = p["spiffe_id"].as_str() {
            let exp =
                p["svid_expires"].as_u64().map_or("not issued yet".to_string(), |t| format!("expires {t} (unix)"));
            out.push_str(&format!("    identity: {id}, SVID {exp}; inbound mTLS {}\n", s(&p["mtls"]["mode"])));
        }
        if let Some(err) = p["error"].as_str() {
            out.push_str(&format!("    error: {err}\n"));
        }
        for w in p["warnings"].as_array().into_iter().flatten() {
            out.push_str(&format!("    warning: {} {:?}: {}\n", s(&w["annotation"]), s(&w["value"]), s(&w["reason"])));
        }
    }
    out.push_str(&format!("\n{:<20} {:>10} {:>12}\n", "MAP", "ENTRIES", "MAX"));
    for m in v["maps"].as_array().into_iter().flatten() {
        out.push_str(&format!("{:<20} {:>10} {:>12}\n", s(&m["name"]), s(&m["entries"]), s(&m["max_entries"])));
    }
    out.push_str("\nkernel counters:");
    for (k, c) in v["counters"].as_object().into_iter().flatten() {
        out.push_str(&format!(" {k}={c}"));
    }
    out.push('\n');
    out
}
