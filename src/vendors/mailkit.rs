//! Mailkit: the credentials travel in the request body, so this rule rewrites bodies.
//!
//! - `POST /json.fcgi`: the top-level members `id` (as a JSON string) and `md5` are set. The
//!   document is spliced, not re-serialised: every other byte (member order, nested values,
//!   escapes, whitespace) is kept. Keys are compared after unescaping, so `"\u0069d"` is
//!   `id`; when a key appears more than once, the first occurrence gets our value and the
//!   others are removed, so no app value survives whichever one Mailkit would read. Missing
//!   members are added after the last member.
//! - `POST /rpc.fcgi`: the body must be a strict XML-RPC call (the grammar is on
//!   [`xmlrpc_credential_slots`]); anything else is refused, because a lenient reader (CPython's
//!   `xmlrpc.client` is one) also reads values outside `<param>`, so a stray `<string>` before
//!   the first param would move the app's choice into the credential slots. The `<value>` of
//!   the first two `<param>`s becomes `<int>ID</int>` (`<string>` when the ID is not a 32-bit
//!   integer) and `<string>MD5</string>`, escaped; the rest of the document is byte-identical.
//!   A UTF-8 byte order mark is accepted and kept: offsets count it.
//! - Anything unparsable, a JSON body that is not an object (a byte order mark included:
//!   RFC 8259 forbids one), an XML-RPC call outside the grammar or with fewer than two
//!   params → 400 `bad_request`. A compressed body (`Content-Encoding`) cannot be rewritten
//!   and is refused the same way.
//! - Mailkit's API is POST to these two endpoints only: another path is 404 `unknown_route`,
//!   another method 400 `bad_request`.

use std::borrow::Cow;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use quick_xml::Reader;
use quick_xml::events::Event;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use futures_util::future::BoxFuture;
use http::header::CONTENT_ENCODING;
use http::request::Parts;

use super::error::RuleError;
use super::{BodyRule, Plan, RuleInput, TestOutcome, Vendor, Via};
use crate::tenants::{EffectiveTenant, MailkitCreds, VendorKind};
use crate::upstream;

/// The formats of Mailkit's credential fields, as the credential schema
/// (`crate::model::MailkitConn`) checks them on every write. A leaf (it imports only
/// [`crate::syntax`]), so the model can name it without importing the data plane.
pub mod fields {
    use crate::syntax::problem;

    pub fn client_id(s: &str) -> Result<(), String> {
        problem(
            s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()),
            "must be 1-20 digits",
        )
    }

    pub fn client_md5(s: &str) -> Result<(), String> {
        problem(
            s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()),
            "must be 32 hex digits",
        )
    }
}

/// Mailkit's API host.
pub const HOST: &str = "api.mailkit.eu";

/// Mailkit as the proxy sees it: prefix `/mailkit`, host `api.mailkit.eu`, the credentials
/// spliced into the body (JSON or XML-RPC).
pub struct Mailkit;

impl Mailkit {
    fn creds(tenant: &EffectiveTenant) -> Result<&MailkitCreds, RuleError> {
        tenant.mailkit.as_ref().ok_or(RuleError::NotConfigured)
    }
}

impl Vendor for Mailkit {
    fn name(&self) -> &'static str {
        "mailkit"
    }

    fn kind(&self) -> Option<VendorKind> {
        Some(VendorKind::Mailkit)
    }

    fn prefixes(&self) -> &'static [&'static str] {
        &["mailkit"]
    }

    fn owns_host(&self, host: &str) -> bool {
        host.eq_ignore_ascii_case(HOST)
    }

    fn dns_suffixes(&self) -> &'static [&'static str] {
        &[HOST]
    }

    fn upstream_host<'t>(
        &self,
        _via: Via<'_>,
        tenant: &'t EffectiveTenant,
    ) -> Result<&'t str, RuleError> {
        Self::creds(tenant)?;
        Ok(HOST)
    }

    fn plan(&self, req: RuleInput<'_>, tenant: &EffectiveTenant) -> Result<Plan, RuleError> {
        Self::creds(tenant)?;
        endpoint(req.method, req.path.as_str())?;
        if req
            .headers
            .get(CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity")
        {
            return Err(RuleError::malformed(
                "a compressed Mailkit body cannot be rewritten; send it uncompressed",
            ));
        }
        Ok(Plan {
            path_and_query: None,
            body: BodyRule::Rewrite,
        })
    }

    fn rewrite_body(
        &self,
        parts: &Parts,
        body: &[u8],
        tenant: &EffectiveTenant,
    ) -> Result<Vec<u8>, RuleError> {
        rewrite(
            endpoint(&parts.method, parts.uri.path())?,
            body,
            Self::creds(tenant)?,
        )
    }

    fn test<'a>(
        &'a self,
        client: &'a upstream::Client,
        tenant: &'a EffectiveTenant,
    ) -> BoxFuture<'a, TestOutcome> {
        Box::pin(async move {
            match &tenant.mailkit {
                Some(creds) => test(client, creds).await,
                None => TestOutcome::not_configured(VendorKind::Mailkit),
            }
        })
    }
}

