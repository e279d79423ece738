//! Control plane over real gRPC: CRUD, paging, etags, field masks, validation, partner
//! defaults, authentication, health and reflection.

mod support;

use std::path::Path;

use prost_types::FieldMask;
use sidekey::config::ServeConfig;
use sidekey::proto::{self, tenant_service_client::TenantServiceClient};
use sidekey::server::{self, Running};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const ORG: &str = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa";
const MD5: &str = "0123456789abcdef0123456789abcdef";

async fn start(dir: &Path) -> Running {
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    server::start(config).await.expect("sidekey starts")
}

async fn client(running: &Running) -> TenantServiceClient<Channel> {
    TenantServiceClient::connect(running.grpc_url.clone())
        .await
        .expect("connect")
}

fn secret(v: &str) -> Option<proto::Secret> {
    Some(proto::Secret {
        value: v.into(),
        fingerprint: String::new(),
    })
}

fn m3ter_tenant(id: &str, api_secret: &str) -> proto::Tenant {
    proto::Tenant {
        id: id.into(),
        display_name: format!("Tenant {id}"),
        m3ter: Some(proto::M3terConnection {
            access_key_id: "AK-1".into(),
            api_secret: secret(api_secret),
            org_id: ORG.into(),
            environment: String::new(),
        }),
        ..Default::default()
    }
}

async fn create(
    c: &mut TenantServiceClient<Channel>,
    t: proto::Tenant,
) -> Result<proto::Tenant, tonic::Status> {
    c.create_tenant(proto::CreateTenantRequest { tenant: Some(t) })
        .await
        .map(|r| r.into_inner())
}

