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
        "--intercept-ca-cert {0} has no X.509 name constraints limiting it to some DNS names, \
         so clients trusting it would accept its certificates for any domain: create a constrained CA with `sidekey ca \
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
    names: DnsConstraints,
}

impl fmt::Debug for InterceptCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptCa")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The DNS-name part of a CA's X.509 name constraints (RFC 5280 4.2.1.10, as webpki, Go and
/// OpenSSL apply them): which host names a client trusting the CA accepts its leaves for.
/// Constraints on other name types (IP addresses, e-mail, directory names) say nothing
/// about DNS names.
#[derive(Debug, Default)]
struct DnsConstraints {
    /// Permitted DNS subtrees; `None` when there are none (any name is permitted).
    permitted: Option<Vec<String>>,
    /// Excluded DNS subtrees.
    excluded: Vec<String>,
}

impl DnsConstraints {
    fn from_x509(nc: &x509_parser::extensions::NameConstraints<'_>) -> Self {
        fn dns(subtrees: Option<&Vec<x509_parser::extensions::GeneralSubtree<'_>>>) -> Vec<String> {
            subtrees
                .into_iter()
                .flatten()
                .filter_map(|s| match s.base {
                    x509_parser::extensions::GeneralName::DNSName(name) => {
                        Some(name.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        }
        let permitted = dns(nc.permitted_subtrees.as_ref());
        Self {
            permitted: (!permitted.is_empty()).then_some(permitted),
            excluded: dns(nc.excluded_subtrees.as_ref()),
        }
    }

    /// Whether a leaf for `host` passes these constraints.
    fn permits(&self, host: &str) -> bool {
        let inside = |c: &String| subtree_contains(c, host);
        self.permitted.as_ref().is_none_or(|p| p.iter().any(inside))
            && !self.excluded.iter().any(inside)
    }

    /// Whether a leaf for `domain` and for every name under it passes these constraints.
    fn permits_all_under(&self, domain: &str) -> bool {
        self.permitted
            .as_ref()
            .is_none_or(|p| p.iter().any(|c| subtree_contains(c, domain)))
            && !self.excluded.iter().any(|e| {
                subtree_contains(e, domain) || is_within(e.trim_start_matches('.'), domain)
            })
    }
}

/// Whether the DNS name constraint `subtree` covers `name`: `m3ter.com` covers `m3ter.com`
/// and every name under it, `.m3ter.com` only the names under it, and an empty one every
/// name. ASCII case is ignored.
fn subtree_contains(subtree: &str, name: &str) -> bool {
    match subtree.strip_prefix('.') {
        _ if subtree.is_empty() => true,
        Some(parent) => is_within(name, parent) && name.len() > parent.len(),
        None => is_within(name, subtree),
    }
}

/// Whether `name` is `domain` or a name under it (label-wise, ASCII case ignored).
fn is_within(name: &str, domain: &str) -> bool {
    let (name, domain) = (name.as_bytes(), domain.as_bytes());
    match name.len().checked_sub(domain.len()) {
        Some(0) => name.eq_ignore_ascii_case(domain),
        Some(cut) => name[cut - 1] == b'.' && name[cut..].eq_ignore_ascii_case(domain),
        None => false,
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
        let names = {
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
                Ok(Some(nc)) => DnsConstraints::from_x509(nc.value),
                Ok(None) => DnsConstraints::default(),
                Err(_) => return Err(invalid_cert("its name constraints cannot be parsed")),
            }
        };
        // Constraints that permit no DNS subtree (only IP ranges, say) leave every host name
        // open: such a CA is as dangerous as one without constraints.
        if names.permitted.is_none() && !allow_unconstrained {
            return Err(CaError::Unconstrained(cert_name));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|_| invalid_cert("cannot be used to sign certificates"))?;
        Ok(Self {
            issuer,
            cert: der,
            names,
        })
    }

    /// Whether the CA's name constraints permit some DNS names only (not every name).
    pub fn is_constrained(&self) -> bool {
        self.names.permitted.is_some()
    }

    /// Whether clients that honour the CA's name constraints accept a leaf for `host`.
    pub fn permits(&self, host: &str) -> bool {
        self.names.permits(host)
    }

    /// Those of `domains` (vendor DNS suffixes, [`crate::vendors::Registry::dns_suffixes`])
    /// for which the CA's name constraints do not permit the domain and every name under it:
    /// a CA made by an older sidekey or by hand, before a vendor host was added.
    pub fn uncovered<'a>(&self, domains: &[&'a str]) -> Vec<&'a str> {
        domains
            .iter()
            .copied()
            .filter(|d| !self.names.permits_all_under(d))
            .collect()
    }

