//! Mailkit: the credentials travel in the request body, so this rule rewrites bodies.
//!
//! - `POST /json.fcgi`: the top-level members `id` (as a JSON string) and `md5` are set. The
//!   document is spliced, not re-serialised: every other byte (member order, nested values,
//!   escapes, whitespace) is kept. Keys are compared after unescaping, so `"\u0069d"` is
//!   `id`; when a key appears more than once, the first occurrence gets our value and the
//!   others are removed, so no app value survives whichever one Mailkit would read. Missing
//!   members are added after the last member.
//! - `POST /rpc.fcgi`: the `<value>` of the first two `<param>`s becomes `<int>ID</int>`
//!   (`<string>` when the ID is not a 32-bit integer) and `<string>MD5</string>`, escaped;
//!   the rest of the document is byte-identical. A DOCTYPE is refused (no entity games).
//! - Anything unparsable, a JSON body that is not an object, or an XML-RPC call with fewer
//!   than two params → 400 `bad_request`. A compressed body (`Content-Encoding`) cannot be
//!   rewritten and is refused the same way.
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

use super::TestOutcome;
use crate::proxy::error::ProxyError;
use crate::tenants::MailkitCreds;
use crate::upstream;

/// The two Mailkit endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Json,
    XmlRpc,
}

/// Which endpoint `method path` calls, or the refusal.
pub(crate) fn endpoint(method: &Method, path: &str) -> Result<Endpoint, ProxyError> {
    let ep = match path {
        "/json.fcgi" => Endpoint::Json,
        "/rpc.fcgi" => Endpoint::XmlRpc,
        _ => {
            return Err(ProxyError::UnknownRoute(
                "Mailkit's API is POST /json.fcgi or POST /rpc.fcgi".to_owned(),
            ));
        }
    };
    if method != Method::POST {
        return Err(ProxyError::bad_request("Mailkit's API accepts only POST"));
    }
    Ok(ep)
}

/// The rewritten body for `endpoint`.
pub(crate) fn rewrite(
    endpoint: Endpoint,
    body: &[u8],
    creds: &MailkitCreds,
) -> Result<Vec<u8>, ProxyError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ProxyError::bad_request("the Mailkit request body is not UTF-8"))?;
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

fn rewrite_json(text: &str, creds: &MailkitCreds) -> Result<Vec<u8>, ProxyError> {
    let members: Members<'_> = serde_json::from_str(text).map_err(|e| {
        ProxyError::bad_request(format!(
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
    let write_value = |out: &mut Vec<u8>, slot: Slot| -> Result<(), ProxyError> {
        let r = match slot {
            Slot::Id => serde_json::to_writer(&mut *out, &creds.client_id),
            _ => serde_json::to_writer(&mut *out, creds.client_md5.expose()),
        };
        r.map_err(|_| ProxyError::bad_request("cannot encode the Mailkit credentials"))
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

fn xml_err(e: impl std::fmt::Display) -> ProxyError {
    ProxyError::bad_request(format!("the Mailkit XML-RPC body does not parse: {e}"))
}

fn rewrite_xmlrpc(text: &str, creds: &MailkitCreds) -> Result<Vec<u8>, ProxyError> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    // (start, end) byte ranges to replace, and whether the range is a whole `<value/>`.
    let mut spans: Vec<(usize, usize, bool)> = Vec::with_capacity(2);
    let mut stack: Vec<&'static str> = Vec::with_capacity(8);
    let mut params = 0usize;
    let mut value_start = 0usize;
    let mut root_seen = false;
    loop {
        let before = reader.buffer_position() as usize;
        let ev = reader.read_event().map_err(xml_err)?;
        let after = reader.buffer_position() as usize;
        match ev {
            Event::DocType(_) => {
                return Err(ProxyError::bad_request(
                    "a DOCTYPE is not allowed in a Mailkit XML-RPC body",
                ));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                let name = e.name();
                let name = name.as_ref();
                let role = match (stack.as_slice(), name) {
                    ([], b"methodCall") => "methodCall",
                    ([], _) => {
                        return Err(ProxyError::bad_request(
                            "the Mailkit XML-RPC body is not a <methodCall>",
                        ));
                    }
                    (["methodCall"], b"params") => "params",
                    (["methodCall", "params"], b"param") => {
                        params += 1;
                        "param"
                    }
                    (["methodCall", "params", "param"], b"value") if params <= 2 => "value",
                    _ => "",
                };
                if stack.is_empty() {
                    if root_seen {
                        return Err(xml_err("more than one root element"));
                    }
                    root_seen = true;
                }
                if role == "value" {
                    if spans.len() >= params {
                        return Err(xml_err("a <param> with more than one <value>"));
                    }
                    if empty {
                        spans.push((before, after, true));
                    } else {
                        value_start = after;
                    }
                }
                if !empty {
                    stack.push(role);
                }
            }
            Event::End(_) => {
                let role = stack.pop();
                if role == Some("value") && stack.len() == 3 {
                    spans.push((value_start, before, false));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen {
        return Err(xml_err("no root element"));
    }
    if spans.len() < 2 {
        return Err(ProxyError::bad_request(
            "a Mailkit XML-RPC call needs at least two params (client ID and MD5)",
        ));
    }
    let id = &creds.client_id;
    let id_value = if id.parse::<i32>().is_ok() {
        format!("<int>{id}</int>")
    } else {
        format!(
            "<string>{}</string>",
            quick_xml::escape::escape(id.as_str())
        )
    };
    let md5_value = format!(
        "<string>{}</string>",
        quick_xml::escape::escape(creds.client_md5.expose())
    );
    let mut out = Vec::with_capacity(text.len() + 64);
    let mut cursor = 0;
    for ((start, end, whole), new) in spans.iter().take(2).zip([&id_value, &md5_value]) {
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
        .uri(format!(
            "https://{}/json.fcgi",
            crate::proxy::route::MAILKIT_HOST
        ))
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
    fn xml(s: &str) -> Result<String, ProxyError> {
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
