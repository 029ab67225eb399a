//! Real TLS 1.3 handshakes over in-memory pipes (tokio-rustls on `tokio::io::duplex`), with certificates
//! minted by the development CA, including ones it would refuse to issue.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::ServerSessionMemoryCache;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig, SignatureScheme};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::dev_ca::{new_key, uri_san};
use super::*;

const TD: &str = "democluster.internal";
const PARTNER: &str = "partner.example";
const TTL: Duration = Duration::from_secs(3600);
const HOUR: Duration = Duration::from_secs(3600);

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("test IDs are valid")
}

fn workload(ca: &DevCa, ns: &str, sa: &str) -> Svid {
    let id = workload_id(ca.trust_domain(), ns, sa).expect("valid workload id");
    ca.issue(&id, TTL).expect("dev CA issues")
}

fn identity(svid: &Svid, bundles: &TrustBundles) -> TlsIdentity {
    tls_identity(svid, bundles).expect("configs build")
}

/// A leaf the dev CA would not issue: arbitrary URI SANs, CA flag, validity window.
struct LeafSpec {
    uris: Vec<String>,
    ca_flag: bool,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl LeafSpec {
    fn valid(uri: &str) -> LeafSpec {
        let now = SystemTime::now();
        LeafSpec {
            uris: vec![uri.to_string()],
            ca_flag: false,
            ekus: vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - HOUR,
            not_after: now + HOUR,
        }
    }
}

/// Signs `spec` with `ca` and wraps it in an `Svid` without `Svid::from_der`'s checks, so a misbehaving
/// peer can present it.
fn mint(ca: &DevCa, spec: LeafSpec) -> Svid {
    let mut params = CertificateParams::default();
    params.subject_alt_names = spec.uris.iter().map(|uri| uri_san(uri).expect("ASCII URI")).collect();
    params.is_ca = if spec.ca_flag { IsCa::Ca(BasicConstraints::Unconstrained) } else { IsCa::ExplicitNoCa };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = spec.ekus;
    params.not_before = OffsetDateTime::from(spec.not_before);
    params.not_after = OffsetDateTime::from(spec.not_after);
    let key = new_key().expect("key");
    let leaf = ca.sign(&params, &key).expect("sign");
    Svid {
        id: SpiffeId::parse(spec.uris.first().map_or("spiffe://unused/none", String::as_str))
            .unwrap_or_else(|_| id("spiffe://unused/invalid")),
        chain: vec![leaf],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before: spec.not_before,
        not_after: spec.not_after,
    }
}

struct Handshake {
    client: io::Result<client::TlsStream<DuplexStream>>,
    server: io::Result<server::TlsStream<DuplexStream>>,
}

/// Runs one handshake. The engine dials pod IPs, so the client uses an IP server name (no SNI).
async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Handshake {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::IpAddress(Ipv4Addr::new(10, 1, 2, 3).into());
    let both = async {
        tokio::join!(TlsConnector::from(client).connect(name, client_io), TlsAcceptor::from(server).accept(server_io))
    };
    let (client, server) = tokio::time::timeout(Duration::from_secs(10), both).await.expect("handshake hangs");
    Handshake { client, server }
}

fn error_text(result: &io::Result<impl Sized>) -> String {
    match result {
        Ok(_) => panic!("expected this side of the handshake to fail"),
        Err(err) => err.to_string(),
    }
}

/// The rule behind a verifier rejection, as a log line or a metric would recover it.
fn rule(err: &io::Error) -> Option<&IdentityError> {
    super::handshake_failure(err)
}

/// After the server rejected the client's certificate, the client (whose TLS 1.3 handshake completes
/// before the server has judged it) must find the connection dead.
async fn assert_dead(mut stream: client::TlsStream<DuplexStream>) {
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("read hangs");
    assert!(matches!(read, Err(_) | Ok(0)), "connection still alive: {read:?}");
}

async fn exchange(client: &mut client::TlsStream<DuplexStream>, server: &mut server::TlsStream<DuplexStream>) {
    client.write_all(b"ping").await.expect("client writes");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("server reads");
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.expect("server writes");
    client.read_exact(&mut buf).await.expect("client reads");
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn mutual_handshake_exposes_both_ids_and_alpn() {
    let ca = DevCa::new(TD).expect("CA");
    let a = workload(&ca, "a", "client");
    let b = workload(&ca, "b", "server");
    let (a_tls, b_tls) = (identity(&a, &ca.bundles()), identity(&b, &ca.bundles()));
    // Each pod dials and accepts, so check both directions.
    for (dialer, listener) in [(&a_tls, &b_tls), (&b_tls, &a_tls)] {
        let hs = handshake(dialer.client_for(&listener.id), listener.server.clone()).await;
        let (mut client, mut server) = (hs.client.expect("client side"), hs.server.expect("server side"));
        let (_, client_conn) = client.get_ref();
        let (_, server_conn) = server.get_ref();
        assert_eq!(peer_id(client_conn.peer_certificates()), Some(listener.id.clone()));
        assert_eq!(peer_id(server_conn.peer_certificates()), Some(dialer.id.clone()));
        assert_eq!(client_conn.alpn_protocol(), Some(ALPN));
        assert_eq!(server_conn.alpn_protocol(), Some(ALPN));
        assert_eq!(client_conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(server_conn.server_name(), None, "an IP server name must not be sent as SNI");
        exchange(&mut client, &mut server).await;
    }
    assert_eq!(a_tls.id.as_str(), "spiffe://democluster.internal/ns/a/sa/client");
    assert_eq!(b_tls.not_after, b.not_after);
}

#[tokio::test]
async fn a_server_proving_another_id_is_refused_before_the_client_authenticates() {
    let ca = DevCa::new(TD).expect("CA");
    let client = identity(&workload(&ca, "a", "client"), &ca.bundles());
    let server = identity(&workload(&ca, "b", "server"), &ca.bundles());
    // Valid in every other way: same CA, same namespace, another service account.
    let impostor = identity(&workload(&ca, "b", "impostor"), &ca.bundles());

    let hs = handshake(client.client_for(&server.id), impostor.server.clone()).await;
    let err = hs.client.expect_err("the client refuses the impostor");
    match rule(&err) {
        Some(IdentityError::UnexpectedServer { expected, presented }) => {
            assert_eq!((expected.as_str(), presented.as_str()), (server.id.as_str(), impostor.id.as_str()));
        }
        other => panic!("refused for the wrong reason: {other:?} ({err})"),
    }
    assert!(err.to_string().contains("expected spiffe://democluster.internal/ns/b/sa/server"), "{err}");
    // The client never sent its certificate and Finished, so the impostor has no authenticated
    // connection to hand to its app.
    assert!(hs.server.is_err(), "the impostor's side must not complete");

    let hs = handshake(client.client_for(&server.id), server.server.clone()).await;
    let (mut a, mut b) = (hs.client.expect("the expected server is reached"), hs.server.expect("server side"));
    exchange(&mut a, &mut b).await;
}

/// A peer presenting `bad` is rejected whichever side it plays, with `expected` in the verifier's error.
async fn assert_rejected(ca: &DevCa, bad: &TlsIdentity, expected: &str) {
    let good = identity(&workload(ca, "default", "good"), &ca.bundles());

    // Bad server: the client's verifier rejects it.
    let hs = handshake(good.client.clone(), bad.server.clone()).await;
    let text = error_text(&hs.client);
    assert!(text.contains(expected), "client error {text:?} does not name {expected:?}");
    assert!(hs.server.is_err(), "server must not complete either");

    // Bad client: the server's verifier rejects it.
    let hs = handshake(bad.client.clone(), good.server.clone()).await;
    let text = error_text(&hs.server);
    assert!(text.contains(expected), "server error {text:?} does not name {expected:?}");
    if let Ok(client) = hs.client {
        assert_dead(client).await;
    }
}

#[tokio::test]
async fn foreign_trust_domain_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let evil = DevCa::new("evil.example").expect("CA");
    // The foreign peer trusts us; we do not trust it.
    let bad = identity(&workload(&evil, "x", "mallory"), &ca.bundles());
    assert_rejected(&ca, &bad, "no trust bundle for trust domain evil.example").await;
}

#[tokio::test]
async fn impostor_ca_for_our_trust_domain_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let impostor = DevCa::new(TD).expect("CA");
    let bad = identity(&workload(&impostor, "default", "good"), &ca.bundles());
    assert_rejected(&ca, &bad, "does not verify against the trust bundle of democluster.internal").await;
}

#[tokio::test]
async fn expired_certificate_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let now = SystemTime::now();
    let spec = LeafSpec {
        not_before: now - 2 * HOUR,
        not_after: now - HOUR,
        ..LeafSpec::valid(&format!("spiffe://{TD}/ns/a/sa/old"))
    };
    let bad = identity(&mint(&ca, spec), &ca.bundles());
    assert_rejected(&ca, &bad, "certificate expired").await;
}

