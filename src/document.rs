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

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::model::{
    Connection, Connections, ProtoMut, ProtoRef, Slot, VendorFields, VendorVisitor, json_name,
    vendor_fields,
};
use crate::model::{ProtoConnections, ProtoConnectionsOwned};
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

/// The field names of a document outside the vendor connections, whose names (and their
/// fields' names) come from the schema: only these may appear in an error's path.
const FIELD_NAMES: &[&str] = &[
    "partnerDefaults",
    "partner_defaults",
    "tenants",
    "id",
    "displayName",
    "display_name",
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

/// Whether a document may hold a field of this name.
fn is_field_name(name: &str) -> bool {
    FIELD_NAMES.contains(&name)
        || vendor_fields().iter().any(|v| {
            v.vendor.as_str() == name
                || v.fields
                    .iter()
                    .any(|f| f.name == name || f.json_name == name)
        })
}

/// Whether `path` is a serde_yaml_ng path made only of known field names and indices, e.g.
/// `tenants[3].miradore.apiKey`.
fn is_field_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('.').all(|segment| {
            let name_end = segment.find('[').unwrap_or(segment.len());
            let (name, indices) = segment.split_at(name_end);
            (is_field_name(name) || (name.is_empty() && !indices.is_empty()))
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
            .filter(|name| is_field_name(name))
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

/// A tenant document. Read field by field (see [`ConnectionsDoc`]) with serde's rules for a
/// struct with `deny_unknown_fields` and camelCase names that also accepts the snake_case
/// ones: an unknown name, a name given twice, a missing `id` or a value of the wrong type is
/// an error that names the field.
#[derive(Debug, Default)]
pub struct TenantDoc {
    pub id: String,
    pub display_name: String,
    pub connections: ConnectionsDoc,
    /// Accepted so that a `get -o json` output can be applied back; ignored.
    pub etag: Option<String>,
    pub create_time: Option<serde_json::Value>,
    pub update_time: Option<serde_json::Value>,
}

/// The vendor connections of a document (`miradore: { site: ..., apiKey: ... }`), each
/// field named as the schema declares it ([`Connection::FIELDS`]): its camelCase name or
/// its snake_case one. A text field left out is blank, a secret left out is unset.
#[derive(Debug, Default)]
pub struct ConnectionsDoc {
    /// Per vendor of [`vendor_fields`], in that order: `None` when the document leaves it
    /// out or gives it as null, else its fields in their declared order.
    vendors: Vec<Option<Vec<FieldDoc>>>,
}

#[derive(Debug)]
enum FieldDoc {
    Text(String),
    /// Boxed: a secret's document is four times a text field's size, and a tenants file of
    /// 10,000 tenants holds every field at once while it is read.
    Secret(Option<Box<SecretDoc>>),
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

/// The partner defaults in a document: the same connections as a tenant, nothing else.
#[derive(Debug, Default)]
pub struct PartnerDefaultsDoc {
    pub connections: ConnectionsDoc,
}

impl PartnerDefaultsDoc {
    pub fn into_proto(
        self,
        sources: &dyn Sources,
    ) -> Result<proto::PartnerDefaults, DocumentError> {
        let mut p = proto::PartnerDefaults::default();
        self.connections
            .into_proto(sources)
            .map_err(|e| match e {
                DocumentError::Secret { field, message } => DocumentError::Secret {
                    field: format!("partnerDefaults.{field}"),
                    message,
                },
                other => other,
            })?
            .set_in_partner(&mut p);
        Ok(p)
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
        let mut t = proto::Tenant {
            id: self.id,
            display_name: self.display_name,
            ..Default::default()
        };
        self.connections.into_proto(sources)?.set_in_tenant(&mut t);
        Ok(t)
    }
}

impl ConnectionsDoc {
    /// The connection messages, with every referenced secret read from `sources`, in the
    /// vendors' and fields' declared order (the first error wins).
    fn into_proto(self, sources: &dyn Sources) -> Result<ProtoConnectionsOwned, DocumentError> {
        struct Fill<'a> {
            docs: std::vec::IntoIter<Option<Vec<FieldDoc>>>,
            sources: &'a dyn Sources,
            out: Result<ProtoConnectionsOwned, DocumentError>,
        }
        impl VendorVisitor for Fill<'_> {
            fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
                // Both walk the vendors in the same order.
                let (Some(Some(fields)), Ok(out)) = (self.docs.next(), &mut self.out) else {
                    return;
                };
                let msg = slot.proto_mut(out).insert(C::Proto::default());
                for (field, doc) in C::FIELDS.iter().zip(fields) {
                    match ((field.proto_mut)(msg), doc) {
                        (ProtoMut::Text(dst), FieldDoc::Text(text)) => *dst = text,
                        (ProtoMut::Secret(dst), FieldDoc::Secret(doc)) => {
                            let path = format!("{}.{}", C::VENDOR.as_str(), json_name(field.name));
                            match resolve_secret(doc.map(|d| *d), &path, self.sources) {
                                Ok(secret) => *dst = secret,
                                Err(e) => {
                                    self.out = Err(e);
                                    return;
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut fill = Fill {
            docs: self.vendors.into_iter(),
            sources,
            out: Ok(ProtoConnectionsOwned::default()),
        };
        Connections::for_each_vendor(&mut fill);
        fill.out
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
            let Some(msg) = slot.proto(self.msgs) else {
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

// ---- reading the documents ----
//
// `TenantDoc`, `PartnerDefaultsDoc` and each vendor's connection are read as serde's derive
// reads a struct with `deny_unknown_fields` (a name is matched while its key is read, a
// value is read as the field's type, a missing `id` is reported at the end of the mapping),
// so the errors, and their paths and lines, are serde_yaml_ng's as before; only the names
// come from the schema.

/// A mapping key, read as serde's derive reads a field name.
struct Key<'a, K>(&'a dyn Fn(&str) -> Option<K>);

impl<'de, K> DeserializeSeed<'de> for Key<'_, K> {
    type Value = K;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de, K> Visitor<'de> for Key<'_, K> {
    type Value = K;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("field identifier")
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<K, E> {
        (self.0)(name).ok_or_else(|| E::unknown_field(name, &[]))
    }
}

/// Reads the value of a field that may be given once.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

fn vendor_index(name: &str) -> Option<usize> {
    vendor_fields()
        .iter()
        .position(|v| v.vendor.as_str() == name)
}

/// The vendor connections read so far from one mapping; `Some(None)` is a vendor given as
/// null (given, so a second one is given twice).
struct ConnectionsReader(Vec<Option<Option<Vec<FieldDoc>>>>);

impl ConnectionsReader {
    fn new() -> Self {
        Self(vendor_fields().iter().map(|_| None).collect())
    }

    /// Reads the value of the `index`th vendor's key.
    fn read<'de, A: MapAccess<'de>>(&mut self, map: &mut A, index: usize) -> Result<(), A::Error> {
        let vendor = &vendor_fields()[index];
        if self.0[index].is_some() {
            return Err(de::Error::duplicate_field(vendor.vendor.as_str()));
        }
        self.0[index] = Some(map.next_value_seed(OptionalConnection(vendor))?);
        Ok(())
    }

    fn finish(self) -> ConnectionsDoc {
        ConnectionsDoc {
            vendors: self.0.into_iter().map(Option::flatten).collect(),
        }
    }
}

/// A vendor's connection, or null.
struct OptionalConnection(&'static VendorFields);

impl<'de> DeserializeSeed<'de> for OptionalConnection {
    type Value = Option<Vec<FieldDoc>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalConnection {
    type Value = Option<Vec<FieldDoc>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("option")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_struct("connection", &[], ConnectionFields(self.0))
            .map(Some)
    }
}

/// A vendor's connection: its fields by camelCase or snake_case name, each at most once.
struct ConnectionFields(&'static VendorFields);

impl<'de> Visitor<'de> for ConnectionFields {
    type Value = Vec<FieldDoc>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "struct {} connection", self.0.vendor.as_str())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let fields = &self.0.fields;
        let lookup = |name: &str| {
            fields
                .iter()
                .position(|f| f.json_name == name || f.name == name)
        };
        let mut found: Vec<Option<FieldDoc>> = fields.iter().map(|_| None).collect();
        while let Some(i) = map.next_key_seed(Key(&lookup))? {
            let field = &fields[i];
            if found[i].is_some() {
                return Err(de::Error::duplicate_field(field.json_name.as_str()));
            }
            found[i] = Some(if field.secret {
                FieldDoc::Secret(map.next_value()?)
            } else {
                FieldDoc::Text(map.next_value()?)
            });
        }
        let blank = |secret: bool| {
            if secret {
                FieldDoc::Secret(None)
            } else {
                FieldDoc::Text(String::new())
            }
        };
        Ok(fields
            .iter()
            .zip(found)
            .map(|(field, doc)| doc.unwrap_or_else(|| blank(field.secret)))
            .collect())
    }
}

enum TenantKey {
    Id,
    DisplayName,
    Vendor(usize),
    Etag,
    CreateTime,
    UpdateTime,
}

impl<'de> Deserialize<'de> for TenantDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tenant;
        impl<'de> Visitor<'de> for Tenant {
            type Value = TenantDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("struct TenantDoc")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TenantDoc, A::Error> {
                let lookup = |name: &str| {
                    Some(match name {
                        "id" => TenantKey::Id,
                        "displayName" | "display_name" => TenantKey::DisplayName,
                        "etag" => TenantKey::Etag,
                        "createTime" | "create_time" => TenantKey::CreateTime,
                        "updateTime" | "update_time" => TenantKey::UpdateTime,
                        vendor => TenantKey::Vendor(vendor_index(vendor)?),
                    })
                };
                let (mut id, mut display_name) = (None, None);
                let (mut etag, mut create_time, mut update_time) = (None, None, None);
                let mut connections = ConnectionsReader::new();
                while let Some(key) = map.next_key_seed(Key(&lookup))? {
                    match key {
                        TenantKey::Id => once(&mut map, &mut id, "id")?,
                        TenantKey::DisplayName => once(&mut map, &mut display_name, "displayName")?,
                        TenantKey::Vendor(i) => connections.read(&mut map, i)?,
                        TenantKey::Etag => once(&mut map, &mut etag, "etag")?,
                        TenantKey::CreateTime => once(&mut map, &mut create_time, "createTime")?,
                        TenantKey::UpdateTime => once(&mut map, &mut update_time, "updateTime")?,
                    }
                }
                Ok(TenantDoc {
                    id: id.ok_or_else(|| de::Error::missing_field("id"))?,
                    display_name: display_name.unwrap_or_default(),
                    connections: connections.finish(),
                    etag: etag.flatten(),
                    create_time: create_time.flatten(),
                    update_time: update_time.flatten(),
                })
            }
        }
        d.deserialize_struct("TenantDoc", &[], Tenant)
    }
}

impl<'de> Deserialize<'de> for PartnerDefaultsDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Partner;
        impl<'de> Visitor<'de> for Partner {
            type Value = PartnerDefaultsDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("struct PartnerDefaultsDoc")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PartnerDefaultsDoc, A::Error> {
                let mut connections = ConnectionsReader::new();
                while let Some(i) = map.next_key_seed(Key(&vendor_index))? {
                    connections.read(&mut map, i)?;
                }
                Ok(PartnerDefaultsDoc {
                    connections: connections.finish(),
                })
            }
        }
        d.deserialize_struct("PartnerDefaultsDoc", &[], Partner)
    }
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

    /// The reader the schema drives reports what serde's derive reported for the typed
    /// structs it replaced (these messages were taken from them), under both names.
    #[test]
    fn connections_are_read_by_their_declared_names_with_serde_errors() {
        let cases = [
            (
                "id: a\nmiradore: { apiKey: { value: a }, api_key: { value: b } }",
                "miradore: apiKey is given twice at line 2 column 11",
            ),
            (
                "id: a\nmiradore: ~\nmiradore: {}",
                "miradore is given twice at line 1 column 1",
            ),
            (
                "{\"id\": \"a\", \"m3ter\": {\"orgId\": \"o\", \"org_id\": \"o\"}}",
                "m3ter: orgId is given twice at line 1 column 22",
            ),
            (
                "id: a\nm3ter: { accessKeyID: a }",
                "m3ter: has a field that is not allowed here (check its name and indentation) at line 2 column 10",
            ),
            (
                "id: a\nmiradore: [a, b]",
                "miradore: has the wrong type (expected a mapping ({ ... })) at line 2 column 11",
            ),
            (
                "id: a\nmiradore: { site: [a] }",
                "miradore.site: has the wrong type (expected a string) at line 2 column 19",
            ),
            (
                "id: a\nmiradore: { [a]: 1 }",
                "miradore: has the wrong type (expected another type) at line 2 column 13",
            ),
            ("miradore: null", "id is required at line 1 column 1"),
        ];
        for (text, expected) in cases {
            assert_eq!(TenantDoc::parse(text).unwrap_err(), expected, "{text:?}");
        }
        let t = TenantDoc::parse(
            "id: a\nm3ter: { access_key_id: k, orgId: o }\nmailkit:\nmiradore: { site: 12 }",
        )
        .unwrap()
        .into_proto(&|_: &str| None)
        .unwrap();
        let m3ter = t.m3ter.unwrap();
        assert_eq!(
            (m3ter.access_key_id.as_str(), m3ter.org_id.as_str()),
            ("k", "o")
        );
        assert!(m3ter.api_secret.is_none() && m3ter.environment.is_empty());
        assert_eq!(t.miradore.unwrap().site, "12");
        assert!(t.mailkit.is_none());
        let partner: PartnerDefaultsDoc =
            parse_yaml("mailkit: { clientMd5: { value: x } }").unwrap();
        let p = partner.into_proto(&|_: &str| None).unwrap();
        assert_eq!(p.mailkit.unwrap().client_md5.unwrap().value, "x");
        assert_eq!(
            parse_yaml::<PartnerDefaultsDoc>("id: a").unwrap_err(),
            "the document has a field that is not allowed here (check its name and indentation) at line 1 column 1"
        );
    }
}