    /// Logs one warning per vendor domain in `domains` the CA cannot vouch for, naming it and
    /// the fix; `CONNECT` to those hosts is refused (500 `intercept_failed`).
    pub fn warn_uncovered(&self, domains: &[&str], cert: &Path) {
        for domain in self.uncovered(domains) {
            tracing::warn!(cert = %cert.display(), domain,
                "the interception CA's name constraints do not permit {domain} (and the names \
                 under it): CONNECT to those hosts will be refused with intercept_failed, since \
                 clients would reject the certificate; create a new CA with `sidekey ca init` and \
                 give apps its certificate");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_subtree_covers_its_name_and_the_names_under_it() {
        for (subtree, name, covered) in [
            ("m3ter.com", "m3ter.com", true),
            ("m3ter.com", "api.m3ter.com", true),
            ("m3ter.com", "API.M3ter.COM", true),
            ("M3TER.com", "a.b.m3ter.com", true),
            ("m3ter.com", "evilm3ter.com", false),
            ("m3ter.com", "m3ter.com.evil.example", false),
            ("m3ter.com", "com", false),
            (".m3ter.com", "m3ter.com", false),
            (".m3ter.com", "api.m3ter.com", true),
            ("", "anything.example", true),
        ] {
            assert_eq!(
                subtree_contains(subtree, name),
                covered,
                "{subtree:?} {name:?}"
            );
        }
    }

    fn names(permitted: &[&str], excluded: &[&str]) -> DnsConstraints {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        DnsConstraints {
            permitted: (!permitted.is_empty()).then(|| own(permitted)),
            excluded: own(excluded),
        }
    }

    #[test]
    fn uncovered_domains_are_those_not_wholly_permitted() {
        let domains = ["online.miradore.com", "m3ter.com", "api.mailkit.eu"];
        let uncovered = |n: DnsConstraints| -> Vec<&str> {
            domains
                .iter()
                .copied()
                .filter(|d| !n.permits_all_under(d))
                .collect()
        };
        // As `sidekey ca init` makes it: all covered.
        assert!(uncovered(names(&domains, &[])).is_empty());
        // A parent domain covers its subdomains.
        assert!(uncovered(names(&["com", "eu"], &[])).is_empty());
        // A vendor domain left out, or only part of it permitted, or part of it excluded.
        assert_eq!(
            uncovered(names(&["online.miradore.com", "api.mailkit.eu"], &[])),
            ["m3ter.com"]
        );
        assert_eq!(
            uncovered(names(
                &["online.miradore.com", "api.m3ter.com", "api.mailkit.eu"],
                &[]
            )),
            ["m3ter.com"]
        );
        assert_eq!(
            uncovered(names(&domains, &["ingest.m3ter.com"])),
            ["m3ter.com"]
        );
        assert_eq!(uncovered(names(&domains, &[".eu"])), ["api.mailkit.eu"]);
        // No DNS constraint at all permits everything.
        assert!(uncovered(names(&[], &[])).is_empty());
        // Host by host.
        let n = names(&domains, &["ingest.m3ter.com"]);
        assert!(n.permits("api.m3ter.com"));
        assert!(n.permits("acme.online.miradore.com"));
        assert!(!n.permits("ingest.m3ter.com"));
        assert!(!n.permits("evil.example"));
    }
}
