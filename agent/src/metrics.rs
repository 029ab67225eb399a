//! Prometheus metrics (`/metrics` on `--metrics-addr`), rendered at scrape
//! time from the same snapshot `status` shows, so the two never disagree.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{admin::Status, engine::PodStatsSnapshot};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

pub fn render(status: &Status) -> String {
    let mut r = Registry::with_prefix("meshcap");
    let opened =
        counter(&mut r, "connections_opened", "Connections relayed, by direction and mode (mtls or plaintext)");
    let closed = counter(&mut r, "connections_closed", "Relayed connections that ended");
    let active = gauge(&mut r, "connections_active", "Relayed connections open now");
    let refused = counter(&mut r, "connections_refused", "Connections refused, by reason");
    let peers = counter(&mut r, "peer_connections", "mTLS connections by verified peer SPIFFE identity");
    let bytes = counter(&mut r, "bytes", "Bytes relayed, from the app's side (sent) and to it (received)");
    let tls_failures = counter(&mut r, "tls_handshake_failures", "TLS handshakes that failed, by reason");
    let refreshes = counter(&mut r, "identity_refreshes", "SVIDs received or minted");
    let refresh_failures = counter(&mut r, "identity_refresh_failures", "SVID updates that could not be used");
    let map_entries = gauge(&mut r, "map_entries", "Entries in use per eBPF map");
    let map_capacity = gauge(&mut r, "map_capacity", "Size of each eBPF map");
    let kernel =
        counter(&mut r, "kernel_events", "Events counted by the eBPF hooks (err_* are failures, e.g. map inserts)");
    let ready = gauge(&mut r, "ready", "1 when programs are attached and every enrolled pod has its SVID");

    for pod in status.pods.iter().filter(|p| p.captured) {
        let name = format!("{}/{}", pod.namespace, pod.name);
        for (direction, stats) in [("outbound", &pod.outbound), ("inbound", &pod.inbound)] {
            let Some(s): Option<&PodStatsSnapshot> = stats.as_ref() else { continue };
            let l = |extra: &[(&str, &str)]| {
                let mut v = labels(&[("pod", &name), ("direction", direction)]);
                v.extend(labels(extra));
                v
            };
            opened.get_or_create(&l(&[("mode", "mtls")])).inc_by(s.mtls);
            opened.get_or_create(&l(&[("mode", "plaintext")])).inc_by(s.plaintext);
            closed.get_or_create(&l(&[])).inc_by(s.relayed.saturating_sub(s.active));
            active.get_or_create(&l(&[])).set(s.active as i64);
            refused.get_or_create(&l(&[("reason", "strict_plaintext")])).inc_by(s.plaintext_refused);
            refused.get_or_create(&l(&[("reason", "failed")])).inc_by(s.failed.saturating_sub(s.plaintext_refused));
            bytes.get_or_create(&l(&[("flow", "sent")])).inc_by(s.bytes_sent);
            bytes.get_or_create(&l(&[("flow", "received")])).inc_by(s.bytes_received);
            for (id, n) in &s.peer_ids {
                peers.get_or_create(&l(&[("peer_identity", id)])).inc_by(*n);
            }
            for (reason, n) in &s.tls_failures {
                tls_failures.get_or_create(&l(&[("reason", reason)])).inc_by(*n);
            }
        }
    }
    let source = labels(&[("source", status.identity.source)]);
    refreshes.get_or_create(&source).inc_by(status.identity.refreshes);
    refresh_failures.get_or_create(&source).inc_by(status.identity.refresh_failures);
    for m in &status.maps {
        map_entries.get_or_create(&labels(&[("map", m.name)])).set(m.entries as i64);
        map_capacity.get_or_create(&labels(&[("map", m.name)])).set(i64::from(m.max_entries));
    }
    for (event, n) in &status.counters {
        kernel.get_or_create(&labels(&[("event", event)])).inc_by(*n);
    }
    ready.get_or_create(&Vec::new()).set(i64::from(status.ready));

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