/// The two Mailkit endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Json,
    XmlRpc,
}

/// Which endpoint `method path` calls, or the refusal.
pub(crate) fn endpoint(method: &Method, path: &str) -> Result<Endpoint, RuleError> {
    let ep = match path {
        "/json.fcgi" => Endpoint::Json,
        "/rpc.fcgi" => Endpoint::XmlRpc,
        _ => {
            return Err(RuleError::UnknownRoute(
                "Mailkit's API is POST /json.fcgi or POST /rpc.fcgi",
            ));
        }
    };
    if method != Method::POST {
        return Err(RuleError::malformed("Mailkit's API accepts only POST"));
    }
    Ok(ep)
}

/// The rewritten body for `endpoint`.
pub(crate) fn rewrite(
    endpoint: Endpoint,
    body: &[u8],
    creds: &MailkitCreds,
) -> Result<Vec<u8>, RuleError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| RuleError::malformed("the Mailkit request body is not UTF-8"))?;
    match endpoint {
        Endpoint::Json => rewrite_json(text, creds),
        Endpoint::XmlRpc => rewrite_xmlrpc(text, creds),
    }
}

/// Top-level members as borrowed raw slices of the input, in order.
struct Members<'a>(Vec<(&'a RawValue, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(kv) = map.next_entry::<&'de RawValue, &'de RawValue>()? {
                    out.push(kv);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Id,
    Md5,
    Other,
}

fn slot_of(raw_key: &str) -> Slot {
    let key: Cow<'_, str> = if raw_key.contains('\\') {
        match serde_json::from_str::<String>(raw_key) {
            Ok(k) => Cow::Owned(k),
            Err(_) => return Slot::Other,
        }
    } else {
        Cow::Borrowed(
            raw_key
                .get(1..raw_key.len().saturating_sub(1))
                .unwrap_or(""),
        )
    };
    match key.as_ref() {
        "id" => Slot::Id,
        "md5" => Slot::Md5,
        _ => Slot::Other,
    }
}

fn rewrite_json(text: &str, creds: &MailkitCreds) -> Result<Vec<u8>, RuleError> {
    let members: Members<'_> = serde_json::from_str(text).map_err(|e| {
        RuleError::malformed(format!(
            "the Mailkit JSON body is not a JSON object (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let base = text.as_ptr() as usize;
    // Raw values borrow from `text`, so their offsets are pointer differences.
    let span = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - base;
        (start, start + raw.get().len())
    };
    let write_value = |out: &mut Vec<u8>, slot: Slot| -> Result<(), RuleError> {
        let r = match slot {
            Slot::Id => serde_json::to_writer(&mut *out, &creds.client_id),
            _ => serde_json::to_writer(&mut *out, creds.client_md5.expose()),
        };
        r.map_err(|_| RuleError::malformed("cannot encode the Mailkit credentials"))
    };

    let mut out = Vec::with_capacity(text.len() + 64);
    let mut cursor = 0;
    let (mut seen_id, mut seen_md5) = (false, false);
    let mut prev_end = None;
    for (key, value) in &members.0 {
        let (vs, ve) = span(value);
        let slot = slot_of(key.get());
        let seen = match slot {
            Slot::Id => &mut seen_id,
            Slot::Md5 => &mut seen_md5,
            Slot::Other => {
                prev_end = Some(ve);
                continue;
            }
        };
        if *seen {
            // A duplicate: drop it together with the separator before it.
            if let Some(p) = prev_end.filter(|p| *p > cursor) {
                out.extend_from_slice(&text.as_bytes()[cursor..p]);
            }
            cursor = ve;
        } else {
            *seen = true;
            out.extend_from_slice(&text.as_bytes()[cursor..vs]);
            write_value(&mut out, slot)?;
            cursor = ve;
        }
        prev_end = Some(ve);
    }
    if !(seen_id && seen_md5) {
        // Insert after the last member, or right after `{` when there is none.
        let at = match prev_end {
            Some(p) => p,
            None => text.find('{').map(|i| i + 1).unwrap_or(0),
        };
        let at = at.max(cursor);
        out.extend_from_slice(&text.as_bytes()[cursor..at]);
        let mut need_comma = !members.0.is_empty();
        for (seen, slot, name) in [
            (seen_id, Slot::Id, "\"id\":"),
            (seen_md5, Slot::Md5, "\"md5\":"),
        ] {
            if !seen {
                if need_comma {
                    out.push(b',');
                }
                out.extend_from_slice(name.as_bytes());
                write_value(&mut out, slot)?;
                need_comma = true;
            }
        }
        cursor = at;
    }
    out.extend_from_slice(&text.as_bytes()[cursor..]);
    Ok(out)
}

fn xml_err(e: impl std::fmt::Display) -> RuleError {
    RuleError::malformed(format!("the Mailkit XML-RPC body is refused: {e}"))
}

/// The UTF-8 byte order mark. XML allows one before the document; it is kept in the output
/// and every offset below counts it, so the splice lands where the bytes were received.
const UTF8_BOM: &str = "\u{feff}";

/// Deepest element nesting accepted in an XML-RPC call (arrays and structs nest); deeper
/// documents are refused rather than walked.
pub(crate) const MAX_XMLRPC_DEPTH: usize = 64;

/// The elements of an XML-RPC call, by their exact names: XML-RPC names are case-sensitive and
/// unprefixed, so `<PARAM>` or `<a:param>` is no element of the grammar.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Element {
    MethodCall,
    MethodName,
    Params,
    Param,
    Value,
    /// `int`, `i4`, `i8`, `boolean`, `string`, `double`, `dateTime.iso8601`, `base64`: text.
    Scalar,
    Nil,
    Struct,
    Member,
    Name,
    Array,
    Data,
}

