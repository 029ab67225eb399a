//! Mesh membership: which IPs belong to enrolled pods (on any node), the
//! identity each should present, and whether it takes mTLS on a port. The
//! outbound engine decides per connection from this: mTLS to a meshed
//! destination, plain passthrough to anything else.

use std::{collections::HashMap, net::IpAddr, net::SocketAddr};

use crate::{
    identity::{workload_id, SpiffeId},
    pods::{PeerAuthentication, PodInfo},
    policy::{enrollment, inbound_mtls, pod_policy, Enrollment, InboundMtls, InboundRules, PeerMode},
};

#[derive(Debug, Clone)]
pub struct MeshPeer {
    /// `namespace/name`.
    pub pod: String,
    pub id: SpiffeId,
    pub mtls: InboundMtls,
    pub inbound: InboundRules,
}

/// How the outbound engine carries one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Not a meshed destination (or one that takes plaintext on this port).
    Plaintext,
    /// mTLS; the server must prove it is `expected`.
    Mtls { expected: SpiffeId },
}

#[derive(Debug, Default)]
pub struct MeshIndex {
    by_ip: HashMap<IpAddr, MeshPeer>,
}

impl MeshIndex {
    /// Builds the index from every pod of the file; returns it with notes
    /// about pods that could not be placed (bad identity, IP claimed twice).
    pub fn build(
        pods: &[PodInfo],
        policies: &[PeerAuthentication],
        trust_domain: &str,
        root_namespace: &str,
    ) -> (Self, Vec<String>) {
        let mut index = Self::default();
        let mut notes = Vec::new();
        let mut created = HashMap::new();
        for pod in pods.iter().filter(|p| enrollment(p) == Enrollment::Enrolled) {
            let id = match workload_id(trust_domain, &pod.namespace, &pod.service_account) {
                Ok(id) => id,
                Err(e) => {
                    notes.push(format!("pod {}: no SPIFFE ID: {e}; treated as outside the mesh", pod.key()));
                    continue;
                }
            };
            let (mtls, _) = inbound_mtls(pod, policies, root_namespace);
            let peer = MeshPeer { pod: pod.key(), id, mtls, inbound: pod_policy(pod).inbound };
            for ip in &pod.ips {
                // The newer pod holds the IP: the other's deletion has not reached us yet. A pod without a
                // creation time counts as the oldest, and a tie keeps the first.
                if let Some(holder) = index.by_ip.get(ip) {
                    let newer = pod.created > created[ip];
                    let (keeper, other) =
                        if newer { (pod.key(), holder.pod.clone()) } else { (holder.pod.clone(), pod.key()) };
                    let why = if pod.created == created[ip] { "listed first" } else { "the newer" };
                    notes.push(format!("pods {other} and {keeper} both claim IP {ip}; {keeper}, {why}, keeps it"));
                    if !newer {
                        continue;
                    }
                }
                index.by_ip.insert(*ip, peer.clone());
                created.insert(*ip, pod.created);
            }
        }
        (index, notes)
    }

    pub fn peer(&self, ip: IpAddr) -> Option<&MeshPeer> {
        self.by_ip.get(&ip)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// mTLS to a meshed pod, unless that pod's engine does not take this
    /// port (inbound exclusions) or its policy is DISABLE: then plaintext,
    /// as Istio's auto-mTLS does.
    pub fn upstream(&self, dst: SocketAddr) -> Upstream {
        let Some(peer) = self.by_ip.get(&dst.ip()) else { return Upstream::Plaintext };
        let port = dst.port();
        let captured = match &peer.inbound {
            InboundRules::AllExcept(excluded) => !excluded.contains(&port),
            InboundRules::Only(ports) => ports.contains(&port),
        };
        if !captured || peer.mtls.for_port(port) == PeerMode::Disable {
            return Upstream::Plaintext;
        }
        Upstream::Mtls { expected: peer.id.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::pods::MtlsMode;

    fn pod(name: &str, ip: &str, enrolled: bool, annotations: &[(&str, &str)]) -> PodInfo {
        let mut labels = BTreeMap::new();
        if enrolled {
            labels.insert("sidecar.istio.io/inject".to_string(), "true".to_string());
            labels.insert("spire-managed-identity".to_string(), "true".to_string());
        }
        labels.insert("app".to_string(), name.to_string());
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: name.into(),
            labels,
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ips: vec![ip.parse().unwrap()],
            local: None,
            created: None,
            line: 1,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn meshed_pods_get_mtls_with_their_identity_others_plaintext() {
        let pods = [pod("api", "10.0.0.2", true, &[]), pod("legacy", "10.0.0.3", false, &[])];
        let (index, notes) = MeshIndex::build(&pods, &[], "democluster.internal", "istio-system");
        assert!(notes.is_empty());
        assert_eq!(
            index.upstream(addr("10.0.0.2:8080")),
            Upstream::Mtls { expected: SpiffeId::parse("spiffe://democluster.internal/ns/shop/sa/api").unwrap() }
        );
        assert_eq!(index.upstream(addr("10.0.0.3:8080")), Upstream::Plaintext);
        assert_eq!(index.upstream(addr("192.0.2.1:80")), Upstream::Plaintext);
    }

    #[test]
    fn excluded_inbound_ports_and_disable_get_plaintext() {
        let pods = [pod("api", "10.0.0.2", true, &[("traffic.sidecar.istio.io/excludeInboundPorts", "9090")])];
        let mut disable = PeerAuthentication {
            namespace: "shop".into(),
            name: "off".into(),
            selector: Some([("app".to_string(), "api".to_string())].into()),
            mode: MtlsMode::Strict,
            port_modes: BTreeMap::new(),
            line: 1,
            ..Default::default()
        };
        disable.port_modes.insert(8081, MtlsMode::Disable);
        let (index, _) = MeshIndex::build(&pods, &[disable], "democluster.internal", "istio-system");
        assert!(matches!(index.upstream(addr("10.0.0.2:8080")), Upstream::Mtls { .. }));
        assert_eq!(index.upstream(addr("10.0.0.2:9090")), Upstream::Plaintext);
        assert_eq!(index.upstream(addr("10.0.0.2:8081")), Upstream::Plaintext);
    }

    #[test]
    fn an_ip_claimed_twice_goes_to_the_newer_pod_in_any_order() {
        let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut old = pod("old", "10.0.0.2", true, &[]);
        old.created = Some(t0);
        let mut new = pod("new", "10.0.0.2", true, &[]);
        new.created = Some(t0 + std::time::Duration::from_secs(1));
        for pods in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            let (index, notes) = MeshIndex::build(&pods, &[], "democluster.internal", "istio-system");
            assert_eq!(index.len(), 1);
            assert_eq!(index.peer("10.0.0.2".parse().unwrap()).unwrap().pod, "shop/new");
            assert_eq!(notes, ["pods shop/old and shop/new both claim IP 10.0.0.2; shop/new, the newer, keeps it"]);
        }
        // Without creation times (a pods file may omit them) the first keeps it.
        let (index, _) = MeshIndex::build(
            &[pod("a", "10.0.0.2", true, &[]), pod("b", "10.0.0.2", true, &[])],
            &[],
            "democluster.internal",
            "istio-system",
        );
        assert_eq!(index.peer("10.0.0.2".parse().unwrap()).unwrap().pod, "shop/a");
    }
}
