//! A fourth vendor, defined only here, through the proxy end to end: app → sidekey (plain
//! HTTP) → mock vendor (TLS, its own host). It follows docs/adding-a-vendor.md for a vendor
//! that keeps no per-tenant credentials: one `Vendor` implementation, added to the registry.
//! Nothing in src/ knows it, so routing, the forward-proxy form, refusals and the error
//! mapping are shown to come from the registry alone.

mod support;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::HeaderValue;
use http::request::Parts;
use sidekey::proxy::{Proxy, ProxyConfig};
use sidekey::tenants::{EffectiveTenant, SnapshotReader};
use sidekey::upstream::{self, UpstreamConfig};
use sidekey::vendors::{BodyRule, Plan, Registry, RuleError, RuleInput, TestOutcome, Vendor, Via};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use support::{MockResponse, MockVendor, TestCa, tenants, tokens};

const HOST: &str = "api.static.test";
const KEY: &str = "static-secret-value";

/// Sends every request to `api.static.test` with a fixed `X-Static-Key`; refuses `/admin`.
struct StaticHeader;

impl Vendor for StaticHeader {
    fn name(&self) -> &'static str {
        "static"
    }

    fn prefixes(&self) -> &'static [&'static str] {
        &["static"]
    }

    fn owns_host(&self, host: &str) -> bool {
        host.eq_ignore_ascii_case(HOST)
    }

    fn configured(&self, _: &EffectiveTenant) -> bool {
        true
    }

    fn upstream_host<'t>(&self, _: Via<'_>, _: &'t EffectiveTenant) -> Result<&'t str, RuleError> {
        Ok(HOST)
    }

    fn plan(&self, req: RuleInput<'_>, _: &EffectiveTenant) -> Result<Plan, RuleError> {
        if req.path.segments().next() == Some("admin") {
            return Err(RuleError::UnknownRoute("the static vendor has no /admin"));
        }
        Ok(Plan {
            path_and_query: None,
            body: BodyRule::Stream,
        })
    }

    fn inject(&self, parts: &mut Parts, _: &EffectiveTenant) -> Result<(), RuleError> {
        let mut key = HeaderValue::from_static(KEY);
        key.set_sensitive(true);
        parts.headers.insert("x-static-key", key);
        Ok(())
    }

    fn test<'a>(
        &'a self,
        _: &'a upstream::Client,
        _: &'a EffectiveTenant,
    ) -> BoxFuture<'a, TestOutcome> {
        Box::pin(async {
            TestOutcome {
                ok: true,
                http_status: 0,
                message: "a static header needs no test call".to_owned(),
            }
        })
    }
}

fn bare_tenant() -> EffectiveTenant {
    EffectiveTenant {
        id: "bare".into(),
        miradore: None,
        m3ter: None,
        mailkit: None,
    }
}

#[tokio::test]
async fn a_vendor_defined_in_a_test_goes_through_the_proxy() {
    let ca = TestCa::new("fourth vendor CA");
    let mock = MockVendor::builder(&ca)
        .names(&[HOST])
        .respond(|_| MockResponse::ok("{}"))
        .start()
        .await;
    let client = upstream::Client::new(UpstreamConfig {
        extra_ca_files: vec![ca.pem_file()],
        connect_to: vec![
            format!("{HOST}:443:127.0.0.1:{}", mock.port())
                .parse()
                .unwrap(),
        ],
        ..Default::default()
    })
    .unwrap();
    let vendors = Registry::new(Arc::new(tokens::Fixed("t"))).with_vendor(Box::new(StaticHeader));
    let proxy = Proxy::with_vendors(
        SnapshotReader::fixed([bare_tenant(), tenants::acme()]),
        client,
        vendors,
        ProxyConfig::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(sidekey::proxy::serve(listener, proxy, async move {
        let _ = stopped.await;
    }));
    let app = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| {
        app.get(format!("http://{addr}{path}"))
            .header("x-sidekey-tenant", "bare")
            .send()
    };

    // Prefix form: the prefix is removed, the header injected, the tenant header dropped.
    let resp = get("/static/v1/things?x=1").await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.single();
    assert_eq!(seen.path_and_query(), "/v1/things?x=1");
    assert_eq!(seen.host(), Some(HOST));
    assert_eq!(seen.header("x-static-key"), Some(KEY));
    assert_eq!(seen.header("x-sidekey-tenant"), None);

    // Forward-proxy form: the vendor claims its host.
    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://bare:x@{addr}")).unwrap())
        .build()
        .unwrap();
    let resp = proxied
        .get(format!("http://{HOST}/v1/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].path_and_query(), "/v1/other");
    assert_eq!(seen[1].header("x-static-key"), Some(KEY));

    // The vendor's refusal, mapped by the proxy like any other.
    let resp = get("/static/admin/x").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-sidekey-error"], "unknown_route");
    // Unknown prefixes list the new one too.
    let resp = get("/nowhere/x").await.unwrap();
    assert_eq!(resp.status(), 404);
    let body = resp.text().await.unwrap();
    assert!(body.contains("/mailkit/ or /static/"), "{body}");
    // The built-in vendors still ask for their credentials.
    let resp = get("/mailkit/json.fcgi").await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-sidekey-error"], "vendor_not_configured");
    assert_eq!(
        mock.requests().len(),
        2,
        "no refused request reached the vendor"
    );

    let _ = stop.send(());
    server.await.unwrap();
}