impl Element {
    fn of(name: &[u8]) -> Option<Element> {
        Some(match name {
            b"methodCall" => Element::MethodCall,
            b"methodName" => Element::MethodName,
            b"params" => Element::Params,
            b"param" => Element::Param,
            b"value" => Element::Value,
            b"int" | b"i4" | b"i8" | b"boolean" | b"string" | b"double" | b"dateTime.iso8601"
            | b"base64" => Element::Scalar,
            b"nil" => Element::Nil,
            b"struct" => Element::Struct,
            b"member" => Element::Member,
            b"name" => Element::Name,
            b"array" => Element::Array,
            b"data" => Element::Data,
            _ => return None,
        })
    }

    /// Whether `child` may come next in `self` after `seen` child elements.
    fn allows(self, seen: usize, text: bool, child: Element) -> bool {
        use Element::*;
        match (self, seen, child) {
            (MethodCall, 0, MethodName) | (MethodCall, 1, Params) => true,
            (Params, _, Param) | (Struct, _, Member) | (Data, _, Value) => true,
            (Param, 0, Value) | (Member, 0, Name) | (Member, 1, Value) | (Array, 0, Data) => true,
            (Value, 0, Scalar | Nil | Struct | Array) => !text,
            _ => false,
        }
    }

    /// Whether character data other than whitespace may appear directly inside.
    fn has_text(self, seen: usize) -> bool {
        match self {
            Element::MethodName | Element::Scalar | Element::Name => true,
            Element::Value => seen == 0,
            _ => false,
        }
    }

    /// Whether the element is complete with `seen` children and `text` seen.
    fn complete(self, seen: usize, text: bool) -> bool {
        match self {
            Element::MethodCall => seen >= 1,
            Element::MethodName => text,
            Element::Param | Element::Array => seen == 1,
            Element::Member => seen == 2,
            _ => true,
        }
    }
}

/// An open element while the call is read.
struct Frame {
    element: Element,
    /// Child elements so far.
    seen: usize,
    /// Character data other than whitespace so far.
    text: bool,
}

/// Characters XML 1.0 allows anywhere in a document (its `Char` production).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
        || c >= '\u{10000}'
}