#[tokio::test]
async fn not_yet_valid_certificate_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let now = SystemTime::now();
    let spec = LeafSpec {
        not_before: now + HOUR,
        not_after: now + 2 * HOUR,
        ..LeafSpec::valid(&format!("spiffe://{TD}/ns/a/sa/new"))
    };
    let bad = identity(&mint(&ca, spec), &ca.bundles());
    assert_rejected(&ca, &bad, "certificate not valid yet").await;
}

#[tokio::test]
async fn ca_flag_leaf_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let spec = LeafSpec { ca_flag: true, ..LeafSpec::valid(&format!("spiffe://{TD}/ns/a/sa/ca")) };
    let bad = identity(&mint(&ca, spec), &ca.bundles());
    assert_rejected(&ca, &bad, "leaf is a CA certificate").await;
}

#[tokio::test]
async fn two_uri_sans_are_rejected_with_recoverable_rule() {
    let ca = DevCa::new(TD).expect("CA");
    let spec = LeafSpec {
        uris: vec![format!("spiffe://{TD}/ns/a/sa/one"), format!("spiffe://{TD}/ns/a/sa/two")],
        ..LeafSpec::valid("unused")
    };
    let bad = identity(&mint(&ca, spec), &ca.bundles());
    assert_rejected(&ca, &bad, "leaf certificate has 2 URI SANs; SPIFFE requires exactly one").await;

    let good = identity(&workload(&ca, "default", "good"), &ca.bundles());
    let hs = handshake(good.client.clone(), bad.server.clone()).await;
    let err = hs.client.expect_err("client rejects");
    assert!(matches!(rule(&err), Some(IdentityError::UriSanCount { count: 2 })), "{err:?}");
}

