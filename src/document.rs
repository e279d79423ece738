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

use crate::model::{Connection, Connections, ProtoRef, Slot, VendorVisitor};
use crate::proto;
use crate::wire::ProtoConnections;

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
        read_regular_file(path, MAX_SECRET_FILE_BYTES)
    }
}

/// Largest tenant document or tenants file, in bytes: a few thousand tenants. Larger files
/// are refused before they are read.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Largest file a secret is read from (`valueFrom: { file }`), in bytes. A secret is at most
/// 4096 bytes; the rest allows surrounding whitespace.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;
/// Deepest nesting accepted in a document, counting indentation columns, `- `/`? ` block
/// indicators and open `[`/`{` (even inside quotes). A valid document nests about 6 levels;
/// YAML parsing time grows with the square of the depth, so depth is bounded before parsing.
pub const MAX_NESTING: usize = 64;
/// How long reading and parsing a document, with the secret files it references, may take.
/// It runs on the blocking pool; past this the caller gives up (a read stuck on a dead
/// network file system is left behind, the caller is not).
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The content of `path` if it is a regular file (symlinks followed) of at most `max` bytes.
/// Anything else (a FIFO, a device such as /dev/zero, a directory, a socket) is refused
/// without being opened, so a read can neither block waiting for a writer nor grow without
/// end. The type is checked again on the opened file, in case the path was swapped between
/// the two checks; opening a FIFO swapped in at that instant could still block, which is why
/// callers also run this on the blocking pool under a deadline.
pub fn read_regular_file(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let check = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
        }
        if meta.len() > max {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("larger than {max} bytes"),
            ));
        }
        Ok(())
    };
    check(std::fs::metadata(path)?)?;
    let file = std::fs::File::open(path)?;
    check(file.metadata()?)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file that grew after the check from one that fits.
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Parses one YAML (or JSON) document into `T`, after bounding its size and nesting depth.
/// Errors name the field path and the line, never a value: serde's messages quote the
/// offending value (`invalid type: string "s3cret"`), which may be a secret.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    if text.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(format!("larger than {MAX_DOCUMENT_BYTES} bytes"));
    }
    if let Some(line) = too_deep(text) {
        return Err(format!(
            "nested more than {MAX_NESTING} levels deep at line {line}"
        ));
    }
    serde_yaml_ng::from_str(text).map_err(|e| describe_yaml_error(&e))
}

