//! Adversarial cases: parsers. Property tests of what sidekey forwards, over real sockets
//! (app → proxy → mock vendor with its own CA), against reference readers written here.
//!
//! The invariant (issue 10): the forwarded body or path carries the tenant's credential exactly
//! once, in the place the vendor reads it, or the request is refused before anything is sent.
//! Each property generates mostly valid requests with hostile pieces spliced in, and checks
//! what the mock vendor received with a reader as lenient as real clients:
//! - XML-RPC: a reader that, like CPython's `xmlrpc.client`, collects every typed value in
//!   document order wherever it is and ignores unknown or prefixed tags;
//! - JSON: every top-level member with its key unescaped, so both first-wins and last-wins
//!   readers are covered;
//! - paths: a server that decodes escapes twice, reads `\` as `/`, strips `;` parameters,
//!   merges `//`, resolves dot segments and matches case-insensitively.
//!
//! Case counts are bounded (`CASES`): each property runs in about a second.

use std::net::SocketAddr;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use quick_xml::Reader;
use quick_xml::events::Event;
use serde::de::{Deserializer, MapAccess, Visitor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::support::tenants::{M3TER_ORG, MAILKIT_ID, MAILKIT_MD5, MIRADORE_KEY, acme};
use crate::support::{MockVendor, TestCa, TestProxy};

/// Cases per property: enough to hit every hostile piece in every position several times.
const CASES: u32 = 192;

/// A proxy for `acme` in front of a mock vendor, on its own runtime, so proptest's synchronous
/// runner can drive it.
struct Harness {
    rt: Runtime,
    proxy: TestProxy,
    mock: MockVendor,
    client: reqwest::Client,
    _ca: TestCa,
}

impl Harness {
    fn start() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (ca, mock, proxy) = rt.block_on(async {
            let ca = TestCa::new("sidekey parser suite CA");
            let mock = MockVendor::builder(&ca).start().await;
            let proxy = TestProxy::builder()
                .tenant(acme())
                .trust(&ca)
                .route_to(&mock)
                .start()
                .await;
            (ca, mock, proxy)
        });
        let client = proxy.client();
        Harness {
            rt,
            proxy,
            mock,
            client,
            _ca: ca,
        }
    }

    /// Runs `property` on `CASES` inputs; a failure panics with the shrunk input.
    fn check<S: Strategy>(
        &self,
        strategy: S,
        property: impl Fn(S::Value) -> Result<(), TestCaseError>,
    ) {
        let config = Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, property) {
            panic!("{e}");
        }
    }

    /// POSTs `body` to the Mailkit `endpoint`; returns sidekey's error code (if it refused) and
    /// the body the vendor received (if anything was forwarded).
    fn mailkit(&self, endpoint: &str, body: Vec<u8>) -> (Option<String>, Option<Vec<u8>>) {
        let before = self.mock.requests().len();
        let resp = self.rt.block_on(
            self.client
                .post(self.proxy.url(&format!("/mailkit{endpoint}")))
                .header("x-sidekey-tenant", "acme")
                .body(body)
                .send(),
        );
        let resp = resp.unwrap();
        let refused = resp
            .headers()
            .get("x-sidekey-error")
            .map(|v| v.to_str().unwrap().to_owned());
        let requests = self.mock.requests();
        let forwarded = requests.get(before).map(|r| r.body.to_vec());
        assert!(requests.len() <= before + 1);
        (refused, forwarded)
    }

    /// Sends `GET <target>` over a raw socket (no client normalises it); returns the status,
    /// sidekey's error code and the path and query the vendor received.
    fn get_raw(&self, target: &str, host: &str) -> (u16, Option<String>, Option<String>) {
        let before = self.mock.requests().len();
        let answer = self.rt.block_on(raw_get(self.proxy.addr, target, host));
        let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let code = answer
            .lines()
            .find_map(|l| l.strip_prefix("x-sidekey-error: "))
            .map(|c| c.trim().to_owned());
        let forwarded = self
            .mock
            .requests()
            .get(before)
            .map(|r| r.path_and_query().to_owned());
        (status, code, forwarded)
    }
}

