//! SPIRE Delegated Identity API: the agent, an authorized delegate of the
//! SPIRE agent on its node, subscribes for each local pod's SVIDs by the
//! pod's selectors, and for the trust bundles of every trust domain.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spire_api::{
    selectors::{K8s, Selector},
    DelegateAttestationRequest, DelegatedIdentityClient, DelegatedIdentityError,
};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use super::{Identities, Subject, FIRST_BACKOFF, MAX_BACKOFF};
use crate::identity::{tls_identity, Svid, TlsIdentity, TrustBundles};

/// `unix:///run/spire/admin.sock`, `unix:/path` or a bare path.
pub fn endpoint(given: &str) -> String {
    if given.starts_with("unix:") {
        given.to_string()
    } else {
        format!("unix://{given}")
    }
}

async fn connect(endpoint: &str) -> Result<DelegatedIdentityClient, DelegatedIdentityError> {
    DelegatedIdentityClient::connect_to(endpoint).await
}

/// The bundle subscription: every trust domain's CA certificates.
pub async fn watch_bundles(endpoint: String, tx: watch::Sender<Option<TrustBundles>>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut subscribed = false;
        let result = subscribe_bundles(&endpoint, &tx, &mut subscribed).await;
        if subscribed {
            backoff = FIRST_BACKOFF;
        }
        match result {
            Ok(()) => tracing::warn!(%endpoint, "SPIRE bundle stream ended; resubscribing"),
            Err(e) => tracing::error!(
                %endpoint,
                error = %e,
                retry_in_ms = backoff.as_millis() as u64,
                "SPIRE trust bundles unavailable or unusable; keeping the current bundles"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe_bundles(
    endpoint: &str,
    tx: &watch::Sender<Option<TrustBundles>>,
    subscribed: &mut bool,
) -> Result<(), DelegatedIdentityError> {
    let mut stream = connect(endpoint).await?.stream_x509_bundles().await?;
    tracing::info!(%endpoint, "subscribed to SPIRE trust bundles");
    while let Some(update) = stream.next().await {
        let set = update?;
        // Only a usable update resets the backoff: a server that keeps
        // sending a bad set is retried ever more slowly, not every 500 ms.
        *subscribed = true;
        let previous = tx.borrow().clone().unwrap_or_default();
        let mut bundles = TrustBundles::new();
        for (td, bundle) in set.iter() {
            let roots: Vec<CertificateDer<'static>> =
                bundle.authorities().iter().map(|c| CertificateDer::from(c.as_ref().to_vec())).collect();
            if let Err(e) = bundles.insert(td.as_ref(), roots) {
                // Keep what was trusted before for this domain rather than
                // dropping it: a bad update must not cut the mesh off.
                let kept = previous.roots(td.as_ref()).map(<[_]>::to_vec);
                tracing::error!(
                    trust_domain = %td,
                    error = %e,
                    keeping_previous = kept.is_some(),
                    "SPIRE sent an unusable trust bundle"
                );
                if let Some(roots) = kept {
                    let _ = bundles.insert(td.as_ref(), roots);
                }
            }
        }
        tracing::info!(domains = ?bundles.domains(), "trust bundles updated");
        tx.send_replace(Some(bundles));
    }
    Ok(())
}

fn selectors(subject: &Subject) -> Vec<Selector> {
    vec![
        Selector::Generic(("k8s".into(), format!("pod-uid:{}", subject.pod_uid))),
        Selector::K8s(K8s::Namespace(subject.namespace.clone())),
        Selector::K8s(K8s::ServiceAccount(subject.service_account.clone())),
    ]
}

/// One pod's SVID subscription. An empty update means "not issued yet" (or
/// withdrawn): the pod has no identity, and its connections are refused. A
/// bad SVID is reported and the current one kept.
pub async fn watch_svid(
    ids: Arc<Identities>,
    endpoint: String,
    subject: Subject,
    mut bundles: watch::Receiver<Option<TrustBundles>>,
    tx: watch::Sender<Option<Arc<TlsIdentity>>>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut current: Option<Svid> = None;
    loop {
        let request = match DelegateAttestationRequest::for_selectors(selectors(&subject)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pod_uid = %subject.pod_uid, error = %e, "cannot build SPIRE selectors for the pod");
                return;
            }
        };
        let stream = match connect(&endpoint).await {
            Ok(client) => client.stream_x509_svids(request).await,
            Err(e) => Err(e),
        };
        let mut stream = match stream {
            Ok(s) => {
                backoff = FIRST_BACKOFF;
                s
            }
            Err(e) => {
                tracing::warn!(
                    id = %subject.id,
                    %endpoint,
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "SPIRE admin socket unavailable; keeping the current SVID (if any) and retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            tokio::select! {
                update = stream.next() => match update {
                    None => break,
                    Some(Ok(svid)) => match to_svid(&svid) {
                        Ok(svid) => {
                            if svid.id != subject.id {
                                tracing::warn!(expected = %subject.id, issued = %svid.id, "SPIRE issued an SVID with another SPIFFE ID than the mesh expects for this pod; peers will refuse it");
                            }
                            current = Some(svid);
                            ids.refreshed();
                        }
                        Err(e) => {
                            ids.refresh_failed();
                            tracing::error!(id = %subject.id, pod_uid = %subject.pod_uid, error = %e, "SPIRE sent an unusable SVID; keeping the current one");
                            continue;
                        }
                    },
                    Some(Err(DelegatedIdentityError::EmptyResponse)) => {
                        tracing::info!(id = %subject.id, pod_uid = %subject.pod_uid, "SPIRE has no SVID for this pod (not issued yet, or withdrawn): its connections are refused");
                        current = None;
                    }
                    Some(Err(e)) => {
                        ids.refresh_failed();
                        tracing::error!(id = %subject.id, pod_uid = %subject.pod_uid, error = %e, "SPIRE sent an unusable SVID; keeping the current one");
                        continue;
                    }
                },
                changed = bundles.changed() => if changed.is_err() { return },
            }
            publish(&subject, current.as_ref(), bundles.borrow().as_ref(), &tx);
        }
        tracing::warn!(id = %subject.id, "SPIRE SVID stream ended; resubscribing");
        tokio::time::sleep(backoff).await;
    }
}

fn to_svid(svid: &spiffe::X509Svid) -> Result<Svid, crate::identity::IdentityError> {
    let chain = svid.cert_chain().iter().map(|c| CertificateDer::from(c.as_ref().to_vec())).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key().as_ref().to_vec()));
    Svid::from_der(chain, key)
}

fn publish(
    subject: &Subject,
    svid: Option<&Svid>,
    bundles: Option<&TrustBundles>,
    tx: &watch::Sender<Option<Arc<TlsIdentity>>>,
) {
    let identity = match (svid, bundles) {
        (Some(svid), Some(bundles)) => match tls_identity(svid, bundles) {
            Ok(identity) => Some(Arc::new(identity)),
            Err(e) => {
                tracing::error!(id = %subject.id, error = %e, "cannot build TLS configs from the SPIRE SVID");
                return;
            }
        },
        // No SVID, or no bundle to verify peers with yet: no identity.
        _ => None,
    };
    tx.send_replace(identity);
}