fn violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn crud_round_trip_never_returns_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;

    let created = create(&mut c, m3ter_tenant("acme", "s3cr3t-value"))
        .await
        .unwrap();
    assert_eq!(created.id, "acme");
    let fp = created.m3ter.as_ref().unwrap().api_secret.as_ref().unwrap();
    assert!(fp.value.is_empty());
    assert!(fp.fingerprint.starts_with("sha256:") && fp.fingerprint.len() == 19);
    assert!(created.create_time.is_some() && !created.etag.is_empty());

    let got = c
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
    assert!(!format!("{got:?}").contains("s3cr3t-value"));

    c.delete_tenant(proto::DeleteTenantRequest {
        id: "acme".into(),
        etag: String::new(),
    })
    .await
    .unwrap();
    let gone = c
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let gone = c
        .delete_tenant(proto::DeleteTenantRequest {
            id: "acme".into(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(running.shutdown().await);
}

#[tokio::test]
async fn duplicate_create_is_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    create(&mut c, m3ter_tenant("acme", "a")).await.unwrap();
    let err = create(&mut c, m3ter_tenant("acme", "b")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn list_pages_across_more_than_one_page() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    for i in 0..7 {
        create(&mut c, m3ter_tenant(&format!("t{i}"), "x"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_tenants(proto::ListTenantsRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.tenants.len() <= 3);
        seen.extend(page.tenants.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4", "t5", "t6"]);

    let bad = c
        .list_tenants(proto::ListTenantsRequest {
            page_size: 1,
            page_token: "!!not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["page_token"]);
    let bad = c
        .list_tenants(proto::ListTenantsRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["page_size"]);
}

#[tokio::test]
async fn mask_update_rotates_one_secret_and_keeps_the_rest_and_stale_etag_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    let created = create(&mut c, m3ter_tenant("acme", "old-secret"))
        .await
        .unwrap();
    let old_fp = created
        .m3ter
        .as_ref()
        .unwrap()
        .api_secret
        .clone()
        .unwrap()
        .fingerprint;

    let updated = c
        .update_tenant(proto::UpdateTenantRequest {
            tenant: Some(proto::Tenant {
                id: "acme".into(),
                etag: created.etag.clone(),
                m3ter: Some(proto::M3terConnection {
                    api_secret: secret("new-secret"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["m3ter.api_secret".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let m = updated.m3ter.as_ref().unwrap();
    assert_ne!(m.api_secret.as_ref().unwrap().fingerprint, old_fp);
    assert_eq!(m.access_key_id, "AK-1");
    assert_eq!(m.org_id, ORG);
    assert_eq!(updated.display_name, "Tenant acme");
    assert_ne!(updated.etag, created.etag);

    // The proxy sees the new secret at once.
    let snap = running.catalog.snapshot().load();
    let eff = snap.tenant("acme").unwrap().m3ter.as_ref().unwrap();
    assert_eq!(eff.api_secret.expose(), "new-secret");

    // The etag read before the update is now stale.
    let stale = c
        .update_tenant(proto::UpdateTenantRequest {
            tenant: Some(proto::Tenant {
                id: "acme".into(),
                etag: created.etag.clone(),
                display_name: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let stale = c
        .delete_tenant(proto::DeleteTenantRequest {
            id: "acme".into(),
            etag: created.etag,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let missing = c
        .update_tenant(proto::UpdateTenantRequest {
            tenant: Some(proto::Tenant {
                id: "nobody".into(),
                display_name: "x".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let bad_mask = c
        .update_tenant(proto::UpdateTenantRequest {
            tenant: Some(proto::Tenant {
                id: "acme".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["create_time".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violations(&bad_mask),
        ["update_mask", "update_mask.paths[0]"]
    );
}

#[tokio::test]
async fn every_validation_failure_names_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;

    let cases: Vec<(proto::Tenant, &[&str])> = vec![
        (m3ter_tenant("Bad_ID", "x"), &["tenant.id"]),
        (m3ter_tenant("", "x"), &["tenant.id"]),
        (
            proto::Tenant {
                id: "a".into(),
                miradore: Some(proto::MiradoreConnection {
                    site: "bad site".into(),
                    api_key: secret("k"),
                }),
                ..Default::default()
            },
            &["tenant.miradore.site"],
        ),
        (
            proto::Tenant {
                id: "a".into(),
                m3ter: Some(proto::M3terConnection {
                    access_key_id: "k".into(),
                    api_secret: secret("line\nbreak"),
                    org_id: "not-a-uuid".into(),
                    environment: "Not A Label".into(),
                }),
                ..Default::default()
            },
            &[
                "tenant.m3ter.api_secret.value",
                "tenant.m3ter.org_id",
                "tenant.m3ter.environment",
            ],
        ),
        (
            proto::Tenant {
                id: "a".into(),
                mailkit: Some(proto::MailkitConnection {
                    client_id: "12x".into(),
                    client_md5: secret("nothex"),
                }),
                ..Default::default()
            },
            &[
                "tenant.mailkit.client_id",
                "tenant.mailkit.client_md5.value",
            ],
        ),
        // Incomplete effective credentials: nothing to inherit from.
        (
            proto::Tenant {
                id: "a".into(),
                mailkit: Some(proto::MailkitConnection {
                    client_id: "123".into(),
                    client_md5: None,
                }),
                ..Default::default()
            },
            &["tenant.mailkit.client_md5"],
        ),
    ];
    for (tenant, fields) in cases {
        let err = create(&mut c, tenant).await.unwrap_err();
        assert_eq!(violations(&err), fields);
        assert!(!err.message().contains("line\nbreak"));
    }
}

#[tokio::test]
async fn partner_defaults_are_inherited_and_cannot_be_pulled_from_under_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;

    let p = c
        .update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
            partner_defaults: Some(proto::PartnerDefaults {
                mailkit: Some(proto::MailkitConnection {
                    client_id: String::new(),
                    client_md5: secret(MD5),
                }),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(p.mailkit.unwrap().client_md5.unwrap().value.is_empty());

    for id in ["acme", "beta"] {
        create(
            &mut c,
            proto::Tenant {
                id: id.into(),
                mailkit: Some(proto::MailkitConnection {
                    client_id: "4242".into(),
                    client_md5: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let snap = running.catalog.snapshot().load();
    let mk = snap.tenant("acme").unwrap().mailkit.as_ref().unwrap();
    assert_eq!(mk.client_id, "4242");
    assert_eq!(mk.client_md5.expose(), MD5);

    let err = c
        .update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
            partner_defaults: Some(proto::PartnerDefaults::default()),
            update_mask: Some(FieldMask {
                paths: vec!["mailkit".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["partner_defaults.mailkit.client_md5"]);
    let detail = err.get_details_bad_request().unwrap().field_violations[0]
        .description
        .clone();
    assert!(
        detail.contains("acme") && detail.contains("beta"),
        "{detail}"
    );

    let bad = c
        .update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
            partner_defaults: Some(proto::PartnerDefaults {
                m3ter: Some(proto::M3terConnection {
                    org_id: "nope".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["partner_defaults.m3ter.org_id"]);
}

#[tokio::test]
async fn token_is_required_when_configured_but_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "control-token-123\n").unwrap();
    let mut config = ServeConfig::ephemeral(dir.path().join("data"));
    config.grpc_token_file = Some(token_file);
    let running = server::start(config).await.unwrap();

    let mut anon = client(&running).await;
    let err = anon
        .get_partner_defaults(proto::GetPartnerDefaultsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let channel = Channel::from_shared(running.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = |value: &'static str| {
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", value.parse().unwrap());
            Ok(req)
        }
    };
    let mut wrong =
        TenantServiceClient::with_interceptor(channel.clone(), bearer("Bearer control-token-12"));
    let err = wrong
        .get_partner_defaults(proto::GetPartnerDefaultsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("control-token-123"));

    let mut right =
        TenantServiceClient::with_interceptor(channel.clone(), bearer("Bearer control-token-123"));
    right
        .get_partner_defaults(proto::GetPartnerDefaultsRequest {})
        .await
        .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sidekey.v1.TenantService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn writes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    let created = create(&mut c, m3ter_tenant("acme", "persisted"))
        .await
        .unwrap();
    drop(c);
    assert!(running.shutdown().await);

    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    let got = c
        .get_tenant(proto::GetTenantRequest { id: "acme".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
    let snap = running.catalog.snapshot().load();
    assert_eq!(
        snap.tenant("acme")
            .unwrap()
            .m3ter
            .as_ref()
            .unwrap()
            .api_secret
            .expose(),
        "persisted"
    );
}

#[tokio::test]
async fn masking_a_secret_without_a_value_makes_it_inherit_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    create(&mut c, m3ter_tenant("acme", "own-secret"))
        .await
        .unwrap();
    let clear = proto::UpdateTenantRequest {
        tenant: Some(proto::Tenant {
            id: "acme".into(),
            m3ter: Some(proto::M3terConnection::default()),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["m3ter.api_secret".into()],
        }),
    };

    // Nothing to inherit: refused, naming the field; the tenant keeps its secret.
    let err = c.update_tenant(clear.clone()).await.unwrap_err();
    assert_eq!(violations(&err), ["tenant.m3ter.api_secret"]);
    let snap = running.catalog.snapshot().load();
    let own = snap.tenant("acme").unwrap().m3ter.as_ref().unwrap();
    assert_eq!(own.api_secret.expose(), "own-secret");

    // With a partner default, clearing makes the tenant inherit it.
    c.update_partner_defaults(proto::UpdatePartnerDefaultsRequest {
        partner_defaults: Some(proto::PartnerDefaults {
            m3ter: Some(proto::M3terConnection {
                api_secret: secret("partner-secret"),
                ..Default::default()
            }),
            ..Default::default()
        }),
        update_mask: None,
    })
    .await
    .unwrap();
    let t = c.update_tenant(clear).await.unwrap().into_inner();
    assert!(
        t.m3ter.unwrap().api_secret.is_none(),
        "no own secret any more"
    );
    let snap = running.catalog.snapshot().load();
    let eff = snap.tenant("acme").unwrap().m3ter.as_ref().unwrap();
    assert_eq!(eff.api_secret.expose(), "partner-secret");
}

// ---------------------------------------------------------------------------------------
// Hostile input: bounded statuses, canonical etags, display names (issue 18)

/// What a status costs in response metadata: its message, and its details as the base64 of
/// grpc-status-details-bin.
fn status_metadata_len(status: &tonic::Status) -> usize {
    status.message().len() + status.details().len().div_ceil(3) * 4
}

#[tokio::test]
async fn many_bad_mask_paths_give_one_bounded_status() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    create(&mut c, m3ter_tenant("acme", "s")).await.unwrap();
    let update = |paths: Vec<String>| proto::UpdateTenantRequest {
        tenant: Some(proto::Tenant {
            id: "acme".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask { paths }),
    };

    // Every path bad and long, within the mask limit: the first few are named, the valid
    // paths are stated once, the total is counted, and the status stays small.
    let paths: Vec<String> = (0..32)
        .map(|i| format!("{i}{}", "\u{202E}x".repeat(300)))
        .collect();
    let err = c.update_tenant(update(paths)).await.unwrap_err();
    let fields = violations(&err);
    assert_eq!(
        fields,
        [
            "update_mask",
            "update_mask.paths[0]",
            "update_mask.paths[1]",
            "update_mask.paths[2]"
        ]
    );
    assert!(
        err.message().contains("33 field violations"),
        "{}",
        err.message()
    );
    assert_eq!(err.message().matches("m3ter.api_secret").count(), 1);
    assert!(err.message().is_ascii());
    assert!(
        status_metadata_len(&err) <= 4096,
        "{}",
        status_metadata_len(&err)
    );

    // Far more paths than there are: refused by count alone.
    let err = c
        .update_tenant(update(vec!["nope".to_owned(); 5_000]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["update_mask"]);
    assert!(err.message().contains("at most 32"), "{}", err.message());
    assert!(status_metadata_len(&err) <= 4096);

    // A request over the size limit is refused before it is decoded, with the code gRPC
    // specifies for it (tonic's own is OUT_OF_RANGE).
    let err = c
        .update_tenant(update(vec!["nope".to_owned(); 200_000]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn long_ids_are_cut_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    let id = "z".repeat(16_384);
    let err = c
        .get_tenant(proto::GetTenantRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 200, "{}", err.message());
    assert!(err.message().contains("16384 bytes"), "{}", err.message());
    let err = c
        .delete_tenant(proto::DeleteTenantRequest {
            id: id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().len() < 200, "{}", err.message());
    let err = c
        .test_tenant(proto::TestTenantRequest {
            id,
            vendor: proto::Vendor::M3ter as i32,
        })
        .await
        .unwrap_err();
    assert!(err.message().len() < 200, "{}", err.message());
    // A bad id in a create is named by field, without being repeated at length.
    let err = create(&mut c, m3ter_tenant(&"Z".repeat(16_384), "s"))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0], "tenant.id");
    assert!(status_metadata_len(&err) <= 4096);
}

#[tokio::test]
async fn test_tenant_refuses_an_unknown_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    create(&mut c, m3ter_tenant("acme", "s")).await.unwrap();
    for vendor in [proto::Vendor::Unspecified as i32, 99, -1] {
        let err = c
            .test_tenant(proto::TestTenantRequest {
                id: "acme".into(),
                vendor,
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err), ["vendor"], "{vendor}");
        let details = err.get_details_bad_request().unwrap();
        assert_eq!(
            details.field_violations[0].description,
            "must be VENDOR_MIRADORE, VENDOR_M3TER or VENDOR_MAILKIT"
        );
    }
}

#[tokio::test]
async fn only_canonical_etags_match() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    let created = create(&mut c, m3ter_tenant("acme", "s")).await.unwrap();
    for etag in [
        format!("+{}", created.etag),
        format!("0{}", created.etag),
        format!(" {}", created.etag),
    ] {
        let err = c
            .delete_tenant(proto::DeleteTenantRequest {
                id: "acme".into(),
                etag: etag.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{etag:?}");
    }
    c.delete_tenant(proto::DeleteTenantRequest {
        id: "acme".into(),
        etag: created.etag,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn display_names_with_bidi_overrides_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let mut c = client(&running).await;
    for name in [
        "Acme \u{202E}pr0c",
        "Acme\u{2067}x",
        "Acme\u{2028}",
        "Acme\u{7}",
    ] {
        let mut t = m3ter_tenant("acme", "s");
        t.display_name = name.into();
        let err = create(&mut c, t).await.unwrap_err();
        assert_eq!(violations(&err), ["tenant.display_name"], "{name:?}");
    }
    let mut t = m3ter_tenant("acme", "s");
    t.display_name = "Ærø Øl שלום".into();
    create(&mut c, t).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// TestTenant never repeats what a vendor says (issue 18)

#[tokio::test]
async fn test_tenant_never_echoes_a_vendor_quoting_the_credentials() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use support::{MockResponse, MockVendor, TestCa};

    const KEY: &str = "miradore-key-+/=5531";
    const SECRET: &str = "m3ter-secret-+/=7719";
    const MD5V: &str = "abcdef0123456789abcdef0123456789";
    let ca = TestCa::new("echo CA");
    // A hostile or careless vendor: every refusal quotes the whole request back.
    let mock = MockVendor::builder(&ca)
        .respond(|r| {
            let mut echo = format!("{} {}", r.method, r.path_and_query());
            for (name, value) in &r.headers {
                echo.push_str(&format!(" {name}={}", value.to_str().unwrap_or("")));
            }
            echo.push_str(r.body_str());
            if r.path_and_query() == "/json.fcgi" {
                MockResponse::ok(serde_json::json!({"error_status": 1, "error": echo}).to_string())
            } else {
                MockResponse::status(401).body(echo)
            }
        })
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::ephemeral(dir.path().join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    config.upstream_ca = vec![ca.pem_file()];
    config.connect_to = support::connect_to_rules(mock.port());
    let running = server::start(config).await.unwrap();
    let mut c = client(&running).await;
    create(
        &mut c,
        proto::Tenant {
            id: "acme".into(),
            miradore: Some(proto::MiradoreConnection {
                site: "acme".into(),
                api_key: secret(KEY),
            }),
            m3ter: Some(proto::M3terConnection {
                access_key_id: "AK-1".into(),
                api_secret: secret(SECRET),
                org_id: ORG.into(),
                environment: String::new(),
            }),
            mailkit: Some(proto::MailkitConnection {
                client_id: "42".into(),
                client_md5: secret(MD5V),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let forms = |s: &str| {
        vec![
            s.to_owned(),
            STANDARD.encode(s),
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        ]
    };
    let mut secrets = forms(KEY);
    secrets.extend(forms(SECRET));
    secrets.extend(forms(MD5V));
    secrets.push(STANDARD.encode(format!("AK-1:{SECRET}")));
    for vendor in [
        proto::Vendor::Miradore,
        proto::Vendor::M3ter,
        proto::Vendor::Mailkit,
    ] {
        let out = c
            .test_tenant(proto::TestTenantRequest {
                id: "acme".into(),
                vendor: vendor as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!out.ok, "{vendor:?}: {out:?}");
        for s in &secrets {
            assert!(
                !out.message.contains(s.as_str()),
                "{vendor:?} leaked {s:?}: {}",
                out.message
            );
        }
    }
    // The mock did quote them: the test would catch an echo.
    let quoted = mock.requests().len();
    assert!(quoted >= 3, "{quoted}");
}

/// Field 1 as raw bytes, whatever the method's message says it is.
#[derive(Clone, PartialEq, prost::Message)]
struct RawField1 {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
}

#[tokio::test]
async fn an_undecodable_request_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(running.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Field 1 of GetTenantRequest is a string; as bytes it can be invalid UTF-8, which
    // protobuf refuses to decode.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(RawField1 {
                value: vec![0xff, 0xfe, 0xfd],
            }),
            http::uri::PathAndQuery::from_static("/sidekey.v1.TenantService/GetTenant"),
            tonic_prost::ProstCodec::<RawField1, proto::Tenant>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

// ---------------------------------------------------------------------------------------
// The Unix socket path (issue 18)

async fn start_on_socket(dir: &Path, socket: &Path) -> Result<Running, server::StartError> {
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    config.grpc_listen = sidekey::control::GrpcListen::Unix(socket.to_owned());
    server::start(config).await
}

#[tokio::test]
async fn only_a_stale_socket_is_replaced_at_the_socket_path() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();

    // A regular file (here: where the store lives) is refused and left intact.
    let store_like = dir.path().join("sidekey.redb");
    std::fs::write(&store_like, "precious").unwrap();
    let msg = start_on_socket(dir.path(), &store_like)
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(msg.contains("not a socket"), "{msg}");
    assert_eq!(std::fs::read_to_string(&store_like).unwrap(), "precious");
    // So is a directory.
    let msg = start_on_socket(dir.path(), dir.path())
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(msg.contains("not a socket"), "{msg}");

    // A live socket is refused.
    let live_path = dir.path().join("live.sock");
    let _live = std::os::unix::net::UnixListener::bind(&live_path).unwrap();
    let msg = start_on_socket(dir.path(), &live_path)
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(msg.contains("in use"), "{msg}");

    // A stale one (bound, then its listener gone) is replaced; the new socket is owner-only
    // and no private bind directory is left behind.
    let stale = dir.path().join("grpc.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let running = start_on_socket(dir.path(), &stale).await.unwrap();
    let meta = std::fs::symlink_metadata(&stale).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".sidekey-bind"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mut c = TenantServiceClient::connect(running.grpc_url.clone())
        .await
        .unwrap();
    c.list_tenants(proto::ListTenantsRequest::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Listener bounds: handshake deadline and connection cap (issue 18)

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

/// A second control plane over `running`'s catalog, with the given bounds.
async fn bounded_control_plane(running: &Running, limits: sidekey::control::Limits) -> String {
    use std::sync::Arc;
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
        limits,
        std::future::pending(),
    ));
    url
}

#[tokio::test]
async fn a_connection_without_a_handshake_is_closed_at_the_deadline() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let url = bounded_control_plane(
        &running,
        sidekey::control::Limits {
            max_connections: 8,
            handshake_timeout: std::time::Duration::from_millis(100),
        },
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server closes it: the read ends (EOF or reset) well within the bound.
    let mut buf = [0u8; 64];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a silent connection was kept open");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let url = bounded_control_plane(
        &running,
        sidekey::control::Limits {
            max_connections: 1,
            handshake_timeout: std::time::Duration::from_secs(60),
        },
    )
    .await;
    let hog = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    // The one slot is taken: a call does not get through while the hog is connected.
    let call = tokio::spawn(async move {
        let mut c = TenantServiceClient::connect(url).await?;
        c.list_tenants(proto::ListTenantsRequest::default())
            .await
            .map_err(|e| e.into())
            .map(|_| ())
    });
    let call: tokio::task::JoinHandle<Result<(), Box<dyn std::error::Error + Send + Sync>>> = call;
    tokio::pin!(call);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut call)
            .await
            .is_err(),
        "a connection beyond the cap was served"
    );
    drop(hog);
    tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .expect("served once the slot is free")
        .unwrap()
        .unwrap();
}
