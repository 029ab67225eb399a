//! Workload identity for mutual TLS between pods.
//!
//! Each side of an engine-to-engine connection presents its own pod's SPIFFE X.509 SVID and accepts the
//! peer only if the peer's leaf carries exactly one `spiffe://` URI SAN and chains to the trust bundle of
//! the peer's own trust domain. A client also requires the one SPIFFE ID it dialled
//! ([`TlsIdentity::client_for`]) before it authenticates itself. The SPIFFE ID of a verified client is
//! read with [`peer_id`]; deciding whether that ID may talk to this pod is policy's job, not this module's.
//!
//! Identity sources hand over DER ([`Svid::from_der`], [`TrustBundles::insert`]); [`DevCa`] is the
//! embedded source for demos and tests when no SPIRE agent socket is configured.

mod dev_ca;
mod svid;
mod tls;
mod verify;
mod x509;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use dev_ca::DevCa;
pub use svid::{Svid, TrustBundles};
pub use tls::{handshake_failure, peer_id, peer_not_after, tls_identity, TlsIdentity};

/// ALPN protocol meshcap speaks between engines.
pub const ALPN: &[u8] = b"meshcap/1";

const SCHEME_PREFIX: &str = "spiffe://";
/// SPIFFE-ID spec §2.1: trust domain names are at most 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE-ID spec §2.3: implementations must support 2048-byte IDs and should not mint longer ones.
const MAX_ID_LEN: usize = 2048;

/// Everything that can go wrong while parsing, issuing or verifying identities.
///
/// The verifiers put these into `rustls::CertificateError::Other`, so a handshake failure can be traced
/// back to the rule that failed (downcast the `OtherError` payload to `IdentityError`).
#[derive(thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId { input: String, reason: String },

    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain { trust_domain: String, reason: String },

    #[error("invalid {field} {value:?} for a workload SPIFFE ID: must be one non-empty path segment")]
    InvalidWorkloadSegment { field: &'static str, value: String },

    #[error("certificate chain is empty")]
    EmptyChain,

    #[error("certificate {index} of the chain is not valid X.509: {reason}")]
    MalformedCertificate { index: usize, reason: String },

    #[error("leaf certificate has {count} URI SANs; SPIFFE requires exactly one")]
    UriSanCount { count: usize },

    #[error("leaf certificate's URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    UriSanNotSpiffe { uri: String, reason: String },

    #[error("leaf is a CA certificate; an SVID leaf must not be a CA")]
    LeafIsCa,

    #[error("leaf certificate key usage {problem}")]
    LeafKeyUsage { problem: &'static str },

    #[error("certificate {index} of the chain is not a CA certificate; SVID intermediates must be CAs")]
    IntermediateNotCa { index: usize },

    #[error("private key cannot be used: {source}")]
    UnusableKey {
        #[source]
        source: rustls::Error,
    },

    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,

    #[error("trust bundle for {trust_domain} has no root certificates")]
    EmptyBundle { trust_domain: String },

    #[error("trust bundle root {index} for {trust_domain} is not a CA certificate")]
    RootNotCa { trust_domain: String, index: usize },

    #[error("trust bundle root {index} for {trust_domain} is not a usable trust anchor: {source}")]
    BadTrustAnchor {
        trust_domain: String,
        index: usize,
        #[source]
        source: rustls::Error,
    },

    #[error("no trust bundles: a TLS identity must trust at least one trust domain")]
    NoTrustBundles,

    #[error("no trust bundle for trust domain {trust_domain}")]
    UnknownTrustDomain { trust_domain: String },

    #[error("server presented {presented}, expected {expected}")]
    UnexpectedServer { expected: String, presented: String },

    // rustls::CertificateError implements Display but not Error, hence a plain field.
    #[error("certificate chain does not verify against the trust bundle of {trust_domain}: {reason}")]
    ChainRejected { trust_domain: String, reason: rustls::CertificateError },

    #[error("building the {side} TLS config: {source}")]
    TlsConfig {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },

    #[error("building the client-certificate verifier for {trust_domain}: {source}")]
    VerifierBuild {
        trust_domain: String,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    #[error("development CA could not {action}: {source}")]
    DevCa {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

// rustls renders `CertificateError::Other` with `{:?}`, so Debug is the message: that keeps the failed
// rule readable in handshake errors ("invalid peer certificate: Other(OtherError(leaf is a CA ...))").
impl fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain>/<path>`.
///
/// Stricter than the URI grammar on purpose: lowercase scheme and trust domain only (the canonical form
/// SPIRE issues), a non-empty path (a bare trust domain names no workload), and none of query, fragment,
/// port or userinfo. Two IDs are equal iff their strings are equal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    text: String,
    // Kept alongside the text so code using the spiffe crate (Workload API) needs no re-parse.
    inner: spiffe::SpiffeId,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let invalid =
            |reason: &str| IdentityError::InvalidSpiffeId { input: s.to_string(), reason: reason.to_string() };
        if s.len() > MAX_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or_else(|| invalid("must start with \"spiffe://\""))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if let Err(reason) = trust_domain_rule(trust_domain) {
            return Err(invalid(&format!("trust domain: {reason}")));
        }
        if path.is_empty() {
            return Err(invalid("path is empty; a workload ID needs one"));
        }
        if path.contains(['?', '#']) {
            return Err(invalid("query and fragment are not allowed"));
        }
        // The spiffe crate enforces the path rules: segment characters, no empty or dot segments, no
        // trailing slash. Our own checks above are the stricter superset it lacks.
        let inner = spiffe::SpiffeId::new(s).map_err(|e| invalid(&format!("path: {e}")))?;
        Ok(SpiffeId { text: s.to_string(), inner })
    }

    pub fn trust_domain(&self) -> &str {
        self.inner.trust_domain_name()
    }

    /// The path, starting with '/'.
    pub fn path(&self) -> &str {
        self.inner.path()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The same ID as the spiffe crate's type, for the Workload API.
    pub fn as_spiffe(&self) -> &spiffe::SpiffeId {
        &self.inner
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({:?})", self.text)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SpiffeId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// spiffe://<td>/ns/<namespace>/sa/<service account> — the ClusterSPIFFEID template the mesh uses.
pub fn workload_id(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, IdentityError> {
    // A '/' inside a segment would silently produce a different, still well-formed ID.
    for (field, value) in [("namespace", namespace), ("service account", service_account)] {
        if value.is_empty() || value.contains('/') {
            return Err(IdentityError::InvalidWorkloadSegment { field, value: value.to_string() });
        }
    }
    SpiffeId::parse(&format!("{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}"))
}

/// Checks a bare trust domain name (as bundles and the dev CA take it).
pub(crate) fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    trust_domain_rule(trust_domain).map_err(|reason| IdentityError::InvalidTrustDomain {
        trust_domain: trust_domain.to_string(),
        reason: reason.to_string(),
    })
}

fn trust_domain_rule(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("empty".to_string());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("longer than 255 bytes".to_string());
    }
    match trust_domain.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        None => Ok(()),
        // Name the usual culprits: they mean a URI feature SPIFFE forbids, not a typo.
        Some(':') => Err("port is not allowed".to_string()),
        Some('@') => Err("userinfo is not allowed".to_string()),
        Some(c) if c.is_ascii_uppercase() => Err("must be lowercase".to_string()),
        Some(c) => Err(format!("character {c:?} is not allowed (only a-z 0-9 . - _)")),
    }
}
