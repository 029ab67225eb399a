//! Our own X.509 SVID and the trust bundles peers are checked against.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::{check_trust_domain, x509, IdentityError, SpiffeId};

/// An X.509 SVID: leaf first, then intermediates; its key; validity of the leaf.
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// Parses and checks a chain+key as an identity source hands them over (DER): exactly one spiffe://
    /// URI SAN on the leaf, leaf not a CA, intermediates are CAs, key matches leaf. Errors name the problem.
    ///
    /// The chain is not verified against any bundle here: trust is the peer's decision, and a source may
    /// hand over an SVID before the bundle that covers it.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Svid, IdentityError> {
        let leaf_der = chain.first().ok_or(IdentityError::EmptyChain)?;
        let leaf = x509::inspect_leaf(leaf_der)?;
        for (index, der) in chain.iter().enumerate().skip(1) {
            if !x509::is_ca(&x509::parse(der, index)?, index)? {
                return Err(IdentityError::IntermediateNotCa { index });
            }
        }
        // Load the key the way rustls will when it builds the configs, so a key it cannot use fails here.
        let signing_key = any_supported_type(&key).map_err(|source| IdentityError::UnusableKey { source })?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(IdentityError::KeyMismatch)
            }
            // Every ring key type reports its public key, so "unknown" cannot be waved through silently.
            Err(source) => return Err(IdentityError::UnusableKey { source }),
        }
        Ok(Svid { id: leaf.id, chain, key, not_before: leaf.not_before, not_after: leaf.not_after })
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Svid {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Trust bundles by trust domain (federation: several domains).
///
/// A peer is checked against the bundle of the trust domain in its own SPIFFE ID, never against the
/// union: a CA of one domain must not be able to mint identities of another.
#[derive(Clone, Default)]
pub struct TrustBundles {
    bundles: BTreeMap<String, Bundle>,
}

#[derive(Clone)]
pub(super) struct Bundle {
    pub(super) roots: Vec<CertificateDer<'static>>,
    pub(super) store: Arc<RootCertStore>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the roots of `trust_domain`, replacing any earlier bundle for it (a bundle refresh replaces,
    /// it does not accumulate). Each root must parse as a CA certificate usable as a trust anchor.
    pub fn insert(&mut self, trust_domain: &str, roots: Vec<CertificateDer<'static>>) -> Result<(), IdentityError> {
        check_trust_domain(trust_domain)?;
        if roots.is_empty() {
            return Err(IdentityError::EmptyBundle { trust_domain: trust_domain.to_string() });
        }
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            let is_ca = x509::parse(root, index).and_then(|cert| x509::is_ca(&cert, index));
            if !matches!(is_ca, Ok(true)) {
                return Err(IdentityError::RootNotCa { trust_domain: trust_domain.to_string(), index });
            }
            store.add(root.clone()).map_err(|source| IdentityError::BadTrustAnchor {
                trust_domain: trust_domain.to_string(),
                index,
                source,
            })?;
        }
        self.bundles.insert(trust_domain.to_string(), Bundle { roots, store: Arc::new(store) });
        Ok(())
    }

    /// The trust domains that have a bundle, sorted.
    pub fn domains(&self) -> Vec<String> {
        self.bundles.keys().cloned().collect()
    }

    /// The roots of one trust domain.
    pub fn roots(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.bundles.get(trust_domain).map(|bundle| bundle.roots.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Bundle)> {
        self.bundles.iter()
    }
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.bundles.iter().map(|(domain, bundle)| (domain, bundle.roots.len()))).finish()
    }
}
