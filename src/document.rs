//! Declarative tenant documents: a tenant as YAML or JSON in the proto3 JSON mapping
//! (lowerCamelCase names; the proto's snake_case names are accepted too), as taken by
//! `sidekey tenants apply -f FILE`.
//!
//! A secret is given inline or by reference, so the document itself need not hold it:
//!
//! ```yaml
//! id: acme
//! displayName: Acme Corp
//! miradore:
//!   site: acme
//!   apiKey: { valueFrom: { file: /var/run/secrets/acme/miradore-api-key } }
//! m3ter:
//!   accessKeyId: AKIA...
//!   apiSecret: { valueFrom: { env: ACME_M3TER_SECRET } }
//!   orgId: 0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa
//! mailkit:
//!   clientId: "12345"
//!   clientMd5: { value: 0123456789abcdef0123456789abcdef }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::proto;

/// Where `valueFrom` references are read: the process environment and files. Any
/// `Fn(&str) -> Option<String>` is a source whose environment is that function and whose
/// files are read from disk.
pub trait Sources {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &Path) -> std::io::Result<String>;
}

impl<F: Fn(&str) -> Option<String>> Sources for F {
    fn env(&self, name: &str) -> Option<String> {
        self(name)
    }
    fn file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid tenant document: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Secret { field: String, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantDoc {
    pub id: String,
    #[serde(default, alias = "display_name")]
    pub display_name: String,
    #[serde(default)]
    pub miradore: Option<MiradoreDoc>,
    #[serde(default)]
    pub m3ter: Option<M3terDoc>,
    #[serde(default)]
    pub mailkit: Option<MailkitDoc>,
    /// Accepted so that a `get -o json` output can be applied back; ignored.
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default, alias = "create_time")]
    pub create_time: Option<serde_json::Value>,
    #[serde(default, alias = "update_time")]
    pub update_time: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MiradoreDoc {
    #[serde(default)]
    pub site: String,
    #[serde(default, alias = "api_key")]
    pub api_key: Option<SecretDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct M3terDoc {
    #[serde(default, alias = "access_key_id")]
    pub access_key_id: String,
    #[serde(default, alias = "api_secret")]
    pub api_secret: Option<SecretDoc>,
    #[serde(default, alias = "org_id")]
    pub org_id: String,
    #[serde(default)]
    pub environment: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MailkitDoc {
    #[serde(default, alias = "client_id")]
    pub client_id: String,
    #[serde(default, alias = "client_md5")]
    pub client_md5: Option<SecretDoc>,
}

/// A secret: `value` inline, or `valueFrom` a file or an environment variable. With only a
/// `fingerprint` (as `get -o json` prints), `tenants apply` keeps the stored value if its
/// fingerprint matches; a tenants file refuses it (a file has nothing to keep).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretDoc {
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, alias = "value_from")]
    pub value_from: Option<SecretSource>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// Where a secret is read from: exactly one of the two.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretSource {
    /// A file whose content (surrounding whitespace trimmed) is the secret, e.g. a mounted
    /// Kubernetes Secret.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// An environment variable of the process reading the document.
    #[serde(default)]
    pub env: Option<String>,
}

/// The partner defaults in a document: the same three connections as a tenant.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PartnerDefaultsDoc {
    #[serde(default)]
    pub miradore: Option<MiradoreDoc>,
    #[serde(default)]
    pub m3ter: Option<M3terDoc>,
    #[serde(default)]
    pub mailkit: Option<MailkitDoc>,
}

impl PartnerDefaultsDoc {
    pub fn into_proto(
        self,
        sources: &dyn Sources,
    ) -> Result<proto::PartnerDefaults, DocumentError> {
        // Same conversion as a tenant's connections, with the field paths of the partner.
        let t = TenantDoc {
            miradore: self.miradore,
            m3ter: self.m3ter,
            mailkit: self.mailkit,
            ..Default::default()
        }
        .into_proto(sources)
        .map_err(|e| match e {
            DocumentError::Secret { field, message } => DocumentError::Secret {
                field: format!("partnerDefaults.{field}"),
                message,
            },
            other => other,
        })?;
        Ok(proto::PartnerDefaults {
            miradore: t.miradore,
            m3ter: t.m3ter,
            mailkit: t.mailkit,
            ..Default::default()
        })
    }
}

