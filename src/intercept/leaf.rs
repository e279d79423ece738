//! Leaf certificates for intercepted hosts: one ECDSA P-256 leaf per host, minted on first
//! use from the [`InterceptCa`], cached with its TLS server configuration, and replaced once
//! [`LEAF_RENEW_AFTER`] has passed, well before it expires ([`LEAF_LIFETIME`]).
//!
//! Each host's configuration serves its leaf only to a client whose SNI names that host
//! (case-insensitively); any other SNI, or none, fails the handshake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::time::Instant;

use super::InterceptCa;

/// Validity of a leaf: 24 hours from minting (its notBefore is back-dated one hour for
/// clients whose clock is slightly behind).
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Age at which a cached leaf is replaced by a new one: 16 hours, a third of its lifetime
/// before it expires, so a tunnel opened on an old leaf never meets its expiry.
pub const LEAF_RENEW_AFTER: Duration = Duration::from_secs(16 * 3600);

/// Hosts whose leaves are cached at once; past it, leaves due for renewal are dropped, then
/// all (they are re-minted on use). Vendor hosts are few; tenants' Miradore sites add one each.
const MAX_LEAVES: usize = 4096;

/// ALPN offered inside a tunnel, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why no leaf could be made for a host.
#[derive(Debug, thiserror::Error)]
#[error("cannot mint a certificate for {host}: {reason}")]
pub struct MintError {
    host: String,
    reason: String,
}

/// The leaf cache. Cheap to share behind an `Arc`; the lock is never held across an await
/// nor while minting.
pub struct Leaves {
    ca: InterceptCa,
    provider: Arc<CryptoProvider>,
    cache: Mutex<HashMap<Box<str>, Leaf>>,
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: Instant,
}

impl std::fmt::Debug for Leaves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaves")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl Leaves {
    pub fn new(ca: InterceptCa) -> Self {
        Self {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The TLS server configuration for `host` (lower-cased): its cached leaf, or a new one
    /// when there is none or it is due for renewal.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, MintError> {
        let host = host.to_ascii_lowercase();
        let now = Instant::now();
        if let Some(leaf) = self.lock().get(host.as_str())
            && now < leaf.renew_at
        {
            return Ok(leaf.config.clone());
        }
        let config = Arc::new(self.mint(&host)?);
        let mut cache = self.lock();
        if cache.len() >= MAX_LEAVES {
            cache.retain(|_, leaf| now < leaf.renew_at);
            if cache.len() >= MAX_LEAVES {
                cache.clear();
            }
        }
        cache.insert(
            host.into_boxed_str(),
            Leaf {
                config: config.clone(),
                renew_at: now + LEAF_RENEW_AFTER,
            },
        );
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Leaf>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, MintError> {
        let failed = |reason: String| MintError {
            host: host.to_owned(),
            reason,
        };
        if !self.ca.permits(host) {
            // A leaf the client would reject with an opaque TLS error: refuse it here instead.
            return Err(failed(
                "the interception CA's name constraints do not permit this host, so clients \
                 would reject the certificate; the operator must create a new CA with `sidekey \
                 ca init` (docs/interception.md)"
                    .to_owned(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| failed(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![host.to_owned()]).map_err(|e| failed(e.to_string()))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        let cert = params
            .signed_by(&key, self.ca.issuer())
            .map_err(|e| failed(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| failed(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| failed(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneName {
                host: host.to_owned(),
                key: certified,
            }));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// Serves one leaf, to clients whose SNI is its host.
#[derive(Debug)]
struct OneName {
    host: String,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OneName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .filter(|sni| sni.eq_ignore_ascii_case(&self.host))
            .map(|_| self.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves() -> Leaves {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::super::ca::init(dir.path(), &["m3ter.com"]).unwrap();
        Leaves::new(InterceptCa::load(&cert, &key, false).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn leaves_are_cached_then_renewed_before_expiry() {
        let leaves = leaves();
        let first = leaves.server_config("api.m3ter.com").unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &leaves.server_config("API.m3ter.com").unwrap()
        ));
        tokio::time::advance(LEAF_RENEW_AFTER - Duration::from_secs(1)).await;
        let same = leaves.server_config("api.m3ter.com").unwrap();
        assert!(Arc::ptr_eq(&first, &same), "renewed too early");
        tokio::time::advance(Duration::from_secs(2)).await;
        let renewed = leaves.server_config("api.m3ter.com").unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed), "not renewed when due");
        // Renewal comes well before the leaf expires.
        assert!(LEAF_RENEW_AFTER + Duration::from_secs(3600) < LEAF_LIFETIME);
    }
}
