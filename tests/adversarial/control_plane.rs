//! Adversarial cases: control plane and tenants file. Each case names the invariant it
//! defends; all are bounded in count and time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::FieldMask;
use sidekey::config::ServeConfig;
use sidekey::document::TenantDoc;
use sidekey::proto::{self, tenant_service_client::TenantServiceClient};
use sidekey::server::{self, Running};
use sidekey::store::embedded::EmbeddedStore;
use sidekey::store::master_key::MasterKeys;
use sidekey::tenants::Catalog;
use sidekey::tenants_file::{Poll, TenantsFile};
use tonic::Code;

const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET: &str = "adversarial-secret-9931";

async fn start(dir: &Path) -> Running {
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(MASTER_KEY));
    server::start(config).await.expect("sidekey starts")
}

fn tenants(n: usize) -> String {
    let mut out = String::from("tenants:\n");
    for i in 0..n {
        out.push_str(&format!(
            "  - id: t{i}\n    miradore: {{ site: s{i}, apiKey: {{ value: key-{i} }} }}\n"
        ));
    }
    out
}

/// Invariant: rewriting the tenants file in place (truncate, then write) never deletes a
/// tenant, wherever the watcher's read falls. The run: 48 cycles of a 200-tenant
/// file, 6,920 spurious deletions.
#[tokio::test]
async fn truncate_and_rewrite_cycles_delete_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterKeys::parse(MASTER_KEY, "test").unwrap();
    let store = EmbeddedStore::open(&dir.path().join("data"), keys).unwrap();
    let catalog = Arc::new(Catalog::open(Arc::new(store)).await.unwrap());
    let path = dir.path().join("tenants.yaml");
    let full = tenants(200);
    std::fs::write(&path, &full).unwrap();
    let mut w = TenantsFile::new(path.clone(), &dir.path().join("data"), catalog.clone())
        .quiet_period(Duration::from_secs(3600));
    assert_eq!(w.poll().await, Poll::Settling);
    assert!(matches!(w.poll().await, Poll::Applied(_)));

    let started = Instant::now();
    for cycle in 0..48usize {
        // The read lands after the truncate, or part-way through the write.
        let cut = (cycle * 7919) % full.len();
        std::fs::write(&path, &full[..cut]).unwrap();
        let seen = w.poll().await;
        assert_eq!(seen, Poll::Settling, "cycle {cycle}, cut {cut}");
        std::fs::write(&path, &full).unwrap();
        assert_eq!(w.poll().await, Poll::Unchanged, "cycle {cycle}");
        assert_eq!(catalog.snapshot().load().len(), 200, "cycle {cycle}");
    }
    // A truncated version that stays (a writer that died) and still parses deletes at most
    // the allowed share.
    std::fs::write(&path, tenants(20)).unwrap();
    assert_eq!(w.poll().await, Poll::Settling);
    assert!(matches!(w.poll().await, Poll::Rejected(e) if e.contains("--tenants-file-max-delete")));
    assert_eq!(catalog.snapshot().load().len(), 200);
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Invariant: a hostile document is refused quickly, whatever its shape, and the refusal
/// never repeats a value from it.
#[test]
fn hostile_documents_are_refused_quickly_without_quoting_them() {
    let hostile = [
        format!("id: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("id: a\netag:\n{}x", "- ".repeat(100_000)),
        format!("id: a\netag:\n{}", "{a: ".repeat(100_000)),
        format!("id: a\netag:\n{}", "? ".repeat(100_000)),
        format!(
            "id: a\netag:\n{}",
            (0..2_000)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect::<String>()
        ),
        // The billion-laughs shape.
        "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n\
         d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n\
         g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nid: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
            .to_owned(),
        format!("id: a\netag: \"{}\"", "x".repeat(5 << 20)),
        format!("id: a\nmiradore: {{ apiKey: \"{SECRET}\" }}"),
        format!("id: a\nmiradore: {{ {SECRET}: 1 }}"),
        format!("id: a\nmiradore: {{ apiKey: {{ value: [{SECRET}] }} }}"),
        format!("id: a\nmiradore: {{ apiKey: {{ value: '{SECRET}"),
        format!("{SECRET}: [}}"),
        "\u{feff}id: a\n\0".to_owned(),
    ];
    for text in &hostile {
        let started = Instant::now();
        let result = TenantDoc::parse(text);
        let elapsed = started.elapsed();
        let err = result.expect_err("a hostile document parsed");
        assert!(
            elapsed < Duration::from_secs(1),
            "{elapsed:?} for {}",
            &text[..text.len().min(40)]
        );
        assert!(!err.contains(SECRET), "{err}");
        assert!(err.len() < 300, "{err}");
    }
}

/// Invariant: whatever a request holds, its refusal fits in common metadata limits (here
/// 4 KiB of message and details) and never quotes a secret.
#[tokio::test]
async fn hostile_requests_get_small_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = TenantServiceClient::connect(running.grpc_url.clone())
        .await
        .unwrap();
    let long = "\u{202E}".repeat(10_000);
    let secret = || {
        Some(proto::Secret {
            value: format!("{SECRET}\n{long}"),
            fingerprint: String::new(),
        })
    };
    let mut statuses = Vec::new();
    for id in [
        long.clone(),
        "A".repeat(16_000),
        String::from_utf8_lossy(&[0xff; 500]).into_owned(),
    ] {
        statuses.push(
            c.get_tenant(proto::GetTenantRequest { id: id.clone() })
                .await
                .unwrap_err(),
        );
        statuses.push(
            c.create_tenant(proto::CreateTenantRequest {
                tenant: Some(proto::Tenant {
                    id: id.clone(),
                    display_name: long.clone(),
                    miradore: Some(proto::MiradoreConnection {
                        site: long.clone(),
                        api_key: secret(),
                    }),
                    m3ter: Some(proto::M3terConnection {
                        access_key_id: long.clone(),
                        api_secret: secret(),
                        org_id: long.clone(),
                        environment: long.clone(),
                    }),
                    mailkit: Some(proto::MailkitConnection {
                        client_id: long.clone(),
                        client_md5: secret(),
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err(),
        );
        statuses.push(
            c.update_tenant(proto::UpdateTenantRequest {
                tenant: Some(proto::Tenant {
                    id,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: (0..32)
                        .map(|i| format!("{i}{}", "\u{202E}".repeat(400)))
                        .collect(),
                }),
            })
            .await
            .unwrap_err(),
        );
    }
    statuses.push(
        c.list_tenants(proto::ListTenantsRequest {
            page_size: -1,
            page_token: long.clone(),
        })
        .await
        .unwrap_err(),
    );
    for status in &statuses {
        let size = status.message().len() + status.details().len().div_ceil(3) * 4;
        assert!(size <= 4096, "{size} bytes: {status:?}");
        assert!(!status.message().contains(SECRET), "{status:?}");
        assert_ne!(status.code(), Code::Internal, "{status:?}");
    }
}

/// Invariant: only the etag string sidekey issued matches.
#[tokio::test]
async fn etag_variants_never_match() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = TenantServiceClient::connect(running.grpc_url.clone())
        .await
        .unwrap();
    let t = c
        .create_tenant(proto::CreateTenantRequest {
            tenant: Some(proto::Tenant {
                id: "acme".into(),
                miradore: Some(proto::MiradoreConnection {
                    site: "acme".into(),
                    api_key: Some(proto::Secret {
                        value: "k".into(),
                        fingerprint: String::new(),
                    }),
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let e = &t.etag;
    for variant in [
        format!("+{e}"),
        format!("0{e}"),
        format!("00{e}"),
        format!("{e} "),
        format!(" {e}"),
        format!("{e}\n"),
        format!("\"{e}\""),
        format!("W/\"{e}\""),
        format!("{e}.0"),
        format!("{e}e0"),
        format!("-{e}"),
        format!("{e}\u{0}"),
        "١".repeat(e.len()),
    ] {
        let err = c
            .delete_tenant(proto::DeleteTenantRequest {
                id: "acme".into(),
                etag: variant.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{variant:?}");
    }
    assert!(
        c.get_tenant(proto::GetTenantRequest { id: "acme".into() })
            .await
            .is_ok()
    );
}

/// Invariant: connections that never speak are closed, and do not keep a real client out
/// for longer than the handshake deadline.
#[tokio::test]
async fn silent_connections_do_not_lock_out_clients() {
    struct NoTester;
    #[async_trait::async_trait]
    impl sidekey::vendors::VendorTester for NoTester {
        async fn test(
            &self,
            _: &sidekey::tenants::EffectiveTenant,
            _: sidekey::tenants::VendorKind,
        ) -> sidekey::vendors::TestOutcome {
            sidekey::vendors::TestOutcome {
                ok: false,
                http_status: 0,
                message: String::new(),
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let listener = sidekey::control::GrpcListener::bind(&sidekey::control::GrpcListen::Tcp(
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let url = listener.client_url();
    let api = sidekey::control::TenantApi::new(running.catalog.clone(), Arc::new(NoTester));
    tokio::spawn(sidekey::control::serve_with(
        listener,
        api,
        None,
        sidekey::control::Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_millis(200),
        },
        std::future::pending(),
    ));
    // Eight silent connections, twice the cap.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
                .await
                .unwrap(),
        );
    }
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = TenantServiceClient::connect(url).await.unwrap();
        c.list_tenants(proto::ListTenantsRequest::default())
            .await
            .unwrap();
    })
    .await;
    assert!(served.is_ok(), "a real client was locked out");
    drop(silent);
}
