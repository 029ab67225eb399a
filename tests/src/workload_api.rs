//! An in-process SPIFFE Workload API: `SpiffeWorkloadAPI/FetchX509SVID`
//! over a Unix socket, refusing requests without the `workload.spiffe.io:
//! true` security header as real implementations do.

use std::{path::Path, pin::Pin, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, Stream, StreamExt as _};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};

use crate::spire::{PodSvid, TestCa};

/// The Workload API messages (workload.proto), written out: the `spiffe`
/// crate keeps its generated types private.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// Serves one identity (the agent's) until dropped.
pub struct FakeWorkloadApi {
    socket: std::path::PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    _svid: watch::Sender<X509SvidResponse>,
}

impl FakeWorkloadApi {
    pub fn start(socket: &Path, ca: &TestCa, id: &str) -> Self {
        let PodSvid::Issued { chain, key, .. } = ca.issue(id, Duration::from_secs(3600)) else {
            unreachable!("issue always issues")
        };
        let response = X509SvidResponse {
            svids: vec![X509Svid {
                spiffe_id: id.into(),
                x509_svid: chain.concat(),
                x509_svid_key: key,
                bundle: ca.der.clone(),
                hint: String::new(),
            }],
            ..Default::default()
        };
        let (tx, rx) = watch::channel(response);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake Workload API runtime");
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(socket).expect("binding the fake Workload API socket")
        };
        let service = WorkloadApi { svid: Arc::new(rx) };
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Self { socket: socket.into(), runtime: Some(runtime), _svid: tx }
    }
}

impl Drop for FakeWorkloadApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[derive(Clone)]
struct WorkloadApi {
    svid: Arc<watch::Receiver<X509SvidResponse>>,
}

impl tonic::server::NamedService for WorkloadApi {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

struct FetchX509(Arc<watch::Receiver<X509SvidResponse>>);

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchX509 {
    type Response = X509SvidResponse;
    type ResponseStream = ResponseStream<Self::Response>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<X509SvidRequest>) -> Self::Future {
        let rx = (*self.0).clone();
        Box::pin(async move {
            let header = request.metadata().get("workload.spiffe.io").and_then(|v| v.to_str().ok());
            if header != Some("true") {
                return Err(tonic::Status::invalid_argument("security header missing from request"));
            }
            let updates = WatchStream::new(rx).map(Ok);
            Ok(tonic::Response::new(Box::pin(updates) as Self::ResponseStream))
        })
    }
}

impl<B> Service<http::Request<B>> for WorkloadApi
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
        let svid = self.svid.clone();
        match req.uri().path() {
            "/SpiffeWorkloadAPI/FetchX509SVID" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchX509(svid), req).await)
            }),
            _ => Box::pin(async move { Ok(tonic::Status::unimplemented("not served by this fake").into_http()) }),
        }
    }
}