async fn raw_get(addr: SocketAddr, target: &str, host: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nx-sidekey-tenant: acme\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

// ---------------------------------------------------------------------------------------
// XML-RPC

/// A value as a lenient reader sees it.
#[derive(Debug, PartialEq)]
enum Read {
    Int(String),
    Str(String),
    Other,
}

/// Reads a call the way CPython's `xmlrpc.client.Unmarshaller` does: every typed element
/// anywhere pushes a value (prefixed tags by their local name), arrays and structs collapse
/// what they contain, unknown tags are skipped, a `<value>` with only text is a string.
fn lenient_read(doc: &[u8]) -> Result<Vec<Read>, String> {
    let text = std::str::from_utf8(doc).map_err(|e| e.to_string())?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Read> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut data = String::new();
    let mut in_bare_value = false;
    let local = |name: &[u8]| -> String {
        let name = String::from_utf8_lossy(name).into_owned();
        name.rsplit(':').next().unwrap_or("").to_owned()
    };
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => {
                let tag = local(e.name().as_ref());
                if tag == "array" || tag == "struct" {
                    marks.push(stack.len());
                }
                data.clear();
                in_bare_value = tag == "value";
            }
            Event::Empty(e) => {
                let tag = local(e.name().as_ref());
                data.clear();
                in_bare_value = tag == "value";
                end_tag(&tag, &mut stack, &mut marks, &data, &mut in_bare_value);
            }
            Event::End(e) => {
                let tag = local(e.name().as_ref());
                end_tag(&tag, &mut stack, &mut marks, &data, &mut in_bare_value);
            }
            Event::Text(t) => data.push_str(&t.decode().map_err(|e| e.to_string())?),
            Event::CData(t) => data.push_str(&String::from_utf8_lossy(&t)),
            Event::GeneralRef(r) => {
                let s = match r.as_ref() {
                    b"lt" => "<".to_owned(),
                    b"gt" => ">".to_owned(),
                    b"amp" => "&".to_owned(),
                    b"apos" => "'".to_owned(),
                    b"quot" => "\"".to_owned(),
                    _ => r
                        .resolve_char_ref()
                        .ok()
                        .flatten()
                        .ok_or("undefined entity")?
                        .to_string(),
                };
                data.push_str(&s);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(stack)
}

/// CPython's end handlers: each typed one pushes its value and clears the bare-value flag.
fn end_tag(tag: &str, stack: &mut Vec<Read>, marks: &mut Vec<usize>, data: &str, bare: &mut bool) {
    match tag {
        "int" | "i4" | "i8" => stack.push(Read::Int(data.trim().to_owned())),
        "string" | "name" => stack.push(Read::Str(data.to_owned())),
        "value" if *bare => stack.push(Read::Str(data.to_owned())),
        "boolean" | "double" | "nil" | "base64" | "dateTime.iso8601" => stack.push(Read::Other),
        "array" | "struct" => {
            let mark = marks.pop().unwrap_or(0).min(stack.len());
            stack.truncate(mark);
            stack.push(Read::Other);
        }
        _ => return,
    }
    *bare = false;
}

/// A valid XML-RPC `<value>`, as separate tokens so hostile pieces can go between any two.
fn value_tokens() -> impl Strategy<Value = Vec<String>> {
    let text = "[a-z0-9 ]{0,6}";
    let leaf = prop_oneof![
        (0..1000i32).prop_map(|n| vec![
            "<value>".into(),
            format!("<int>{n}</int>"),
            "</value>".into()
        ]),
        text.prop_map(|s| vec![
            "<value>".into(),
            "<string>".into(),
            s,
            "&amp;".into(),
            "</string>".into(),
            "</value>".into()
        ]),
        text.prop_map(|s| vec!["<value>".into(), s, "</value>".into()]),
        Just(vec!["<value/>".into()]),
        Just(vec!["<value><nil/></value>".into()]),
        Just(vec!["<value><boolean>1</boolean></value>".into()]),
    ];
    leaf.prop_recursive(3, 24, 3, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|vs| {
                let mut t = vec!["<value>".to_owned(), "<array>".into(), "<data>".into()];
                t.extend(vs.into_iter().flatten());
                t.extend(["</data>".into(), "</array>".into(), "</value>".into()]);
                t
            }),
            prop::collection::vec(("[a-z]{1,4}", inner), 0..3).prop_map(|ms| {
                let mut t = vec!["<value>".to_owned(), "<struct>".into()];
                for (name, v) in ms {
                    t.extend(["<member>".into(), format!("<name>{name}</name>")]);
                    t.extend(v);
                    t.push("</member>".into());
                }
                t.extend(["</struct>".into(), "</value>".into()]);
                t
            }),
        ]
    })
}

