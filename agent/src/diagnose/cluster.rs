//! `diagnose --kubernetes`: the same checks on what the cluster holds (pods,
//! PeerAuthentications, ConfigMaps for SPIRE's and Istio's trust domains),
//! each finding naming the object instead of a file and line.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    api::{Api, DynamicObject, ListParams},
    Client,
};
use serde::Serialize;

use super::{load_value, Location, Manifests};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Kubernetes client configuration (in-cluster service account, or KUBECONFIG): {source}")]
    Config { source: kube::config::InferConfigError },
    #[error("Kubernetes client: {source}")]
    Client { source: kube::Error },
    #[error("listing {what} from the Kubernetes API: {source}")]
    List { what: &'static str, source: kube::Error },
    #[error("starting a runtime: {source}")]
    Runtime { source: std::io::Error },
}

pub fn load(out: &mut Manifests) -> Result<(), ClusterError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClusterError::Runtime { source })?;
    rt.block_on(load_cluster(out))
}

async fn load_cluster(out: &mut Manifests) -> Result<(), ClusterError> {
    let mut config = kube::Config::infer().await.map_err(|source| ClusterError::Config { source })?;
    // A one-shot command: an unreachable API is reported, not retried for minutes.
    config.default_retry = false;
    let client = Client::try_from(config).map_err(|source| ClusterError::Client { source })?;
    let all = ListParams::default();
    let pods = Api::<Pod>::all(client.clone())
        .list(&all)
        .await
        .map_err(|source| ClusterError::List { what: "pods", source })?;
    for pod in &pods {
        push(out, "pods", "Pod", pod, &pod.metadata);
    }
    let what = "PeerAuthentications";
    match crate::pods::kube::served_peer_authentication(&client).await {
        Ok(Some(ar)) => {
            let list = Api::<DynamicObject>::all_with(client.clone(), &ar)
                .list(&all)
                .await
                .map_err(|source| ClusterError::List { what, source })?;
            for pa in &list {
                push(out, "peerauthentications", "PeerAuthentication", pa, &pa.metadata);
            }
        }
        Ok(None) => eprintln!(
            "meshcap-agent diagnose: PeerAuthentication is not served (Istio's CRDs not installed?): no policies checked"
        ),
        Err(source) => return Err(ClusterError::List { what, source }),
    }
    let maps = Api::<ConfigMap>::all(client)
        .list(&all)
        .await
        .map_err(|source| ClusterError::List { what: "ConfigMaps", source })?;
    for cm in &maps {
        push(out, "configmaps", "ConfigMap", cm, &cm.metadata);
    }
    Ok(())
}

/// Reads one object as if it were a manifest document of `kind`.
fn push(
    out: &mut Manifests,
    resource: &str,
    kind: &str,
    obj: &impl Serialize,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) {
    let ns = meta.namespace.as_deref().unwrap_or("default");
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    let at = Location { file: PathBuf::from(format!("{resource}/{ns}/{name}")), line: 0 };
    let mut json = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return out.unreadable.push(format!("{at}: {e}")),
    };
    // List items may come without their kind.
    json["kind"] = serde_json::Value::from(kind);
    match serde_norway::to_value(&json) {
        Ok(v) => load_value(v, at, out),
        Err(e) => out.unreadable.push(format!("{at}: {e}")),
    }
}
