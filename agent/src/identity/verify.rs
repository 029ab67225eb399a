//! The handshake verifiers: one type that checks a peer's SVID the same way whichever side it is on.
//!
//! Order of checks: parse the leaf and apply the SPIFFE leaf rules (its URI SAN names the trust domain),
//! pick that domain's bundle, then let webpki verify the chain (signatures with the provider's
//! algorithms, validity at handshake time, the EKU of the peer's role). The SAN is read before the chain
//! is verified because it selects the bundle; nothing read from it is trusted until the chain verifies.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};

use super::{x509, IdentityError, SpiffeId, TrustBundles};

/// Verifies SPIFFE peers: as the server config's client-certificate verifier directly, and on the
/// client side through [`ExpectedServer`], which adds the one ID the server must prove.
#[derive(Debug)]
pub(super) struct SpiffeVerifier {
    domains: BTreeMap<String, DomainTrust>,
    algorithms: WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
struct DomainTrust {
    roots: Arc<RootCertStore>,
    // rustls' own client-certificate path validation (clientAuth EKU) for this domain's roots; it never
    // looks at names, so it is exactly the chain check we need for clients.
    clients: Arc<dyn ClientCertVerifier>,
}

/// Which role the peer plays: it decides the EKU webpki requires.
#[derive(Clone, Copy)]
enum PeerRole {
    Client,
    Server,
}

impl SpiffeVerifier {
    pub(super) fn new(bundles: &TrustBundles, provider: &Arc<CryptoProvider>) -> Result<SpiffeVerifier, IdentityError> {
        if bundles.is_empty() {
            return Err(IdentityError::NoTrustBundles);
        }
        let mut domains = BTreeMap::new();
        for (domain, bundle) in bundles.iter() {
            let clients = WebPkiClientVerifier::builder_with_provider(bundle.store.clone(), provider.clone())
                .build()
                .map_err(|source| IdentityError::VerifierBuild { trust_domain: domain.clone(), source })?;
            domains.insert(domain.clone(), DomainTrust { roots: bundle.store.clone(), clients });
        }
        Ok(SpiffeVerifier { domains, algorithms: provider.signature_verification_algorithms })
    }

    /// Checks the peer's chain and SPIFFE leaf rules; returns the SPIFFE ID it proved.
    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, rustls::Error> {
        let leaf = x509::inspect_leaf(end_entity).map_err(rejected)?;
        let trust_domain = leaf.id.trust_domain();
        let trust = self
            .domains
            .get(trust_domain)
            .ok_or_else(|| rejected(IdentityError::UnknownTrustDomain { trust_domain: trust_domain.to_string() }))?;
        let chain = match role {
            PeerRole::Client => trust.clients.verify_client_cert(end_entity, intermediates, now).map(drop),
            PeerRole::Server => {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &trust.roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            }
        };
        chain.map_err(|err| match err {
            // rustls' own messages for these already say "certificate expired: ..." with the times, and
            // the variant makes rustls send the certificate_expired alert.
            rustls::Error::InvalidCertificate(
                reason @ (CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }),
            ) => rustls::Error::InvalidCertificate(reason),
            rustls::Error::InvalidCertificate(reason) => {
                rejected(IdentityError::ChainRejected { trust_domain: trust_domain.to_string(), reason })
            }
            other => other,
        })?;
        Ok(leaf.id)
    }
}

/// Wraps a rule violation so the handshake error both fails the handshake and says which rule failed.
fn rejected(err: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// The client side's verifier: the server must prove exactly the SPIFFE ID the mesh says lives at the
/// dialled address (`None` only in the template each connection's config is cloned from).
///
/// Checked inside the handshake, not after it: a client that only compared IDs once the handshake was
/// done would already have sent its certificate and Finished, so an impostor's engine would count the
/// connection as authenticated and open one to its app before the client hung up.
#[derive(Debug)]
pub(super) struct ExpectedServer {
    pub(super) trust: Arc<SpiffeVerifier>,
    pub(super) expected: Option<SpiffeId>,
}

impl ServerCertVerifier for ExpectedServer {
    /// The server name is ignored on purpose: engines dial pod IPs, and a SPIFFE identity is carried by
    /// the URI SAN alone.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = self.trust.verify_peer(end_entity, intermediates, now, PeerRole::Server)?;
        match &self.expected {
            Some(expected) if *expected != presented => Err(rejected(IdentityError::UnexpectedServer {
                expected: expected.to_string(),
                presented: presented.to_string(),
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    // The configs are TLS 1.3 only so this is never reached; delegating keeps it correct regardless.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA hints: with federation they would list every domain's roots, and an SVID holder has exactly
    /// one certificate to offer anyway (an empty list means "send whatever you have").
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, PeerRole::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