/// The byte range of each of the first two params' `<value>` content in `doc`, after proving
/// `doc` is a strict XML-RPC call:
///
/// ```text
/// document   := BOM? XMLDecl? Misc* methodCall Misc*      Misc := whitespace | comment
/// methodCall := <methodCall> methodName params? </methodCall>
/// methodName := <methodName> [A-Za-z0-9_.:/]+ </methodName>
/// params     := <params> param* </params>
/// param      := <param> value </param>
/// value      := <value> text </value> | <value> (scalar | nil | struct | array) </value>
/// struct     := <struct> member* </struct>     member := <member> name value </member>
/// array      := <array> data </array>          data   := <data> value* </data>
/// ```
///
/// with whitespace and comments allowed between elements, exact element names, no
/// attributes (so no namespaces), no DOCTYPE, no processing instruction, the declaration
/// only first, version 1.0 and an ASCII-compatible encoding. Character data is text, CDATA,
/// and the five predefined or character references. Each range is `(start, end, whole)`:
/// `whole` when the value is an empty `<value/>`, replaced as a whole.
fn xmlrpc_credential_slots(doc: &str) -> Result<[(usize, usize, bool); 2], RuleError> {
    if let Some(c) = doc.chars().find(|c| !is_xml_char(*c)) {
        return Err(xml_err(format_args!(
            "character U+{:04X} is not allowed in XML",
            u32::from(c)
        )));
    }
    let (base, body) = match doc.strip_prefix(UTF8_BOM) {
        Some(rest) => (UTF8_BOM.len(), rest),
        None => (0, doc),
    };
    // quick-xml skips a byte order mark at the start of what it reads without counting it in
    // its positions; a second one would shift every offset by 3 bytes.
    if body.starts_with(UTF8_BOM) {
        return Err(xml_err(
            "only one byte order mark is allowed, at the very start",
        ));
    }
    let mut reader = Reader::from_str(body);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    let mut slots: Vec<(usize, usize, bool)> = Vec::with_capacity(2);
    let mut stack: Vec<Frame> = Vec::with_capacity(16);
    let mut root_done = false;
    let mut first = true;
    loop {
        let before = reader.buffer_position() as usize;
        let ev = reader.read_event().map_err(xml_err)?;
        let after = reader.buffer_position() as usize;
        let is_first = std::mem::replace(&mut first, false);
        match ev {
            Event::Decl(ref d) => {
                if !is_first {
                    return Err(xml_err("an XML declaration is allowed only first"));
                }
                check_decl(d)?;
            }
            Event::DocType(_) => return Err(xml_err("a DOCTYPE is not allowed")),
            Event::PI(_) => return Err(xml_err("a processing instruction is not allowed")),
            Event::Comment(_) => {}
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                if !e.attributes_raw().iter().all(u8::is_ascii_whitespace) {
                    return Err(xml_err("XML-RPC elements carry no attributes"));
                }
                let element = Element::of(e.name().as_ref())
                    .ok_or_else(|| xml_err("an element that is not part of XML-RPC"))?;
                let allowed = match stack.last() {
                    None => !root_done && element == Element::MethodCall,
                    Some(parent) => parent.element.allows(parent.seen, parent.text, element),
                };
                if !allowed {
                    return Err(xml_err("an element out of place in the XML-RPC grammar"));
                }
                if let Some(parent) = stack.last_mut() {
                    parent.seen += 1;
                }
                // A value directly in one of the first two params: a credential slot.
                if element == Element::Value && stack.len() == 3 && stack[1].seen <= 2 {
                    if empty {
                        slots.push((base + before, base + after, true));
                    } else {
                        slots.push((base + after, base + after, false));
                    }
                }
                let frame = Frame {
                    element,
                    seen: 0,
                    text: false,
                };
                if empty {
                    close(&frame, &mut stack, &mut root_done)?;
                } else {
                    if stack.len() >= MAX_XMLRPC_DEPTH {
                        return Err(xml_err("elements nested too deep"));
                    }
                    stack.push(frame);
                }
            }
            Event::End(_) => {
                let frame = stack
                    .pop()
                    .ok_or_else(|| xml_err("an end tag without its start"))?;
                if frame.element == Element::Value
                    && stack.len() == 3
                    && stack[1].seen <= 2
                    && let Some(slot) = slots.last_mut()
                {
                    slot.1 = base + before;
                }
                close(&frame, &mut stack, &mut root_done)?;
            }
            Event::Text(ref t) => {
                let raw: &[u8] = t.as_ref();
                if raw.windows(3).any(|w| w == b"]]>") {
                    return Err(xml_err("']]>' in character data"));
                }
                let blank = raw
                    .iter()
                    .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
                match stack.last_mut() {
                    Some(f) if f.element == Element::MethodName => {
                        let name_char = |b: &u8| b.is_ascii_alphanumeric() || b"_.:/".contains(b);
                        if !raw.iter().all(name_char) {
                            return Err(xml_err(
                                "a methodName is letters, digits and '_' '.' ':' '/' only",
                            ));
                        }
                        f.text = true;
                    }
                    _ if blank => {}
                    Some(f) if f.element.has_text(f.seen) => f.text = true,
                    _ => return Err(xml_err("text out of place in the XML-RPC grammar")),
                }
            }
            Event::CData(_) | Event::GeneralRef(_) => {
                if let Event::GeneralRef(ref r) = ev {
                    check_reference(r)?;
                }
                match stack.last_mut() {
                    Some(f) if f.element != Element::MethodName && f.element.has_text(f.seen) => {
                        f.text = true
                    }
                    _ => {
                        return Err(xml_err(
                            "character data out of place in the XML-RPC grammar",
                        ));
                    }
                }
            }
            Event::Eof => break,
        }
    }
    if !root_done || !stack.is_empty() {
        return Err(xml_err("the document is not one complete <methodCall>"));
    }
    match slots.as_slice() {
        [id, md5] => Ok([*id, *md5]),
        _ => Err(RuleError::malformed(
            "a Mailkit XML-RPC call needs at least two params (client ID and MD5)",
        )),
    }
}