#[tokio::test]
async fn missing_or_non_spiffe_uri_san_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let bad = identity(&mint(&ca, LeafSpec { uris: vec![], ..LeafSpec::valid("unused") }), &ca.bundles());
    assert_rejected(&ca, &bad, "leaf certificate has 0 URI SANs").await;

    let bad = identity(&mint(&ca, LeafSpec::valid("https://democluster.internal/ns/a")), &ca.bundles());
    assert_rejected(&ca, &bad, "is not a valid SPIFFE ID").await;
}

#[tokio::test]
async fn extended_key_usage_must_fit_the_role() {
    let ca = DevCa::new(TD).expect("CA");
    let good = identity(&workload(&ca, "default", "good"), &ca.bundles());
    let spec = LeafSpec {
        ekus: vec![ExtendedKeyUsagePurpose::ServerAuth],
        ..LeafSpec::valid(&format!("spiffe://{TD}/ns/a/sa/server-only"))
    };
    let server_only = identity(&mint(&ca, spec), &ca.bundles());

    let hs = handshake(good.client.clone(), server_only.server.clone()).await;
    assert!(hs.client.is_ok() && hs.server.is_ok(), "serverAuth suffices for a server");

    let hs = handshake(server_only.client.clone(), good.server.clone()).await;
    let text = error_text(&hs.server);
    assert!(text.contains("does not verify against the trust bundle") && text.contains("extended key usage"), "{text}");
}

