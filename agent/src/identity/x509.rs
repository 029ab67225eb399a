//! Reading the X.509 fields SPIFFE cares about: URI SANs, basic constraints, key usage, validity.
//!
//! Shared by [`Svid::from_der`](super::Svid::from_der) (our own SVID, checked once) and the handshake
//! verifiers (every peer, before its chain is verified: the SAN picks the trust bundle to verify against).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE};
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use super::{IdentityError, SpiffeId};

/// What an SVID leaf says about itself once it passed the SPIFFE leaf rules.
pub(super) struct Leaf {
    pub(super) id: SpiffeId,
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
}

/// Parses one DER certificate; `index` is its position in the chain, for the error message.
pub(super) fn parse(der: &[u8], index: usize) -> Result<X509Certificate<'_>, IdentityError> {
    let malformed = |reason: String| IdentityError::MalformedCertificate { index, reason };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes after the certificate", rest.len())));
    }
    Ok(cert)
}

/// Applies the X.509-SVID leaf rules: exactly one URI SAN holding a valid SPIFFE ID, not a CA, and (when
/// key usage is present) digitalSignature without keyCertSign/cRLSign.
pub(super) fn inspect_leaf(der: &[u8]) -> Result<Leaf, IdentityError> {
    let cert = parse(der, 0)?;
    let id = single_spiffe_id(&cert)?;
    if is_ca(&cert, 0)? {
        return Err(IdentityError::LeafIsCa);
    }
    check_leaf_key_usage(&cert)?;
    let validity = cert.validity();
    Ok(Leaf { id, not_before: system_time(validity.not_before), not_after: system_time(validity.not_after) })
}

/// The SPIFFE ID in the one URI SAN of `cert`.
pub(super) fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::MalformedCertificate { index: 0, reason: format!("subjectAltName: {e}") })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // Any second URI, spiffe:// or not, makes the identity ambiguous to some consumer: reject them all.
    let [uri] = uris.as_slice() else {
        return Err(IdentityError::UriSanCount { count: uris.len() });
    };
    SpiffeId::parse(uri).map_err(|e| IdentityError::UriSanNotSpiffe {
        uri: uri.to_string(),
        reason: match e {
            IdentityError::InvalidSpiffeId { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

/// Whether basicConstraints says cA=true. An extension that is present but unparseable is an error, not
/// "absent": otherwise a malformed extension would turn a CA into an acceptable leaf.
pub(super) fn is_ca(cert: &X509Certificate<'_>, index: usize) -> Result<bool, IdentityError> {
    let malformed = |reason: String| IdentityError::MalformedCertificate { index, reason };
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS)
        .map_err(|e| malformed(format!("basicConstraints: {e}")))?;
    match ext.map(|ext| ext.parsed_extension()) {
        None => Ok(false),
        Some(ParsedExtension::BasicConstraints(bc)) => Ok(bc.ca),
        Some(_) => Err(malformed("basicConstraints does not parse".to_string())),
    }
}

fn check_leaf_key_usage(cert: &X509Certificate<'_>) -> Result<(), IdentityError> {
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
        .map_err(|e| IdentityError::MalformedCertificate { index: 0, reason: format!("keyUsage: {e}") })?;
    let usage = match ext.map(|ext| ext.parsed_extension()) {
        // webpki accepts a leaf without key usage; so do we (the EKU still has to fit).
        None => return Ok(()),
        Some(ParsedExtension::KeyUsage(usage)) => usage,
        Some(_) => {
            return Err(IdentityError::MalformedCertificate { index: 0, reason: "keyUsage does not parse".to_string() })
        }
    };
    if !usage.digital_signature() {
        return Err(IdentityError::LeafKeyUsage { problem: "lacks digitalSignature" });
    }
    if usage.key_cert_sign() {
        return Err(IdentityError::LeafKeyUsage { problem: "has keyCertSign, which only a CA may have" });
    }
    if usage.crl_sign() {
        return Err(IdentityError::LeafKeyUsage { problem: "has cRLSign, which only a CA may have" });
    }
    Ok(())
}

fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    // X.509 times before 1970 exist (GeneralizedTime); they are only ever compared, so saturate.
    let offset = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(offset).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(offset).unwrap_or(UNIX_EPOCH)
    }
}