/// Pieces spliced between tokens: the bypasses, and harmless ones a strict reader
/// must still accept where they are valid.
const HOSTILE_XML: &[&str] = &[
    "<string>X</string>",
    "<int>7</int>",
    "<value><string>X</string></value>",
    "<param><value><string>X</string></value></param>",
    "<a:param><value><string>X</string></value></a:param>",
    "<a:string>X</a:string>",
    "<PARAM><value>X</value></PARAM>",
    "<Value>X</Value>",
    "<params><param><value>X</value></param></params>",
    "<methodName>n</methodName>",
    "<array><data><value>X</value></data></array>",
    "<!-- c -->",
    "\n  ",
    "X",
    "<![CDATA[X]]>",
    "&amp;",
    "<?pi x?>",
    "<!DOCTYPE methodCall>",
    "<nil/>",
    "<x/>",
    "\u{feff}",
];

#[derive(Debug, Clone)]
struct XmlCase {
    bom: bool,
    decl: &'static str,
    params: Vec<Vec<String>>,
    splices: Vec<(Index, &'static str)>,
}

impl XmlCase {
    fn tokens(&self) -> Vec<String> {
        let mut t: Vec<String> = Vec::new();
        if self.bom {
            t.push("\u{feff}".into());
        }
        if !self.decl.is_empty() {
            t.push(self.decl.into());
        }
        t.extend([
            "<methodCall>".into(),
            "<methodName>".into(),
            "mailkit.x".into(),
            "</methodName>".into(),
            "<params>".into(),
        ]);
        for p in &self.params {
            t.push("<param>".into());
            t.extend(p.iter().cloned());
            t.push("</param>".into());
        }
        t.extend(["</params>".into(), "</methodCall>".into()]);
        for (at, piece) in &self.splices {
            let i = at.index(t.len() + 1);
            t.insert(i, (*piece).to_owned());
        }
        t
    }
}

fn xml_case() -> impl Strategy<Value = XmlCase> {
    (
        any::<bool>(),
        prop::sample::select(vec![
            "",
            "<?xml version=\"1.0\"?>",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>",
            "<?xml version=\"1.0\" encoding=\"UTF-16\"?>",
        ]),
        prop::collection::vec(value_tokens(), 0..5),
        prop::collection::vec((any::<Index>(), prop::sample::select(HOSTILE_XML)), 0..3),
    )
        .prop_map(|(bom, decl, params, splices)| XmlCase {
            bom,
            decl,
            params,
            splices,
        })
}

#[test]
fn xmlrpc_credentials_land_in_the_first_two_params_or_the_call_is_refused() {
    let h = Harness::start();
    h.check(xml_case(), |case| {
        let body = case.tokens().concat();
        let (refused, forwarded) = h.mailkit("/rpc.fcgi", body.clone().into_bytes());
        let valid = case.splices.is_empty() && !case.decl.contains("UTF-16");
        match (refused, forwarded) {
            (Some(code), None) => {
                prop_assert_eq!(code.as_str(), "bad_request");
                // Liveness: a valid call with two params or more is never refused.
                prop_assert!(!(valid && case.params.len() >= 2), "refused valid {body}");
            }
            (None, Some(sent)) => {
                let read = lenient_read(&sent).map_err(TestCaseError::fail)?;
                prop_assert_eq!(
                    read.first(),
                    Some(&Read::Int(MAILKIT_ID.into())),
                    "{}",
                    body
                );
                prop_assert_eq!(
                    read.get(1),
                    Some(&Read::Str(MAILKIT_MD5.into())),
                    "{}",
                    body
                );
                prop_assert_eq!(count(&sent, MAILKIT_MD5), 1);
                // One value per param: nothing outside the params was read.
                prop_assert_eq!(read.len(), count(&sent, "<param>"), "{}", body);
            }
            other => prop_assert!(false, "unexpected outcome {other:?} for {body}"),
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// JSON

/// Every top-level member of a JSON object, keys unescaped, in order (duplicates kept).
fn members(doc: &[u8]) -> Result<Vec<(String, serde_json::Value)>, String> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(kv) = map.next_entry()? {
                out.push(kv);
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(doc);
    let out = (&mut de).deserialize_map(V).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Keys that are, or unescape to, the credential members, and others.
const JSON_KEYS: &[&str] = &[
    "\"id\"",
    "\"md5\"",
    "\"\\u0069d\"",
    "\"i\\u0064\"",
    "\"m\\u0064\\u0035\"",
    "\"ID\"",
    "\"Md5\"",
    "\"id \"",
    "\"function\"",
    "\"parameters\"",
];

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        (-1000i64..1000).prop_map(|n| n.to_string()),
        "[a-z0-9 ]{0,6}".prop_map(|s| format!("\"{s}\"")),
        Just("\"\\u00e9\\\"\"".to_owned()),
    ];
    leaf.prop_recursive(3, 24, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((prop::sample::select(JSON_KEYS), inner), 0..3).prop_map(|m| {
                let m: Vec<String> = m.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", m.join(","))
            }),
        ]
    })
}

/// Pieces spliced at a random byte offset: most break the document, some do not.
const HOSTILE_JSON: &[&str] = &[
    ",\"id\":\"X\"",
    "\"md5\":\"X\",",
    "}",
    "{",
    ",",
    " ",
    "\u{feff}",
    "/* c */",
    "\"",
];

/// A JSON object's members (raw key, raw value), the whitespace between tokens, and at most
/// one hostile piece spliced at a byte offset.
#[derive(Debug, Clone)]
struct JsonCase {
    members: Vec<(&'static str, String)>,
    ws: &'static str,
    splice: Option<(Index, &'static str)>,
}

fn json_case() -> impl Strategy<Value = JsonCase> {
    (
        prop::collection::vec((prop::sample::select(JSON_KEYS), json_value()), 0..6),
        prop::sample::select(vec!["", " ", "\n  "]),
        prop::option::weighted(0.3, (any::<Index>(), prop::sample::select(HOSTILE_JSON))),
    )
        .prop_map(|(members, ws, splice)| JsonCase {
            members,
            ws,
            splice,
        })
}

#[test]
fn json_credentials_are_the_only_top_level_id_and_md5_or_the_call_is_refused() {
    let h = Harness::start();
    h.check(
        json_case(),
        |JsonCase {
             members: input,
             ws,
             splice,
         }| {
            let spliced = splice.is_some();
            let parts: Vec<String> = input.iter().map(|(k, v)| format!("{k}:{ws}{v}")).collect();
            let mut body = format!("{{{ws}{}{ws}}}", parts.join(&format!(",{ws}")));
            if let Some((at, piece)) = splice {
                // Splice only at a character boundary.
                let mut i = at.index(body.len() + 1);
                while !body.is_char_boundary(i) {
                    i -= 1;
                }
                body.insert_str(i, piece);
            }
            let (refused, forwarded) = h.mailkit("/json.fcgi", body.clone().into_bytes());
            match (refused, forwarded) {
                (Some(code), None) => {
                    prop_assert_eq!(code.as_str(), "bad_request");
                    prop_assert!(spliced, "refused a valid object {body}");
                }
                (None, Some(sent)) => {
                    let out = members(&sent).map_err(TestCaseError::fail)?;
                    let sent_in = members(body.as_bytes()).map_err(TestCaseError::fail)?;
                    let ids: Vec<_> = out.iter().filter(|(k, _)| k == "id").collect();
                    let md5s: Vec<_> = out.iter().filter(|(k, _)| k == "md5").collect();
                    prop_assert_eq!(ids.len(), 1, "{}", body);
                    prop_assert_eq!(md5s.len(), 1, "{}", body);
                    prop_assert_eq!(&ids[0].1, &serde_json::json!(MAILKIT_ID));
                    prop_assert_eq!(&md5s[0].1, &serde_json::json!(MAILKIT_MD5));
                    prop_assert_eq!(count(&sent, MAILKIT_MD5), 1);
                    // Every other member the app sent arrives unchanged and in order.
                    let others =
                        |m: &[(String, serde_json::Value)]| -> Vec<(String, serde_json::Value)> {
                            m.iter()
                                .filter(|(k, _)| k != "id" && k != "md5")
                                .cloned()
                                .collect()
                        };
                    prop_assert_eq!(others(&out), others(&sent_in), "{}", body);
                }
                other => prop_assert!(false, "unexpected outcome {other:?} for {body}"),
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Paths

/// The path a permissive server routes: escapes decoded twice, `\` as `/`, `;` parameters
/// stripped, empty segments merged, dot segments resolved.
fn lenient_segments(path: &str) -> Vec<String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let path = decode(&decode(path)).replace('\\', "/");
    let mut out: Vec<String> = Vec::new();
    for seg in path.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_owned()),
        }
    }
    out
}

const OTHER_ORG: &str = "11111111-2222-3333-4444-555555555555";

/// Two head segments (what the rule checks) and up to five more, some of which climb two
/// levels at once, so a climb out of the checked head and back in is generated often.
fn path_segments(
    heads: (Vec<&'static str>, Vec<&'static str>),
    pool: Vec<&'static str>,
) -> impl Strategy<Value = Vec<&'static str>> {
    (
        prop::sample::select(heads.0),
        prop::sample::select(heads.1),
        prop::collection::vec(prop::sample::select(pool), 0..6),
    )
        .prop_map(|(a, b, rest)| [vec![a, b], rest].concat())
}

/// Segments and climbs common to both vendors' pools.
const CLIMBS: &[&str] = &[
    "",
    ".",
    "..",
    "..;",
    "..;/..;",
    "../..",
    "%2e%2e",
    "%2e%2e/%2e%2e",
    "%2E",
    "..%2f",
    "..%2f..%2f",
    "..%2F..%2F",
    ";",
    "x;y",
    "%2f",
    "%5c",
    "\\..",
    "%252e%252e",
    "%252e%252e/%252e%252e",
    "%41",
    "%20",
    "a.b",
    "~x",
];

/// Segments that are canonical on their own: liveness is checked on paths made of these.
const GOOD_SEGMENTS: &[&str] = &["organizations", M3TER_ORG, "meters", "a.b", "~x", "%20"];

#[test]
fn m3ter_token_goes_only_to_the_tenants_organisation_or_the_path_is_refused() {
    let h = Harness::start();
    let heads = (
        vec![
            "organizations",
            "organizations",
            "Organizations",
            "%6Frganizations",
            "",
            "organizations;x",
        ],
        vec![M3TER_ORG, M3TER_ORG, OTHER_ORG, "", "..", "..;"],
    );
    let pool = [
        CLIMBS,
        &[
            "organizations",
            "Organizations",
            M3TER_ORG,
            OTHER_ORG,
            "meters",
            "measurements",
        ],
    ]
    .concat();
    let forms = prop::sample::select(vec![
        ("/m3ter", "127.0.0.1"),
        ("/m3ter-ingest", "127.0.0.1"),
        ("http://api.m3ter.com", "api.m3ter.com"),
        ("http://ingest.m3ter.com", "ingest.m3ter.com"),
    ]);
    h.check(
        (forms, path_segments(heads, pool)),
        |((prefix, host), segs)| {
            let path = format!("/{}", segs.join("/"));
            let (status, code, forwarded) = h.get_raw(&format!("{prefix}{path}"), host);
            let read = lenient_segments(&path);
            let names_org = read
                .first()
                .is_some_and(|s| s.eq_ignore_ascii_case("organizations"));
            match (code, forwarded) {
                (Some(code), None) => {
                    prop_assert!(status == 400 || status == 403, "{status} {code}");
                    let good = segs.iter().all(|s| GOOD_SEGMENTS.contains(s));
                    let own_org =
                        segs.first() != Some(&"organizations") || segs.get(1) == Some(&M3TER_ORG);
                    prop_assert!(!(good && own_org), "refused canonical {path}: {code}");
                }
                (None, Some(sent)) => {
                    prop_assert_eq!(&sent, &path, "the path is forwarded byte for byte");
                    if names_org {
                        prop_assert!(
                            read.get(1)
                                .is_some_and(|o| o.eq_ignore_ascii_case(M3TER_ORG)),
                            "{path} reaches organisation {:?}",
                            read.get(1)
                        );
                    }
                }
                other => prop_assert!(false, "unexpected outcome {other:?} for {path}"),
            }
            Ok(())
        },
    );
}

#[test]
fn miradore_key_goes_only_to_the_tenants_site_or_the_path_is_refused() {
    let h = Harness::start();
    let heads = (
        vec![
            "Acme1", "Acme1", "acme1", "Other", "%41cme1", "Acme1;x", "api", "API", "",
        ],
        vec!["API", "api", "v2", "Device", "..", "..;"],
    );
    let pool = [CLIMBS, &["Acme1", "Other", "API", "api/v2", "Device"]].concat();
    let forms = prop::sample::select(vec![
        ("/miradore", "127.0.0.1"),
        ("http://online.miradore.com", "online.miradore.com"),
    ]);
    h.check(
        (forms, path_segments(heads, pool)),
        |((prefix, host), segs)| {
            let path = format!("/{}", segs.join("/"));
            let (status, code, forwarded) = h.get_raw(&format!("{prefix}{path}"), host);
            match (code, forwarded) {
                (Some(code), None) => {
                    prop_assert!(matches!(status, 400 | 403 | 404), "{status} {code}");
                }
                (None, Some(sent)) => {
                    let (sent_path, query) = sent.split_once('?').unwrap_or((&sent, ""));
                    let read = lenient_segments(sent_path);
                    // Whatever site the vendor reads in front of an API segment is the tenant's.
                    if read.get(1).is_some_and(|s| s.eq_ignore_ascii_case("api")) {
                        prop_assert_eq!(read[0].as_str(), "Acme1", "{} read as {:?}", path, read);
                    }
                    prop_assert!(
                        read.first()
                            .is_some_and(|s| s == "Acme1" || s.eq_ignore_ascii_case("api")),
                        "{path} forwarded as {sent}"
                    );
                    prop_assert!(count(query.as_bytes(), "auth=") <= 1);
                    prop_assert!(!sent.contains(MIRADORE_KEY), "raw key in the path");
                }
                other => prop_assert!(false, "unexpected outcome {other:?} for {path}"),
            }
            Ok(())
        },
    );
}
