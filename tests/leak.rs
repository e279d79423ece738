//! No secret in any log line at any level: the real binary runs at RUST_LOG=trace while
//! every flow goes through it (control plane, tenants file, Miradore v1 and v2, m3ter token
//! exchange and replay, Mailkit JSON and XML-RPC, TestTenant, malformed tenants files and
//! `tenants apply` documents quoting the secrets), and the captured log (with the CLI's
//! output) is searched for every secret in raw, base64 and percent-encoded forms.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use support::{MockResponse, MockVendor, TestCa};
use tokio::io::{AsyncBufReadExt, BufReader};

const MIRADORE_KEY: &str = "1_Ke{y},!+/Secret";
const M3TER_SECRET: &str = "m3ter-api-secret-3f9a";
const MAILKIT_MD5: &str = "c0ffee00c0ffee00c0ffee00c0ffee00";
const TOKEN: &str = "eyJhbGciOi.bearer-token-7781";
const GRPC_TOKEN: &str = "control-token-5517";
const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";

/// The percent-encoded forms a secret can take: every non-alphanumeric encoded, or only
/// what RFC 3986 does not leave unreserved (`-._~` kept), as sidekey encodes a query value.
fn percent_forms(s: &str) -> [String; 2] {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    [
        utf8_percent_encode(s, NON_ALPHANUMERIC).to_string(),
        utf8_percent_encode(s, UNRESERVED).to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("leak test CA");
    let data_calls = Arc::new(AtomicUsize::new(0));
    let calls = data_calls.clone();
    let mock = MockVendor::builder(&ca)
        .respond(move |req| match req.path_and_query() {
            "/oauth/token" => MockResponse::ok(format!(
                r#"{{"token_type":"Bearer","access_token":"{TOKEN}","expires_in":18000}}"#
            )),
            // The first m3ter data call is refused, forcing a token drop and a replay.
            p if p.starts_with("/organizations/") && calls.fetch_add(1, Ordering::SeqCst) == 0 => {
                MockResponse::status(403)
            }
            _ => MockResponse::ok(r#"{"error_status":0}"#),
        })
        .start()
        .await;

    let tenants = dir.path().join("tenants.yaml");
    std::fs::write(
        &tenants,
        format!(
            "tenants:\n  - id: acme\n    miradore: {{ site: acme, apiKey: {{ value: \"{MIRADORE_KEY}\" }} }}\n    \
             m3ter: {{ accessKeyId: AK1, orgId: {ORG}, apiSecret: {{ value: {M3TER_SECRET} }} }}\n    \
             mailkit: {{ clientId: \"42\", clientMd5: {{ value: {MAILKIT_MD5} }} }}\n"
        ),
    )
    .unwrap();
    let token_file = dir.path().join("grpc-token");
    std::fs::write(&token_file, GRPC_TOKEN).unwrap();
    let socket = dir.path().join("grpc.sock");
    let server_url = format!("unix:{}", socket.display());

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .arg("serve")
        .args([
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--grpc-listen")
        .arg(&server_url)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tenants-file")
        .arg(&tenants)
        .args(["--tenants-file-interval", "50ms"])
        .arg("--grpc-token-file")
        .arg(&token_file)
        .arg("--upstream-ca")
        .arg(ca.pem_file())
        .args(
            support::connect_to_rules(mock.port())
                .iter()
                .flat_map(|r| ["--connect-to".to_owned(), r.to_string()]),
        )
        .env(
            "SIDEKEY_MASTER_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let proxy = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("sidekey exited before ready");
        log.push_str(&line);
        log.push('\n');
        if line.contains("sidekey ready") {
            // proxy=127.0.0.1:PORT
            let addr = line
                .split("proxy=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            break addr.to_owned();
        }
    };
    // Malformed documents quoting every secret where the parser trips: the tenants file
    // (logged by serve) ...
    std::fs::write(
        &tenants,
        format!(
            "tenants:\n  - id: acme\n    miradore: {{ site: acme, apiKey: \"{MIRADORE_KEY}\" }}\n"
        ),
    )
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains("tenants file rejected") {
                return;
            }
        }
        panic!("sidekey exited");
    })
    .await
    .expect("the malformed tenants file is rejected");
    // ... and `tenants apply -f` (its output is searched like the log).
    let bad_doc = dir.path().join("bad.yaml");
    for text in [
        format!("id: acme\nm3ter: {{ accessKeyId: AK1, apiSecret: \"{M3TER_SECRET}\" }}\n"),
        format!(
            "id: acme\nmailkit: {{ clientId: \"42\", clientMd5: {{ value: [{MAILKIT_MD5}] }} }}\n"
        ),
        format!("id: acme\nmailkit: {{ {MAILKIT_MD5}: x }}\n"),
        format!("id: acme\nm3ter: {{ apiSecret: {{ value: '{M3TER_SECRET}\n"),
        format!("id: acme\nmiradore: {{ apiKey: {{ value: {{ {TOKEN}: 1 }} }} }}\n"),
    ] {
        std::fs::write(&bad_doc, &text).unwrap();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
            .args(["tenants", "apply", "-f"])
            .arg(&bad_doc)
            .args(["--server", &server_url])
            .arg("--token-file")
            .arg(&token_file)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{text:?} was applied");
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
    }

    let reader = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });

    let client = reqwest::Client::new();
    let send = |req: reqwest::RequestBuilder| async move {
        let resp = req.header("x-sidekey-tenant", "acme").send().await.unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
    };
    let base = format!("http://{proxy}");
    send(
        client
            .get(format!(
                "{base}/miradore/acme/API/Device?select=Name&auth=app"
            ))
            .header("x-api-key", "app"),
    )
    .await;
    send(client.get(format!("{base}/miradore/api/v2/Device"))).await;
    send(
        client
            .post(format!("{base}/m3ter/organizations/{ORG}/measurements"))
            .body("{}"),
    )
    .await;
    send(
        client
            .post(format!(
                "{base}/m3ter-ingest/organizations/{ORG}/measurements"
            ))
            .body("{}"),
    )
    .await;
    send(
        client
            .post(format!("{base}/mailkit/json.fcgi"))
            .body(r#"{"function":"x","id":"1","md5":"2"}"#),
    )
    .await;
    send(client.post(format!("{base}/mailkit/rpc.fcgi")).body(
        "<?xml version=\"1.0\"?><methodCall><methodName>x</methodName><params>\
         <param><value><int>1</int></value></param><param><value><string>2</string></value></param>\
         </params></methodCall>",
    ))
    .await;
    // Through the forward-proxy form with credentials in the proxy URL.
    let via_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://acme:x@{proxy}")).unwrap())
        .build()
        .unwrap();
    let resp = via_proxy
        .get("http://online.miradore.com/acme/api/v2/Device")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert!(
        data_calls.load(Ordering::SeqCst) >= 2,
        "the replay flow did not run"
    );

    for vendor in ["miradore", "m3ter", "mailkit"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
            .args([
                "tenants",
                "test",
                "acme",
                "--vendor",
                vendor,
                "--server",
                &server_url,
            ])
            .arg("--token-file")
            .arg(&token_file)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    child.start_kill().unwrap();
    child.wait().await.unwrap();
    log.push_str(&reader.await.unwrap());
    assert!(
        log.contains("proxied request"),
        "no request log lines:\n{log}"
    );
    assert!(
        log.contains("snapshot published"),
        "debug logging was not on"
    );

    let basic = STANDARD.encode(format!("AK1:{M3TER_SECRET}"));
    for secret in [MIRADORE_KEY, M3TER_SECRET, MAILKIT_MD5, TOKEN, GRPC_TOKEN] {
        let [strict, unreserved] = percent_forms(secret);
        for form in [
            secret.to_owned(),
            STANDARD.encode(secret),
            strict,
            unreserved,
            basic.clone(),
        ] {
            assert!(
                !log.contains(&form),
                "{form:?} (a form of a secret) is in the log"
            );
        }
    }
}
