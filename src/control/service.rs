//! `sidekey.v1.TenantService`: a thin adapter from RPCs to the [`Catalog`].

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::{Request, Response, Status};

use super::convert::{self, parse_etag};
use super::status::{invalid, invalid_field, stale_etag};
use crate::proto::{self, tenant_service_server::TenantService};
use crate::tenants::Catalog;
use crate::tenants::validate::echo;
use crate::vendors::VendorTester;

/// `page_size` used when a client sends 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Larger `page_size` values are lowered to this.
pub const MAX_PAGE_SIZE: usize = 1000;

pub struct TenantApi {
    catalog: Arc<Catalog>,
    tester: Arc<dyn VendorTester>,
}

impl TenantApi {
    pub fn new(catalog: Arc<Catalog>, tester: Arc<dyn VendorTester>) -> Self {
        Self { catalog, tester }
    }
}

fn etag_of(etag: &str) -> Result<Option<u64>, Status> {
    parse_etag(etag).map_err(|_| stale_etag())
}

fn required<T>(msg: Option<T>, field: &str) -> Result<T, Status> {
    msg.ok_or_else(|| invalid_field(field, "required"))
}

impl TenantApi {
    async fn do_create_tenant(
        &self,
        request: Request<proto::CreateTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        let t = required(request.into_inner().tenant, "tenant")?;
        let conns = convert::connections_in((&t).into());
        let record = self.catalog.create(t.id, t.display_name, conns).await?;
        tracing::info!(tenant = %record.id, "tenant created");
        Ok(Response::new(convert::tenant_out(&record)))
    }

    async fn do_get_tenant(
        &self,
        request: Request<proto::GetTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        let record = self.catalog.get(&request.into_inner().id).await?;
        Ok(Response::new(convert::tenant_out(&record)))
    }

    async fn do_list_tenants(
        &self,
        request: Request<proto::ListTenantsRequest>,
    ) -> Result<Response<proto::ListTenantsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.page_size {
            n if n < 0 => return Err(invalid_field("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => usize::try_from(n)
                .unwrap_or(MAX_PAGE_SIZE)
                .min(MAX_PAGE_SIZE),
        };
        // The token is the last id of the previous page, encoded so clients treat it as
        // opaque.
        let after = if req.page_token.is_empty() {
            None
        } else {
            let bytes = URL_SAFE_NO_PAD
                .decode(&req.page_token)
                .map_err(|_| invalid_field("page_token", "not a token from ListTenants"))?;
            Some(
                String::from_utf8(bytes)
                    .map_err(|_| invalid_field("page_token", "not a token from ListTenants"))?,
            )
        };
        let (page, more) = self.catalog.list(after.as_deref(), limit).await?;
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => URL_SAFE_NO_PAD.encode(&last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListTenantsResponse {
            tenants: page.iter().map(convert::tenant_out).collect(),
            next_page_token,
        }))
    }

    async fn do_update_tenant(
        &self,
        request: Request<proto::UpdateTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        let req = request.into_inner();
        let t = required(req.tenant, "tenant")?;
        let etag = etag_of(&t.etag)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        convert::check_mask(&paths, &["display_name"]).map_err(invalid)?;
        let conns = convert::connections_in((&t).into());
        let record = self
            .catalog
            .update(&t.id, etag, |record| {
                if paths.is_empty() {
                    if !t.display_name.is_empty() {
                        record.display_name = t.display_name;
                    }
                    convert::merge_present(&mut record.connections, &conns);
                } else {
                    if paths.iter().any(|p| p == "display_name") {
                        record.display_name = t.display_name;
                    }
                    convert::apply_mask(&mut record.connections, &conns, &paths);
                }
            })
            .await?;
        tracing::info!(tenant = %record.id, "tenant updated");
        Ok(Response::new(convert::tenant_out(&record)))
    }

    async fn do_delete_tenant(
        &self,
        request: Request<proto::DeleteTenantRequest>,
    ) -> Result<Response<proto::DeleteTenantResponse>, Status> {
        let req = request.into_inner();
        self.catalog.delete(&req.id, etag_of(&req.etag)?).await?;
        tracing::info!(tenant = %req.id, "tenant deleted");
        Ok(Response::new(proto::DeleteTenantResponse {}))
    }