impl TenantDoc {
    /// Reads a YAML or JSON document (JSON is YAML).
    pub fn from_file(path: &Path) -> Result<Self, DocumentError> {
        let text = std::fs::read_to_string(path).map_err(|source| DocumentError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| DocumentError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        // The parser's message names a line and column, never a value.
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    /// The tenant message, with every referenced secret read from `sources`.
    pub fn into_proto(self, sources: &dyn Sources) -> Result<proto::Tenant, DocumentError> {
        let secret = |doc: Option<SecretDoc>, field: &str| resolve_secret(doc, field, sources);
        Ok(proto::Tenant {
            id: self.id,
            display_name: self.display_name,
            miradore: self
                .miradore
                .map(|m| -> Result<_, DocumentError> {
                    Ok(proto::MiradoreConnection {
                        site: m.site,
                        api_key: secret(m.api_key, "miradore.apiKey")?,
                    })
                })
                .transpose()?,
            m3ter: self
                .m3ter
                .map(|m| -> Result<_, DocumentError> {
                    Ok(proto::M3terConnection {
                        access_key_id: m.access_key_id,
                        api_secret: secret(m.api_secret, "m3ter.apiSecret")?,
                        org_id: m.org_id,
                        environment: m.environment,
                    })
                })
                .transpose()?,
            mailkit: self
                .mailkit
                .map(|m| -> Result<_, DocumentError> {
                    Ok(proto::MailkitConnection {
                        client_id: m.client_id,
                        client_md5: secret(m.client_md5, "mailkit.clientMd5")?,
                    })
                })
                .transpose()?,
            ..Default::default()
        })
    }
}

fn resolve_secret(
    doc: Option<SecretDoc>,
    field: &str,
    sources: &dyn Sources,
) -> Result<Option<proto::Secret>, DocumentError> {
    let Some(doc) = doc else { return Ok(None) };
    let err = |message: String| DocumentError::Secret {
        field: field.to_owned(),
        message,
    };
    let value = match (doc.value, doc.value_from) {
        (Some(_), Some(_)) => return Err(err("give value or valueFrom, not both".into())),
        (Some(v), None) => v,
        (None, Some(from)) => match (from.file, from.env) {
            (Some(path), None) => sources
                .file(&path)
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?
                .trim()
                .to_owned(),
            (None, Some(var)) => sources
                .env(&var)
                .ok_or_else(|| err(format!("environment variable {var} is not set")))?
                .trim()
                .to_owned(),
            _ => return Err(err("valueFrom needs exactly one of file or env".into())),
        },
        (None, None) => {
            // Only a fingerprint: carried through as "keep the value with this fingerprint".
            return Ok(doc
                .fingerprint
                .filter(|f| !f.is_empty())
                .map(|fingerprint| proto::Secret {
                    value: String::new(),
                    fingerprint,
                }));
        }
    };
    Ok(Some(proto::Secret {
        value,
        fingerprint: String::new(),
    }))
}

/// The secrets given by fingerprint only, as `(update-mask path, fingerprint)`.
pub fn kept_secrets<'a>(
    miradore: &'a Option<proto::MiradoreConnection>,
    m3ter: &'a Option<proto::M3terConnection>,
    mailkit: &'a Option<proto::MailkitConnection>,
) -> Vec<(&'static str, &'a str)> {
    let kept = |s: &'a Option<proto::Secret>| {
        s.as_ref()
            .filter(|s| s.value.is_empty() && !s.fingerprint.is_empty())
            .map(|s| s.fingerprint.as_str())
    };
    [
        (
            "miradore.api_key",
            miradore.as_ref().and_then(|c| kept(&c.api_key)),
        ),
        (
            "m3ter.api_secret",
            m3ter.as_ref().and_then(|c| kept(&c.api_secret)),
        ),
        (
            "mailkit.client_md5",
            mailkit.as_ref().and_then(|c| kept(&c.client_md5)),
        ),
    ]
    .into_iter()
    .filter_map(|(path, fp)| fp.map(|fp| (path, fp)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_every_secret_source() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "file-secret\n").unwrap();
        let text = format!(
            "id: acme\ndisplayName: Acme\nmiradore:\n  site: acme\n  apiKey: {{ valueFrom: {{ file: {} }} }}\n\
             m3ter:\n  access_key_id: AK\n  apiSecret: {{ valueFrom: {{ env: M3_SECRET }} }}\n  orgId: o\n\
             mailkit:\n  clientId: \"1\"\n  clientMd5: {{ value: inline }}\n",
            key_file.display()
        );
        let env = |k: &str| (k == "M3_SECRET").then(|| "env-secret".to_owned());
        let t = TenantDoc::parse(&text).unwrap().into_proto(&env).unwrap();
        assert_eq!(t.display_name, "Acme");
        assert_eq!(t.miradore.unwrap().api_key.unwrap().value, "file-secret");
        let m3 = t.m3ter.unwrap();
        assert_eq!(m3.access_key_id, "AK");
        assert_eq!(m3.api_secret.unwrap().value, "env-secret");
        assert_eq!(t.mailkit.unwrap().client_md5.unwrap().value, "inline");
    }

    #[test]
    fn missing_env_and_unknown_fields_are_errors() {
        let doc =
            TenantDoc::parse("id: a\nm3ter: { apiSecret: { valueFrom: { env: NOPE } } }").unwrap();
        let err = doc.into_proto(&|_: &str| None).unwrap_err().to_string();
        assert!(
            err.contains("m3ter.apiSecret") && err.contains("NOPE"),
            "{err}"
        );
        assert!(TenantDoc::parse("id: a\nmiradore: { sight: x }").is_err());
    }

    #[test]
    fn fingerprint_only_is_kept_as_such() {
        let doc = TenantDoc::parse(
            r#"{"id":"a","mailkit":{"clientId":"1","clientMd5":{"fingerprint":"sha256:0123"}}}"#,
        )
        .unwrap();
        let t = doc.into_proto(&|_: &str| None).unwrap();
        assert_eq!(
            kept_secrets(&t.miradore, &t.m3ter, &t.mailkit),
            [("mailkit.client_md5", "sha256:0123")]
        );
        assert!(t.mailkit.unwrap().client_md5.unwrap().value.is_empty());
    }
}
