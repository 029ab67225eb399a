//! Development CA: the embedded identity source when no SPIRE socket is configured (demo, tests).
//!
//! It lives in memory only. Two agents each with their own `DevCa` have different roots and so do not
//! trust each other's pods even with the same trust domain name: cross-node mTLS needs SPIRE (or a
//! shared bundle).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::{check_trust_domain, IdentityError, SpiffeId, Svid, TrustBundles};

/// How long the development root is valid; it is regenerated with every agent start anyway.
const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating tolerates clocks of peers (test processes, other namespaces) that are slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct DevCa {
    trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl DevCa {
    /// A fresh self-signed ECDSA P-256 root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<DevCa, IdentityError> {
        check_trust_domain(trust_domain)?;
        let now = SystemTime::now();
        let not_after = now + CA_LIFETIME;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("meshcap development CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        // SPIFFE: a signing certificate may carry the trust domain's own ID; SPIRE's roots do.
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        let key = new_key()?;
        let issuer = CertifiedIssuer::self_signed(params, key)
            .map_err(|source| IdentityError::DevCa { action: "self-sign its root", source })?;
        Ok(DevCa { trust_domain: trust_domain.to_string(), issuer, not_after })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (for sharing the bundle, e.g. federation in tests).
    pub fn root(&self) -> &CertificateDer<'static> {
        self.issuer.der()
    }

    /// Issues an X.509 SVID for `id`, valid for `ttl` (but never beyond the root).
    ///
    /// Leaf: one URI SAN, not a CA, digitalSignature, serverAuth+clientAuth EKU (engines act as both).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, IdentityError> {
        let now = SystemTime::now();
        // Clamped to the root's expiry: a longer leaf would not verify past it anyway, and the clamp keeps
        // a huge ttl from overflowing the date conversion.
        let not_after = now.checked_add(ttl).map_or(self.not_after, |t| t.min(self.not_after));
        let mut params = CertificateParams::default();
        params.distinguished_name = name("meshcap workload");
        params.subject_alt_names = vec![uri_san(id.as_str())?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        let key = new_key()?;
        let leaf = self.sign(&params, &key)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // Run our own output through the same checks an external source gets.
        Svid::from_der(vec![leaf], key)
    }

    /// `{trust_domain: [root]}`.
    pub fn bundles(&self) -> TrustBundles {
        let mut bundles = TrustBundles::new();
        bundles
            .insert(&self.trust_domain, vec![self.root().clone()])
            .expect("the dev CA's root is a CA certificate for a trust domain checked in DevCa::new");
        bundles
    }

    /// Signs arbitrary leaf parameters; tests use it to mint certificates `issue` refuses to make.
    pub(super) fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let cert =
            params.signed_by(key, &self.issuer).map_err(|source| IdentityError::DevCa { action: "sign", source })?;
        Ok(cert.der().clone())
    }
}

pub(super) fn new_key() -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| IdentityError::DevCa { action: "generate a key", source })
}

pub(super) fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    let uri = uri.try_into().map_err(|source| IdentityError::DevCa { action: "encode a URI SAN", source })?;
    Ok(SanType::URI(uri))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "meshcap");
    name.push(DnType::CommonName, common_name);
    name
}
