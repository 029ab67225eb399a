//! rustls configs for one pod identity, and reading the peer's identity from a handshake.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::NoServerSessionStorage;
use rustls::version::TLS13;
use rustls::{ClientConfig, ServerConfig};

use super::verify::{ExpectedServer, SpiffeVerifier};
use super::{x509, IdentityError, SpiffeId, Svid, TrustBundles, ALPN};

/// What a pod presents and accepts: configs are built once per identity (and per rotation) and shared.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    pub id: SpiffeId,
    pub not_after: SystemTime,
    pub server: Arc<ServerConfig>,
    /// Accepts any server of a trusted domain; connections use [`TlsIdentity::client_for`].
    pub(super) client: Arc<ClientConfig>,
    trust: Arc<SpiffeVerifier>,
}

impl TlsIdentity {
    /// The client config for one connection to a server that must prove `expected`.
    ///
    /// A clone of the shared config with its own verifier: a few small allocations, next to a handshake's
    /// signatures, and the only way rustls lets a verifier know which peer this connection is for.
    pub fn client_for(&self, expected: &SpiffeId) -> Arc<ClientConfig> {
        let mut config = (*self.client).clone();
        config.dangerous().set_certificate_verifier(Arc::new(ExpectedServer {
            trust: self.trust.clone(),
            expected: Some(expected.clone()),
        }));
        Arc::new(config)
    }
}

/// Builds the server and client configs that present `svid` and accept peers from `bundles`.
///
/// Both are TLS 1.3 only with the ring provider, speak only [`ALPN`], require a certificate from the
/// peer and never resume a session: a resumed session would skip certificate verification, so a peer
/// whose SVID expired or whose bundle was dropped could come back without being checked.
///
/// `svid` is trusted to be what [`Svid::from_der`] accepted; it is not re-validated here.
pub fn tls_identity(svid: &Svid, bundles: &TrustBundles) -> Result<TlsIdentity, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeVerifier::new(bundles, &provider)?);
    Ok(TlsIdentity {
        id: svid.id.clone(),
        not_after: svid.not_after,
        server: Arc::new(server_config(svid, &provider, verifier.clone())?),
        client: Arc::new(client_config(svid, &provider, verifier.clone())?),
        trust: verifier,
    })
}

fn server_config(
    svid: &Svid,
    provider: &Arc<CryptoProvider>,
    verifier: Arc<SpiffeVerifier>,
) -> Result<ServerConfig, IdentityError> {
    let config_error = |source| IdentityError::TlsConfig { side: "server", source };
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No stateful resumption and no tickets: every connection runs the full handshake and the verifier.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn client_config(
    svid: &Svid,
    provider: &Arc<CryptoProvider>,
    verifier: Arc<SpiffeVerifier>,
) -> Result<ClientConfig, IdentityError> {
    let config_error = |source| IdentityError::TlsConfig { side: "client", source };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedServer { trust: verifier, expected: None }))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The identity rule a failed handshake broke, if a verifier refused the peer's certificate.
pub fn handshake_failure(err: &std::io::Error) -> Option<&IdentityError> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other.0.downcast_ref(),
        _ => None,
    }
}

/// After a completed handshake: the verified peer's SPIFFE ID (from the leaf's URI SAN).
///
/// Pass `conn.peer_certificates()`. Only meaningful on connections made with a [`TlsIdentity`] config,
/// whose verifier has already required exactly one valid SPIFFE URI SAN; anything else yields `None`.
pub fn peer_id(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certificates?.first()?;
    let cert = x509::parse(leaf, 0).ok()?;
    x509::single_spiffe_id(&cert).ok()
}

/// When the verified peer's leaf expires: with [`peer_id`], tells which SVID
/// a peer presented (rotation shows up as a new expiry).
pub fn peer_not_after(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<std::time::SystemTime> {
    let leaf = peer_certificates?.first()?;
    x509::inspect_leaf(leaf).ok().map(|l| l.not_after)
}