#[tokio::test]
async fn chain_with_intermediate_verifies() {
    let ca = DevCa::new(TD).expect("CA");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "meshcap test intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let intermediate_key = new_key().expect("key");
    let intermediate = ca.sign(&params, &intermediate_key).expect("sign");
    let issuer = rcgen::Issuer::new(params, intermediate_key);

    let mut leaf_params = CertificateParams::default();
    leaf_params.subject_alt_names = vec![uri_san(&format!("spiffe://{TD}/ns/c/sa/deep")).expect("URI")];
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = new_key().expect("key");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("sign leaf");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let deep = Svid::from_der(vec![leaf.der().clone(), intermediate], key).expect("valid two-level SVID");

    let deep_tls = identity(&deep, &ca.bundles());
    let good = identity(&workload(&ca, "default", "good"), &ca.bundles());
    for (dialer, listener) in [(&good, &deep_tls), (&deep_tls, &good)] {
        let hs = handshake(dialer.client.clone(), listener.server.clone()).await;
        let (client, server) = (hs.client.expect("client side"), hs.server.expect("server side"));
        assert_eq!(peer_id(client.get_ref().1.peer_certificates()), Some(listener.id.clone()));
        assert_eq!(peer_id(server.get_ref().1.peer_certificates()), Some(dialer.id.clone()));
    }
}

#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let ca = DevCa::new(TD).expect("CA");
    let server = identity(&workload(&ca, "b", "server"), &ca.bundles());
    let mut anonymous = (*identity(&workload(&ca, "a", "client"), &ca.bundles()).client).clone();
    anonymous.client_auth_cert_resolver = Arc::new(NoClientCert);
    let hs = handshake(Arc::new(anonymous), server.server.clone()).await;
    let text = error_text(&hs.server);
    assert!(text.contains("peer sent no certificates"), "{text:?}");
    if let Ok(client) = hs.client {
        assert_dead(client).await;
    }
}

#[tokio::test]
async fn federated_domain_is_accepted_by_its_own_bundle_only() {
    let ours = DevCa::new(TD).expect("CA");
    let partner = DevCa::new(PARTNER).expect("CA");
    let mut federated = ours.bundles();
    federated.insert(PARTNER, vec![partner.root().clone()]).expect("partner root");
    assert_eq!(federated.domains(), vec![TD.to_string(), PARTNER.to_string()]);

    let local = identity(&workload(&ours, "a", "client"), &federated);
    let remote = identity(&workload(&partner, "b", "server"), &federated);
    for (dialer, listener) in [(&local, &remote), (&remote, &local)] {
        let hs = handshake(dialer.client.clone(), listener.server.clone()).await;
        let (client, server) = (hs.client.expect("client side"), hs.server.expect("server side"));
        assert_eq!(peer_id(client.get_ref().1.peer_certificates()), Some(listener.id.clone()));
        assert_eq!(peer_id(server.get_ref().1.peer_certificates()), Some(dialer.id.clone()));
    }
    assert_eq!(remote.id.trust_domain(), PARTNER);

    // Federation must not let the partner's CA mint identities of our domain.
    let forged = mint(&partner, LeafSpec::valid(&format!("spiffe://{TD}/ns/a/sa/client")));
    let forged = identity(&forged, &federated);
    let hs = handshake(local.client.clone(), forged.server.clone()).await;
    let text = error_text(&hs.client);
    assert!(text.contains("does not verify against the trust bundle of democluster.internal"), "{text:?}");
}

#[tokio::test]
async fn sessions_are_never_resumed() {
    let ca = DevCa::new(TD).expect("CA");
    let client_tls = identity(&workload(&ca, "a", "client"), &ca.bundles());
    let server_tls = identity(&workload(&ca, "b", "server"), &ca.bundles());

    // Control: with resumption switched back on, the same sequence does resume, so the check below
    // can tell the difference.
    let mut resuming_client = (*client_tls.client).clone();
    resuming_client.resumption = Resumption::in_memory_sessions(16);
    let mut resuming_server = (*server_tls.server).clone();
    resuming_server.session_storage = ServerSessionMemoryCache::new(16);
    resuming_server.send_tls13_tickets = 2;
    let kinds = two_handshakes(Arc::new(resuming_client), Arc::new(resuming_server)).await;
    assert_eq!(kinds[1], (Some(HandshakeKind::Resumed), Some(HandshakeKind::Resumed)));

    let kinds = two_handshakes(client_tls.client.clone(), server_tls.server.clone()).await;
    let full = (Some(HandshakeKind::Full), Some(HandshakeKind::Full));
    assert_eq!(kinds, [full, full]);
}

