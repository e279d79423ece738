//! Format rules for every operator-supplied field, reported as field violations
//! (`google.rpc.BadRequest` on the gRPC side). Completeness (a required field blank in both
//! the tenant and the partner defaults) is checked in [`super::effective`].

use super::model::{Connections, M3terConn, MailkitConn, MiradoreConn};
use crate::secret::Secret;

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
/// Longest accepted m3ter access key ID, in bytes.
pub const MAX_ACCESS_KEY_ID_LEN: usize = 256;

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`: a DNS label, lower case.
pub fn is_tenant_id(id: &str) -> bool {
    is_dns_label(id)
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `[A-Za-z0-9-]{1,63}`, case kept.
pub fn is_miradore_site(s: &str) -> bool {
    (1..=63).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// 8-4-4-4-12 hex digits.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
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

/// Checks the format of every non-blank field of `conns`; `prefix` is the path of the
/// message holding them (`tenant` or `partner_defaults`).
pub fn validate_connections(conns: &Connections, prefix: &str, out: &mut Vec<FieldViolation>) {
    if let Some(c) = &conns.miradore {
        validate_miradore(c, &format!("{prefix}.miradore"), out);
    }
    if let Some(c) = &conns.m3ter {
        validate_m3ter(c, &format!("{prefix}.m3ter"), out);
    }
    if let Some(c) = &conns.mailkit {
        validate_mailkit(c, &format!("{prefix}.mailkit"), out);
    }
}

fn validate_miradore(c: &MiradoreConn, p: &str, out: &mut Vec<FieldViolation>) {
    if !c.site.is_empty() && !is_miradore_site(&c.site) {
        out.push(FieldViolation::new(
            format!("{p}.site"),
            "must be 1-63 letters, digits or '-' (case is kept)",
        ));
    }
    if let Some(key) = &c.api_key {
        let field = format!("{p}.api_key.value");
        if validate_secret(key, &field, out) && !key.expose().bytes().all(|b| b.is_ascii_graphic())
        {
            // The key travels in the X-API-Key header, which must be visible ASCII.
            out.push(FieldViolation::new(
                field,
                "must be visible ASCII characters without spaces",
            ));
        }
    }
}

fn validate_m3ter(c: &M3terConn, p: &str, out: &mut Vec<FieldViolation>) {
    if !c.access_key_id.is_empty()
        && (c.access_key_id.len() > MAX_ACCESS_KEY_ID_LEN
            || !c
                .access_key_id
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b':'))
    {
        // It is the user part of HTTP Basic credentials, where ':' ends it.
        out.push(FieldViolation::new(
            format!("{p}.access_key_id"),
            format!(
                "must be at most {MAX_ACCESS_KEY_ID_LEN} visible ASCII characters, without ':' or spaces"
            ),
        ));
    }
    if let Some(s) = &c.api_secret {
        validate_secret(s, &format!("{p}.api_secret.value"), out);
    }
    if !c.org_id.is_empty() && !is_uuid(&c.org_id) {
        out.push(FieldViolation::new(
            format!("{p}.org_id"),
            "must be a UUID (8-4-4-4-12 hex digits)",
        ));
    }
    if !c.environment.is_empty() && !is_dns_label(&c.environment) {
        out.push(FieldViolation::new(
            format!("{p}.environment"),
            "must be empty, \"prod\", or a DNS label (lower-case letters, digits, '-')",
        ));
    }
}

fn validate_mailkit(c: &MailkitConn, p: &str, out: &mut Vec<FieldViolation>) {
    if !c.client_id.is_empty()
        && (c.client_id.len() > 20 || !c.client_id.bytes().all(|b| b.is_ascii_digit()))
    {
        out.push(FieldViolation::new(
            format!("{p}.client_id"),
            "must be 1-20 digits",
        ));
    }
    if let Some(md5) = &c.client_md5 {
        let field = format!("{p}.client_md5.value");
        if validate_secret(md5, &field, out)
            && !(md5.expose().len() == 32 && md5.expose().bytes().all(|b| b.is_ascii_hexdigit()))
        {
            out.push(FieldViolation::new(field, "must be 32 hex digits"));
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
