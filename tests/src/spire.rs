//! An in-process SPIRE agent admin endpoint: the real Delegated Identity API
//! (gRPC over a Unix socket, the `spire-api` protobuf messages), with SVIDs
//! minted by a test CA and driven by the test: issue, rotate, withdraw,
//! hand out a wrong or malformed SVID, stop and come back.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use spire_api::pb::spire::api::{
    agent::delegatedidentity::v1::{
        SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
        SubscribeToX509sviDsResponse, X509svidWithKey,
    },
    types::{Spiffeid, X509svid},
};
use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, Stream, StreamExt as _};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};

/// What the server currently says about one pod.
#[derive(Clone, Debug)]
pub enum PodSvid {
    /// An empty response: "not issued yet".
    NotIssued,
    /// A certificate chain (DER) and PKCS#8 key.
    Issued { id: String, chain: Vec<Vec<u8>>, key: Vec<u8>, expires_at: i64 },
}

/// A deliberate defect in an issued certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    None,
    Expired,
    CaFlag,
}

/// A certificate authority for one trust domain.
pub struct TestCa {
    pub trust_domain: String,
    key: KeyPair,
    params: CertificateParams,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("test CA {trust_domain}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into().expect("uri"))];
        let cert = params.self_signed(&key).expect("CA cert");
        Self { trust_domain: trust_domain.into(), der: cert.der().to_vec(), key, params }
    }

    /// An X.509-SVID for `id` (`spiffe://...`), valid for `ttl`.
    pub fn issue(&self, id: &str, ttl: Duration) -> PodSvid {
        self.issue_with(&[id], ttl, Flaw::None)
    }

    /// A leaf with the given URI SANs and, on purpose, a flaw: what a
    /// misbehaving peer might present.
    pub fn issue_with(&self, uris: &[&str], ttl: Duration, flaw: Flaw) -> PodSvid {
        let id = uris.first().copied().unwrap_or_default();
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().expect("URI"))).collect();
        // As SPIRE's X.509-SVIDs: basicConstraints present with cA false.
        params.is_ca =
            if flaw == Flaw::CaFlag { IsCa::Ca(BasicConstraints::Unconstrained) } else { IsCa::ExplicitNoCa };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl).expect("ttl");
        if flaw == Flaw::Expired {
            params.not_before = now - ttl - time::Duration::hours(1);
            params.not_after = now - time::Duration::hours(1);
        } else {
            params.not_before = now - time::Duration::minutes(1);
            params.not_after = now + ttl;
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        PodSvid::Issued {
            id: id.into(),
            chain: vec![cert.der().to_vec()],
            key: key.serialize_der(),
            expires_at: params.not_after.unix_timestamp(),
        }
    }
}

struct State {
    pods: Mutex<HashMap<String, watch::Sender<PodSvid>>>,
    bundles: watch::Sender<HashMap<String, Vec<u8>>>,
}

impl State {
    fn pod(&self, uid: &str) -> watch::Sender<PodSvid> {
        self.pods
            .lock()
            .expect("lock")
            .entry(uid.into())
            .or_insert_with(|| watch::channel(PodSvid::NotIssued).0)
            .clone()
    }
}

/// The server. Dropping it stops serving and removes the socket.
pub struct FakeSpire {
    socket: PathBuf,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeSpire {
    /// Serves at `socket`; bundles start with `ca`'s trust domain.
    pub fn start(socket: &Path, ca: &TestCa) -> Self {
        let (bundles, _) = watch::channel(HashMap::from([(ca.trust_domain.clone(), ca.der.clone())]));
        let state = Arc::new(State { pods: Mutex::new(HashMap::new()), bundles });
        let mut me = Self { socket: socket.into(), state, runtime: None };
        me.serve();
        me
    }

    fn serve(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake SPIRE runtime");
        let _ = std::fs::remove_file(&self.socket);
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&self.socket).expect("binding the fake SPIRE admin socket")
        };
        let service = DelegatedIdentity { state: self.state.clone() };
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        self.runtime = Some(runtime);
    }

    /// Stops serving and unlinks the socket (SPIRE agent going away).
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Serves again at the same path, with the same state (a restart).
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }

    /// Sets what subscribers for the pod with this uid receive.
    pub fn set(&self, pod_uid: &str, svid: PodSvid) {
        self.state.pod(pod_uid).send_replace(svid);
    }

    /// Trust bundles by trust domain (DER CA certificates, concatenated).
    pub fn set_bundles(&self, bundles: HashMap<String, Vec<u8>>) {
        self.state.bundles.send_replace(bundles);
    }
}