/// Ends `frame`: it must be complete; closing the root ends the document.
fn close(frame: &Frame, stack: &mut [Frame], root_done: &mut bool) -> Result<(), RuleError> {
    if !frame.element.complete(frame.seen, frame.text) {
        return Err(xml_err(format_args!(
            "an incomplete <{}>",
            match frame.element {
                Element::MethodCall => "methodCall",
                Element::MethodName => "methodName",
                Element::Param => "param",
                Element::Member => "member",
                Element::Array => "array",
                _ => "element",
            }
        )));
    }
    if stack.is_empty() {
        *root_done = true;
    }
    Ok(())
}

/// Version 1.0, and an encoding whose markup bytes are those of UTF-8 (the body must be
/// UTF-8 in any case): a reader decoding it as declared sees the same elements.
fn check_decl(decl: &quick_xml::events::BytesDecl<'_>) -> Result<(), RuleError> {
    if decl.version().map_err(xml_err)?.as_ref() != b"1.0" {
        return Err(xml_err("only XML version 1.0 is accepted"));
    }
    if let Some(enc) = decl.encoding() {
        let enc = enc.map_err(xml_err)?;
        let ok = [&b"utf-8"[..], b"us-ascii", b"iso-8859-1"]
            .iter()
            .any(|e| enc.eq_ignore_ascii_case(e));
        if !ok {
            return Err(xml_err(
                "the declared encoding must be UTF-8 (or US-ASCII, ISO-8859-1)",
            ));
        }
    }
    Ok(())
}

/// The five predefined entities and character references to XML characters; no others
/// exist without a DOCTYPE.
fn check_reference(r: &quick_xml::events::BytesRef<'_>) -> Result<(), RuleError> {
    let name: &[u8] = r.as_ref();
    if matches!(name, b"lt" | b"gt" | b"amp" | b"apos" | b"quot") {
        return Ok(());
    }
    match r.resolve_char_ref() {
        Ok(Some(c)) if is_xml_char(c) => Ok(()),
        _ => Err(xml_err(
            "an undefined entity or invalid character reference",
        )),
    }
}

/// `s` escaped for XML character data, non-ASCII as character references so the result reads
/// the same whatever ASCII-compatible encoding the document declares.
fn xml_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_ascii() => out.push(c),
            c => out.push_str(&format!("&#x{:X};", u32::from(c))),
        }
    }
    out
}

fn rewrite_xmlrpc(text: &str, creds: &MailkitCreds) -> Result<Vec<u8>, RuleError> {
    let slots = xmlrpc_credential_slots(text)?;
    let id = &creds.client_id;
    let id_value = if id.parse::<i32>().is_ok() {
        format!("<int>{}</int>", xml_text(id))
    } else {
        format!("<string>{}</string>", xml_text(id))
    };
    let md5_value = zeroize::Zeroizing::new(format!(
        "<string>{}</string>",
        xml_text(creds.client_md5.expose())
    ));
    let mut out = Vec::with_capacity(text.len() + 64);
    let mut cursor = 0;
    for ((start, end, whole), new) in slots.iter().zip([&id_value, &*md5_value]) {
        out.extend_from_slice(&text.as_bytes()[cursor..*start]);
        if *whole {
            out.extend_from_slice(b"<value>");
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(b"</value>");
        } else {
            out.extend_from_slice(new.as_bytes());
        }
        cursor = *end;
    }
    out.extend_from_slice(&text.as_bytes()[cursor..]);
    Ok(out)
}

/// How many bytes of a `TestTenant` answer are read.
const TEST_BODY_LIMIT: usize = 1 << 20;

