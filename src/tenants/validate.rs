//! Format rules for every operator-supplied field, reported as field violations
//! (`google.rpc.BadRequest` on the gRPC side). Completeness (a required field blank in both
//! the tenant and the partner defaults) is checked in [`super::effective`].

use super::model::{Connection, Connections, FieldRef, Slot, VendorVisitor};
use crate::secret::Secret;

use crate::syntax::is_dns_label;

/// One offending field: its path (e.g. `tenant.m3ter.org_id`) and what is wrong with it.
/// Descriptions never quote a secret value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    pub(crate) fn missing(field: &str) -> Self {
        Self::new(
            field,
            "required: set it on the tenant or in the partner defaults",
        )
    }

    /// The same violation with `prefix.` before its field path.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

/// Longest text taken from a request (an id, a mask path) that an error message repeats;
/// longer text is cut. Every valid id and path is shorter, so only junk is ever cut.
pub const MAX_ECHOED: usize = 64;

/// `text` as an error message may repeat it: quoted, non-ASCII and control characters
/// escaped (so the message stays one line of ASCII, as gRPC metadata carries it best), and
/// cut after [`MAX_ECHOED`] characters with the original length stated.
pub fn echo(text: &str) -> String {
    let mut out = String::with_capacity(MAX_ECHOED + 24);
    out.push('"');
    let mut cut = false;
    for (n, c) in text.chars().enumerate() {
        if n == MAX_ECHOED {
            cut = true;
            break;
        }
        out.extend(c.escape_default());
    }
    out.push('"');
    if cut {
        out.push_str(&format!("... ({} bytes)", text.len()));
    }
    out
}

/// The path of a declared tenant in errors: `tenants[acme]` for a valid id, `tenants[3]`
/// (its index) for anything else, so that an error never repeats arbitrary text.
pub fn declared_tenant_path(index: usize, id: &str) -> String {
    if is_tenant_id(id) {
        format!("tenants[{id}]")
    } else {
        format!("tenants[{index}]")
    }
}