impl Drop for FakeSpire {
    fn drop(&mut self) {
        self.stop();
    }
}

fn response(svid: &PodSvid) -> SubscribeToX509sviDsResponse {
    match svid {
        PodSvid::NotIssued => SubscribeToX509sviDsResponse::default(),
        PodSvid::Issued { id, chain, key, expires_at } => {
            let rest = id.strip_prefix("spiffe://").unwrap_or(id);
            let (td, path) = rest.split_once('/').map_or((rest, ""), |(t, p)| (t, p));
            SubscribeToX509sviDsResponse {
                x509_svids: vec![X509svidWithKey {
                    x509_svid: Some(X509svid {
                        id: Some(Spiffeid { trust_domain: td.into(), path: format!("/{path}") }),
                        cert_chain: chain.iter().map(|c| c.clone().into()).collect(),
                        expires_at: *expires_at,
                        hint: String::new(),
                    }),
                    x509_svid_key: key.clone().into(),
                }],
                federates_with: vec![],
            }
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[derive(Clone)]
struct DelegatedIdentity {
    state: Arc<State>,
}

impl tonic::server::NamedService for DelegatedIdentity {
    const NAME: &'static str = "spire.api.agent.delegatedidentity.v1.DelegatedIdentity";
}

struct Svids(Arc<State>);

impl tonic::server::ServerStreamingService<SubscribeToX509sviDsRequest> for Svids {
    type Response = SubscribeToX509sviDsResponse;
    type ResponseStream = ResponseStream<Self::Response>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<SubscribeToX509sviDsRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let uid = request
                .get_ref()
                .selectors
                .iter()
                .find_map(|s| (s.r#type == "k8s").then(|| s.value.strip_prefix("pod-uid:")).flatten())
                .ok_or_else(|| tonic::Status::invalid_argument("no k8s:pod-uid selector"))?
                .to_string();
            let updates = WatchStream::new(state.pod(&uid).subscribe()).map(|svid| Ok(response(&svid)));
            Ok(tonic::Response::new(Box::pin(updates) as Self::ResponseStream))
        })
    }
}

struct Bundles(Arc<State>);

impl tonic::server::ServerStreamingService<SubscribeToX509BundlesRequest> for Bundles {
    type Response = SubscribeToX509BundlesResponse;
    type ResponseStream = ResponseStream<Self::Response>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, _request: tonic::Request<SubscribeToX509BundlesRequest>) -> Self::Future {
        let rx = self.0.bundles.subscribe();
        Box::pin(async move {
            let updates = WatchStream::new(rx).map(|bundles| {
                let ca_certificates = bundles.into_iter().map(|(td, der)| (td, der.into())).collect();
                Ok(SubscribeToX509BundlesResponse { ca_certificates })
            });
            Ok(tonic::Response::new(Box::pin(updates) as Self::ResponseStream))
        })
    }
}

impl<B> Service<http::Request<B>> for DelegatedIdentity
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        match req.uri().path() {
            "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(Svids(state), req).await)
            }),
            "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509Bundles" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(Bundles(state), req).await)
            }),
            _ => Box::pin(async move { Ok(tonic::Status::unimplemented("not served by this fake").into_http()) }),
        }
    }
}