/// The first line (1-based) at which an upper bound of the nesting depth passes
/// [`MAX_NESTING`]. The bound over-counts (brackets in quoted text, deep indentation of a
/// block scalar) so that it can never under-count: too deep a valid file is refused, never
/// too deep a hostile one accepted.
fn too_deep(text: &str) -> Option<usize> {
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let mut block = indent;
        let mut rest = &line[indent..];
        while let Some(after) = rest
            .strip_prefix("- ")
            .or_else(|| rest.strip_prefix("? "))
            .or_else(|| rest.strip_prefix("-\t"))
        {
            block += 1;
            rest = after.trim_start_matches([' ', '\t']);
        }
        if block + flow > MAX_NESTING {
            return Some(n + 1);
        }
        for b in line.bytes() {
            match b {
                b'[' | b'{' => {
                    flow += 1;
                    if block + flow > MAX_NESTING {
                        return Some(n + 1);
                    }
                }
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// Every field name a document may hold: only these may appear in an error's path.
const FIELD_NAMES: &[&str] = &[
    "partnerDefaults",
    "partner_defaults",
    "tenants",
    "id",
    "displayName",
    "display_name",
    "miradore",
    "m3ter",
    "mailkit",
    "site",
    "apiKey",
    "api_key",
    "accessKeyId",
    "access_key_id",
    "apiSecret",
    "api_secret",
    "orgId",
    "org_id",
    "environment",
    "clientId",
    "client_id",
    "clientMd5",
    "client_md5",
    "value",
    "valueFrom",
    "value_from",
    "fingerprint",
    "file",
    "env",
    "etag",
    "createTime",
    "create_time",
    "updateTime",
    "update_time",
];

/// Whether `path` is a serde_yaml_ng path made only of known field names and indices, e.g.
/// `tenants[3].miradore.apiKey`.
fn is_field_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('.').all(|segment| {
            let name_end = segment.find('[').unwrap_or(segment.len());
            let (name, indices) = segment.split_at(name_end);
            (FIELD_NAMES.contains(&name) || (name.is_empty() && !indices.is_empty()))
                && indices.split_terminator(']').all(|i| {
                    i.strip_prefix('[')
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
        })
}

/// A YAML error as a fixed sentence, with the field path (when it is made of known field
/// names) and the line and column. Nothing of the document's own text is repeated.
pub fn describe_yaml_error(e: &serde_yaml_ng::Error) -> String {
    let text = e.to_string();
    let (path, problem) = match text.split_once(": ") {
        Some((path, rest)) if is_field_path(path) => (Some(path), rest),
        _ => (None, text.as_str()),
    };
    let named = |prefix: &str| {
        problem
            .strip_prefix(prefix)
            .and_then(|r| r.split('`').next())
            .filter(|name| FIELD_NAMES.contains(name))
    };
    // A predicate about the field at `path` (or the document), or a whole sentence.
    let predicate = |p: &str| (true, p.to_owned());
    let (is_predicate, sentence) = if problem.starts_with("invalid type") {
        let expected = problem
            .rsplit_once(", expected ")
            .map(|(_, e)| e)
            .unwrap_or("");
        let kind = if expected.starts_with("struct") || expected.starts_with("a map") {
            "a mapping ({ ... })"
        } else if expected.starts_with("a sequence") {
            "a list"
        } else if expected.starts_with("a string") {
            "a string"
        } else {
            "another type"
        };
        predicate(&format!("has the wrong type (expected {kind})"))
    } else if problem.starts_with("invalid value") {
        predicate("has an invalid value")
    } else if problem.starts_with("invalid length") {
        predicate("has the wrong number of entries")
    } else if problem.starts_with("unknown field") {
        predicate("has a field that is not allowed here (check its name and indentation)")
    } else if let Some(name) = named("missing field `") {
        (false, format!("{name} is required"))
    } else if let Some(name) = named("duplicate field `") {
        (false, format!("{name} is given twice"))
    } else if problem.starts_with("recursion limit exceeded") {
        predicate("is nested too deeply")
    } else if problem.starts_with("unknown anchor") {
        predicate("refers to an unknown anchor")
    } else if problem.starts_with("repetition limit exceeded") {
        predicate("expands aliases too many times")
    } else {
        predicate("is not valid YAML")
    };
    let at = e
        .location()
        .map(|l| format!(" at line {} column {}", l.line(), l.column()))
        .unwrap_or_default();
    match (path, is_predicate) {
        (Some(path), _) => format!("{path}: {sentence}{at}"),
        (None, true) => format!("the document {sentence}{at}"),
        (None, false) => format!("{sentence}{at}"),
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
        let text =
            read_regular_file(path, MAX_DOCUMENT_BYTES).map_err(|source| DocumentError::Read {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text).map_err(|message| DocumentError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        parse_yaml(text)
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
pub fn kept_secrets(c: ProtoConnections<'_>) -> Vec<(String, &str)> {
    struct Kept<'a> {
        msgs: ProtoConnections<'a>,
        out: Vec<(String, &'a str)>,
    }
    impl<'a> VendorVisitor for Kept<'a> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(msg) = (slot.proto)(&self.msgs) else {
                return;
            };
            for field in C::FIELDS {
                if let ProtoRef::Secret(Some(s)) = (field.proto)(msg)
                    && s.value.is_empty()
                    && !s.fingerprint.is_empty()
                {
                    let path = format!("{}.{}", C::VENDOR.as_str(), field.name);
                    self.out.push((path, s.fingerprint.as_str()));
                }
            }
        }
    }
    let mut kept = Kept {
        msgs: c,
        out: Vec::new(),
    };
    Connections::for_each_vendor(&mut kept);
    kept.out
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
    fn parse_errors_name_the_field_and_line_never_the_value() {
        let cases = [
            (
                "id: a\nmiradore: { apiKey: \"s3cret\" }",
                "miradore.apiKey: has the wrong type (expected a mapping ({ ... })) at line 2",
            ),
            (
                "id: a\nmiradore: { s3cret: x }",
                "miradore: has a field that is not allowed here",
            ),
            (
                "id: a\nmailkit: { clientMd5: { value: [s3cret] } }",
                "mailkit.clientMd5.value: has the wrong type (expected a string)",
            ),
            (
                "id: a\nmailkit: { clientMd5: { value: 's3cret",
                "the document is not valid YAML at line",
            ),
            ("displayName: s3cret", "id is required"),
            ("id: a\nid: s3cret", "id is given twice"),
            (
                "id: a\ncreateTime: { s3cret: [1, 2] }\netag: { s3cret: 1 }",
                "etag: has the wrong type",
            ),
            ("s3cret", "the document has the wrong type"),
        ];
        for (text, expected) in cases {
            let err = TenantDoc::parse(text).unwrap_err();
            assert!(err.starts_with(expected), "{text:?}: {err}");
            assert!(!err.contains("s3cret"), "{text:?}: {err}");
        }
    }

    #[test]
    fn nesting_is_bounded_before_parsing() {
        let started = std::time::Instant::now();
        for hostile in [
            format!("id: {}{}", "[".repeat(60_000), "]".repeat(60_000)),
            format!("id: a\netag:\n{}", "- ".repeat(60_000)),
            format!("id: a\netag:\n{}", "{a: ".repeat(60_000)),
        ] {
            let err = TenantDoc::parse(&hostile).unwrap_err();
            assert!(err.contains("nested more than 64 levels"), "{err}");
        }
        let huge = format!(
            "id: a\netag: \"{}\"",
            "x".repeat(MAX_DOCUMENT_BYTES as usize)
        );
        assert!(TenantDoc::parse(&huge).unwrap_err().contains("larger than"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The usual shapes, and brackets in values, are well within the bound.
        TenantDoc::parse("id: a\nmiradore: { site: x, apiKey: { value: \"[{[{]}]}\" } }").unwrap();
    }

    #[test]
    fn secret_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let fits = dir.path().join("fits");
        std::fs::write(&fits, "k\n").unwrap();
        let env = |_: &str| None;
        assert_eq!(Sources::file(&env, &fits).unwrap(), "k\n");
        for (path, why) in [
            (big.as_path(), "larger than"),
            (Path::new("/dev/zero"), "not a regular file"),
            (dir.path(), "not a regular file"),
        ] {
            let err = Sources::file(&env, path).unwrap_err().to_string();
            assert!(err.contains(why), "{path:?}: {err}");
        }
    }

    #[test]
    fn fingerprint_only_is_kept_as_such() {
        let doc = TenantDoc::parse(
            r#"{"id":"a","mailkit":{"clientId":"1","clientMd5":{"fingerprint":"sha256:0123"}}}"#,
        )
        .unwrap();
        let t = doc.into_proto(&|_: &str| None).unwrap();
        assert_eq!(
            kept_secrets((&t).into()),
            [("mailkit.client_md5".to_owned(), "sha256:0123")]
        );
        assert!(t.mailkit.unwrap().client_md5.unwrap().value.is_empty());
    }
}