    async fn do_test_tenant(
        &self,
        request: Request<proto::TestTenantRequest>,
    ) -> Result<Response<proto::TestTenantResponse>, Status> {
        let req = request.into_inner();
        let Some(vendor) = convert::vendor_in(req.vendor) else {
            return Err(invalid_field(
                "vendor",
                &format!("must be {}", convert::vendor_names()),
            ));
        };
        // The effective credentials are those the proxy would use right now.
        let snapshot = self.catalog.snapshot().load();
        let Some(tenant) = snapshot.tenant(&req.id) else {
            return Err(Status::not_found(format!(
                "tenant {} not found",
                echo(&req.id)
            )));
        };
        if !tenant.has(vendor) {
            return Err(Status::failed_precondition(format!(
                "tenant {} has no {} connection",
                echo(&req.id),
                vendor.as_str()
            )));
        }
        let outcome = self.tester.test(tenant, vendor).await;
        tracing::info!(tenant = %req.id, vendor = vendor.as_str(), ok = outcome.ok,
            http_status = outcome.http_status, "tenant tested");
        Ok(Response::new(proto::TestTenantResponse {
            ok: outcome.ok,
            http_status: i32::from(outcome.http_status),
            message: outcome.message,
        }))
    }

    async fn do_get_partner_defaults(
        &self,
        _request: Request<proto::GetPartnerDefaultsRequest>,
    ) -> Result<Response<proto::PartnerDefaults>, Status> {
        Ok(Response::new(convert::partner_out(
            &self.catalog.partner().await?,
        )))
    }

    async fn do_update_partner_defaults(
        &self,
        request: Request<proto::UpdatePartnerDefaultsRequest>,
    ) -> Result<Response<proto::PartnerDefaults>, Status> {
        let req = request.into_inner();
        let p = required(req.partner_defaults, "partner_defaults")?;
        let etag = etag_of(&p.etag)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        convert::check_mask(&paths, &[]).map_err(invalid)?;
        let conns = convert::connections_in((&p).into());
        let record = self
            .catalog
            .update_partner(etag, |record| {
                if paths.is_empty() {
                    convert::merge_present(&mut record.connections, &conns);
                } else {
                    convert::apply_mask(&mut record.connections, &conns, &paths);
                }
            })
            .await?;
        tracing::info!("partner defaults updated");
        Ok(Response::new(convert::partner_out(&record)))
    }
}

/// Every RPC is counted by method and gRPC code.
#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn create_tenant(
        &self,
        request: Request<proto::CreateTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        observe("CreateTenant", self.do_create_tenant(request).await)
    }

    async fn get_tenant(
        &self,
        request: Request<proto::GetTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        observe("GetTenant", self.do_get_tenant(request).await)
    }

    async fn list_tenants(
        &self,
        request: Request<proto::ListTenantsRequest>,
    ) -> Result<Response<proto::ListTenantsResponse>, Status> {
        observe("ListTenants", self.do_list_tenants(request).await)
    }

    async fn update_tenant(
        &self,
        request: Request<proto::UpdateTenantRequest>,
    ) -> Result<Response<proto::Tenant>, Status> {
        observe("UpdateTenant", self.do_update_tenant(request).await)
    }

    async fn delete_tenant(
        &self,
        request: Request<proto::DeleteTenantRequest>,
    ) -> Result<Response<proto::DeleteTenantResponse>, Status> {
        observe("DeleteTenant", self.do_delete_tenant(request).await)
    }

    async fn test_tenant(
        &self,
        request: Request<proto::TestTenantRequest>,
    ) -> Result<Response<proto::TestTenantResponse>, Status> {
        observe("TestTenant", self.do_test_tenant(request).await)
    }

    async fn get_partner_defaults(
        &self,
        request: Request<proto::GetPartnerDefaultsRequest>,
    ) -> Result<Response<proto::PartnerDefaults>, Status> {
        observe(
            "GetPartnerDefaults",
            self.do_get_partner_defaults(request).await,
        )
    }

    async fn update_partner_defaults(
        &self,
        request: Request<proto::UpdatePartnerDefaultsRequest>,
    ) -> Result<Response<proto::PartnerDefaults>, Status> {
        observe(
            "UpdatePartnerDefaults",
            self.do_update_partner_defaults(request).await,
        )
    }
}

/// `sidekey_control_calls_total{method,code}`.
pub const METRIC_CALLS: &str = "sidekey_control_calls_total";

/// Registers the control plane's metric help texts.
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_CALLS,
        "Control-plane calls, refused ones included, by method and gRPC code"
    );
    super::listener::describe_metrics();
}

/// Counts one control-plane call in `sidekey_control_calls_total{method, code}`.
pub(crate) fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    record_call(method, code);
    result
}

pub(crate) fn record_call(method: impl Into<metrics::SharedString>, code: tonic::Code) {
    let code = match code {
        tonic::Code::Ok => "OK",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::Unavailable => "Unavailable",
        _ => "Other",
    };
    metrics::counter!(METRIC_CALLS, "method" => method.into(), "code" => code).increment(1);
}