/// Longest accepted display name, in characters.
pub const MAX_DISPLAY_NAME: usize = 200;
/// Longest accepted secret value, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;
/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`: a DNS label, lower case.
pub fn is_tenant_id(id: &str) -> bool {
    is_dns_label(id)
}

pub fn validate_tenant_id(id: &str, field: &str, out: &mut Vec<FieldViolation>) {
    if id.is_empty() {
        out.push(FieldViolation::new(field, "required"));
    } else if !is_tenant_id(id) {
        out.push(FieldViolation::new(
            field,
            "must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'",
        ));
    }
}

pub fn validate_display_name(name: &str, field: &str, out: &mut Vec<FieldViolation>) {
    if name.chars().count() > MAX_DISPLAY_NAME {
        out.push(FieldViolation::new(
            field,
            format!("must be at most {MAX_DISPLAY_NAME} characters"),
        ));
    } else if name.chars().any(is_display_control) {
        out.push(FieldViolation::new(
            field,
            "must not contain control, bidirectional-override or line-separator characters",
        ));
    }
}

/// Characters a display name refuses: C0/C1 controls, and the invisible format characters
/// that change how surrounding text is shown (bidirectional embeddings, overrides, isolates
/// and marks; line and paragraph separators), with which a name can pass for another in a
/// terminal or a UI (CVE-2021-42574, "Trojan Source").
fn is_display_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
        )
}

/// Checks the format of every non-blank field of `conns` against its vendor's declared
/// rules ([`Connection::FIELDS`]); `prefix` is the path of the message holding them
/// (`tenant` or `partner_defaults`).
pub fn validate_connections(conns: &Connections, prefix: &str, out: &mut Vec<FieldViolation>) {
    struct Check<'a> {
        conns: &'a Connections,
        prefix: &'a str,
        out: &'a mut Vec<FieldViolation>,
    }
    impl VendorVisitor for Check<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            if let Some(conn) = (slot.get)(self.conns) {
                validate_connection(conn, self.prefix, self.out);
            }
        }
    }
    Connections::for_each_vendor(&mut Check { conns, prefix, out });
}

fn validate_connection<C: Connection>(conn: &C, prefix: &str, out: &mut Vec<FieldViolation>) {
    let vendor = C::VENDOR.as_str();
    for field in C::FIELDS {
        match (field.get)(conn) {
            FieldRef::Text(value) if !value.is_empty() => {
                if let Err(problem) = (field.rule)(value) {
                    out.push(FieldViolation::new(
                        format!("{prefix}.{vendor}.{}", field.name),
                        problem,
                    ));
                }
            }
            FieldRef::Secret(Some(secret)) => {
                let path = format!("{prefix}.{vendor}.{}.value", field.name);
                if validate_secret(secret, &path, out)
                    && let Err(problem) = (field.rule)(secret.expose())
                {
                    out.push(FieldViolation::new(path, problem));
                }
            }
            FieldRef::Text(_) | FieldRef::Secret(None) => {}
        }
    }
}

/// Rules for every secret value. Returns whether it passed, so callers add their own rules
/// only to values that passed these.
fn validate_secret(s: &Secret, field: &str, out: &mut Vec<FieldViolation>) -> bool {
    let v = s.expose();
    let problem = if v.is_empty() {
        "must not be empty"
    } else if v.len() > MAX_SECRET_LEN {
        "is too long (at most 4096 bytes)"
    } else if v.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return true;
    };
    out.push(FieldViolation::new(field, problem));
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{M3terConn, MailkitConn, MiradoreConn};
    use crate::syntax::is_uuid;
    use crate::vendors::miradore::fields::is_site as is_miradore_site;

    #[test]
    fn echoed_text_is_short_ascii_and_quoted() {
        assert_eq!(echo("acme"), "\"acme\"");
        assert_eq!(echo("a\u{202E}\n"), "\"a\\u{202e}\\n\"");
        let long = echo(&"x".repeat(16_384));
        assert!(long.len() < MAX_ECHOED + 24, "{long}");
        assert!(long.ends_with("... (16384 bytes)"), "{long}");
    }

    #[test]
    fn tenant_ids() {
        for ok in ["a", "acme", "acme-1", "0", &"a".repeat(63)] {
            assert!(is_tenant_id(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Acme", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_tenant_id(bad), "{bad}");
        }
    }

    #[test]
    fn sites_and_uuids() {
        assert!(is_miradore_site("AcMe-1"));
        assert!(!is_miradore_site("ac me"));
        assert!(!is_miradore_site(""));
        assert!(is_uuid("0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"));
        assert!(!is_uuid("0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0a"));
        assert!(!is_uuid("0c2a1d53x5a44-4c1a-9f7e-3f7cc1d7e0aa"));
    }

    #[test]
    fn every_bad_field_is_named_without_its_value() {
        let conns = Connections {
            miradore: Some(MiradoreConn {
                site: "bad site".into(),
                api_key: Some(Secret::new("has space")),
            }),
            m3ter: Some(M3terConn {
                access_key_id: "a:b".into(),
                api_secret: Some(Secret::new("")),
                org_id: "nope".into(),
                environment: "Bad_Env".into(),
            }),
            mailkit: Some(MailkitConn {
                client_id: "12a".into(),
                client_md5: Some(Secret::new("zz")),
            }),
        };
        let mut out = Vec::new();
        validate_connections(&conns, "tenant", &mut out);
        let fields: Vec<_> = out.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "tenant.miradore.site",
                "tenant.miradore.api_key.value",
                "tenant.m3ter.access_key_id",
                "tenant.m3ter.api_secret.value",
                "tenant.m3ter.org_id",
                "tenant.m3ter.environment",
                "tenant.mailkit.client_id",
                "tenant.mailkit.client_md5.value",
            ]
        );
        assert!(out.iter().all(|v| !v.description.contains("has space")));
    }

    #[test]
    fn display_names_refuse_controls_and_bidi_overrides() {
        for bad in [
            "a\u{202E}b",
            "a\u{2066}b",
            "a\u{200F}b",
            "a\u{061C}",
            "a\u{2028}b",
            "a\nb",
            "a\u{85}b",
        ] {
            let mut out = Vec::new();
            validate_display_name(bad, "tenant.display_name", &mut out);
            assert_eq!(out.len(), 1, "{bad:?}");
        }
        for ok in ["Acme Corp", "Ærø Øl", "שלום", "👩\u{200D}💻"] {
            let mut out = Vec::new();
            validate_display_name(ok, "tenant.display_name", &mut out);
            assert!(out.is_empty(), "{ok:?}");
        }
    }

    #[test]
    fn control_characters_in_secrets_are_refused() {
        let conns = Connections {
            m3ter: Some(M3terConn {
                api_secret: Some(Secret::new("abc\ndef")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = Vec::new();
        validate_connections(&conns, "tenant", &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].description.contains("control"));
    }
}
