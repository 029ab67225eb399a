//! The agent's own SPIFFE identity, from the Workload API (the socket the
//! SPIFFE CSI driver mounts into the agent's pod). Shown in status and
//! required for readiness when configured; the SPIRE agent authorizes the
//! agent as a delegate by attesting its process, not by this SVID.

use std::{
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use spiffe::X509Source;

#[derive(Default)]
pub struct OwnIdentity {
    configured: bool,
    source: OnceLock<Arc<X509Source>>,
}

#[derive(Debug, Serialize)]
pub struct OwnIdentityStatus {
    pub spiffe_id: Option<String>,
    pub expires: Option<u64>,
}

impl OwnIdentity {
    /// Connects in the background (the Workload API may come up after the
    /// agent; the source retries until it answers).
    pub fn start(endpoint: Option<&str>) -> Arc<Self> {
        let me = Arc::new(Self { configured: endpoint.is_some(), source: OnceLock::new() });
        if let Some(endpoint) = endpoint {
            let endpoint =
                if endpoint.starts_with("unix:") { endpoint.to_string() } else { format!("unix://{endpoint}") };
            let me = me.clone();
            tokio::spawn(async move {
                match X509Source::builder().endpoint(&endpoint).build().await {
                    Ok(source) => {
                        if let Ok(svid) = source.svid() {
                            tracing::info!(id = %svid.spiffe_id(), %endpoint, "agent identity from the Workload API");
                        }
                        let _ = me.source.set(Arc::new(source));
                    }
                    Err(e) => tracing::error!(%endpoint, error = %e, "SPIFFE Workload API: no identity for the agent"),
                }
            });
        }
        me
    }

    /// Ready: not configured, or an SVID is held.
    pub fn ready(&self) -> bool {
        !self.configured || self.source.get().is_some_and(|s| s.svid().is_ok())
    }

    pub fn status(&self) -> Option<OwnIdentityStatus> {
        if !self.configured {
            return None;
        }
        let svid = self.source.get().and_then(|s| s.svid().ok());
        Some(OwnIdentityStatus {
            spiffe_id: svid.as_ref().map(|s| s.spiffe_id().to_string()),
            expires: svid.as_ref().and_then(|s| leaf_expiry(s.leaf().as_ref())),
        })
    }
}

fn leaf_expiry(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t =
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}