/// Two handshakes with the same configs; each carries data so session tickets are read.
async fn two_handshakes(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> [(Option<HandshakeKind>, Option<HandshakeKind>); 2] {
    let mut kinds = [(None, None); 2];
    for kind in &mut kinds {
        let hs = handshake(client.clone(), server.clone()).await;
        let (mut c, mut s) = (hs.client.expect("client side"), hs.server.expect("server side"));
        exchange(&mut c, &mut s).await;
        *kind = (c.get_ref().1.handshake_kind(), s.get_ref().1.handshake_kind());
    }
    kinds
}

#[test]
fn spiffe_id_parse_table() {
    let accepted =
        ["spiffe://democluster.internal/ns/default/sa/myapi", "spiffe://a.b-c_d/x", "spiffe://td/Mixed.Case-path_ok/2"];
    for s in accepted {
        let parsed = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(parsed.as_str(), s);
        assert_eq!(parsed.to_string(), s);
    }
    let rejected = [
        ("", "must start with"),
        ("http://td/x", "must start with"),
        ("SPIFFE://td/x", "must start with"),
        ("spiffe://", "trust domain: empty"),
        ("spiffe:///x", "trust domain: empty"),
        ("spiffe://td", "path is empty"),
        ("spiffe://td/", "path"),
        ("spiffe://TD/x", "must be lowercase"),
        ("spiffe://td:8443/x", "port is not allowed"),
        ("spiffe://user@td/x", "userinfo is not allowed"),
        ("spiffe://td/x?query=1", "query and fragment"),
        ("spiffe://td/x#frag", "query and fragment"),
        ("spiffe://td//x", "path"),
        ("spiffe://td/./x", "path"),
        ("spiffe://td/../x", "path"),
        ("spiffe://td/x/", "path"),
        ("spiffe://td/a b", "path"),
        ("spiffe://td/%41", "path"),
        ("spiffe://t d/x", "not allowed"),
    ];
    for (s, reason) in rejected {
        match SpiffeId::parse(s) {
            Ok(id) => panic!("{s:?} accepted as {id}"),
            Err(e) => assert!(e.to_string().contains(reason), "{s:?}: {e} does not mention {reason:?}"),
        }
    }
    let long = format!("spiffe://td/{}", "a".repeat(2100));
    assert!(SpiffeId::parse(&long).is_err());
}

#[test]
fn spiffe_id_accessors_and_serde() {
    let id = id("spiffe://democluster.internal/ns/default/sa/myapi");
    assert_eq!(id.trust_domain(), "democluster.internal");
    assert_eq!(id.path(), "/ns/default/sa/myapi");
    assert_eq!(id.as_spiffe().to_string(), id.as_str());
    assert_eq!(
        serde_json::to_string(&id).expect("serializes"),
        "\"spiffe://democluster.internal/ns/default/sa/myapi\""
    );
    let back: SpiffeId = serde_json::from_str("\"spiffe://democluster.internal/ns/default/sa/myapi\"").expect("parses");
    assert_eq!(back, id);
    assert!(serde_json::from_str::<SpiffeId>("\"spiffe://Bad/x\"").is_err());
    assert_eq!(format!("{id:?}"), "SpiffeId(\"spiffe://democluster.internal/ns/default/sa/myapi\")");
}

#[test]
fn workload_id_follows_the_cluster_template() {
    let id = workload_id("democluster.internal", "default", "myapi").expect("valid");
    assert_eq!(id.as_str(), "spiffe://democluster.internal/ns/default/sa/myapi");
    for (ns, sa) in [("a/b", "x"), ("", "x"), ("default", ""), ("default", "../x")] {
        assert!(workload_id(TD, ns, sa).is_err(), "{ns:?}/{sa:?} accepted");
    }
    assert!(workload_id("Bad.Domain", "default", "x").is_err());
}

#[test]
fn svid_from_der_accepts_dev_ca_output() {
    let ca = DevCa::new(TD).expect("CA");
    let id = workload_id(TD, "default", "myapi").expect("valid");
    let svid = ca.issue(&id, TTL).expect("issue");
    let again = Svid::from_der(svid.chain.clone(), svid.key.clone_key()).expect("re-parses");
    assert_eq!(again.id, id);
    assert!(svid.not_before <= SystemTime::now() && SystemTime::now() < svid.not_after);
    let ttl_seen = svid.not_after.duration_since(SystemTime::now()).expect("in the future");
    assert!(ttl_seen <= TTL && ttl_seen > TTL - Duration::from_secs(60), "{ttl_seen:?}");
}

#[test]
fn svid_from_der_rejects_with_named_rule() {
    let ca = DevCa::new(TD).expect("CA");
    let one = workload(&ca, "a", "one");
    let other = workload(&ca, "a", "other");
    let err = Svid::from_der(one.chain.clone(), other.key.clone_key()).expect_err("mismatched key");
    assert!(matches!(err, IdentityError::KeyMismatch), "{err}");
    assert_eq!(err.to_string(), "private key does not match the leaf certificate's public key");

    let spec =
        LeafSpec { uris: vec![format!("spiffe://{TD}/a"), format!("spiffe://{TD}/b")], ..LeafSpec::valid("unused") };
    let two = mint(&ca, spec);
    let err = Svid::from_der(two.chain, two.key).expect_err("two URI SANs");
    assert_eq!(err.to_string(), "leaf certificate has 2 URI SANs; SPIFFE requires exactly one");

    let ca_leaf = mint(&ca, LeafSpec { ca_flag: true, ..LeafSpec::valid(&format!("spiffe://{TD}/a")) });
    let err = Svid::from_der(ca_leaf.chain, ca_leaf.key).expect_err("CA leaf");
    assert!(matches!(err, IdentityError::LeafIsCa), "{err}");

    let err = Svid::from_der(vec![], one.key.clone_key()).expect_err("empty chain");
    assert!(matches!(err, IdentityError::EmptyChain), "{err}");

    let err = Svid::from_der(vec![CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])], one.key.clone_key())
        .expect_err("garbage");
    assert!(matches!(err, IdentityError::MalformedCertificate { index: 0, .. }), "{err}");

    // A leaf is not an intermediate.
    let err = Svid::from_der(vec![one.chain[0].clone(), other.chain[0].clone()], one.key.clone_key())
        .expect_err("leaf as intermediate");
    assert!(matches!(err, IdentityError::IntermediateNotCa { index: 1 }), "{err}");
}