/// `TestTenant` for Mailkit: `mailkit.mailinglist.list` over `/json.fcgi`, a read. Mailkit
/// reports failures in the body (`error_status` ≠ 0), whatever the HTTP status.
pub async fn test(client: &upstream::Client, creds: &MailkitCreds) -> TestOutcome {
    let fail = |status: u16, message: String| TestOutcome {
        ok: false,
        http_status: status,
        message,
    };
    let body = match rewrite_json(r#"{"function":"mailkit.mailinglist.list"}"#, creds) {
        Ok(b) => b,
        Err(e) => return fail(0, e.to_string()),
    };
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{}/json.fcgi", HOST))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(upstream::full_body(Bytes::from(body)));
    let req = match req {
        Ok(r) => r,
        Err(_) => return fail(0, "cannot build the test request".to_owned()),
    };
    let resp = match client.send(req).await {
        Ok(r) => r,
        Err(e) => return fail(0, format!("could not reach Mailkit: {e}")),
    };
    let status = resp.status().as_u16();
    let bytes = match Limited::new(resp.into_body(), TEST_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => return fail(status, format!("reading Mailkit's answer failed: {e}")),
    };
    // Mailkit's `error` text is not repeated: it can quote the request, and so the client's
    // MD5. Only the numeric error_status, which cannot carry a secret, is reported.
    let error_status = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error_status").cloned())
        .filter(|v| !(v == 0 || v == "0"));
    if let Some(code) = error_status {
        let code = match &code {
            serde_json::Value::Number(n) => format!(" (error_status {n})"),
            _ => String::new(),
        };
        return fail(
            status,
            format!(
                "Mailkit refused the credentials{code}; its error text is not shown, as it may quote them"
            ),
        );
    }
    if !(200..300).contains(&status) {
        return fail(status, format!("Mailkit answered HTTP {status}"));
    }
    TestOutcome {
        ok: true,
        http_status: status,
        message: "Mailkit accepted the credentials".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::testing::RefusalCode as _;

    fn creds() -> MailkitCreds {
        MailkitCreds {
            client_id: "12345".into(),
            client_md5: Secret::new("0123456789abcdef0123456789abcdef"),
        }
    }
    const MD5: &str = "0123456789abcdef0123456789abcdef";

    fn json(s: &str) -> String {
        String::from_utf8(rewrite(Endpoint::Json, s.as_bytes(), &creds()).unwrap()).unwrap()
    }
    fn xml(s: &str) -> Result<String, RuleError> {
        rewrite(Endpoint::XmlRpc, s.as_bytes(), &creds()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn json_splices_only_the_credentials() {
        let input = "{ \"function\" : \"mailkit.x\",\n  \"id\": 1, \"md5\":\"app\",\n  \"parameters\": {\"a\": [1, 2.50, \"\\u00e9\"], \"id\": \"nested\"} }";
        let want = format!(
            "{{ \"function\" : \"mailkit.x\",\n  \"id\": \"12345\", \"md5\":\"{MD5}\",\n  \"parameters\": {{\"a\": [1, 2.50, \"\\u00e9\"], \"id\": \"nested\"}} }}"
        );
        assert_eq!(json(input), want);
    }

    #[test]
    fn json_escaped_and_duplicate_keys() {
        let out =
            json(r#"{"\u0069d":"app","function":"f","id":"dup","md5":"a","m\u0064\u0035":"b"}"#);
        assert_eq!(
            out,
            format!(r#"{{"\u0069d":"12345","function":"f","md5":"{MD5}"}}"#)
        );
    }

    #[test]
    fn json_missing_members_are_added() {
        assert_eq!(json("{}"), format!(r#"{{"id":"12345","md5":"{MD5}"}}"#));
        assert_eq!(
            json("{\"function\":\"f\"\n}"),
            format!("{{\"function\":\"f\",\"id\":\"12345\",\"md5\":\"{MD5}\"\n}}")
        );
        let out: serde_json::Value = serde_json::from_str(&json(r#"{"md5":"x","a":1}"#)).unwrap();
        assert_eq!(out["id"], "12345");
        assert_eq!(out["md5"], MD5);
    }

    #[test]
    fn json_refusals() {
        for bad in ["", "[]", "{", "{\"id\":1,}", "\"s\"", "{} x"] {
            let e = rewrite(Endpoint::Json, bad.as_bytes(), &creds()).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{bad:?}");
        }
    }

    #[test]
    fn xmlrpc_overwrites_first_two_params() {
        let input = "<?xml version=\"1.0\"?>\n<methodCall>\n <methodName>mailkit.mailinglist.list</methodName>\n <params>\n  <param><value><int>0</int></value></param>\n  <param> <value>app &amp; md5</value> </param>\n  <param><value><struct><member><name>x</name><value><string>a &lt; b</string></value></member></struct></value></param>\n </params>\n</methodCall>\n";
        let want = format!(
            "<?xml version=\"1.0\"?>\n<methodCall>\n <methodName>mailkit.mailinglist.list</methodName>\n <params>\n  <param><value><int>12345</int></value></param>\n  <param> <value><string>{MD5}</string></value> </param>\n  <param><value><struct><member><name>x</name><value><string>a &lt; b</string></value></member></struct></value></param>\n </params>\n</methodCall>\n"
        );
        assert_eq!(xml(input).unwrap(), want);
    }

    #[test]
    fn xmlrpc_empty_values_and_string_ids() {
        let input = "<methodCall><methodName>m</methodName><params><param><value/></param><param><value/></param></params></methodCall>";
        let out = xml(input).unwrap();
        assert_eq!(
            out,
            format!(
                "<methodCall><methodName>m</methodName><params><param><value><int>12345</int></value></param><param><value><string>{MD5}</string></value></param></params></methodCall>"
            )
        );
        let c = MailkitCreds {
            client_id: "a<b".into(),
            client_md5: Secret::new("x&y"),
        };
        let out = rewrite(Endpoint::XmlRpc, input.as_bytes(), &c).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("<value><string>a&lt;b</string></value>"),
            "{out}"
        );
        assert!(
            out.contains("<value><string>x&amp;y</string></value>"),
            "{out}"
        );
    }

    #[test]
    fn xmlrpc_refusals() {
        for bad in [
            "",
            "not xml",
            "<methodCall><params><param><value>1</value></param></params></methodCall>",
            "<other><params><param><value>1</value></param><param><value>2</value></param></params></other>",
            "<!DOCTYPE x [<!ENTITY e \"x\">]><methodCall><params><param><value>1</value></param><param><value>2</value></param></params></methodCall>",
            "<methodCall><params><param><value>1</value></param><param><value>2</value></params></methodCall>",
        ] {
            assert_eq!(xml(bad).unwrap_err().code(), "bad_request", "{bad:?}");
        }
    }

    /// A call whose first two params are `a` and `b`, with `extra` spliced in at `{}`.
    fn call_with(shape: &str) -> String {
        let params = "<param><value><int>1</int></value></param><param><value><string>x</string></value></param>";
        shape.replace("{}", params)
    }

    #[test]
    fn xmlrpc_refuses_what_a_lenient_reader_reads_outside_params() {
        // Issue 10, finding 2: each of these is read by CPython's xmlrpc.client with the
        // app's values in the credential positions.
        for shape in [
            "<methodCall><methodName>m</methodName><params><string>X</string><string>Y</string>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><a:param xmlns:a=\"u\"><value><string>X</string></value></a:param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><PARAM><value><string>X</string></value></PARAM>{}</params></methodCall>",
            "<methodCall><methodName>m<value><string>X</string></value></methodName><params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><params>{}</params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><param><value>X</value></param></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><value><string>X</string></value><params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value><string>X</string></value><value>Y</value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><string>X</string><value>1</value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params>{}</params></methodCall><methodCall/>",
            "<methodCall><methodName>m</methodName><params>{}</params></methodCall><string>X</string>",
            "<methodCall><methodName>m</methodName><params>{}</params></methodCall>trailing",
            "<string>X</string><methodCall><methodName>m</methodName><params>{}</params></methodCall>",
            "<methodCall xmlns=\"urn:x\"><methodName>m</methodName><params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param a=\"1\"><value>1</value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params>junk{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value>t<string>X</string></value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value><struct><string>X</string></struct></value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value><int>1</int><int>2</int></value></param>{}</params></methodCall>",
            "<?xml version=\"1.0\"?><?pi x?><methodCall><methodName>m</methodName><params>{}</params></methodCall>",
            "<methodCall><?xml version=\"1.0\"?><methodName>m</methodName><params>{}</params></methodCall>",
            "<?xml version=\"1.0\" encoding=\"UTF-16\"?><methodCall><methodName>m</methodName><params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value>&e;</value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value>\u{1}</value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value>]]></value></param>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params><param><value><!-- a -- b --></value></param>{}</params></methodCall>",
            "<methodCall><methodName><![CDATA[m]]></methodName><params>{}</params></methodCall>",
            "<methodCall><methodName>a b</methodName><params>{}</params></methodCall>",
            "<methodCall><params>{}</params></methodCall>",
            "<methodCall><methodName>m</methodName><params>{}</params>",
        ] {
            let doc = call_with(shape);
            assert_eq!(xml(&doc).unwrap_err().code(), "bad_request", "{doc}");
        }
    }

    #[test]
    fn xmlrpc_grammar_accepts_every_value_shape() {
        let doc = "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!-- c -->\n<methodCall>\n <methodName>mailkit.x/y:z_1</methodName>\n <params>\n  <param>\n   <value/>\n  </param>\n  <param><value>  </value></param>\n  <param><value><struct><member><name>a&#x41;</name><value><array><data><value><i4>1</i4></value><value><nil/></value><value><![CDATA[<x>]]></value></data></array></value></member></struct></value></param>\n  <param><value><dateTime.iso8601>20260101T00:00:00</dateTime.iso8601></value></param>\n  <param><value><base64>eA==</base64></value></param>\n </params>\n</methodCall>\n<!-- after -->\n";
        let out = xml(doc).unwrap();
        let want = doc
            .replacen("<value/>", "<value><int>12345</int></value>", 1)
            .replacen(
                "<value>  </value>",
                &format!("<value><string>{MD5}</string></value>"),
                1,
            );
        assert_eq!(out, want);
        let deep = format!(
            "<methodCall><methodName>m</methodName><params>{}{}{}</params></methodCall>",
            "<param><value/></param><param><value/></param><param><value>",
            "<array><data><value>".repeat(MAX_XMLRPC_DEPTH),
            "</value></data></array>".repeat(MAX_XMLRPC_DEPTH) + "</value></param>"
        );
        assert_eq!(xml(&deep).unwrap_err().code(), "bad_request");
    }

    #[test]
    fn xmlrpc_accepts_what_real_clients_send() {
        // CPython's xmlrpc.client.dumps((0, 'x', {...}, datetime), allow_none=True), verbatim.
        let python = "<?xml version='1.0'?>\n<methodCall>\n<methodName>mailkit.campaigns.list</methodName>\n<params>\n<param>\n<value><int>0</int></value>\n</param>\n<param>\n<value><string>x</string></value>\n</param>\n<param>\n<value><struct>\n<member>\n<name>a</name>\n<value><array><data>\n<value><int>1</int></value>\n<value><double>2.5</double></value>\n<value><boolean>1</boolean></value>\n<value><nil/></value><value><string>\u{e9}&lt;&amp;</string></value>\n</data></array></value>\n</member>\n<member>\n<name>b</name>\n<value><base64>\naGk=\n</base64></value>\n</member>\n</struct></value>\n</param>\n<param>\n<value><dateTime.iso8601>20260101T00:00:00</dateTime.iso8601></value>\n</param>\n</params>\n</methodCall>\n";
        let want = python
            .replacen("<int>0</int>", "<int>12345</int>", 1)
            .replacen("<string>x</string>", &format!("<string>{MD5}</string>"), 1);
        assert_eq!(xml(python).unwrap(), want);
    }

    #[test]
    fn xmlrpc_byte_order_mark_is_kept_and_counted() {
        // Issue 10, finding 3: the splice used to land three bytes early.
        let input = "\u{feff}<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params><param><value><int>0</int></value></param><param><value>1</value></param></params></methodCall>";
        let want = format!(
            "\u{feff}<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params><param><value><int>12345</int></value></param><param><value><string>{MD5}</string></value></param></params></methodCall>"
        );
        assert_eq!(xml(input).unwrap(), want);
        // A second mark is refused: quick-xml would skip it without counting it in offsets.
        for twice in [
            format!("\u{feff}{input}"),
            input.replacen("?>", "?>\u{feff}", 1),
        ] {
            assert_eq!(xml(&twice).unwrap_err().code(), "bad_request", "{twice}");
        }
        let e = rewrite(Endpoint::Json, "\u{feff}{}".as_bytes(), &creds()).unwrap_err();
        assert_eq!(e.code(), "bad_request");
    }

    #[test]
    fn xmlrpc_credentials_are_escaped_for_any_declared_encoding() {
        let c = MailkitCreds {
            client_id: "é1".into(),
            client_md5: Secret::new("m'd\"5"),
        };
        let input =
            call_with("<methodCall><methodName>m</methodName><params>{}</params></methodCall>");
        let out =
            String::from_utf8(rewrite(Endpoint::XmlRpc, input.as_bytes(), &c).unwrap()).unwrap();
        assert!(
            out.contains("<value><string>&#xE9;1</string></value>"),
            "{out}"
        );
        assert!(
            out.contains("<value><string>m&apos;d&quot;5</string></value>"),
            "{out}"
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint(&Method::POST, "/json.fcgi").unwrap(),
            Endpoint::Json
        );
        assert_eq!(
            endpoint(&Method::POST, "/rpc.fcgi").unwrap(),
            Endpoint::XmlRpc
        );
        assert_eq!(
            endpoint(&Method::GET, "/json.fcgi").unwrap_err().code(),
            "bad_request"
        );
        assert_eq!(
            endpoint(&Method::POST, "/x").unwrap_err().code(),
            "unknown_route"
        );
    }
}
