//! The interception CA: created by `sidekey ca init`, loaded and checked by `sidekey serve`.
//!
//! The CA carries X.509 Name Constraints permitting only the vendors' DNS suffixes
//! ([`crate::vendors::Vendor::dns_suffixes`]), so a client trusting it accepts its
//! certificates for vendor hosts only, even if the key is stolen. The key is held in memory
//! only by [`InterceptCa`], which never prints it (its `Debug` names the subject only).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use zeroize::Zeroizing;

/// Validity of a CA made by `sidekey ca init`: 10 years. Leaves are short-lived
/// ([`super::LEAF_LIFETIME`]); the CA is rotated by creating a new one.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The CA's common name.
const CA_NAME: &str = "sidekey interception CA";

/// A CA that cannot be used: why, naming the file and flag, never the key's contents.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path}: {problem}")]
    Invalid {
        flag: &'static str,
        path: String,
        problem: &'static str,
    },
    #[error(
        "the private key in --intercept-ca-key {key} does not belong to the certificate in \
         --intercept-ca-cert {cert}"
    )]
    Mismatch { cert: String, key: String },
    #[error(
        "--intercept-ca-cert {0} has no X.509 name constraints, so clients trusting it would \
         accept its certificates for any domain: create a constrained CA with `sidekey ca \
         init`, or pass --intercept-ca-allow-unconstrained to accept this one"
    )]
    Unconstrained(String),
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the CA: {0}")]
    Generate(String),
}

/// The loaded CA: signs leaves. Cheap to share behind an `Arc`.
pub struct InterceptCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    constrained: bool,
}

impl fmt::Debug for InterceptCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptCa")
            .field("constrained", &self.constrained)
            .finish_non_exhaustive()
    }
}

impl InterceptCa {
    /// Loads `cert` and `key` (PEM) and checks them: the certificate is a CA, the key is its
    /// key, and it carries name constraints unless `allow_unconstrained`.
    pub fn load(cert: &Path, key: &Path, allow_unconstrained: bool) -> Result<Self, CaError> {
        let cert_name = cert.display().to_string();
        let key_name = key.display().to_string();
        let cert_pem = std::fs::read(cert).map_err(|source| CaError::Read {
            flag: "--intercept-ca-cert",
            path: cert_name.clone(),
            source,
        })?;
        let key_pem = Zeroizing::new(std::fs::read(key).map_err(|source| CaError::Read {
            flag: "--intercept-ca-key",
            path: key_name.clone(),
            source,
        })?);
        let invalid_cert = |problem| CaError::Invalid {
            flag: "--intercept-ca-cert",
            path: cert_name.clone(),
            problem,
        };
        let der = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|_| invalid_cert("not a PEM certificate"))?;
        let key_text = std::str::from_utf8(&key_pem).map_err(|_| CaError::Invalid {
            flag: "--intercept-ca-key",
            path: key_name.clone(),
            problem: "not a PEM private key",
        })?;
        // rcgen's error would not quote the key, but it is not surfaced either way.
        let key_pair = KeyPair::from_pem(key_text).map_err(|_| CaError::Invalid {
            flag: "--intercept-ca-key",
            path: key_name.clone(),
            problem: "not a PEM PKCS#8 private key of a supported type (ECDSA P-256/P-384, \
                      Ed25519, RSA)",
        })?;
        let constrained = {
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|_| invalid_cert("not a valid X.509 certificate"))?;
            let is_ca = x509
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(invalid_cert(
                    "not a CA certificate (basicConstraints cA is not set)",
                ));
            }
            if x509.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
                return Err(CaError::Mismatch {
                    cert: cert_name,
                    key: key_name,
                });
            }
            match x509.name_constraints() {
                Ok(Some(nc)) => nc
                    .value
                    .permitted_subtrees
                    .as_ref()
                    .is_some_and(|p| !p.is_empty()),
                Ok(None) => false,
                Err(_) => return Err(invalid_cert("its name constraints cannot be parsed")),
            }
        };
        if !constrained && !allow_unconstrained {
            return Err(CaError::Unconstrained(cert_name));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|_| invalid_cert("cannot be used to sign certificates"))?;
        Ok(Self {
            issuer,
            cert: der,
            constrained,
        })
    }

    /// Whether the CA carries name constraints.
    pub fn is_constrained(&self) -> bool {
        self.constrained
    }

    /// The CA certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// A new CA (PEM certificate, PEM PKCS#8 key) whose name constraints permit exactly
/// `permitted` (DNS names: each name and its subdomains), valid from now for [`CA_LIFETIME`].
pub fn generate(permitted: &[&str]) -> Result<(String, Zeroizing<String>), CaError> {
    let failed = |e: rcgen::Error| CaError::Generate(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted
            .iter()
            .map(|d| GeneralSubtree::DnsName((*d).to_owned()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + CA_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(failed)?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
}

/// `sidekey ca init --out DIR`: writes `DIR/ca.pem` (0644) and `DIR/ca.key` (0600), creating
/// `DIR` if needed and refusing to overwrite either file. Returns the two paths.
pub fn init(dir: &Path, permitted: &[&str]) -> Result<(PathBuf, PathBuf), CaError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Exists(p.display().to_string()));
        }
    }
    let (cert, key) = generate(permitted)?;
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    write_new(&key_path, key.as_bytes(), 0o600)?;
    write_new(&cert_path, cert.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Creates `path` with `mode` from the start (never readable by others in between); fails if
/// it exists.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let failed = |source| CaError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists(path.display().to_string()),
            _ => failed(e),
        })?;
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)
}