#[test]
fn trust_bundles_check_their_roots() {
    let ca = DevCa::new(TD).expect("CA");
    let mut bundles = TrustBundles::new();
    let leaf = workload(&ca, "a", "b").chain.remove(0);
    let err = bundles.insert(TD, vec![leaf]).expect_err("leaf as root");
    assert!(matches!(err, IdentityError::RootNotCa { index: 0, .. }), "{err}");
    assert!(matches!(bundles.insert(TD, vec![]), Err(IdentityError::EmptyBundle { .. })));
    assert!(matches!(
        bundles.insert("Not Valid", vec![ca.root().clone()]),
        Err(IdentityError::InvalidTrustDomain { .. })
    ));
    assert!(bundles.domains().is_empty());
    bundles.insert(TD, vec![ca.root().clone()]).expect("CA root");
    assert_eq!(bundles.domains(), vec![TD.to_string()]);
    assert_eq!(bundles.roots(TD), Some(&[ca.root().clone()][..]));

    let err = tls_identity(&workload(&ca, "a", "b"), &TrustBundles::new()).expect_err("no bundles");
    assert!(matches!(err, IdentityError::NoTrustBundles), "{err}");
}

#[test]
fn dev_ca_root_is_a_spiffe_signing_certificate() {
    assert!(DevCa::new("Bad Domain").is_err());
    let ca = DevCa::new(TD).expect("CA");
    let root = x509::parse(ca.root(), 0).expect("parses");
    assert!(x509::is_ca(&root, 0).expect("basic constraints"));
    // The root carries its trust domain's bare ID, which names no workload.
    let err = x509::single_spiffe_id(&root).expect_err("bare trust domain ID");
    assert!(
        matches!(&err, IdentityError::UriSanNotSpiffe { uri, .. } if uri == "spiffe://democluster.internal"),
        "{err}"
    );
    assert_eq!(peer_id(Some(&[ca.root().clone()])), None);
}
