//! A tenant's effective credentials: its connections with blank fields filled from the
//! partner defaults. This is what the data plane injects and what `TestTenant` uses.

use std::sync::Arc;

use super::model::{Connections, M3terConn, MailkitConn, MiradoreConn, VendorKind};
use super::validate::FieldViolation;
use crate::secret::Secret;

#[derive(Clone, Debug)]
pub struct MiradoreCreds {
    pub site: String,
    pub api_key: Secret,
}

#[derive(Clone, Debug)]
pub struct M3terCreds {
    pub access_key_id: String,
    pub api_secret: Secret,
    pub org_id: String,
    /// Empty for production.
    pub environment: String,
    /// `api.m3ter.com` or `api.<env>.m3ter.com`.
    pub api_host: String,
    /// `ingest.m3ter.com` or `ingest.<env>.m3ter.com`.
    pub ingest_host: String,
}

#[derive(Clone, Debug)]
pub struct MailkitCreds {
    pub client_id: String,
    pub client_md5: Secret,
}

/// A tenant as the proxy sees it: only complete connections, nothing left to resolve.
#[derive(Debug)]
pub struct EffectiveTenant {
    pub id: Arc<str>,
    pub miradore: Option<MiradoreCreds>,
    pub m3ter: Option<M3terCreds>,
    pub mailkit: Option<MailkitCreds>,
}

impl EffectiveTenant {
    /// Resolves `own` against `defaults`. Every missing required field is reported, by its
    /// path within the tenant (e.g. `m3ter.api_secret`).
    pub fn resolve(
        id: &str,
        own: &Connections,
        defaults: &Connections,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut missing = Vec::new();
        let miradore = own
            .miradore
            .as_ref()
            .and_then(|c| resolve_miradore(c, defaults.miradore.as_ref(), &mut missing));
        let m3ter = own
            .m3ter
            .as_ref()
            .and_then(|c| resolve_m3ter(c, defaults.m3ter.as_ref(), &mut missing));
        let mailkit = own
            .mailkit
            .as_ref()
            .and_then(|c| resolve_mailkit(c, defaults.mailkit.as_ref(), &mut missing));
        if !missing.is_empty() {
            return Err(missing);
        }
        Ok(Self {
            id: Arc::from(id),
            miradore,
            m3ter,
            mailkit,
        })
    }

    pub fn has(&self, vendor: VendorKind) -> bool {
        match vendor {
            VendorKind::Miradore => self.miradore.is_some(),
            VendorKind::M3ter => self.m3ter.is_some(),
            VendorKind::Mailkit => self.mailkit.is_some(),
        }
    }
}

/// The m3ter hosts of an environment: empty or `prod` is production.
pub fn m3ter_hosts(environment: &str) -> (String, String) {
    if environment.is_empty() || environment == "prod" {
        ("api.m3ter.com".to_owned(), "ingest.m3ter.com".to_owned())
    } else {
        (
            format!("api.{environment}.m3ter.com"),
            format!("ingest.{environment}.m3ter.com"),
        )
    }
}

fn pick<'a>(own: &'a str, inherited: Option<&'a str>) -> &'a str {
    if own.is_empty() {
        inherited.unwrap_or("")
    } else {
        own
    }
}

fn pick_secret<'a>(own: &'a Option<Secret>, inherited: Option<&'a Secret>) -> Option<&'a Secret> {
    own.as_ref().or(inherited)
}

fn require<'a>(value: &'a str, field: &str, missing: &mut Vec<FieldViolation>) -> Option<&'a str> {
    if value.is_empty() {
        missing.push(FieldViolation::missing(field));
        None
    } else {
        Some(value)
    }
}

fn require_secret<'a>(
    value: Option<&'a Secret>,
    field: &str,
    missing: &mut Vec<FieldViolation>,
) -> Option<&'a Secret> {
    if value.is_none() {
        missing.push(FieldViolation::missing(field));
    }
    value
}

fn resolve_miradore(
    own: &MiradoreConn,
    d: Option<&MiradoreConn>,
    missing: &mut Vec<FieldViolation>,
) -> Option<MiradoreCreds> {
    let site = require(
        pick(&own.site, d.map(|d| d.site.as_str())),
        "miradore.site",
        missing,
    );
    let key = require_secret(
        pick_secret(&own.api_key, d.and_then(|d| d.api_key.as_ref())),
        "miradore.api_key",
        missing,
    );
    Some(MiradoreCreds {
        site: site?.to_owned(),
        api_key: key?.clone(),
    })
}

fn resolve_m3ter(
    own: &M3terConn,
    d: Option<&M3terConn>,
    missing: &mut Vec<FieldViolation>,
) -> Option<M3terCreds> {
    let key_id = require(
        pick(&own.access_key_id, d.map(|d| d.access_key_id.as_str())),
        "m3ter.access_key_id",
        missing,
    );
    let secret = require_secret(
        pick_secret(&own.api_secret, d.and_then(|d| d.api_secret.as_ref())),
        "m3ter.api_secret",
        missing,
    );
    let org = require(
        pick(&own.org_id, d.map(|d| d.org_id.as_str())),
        "m3ter.org_id",
        missing,
    );
    let environment = pick(&own.environment, d.map(|d| d.environment.as_str()));
    let (api_host, ingest_host) = m3ter_hosts(environment);
    Some(M3terCreds {
        access_key_id: key_id?.to_owned(),
        api_secret: secret?.clone(),
        org_id: org?.to_owned(),
        environment: if environment == "prod" {
            String::new()
        } else {
            environment.to_owned()
        },
        api_host,
        ingest_host,
    })
}

fn resolve_mailkit(
    own: &MailkitConn,
    d: Option<&MailkitConn>,
    missing: &mut Vec<FieldViolation>,
) -> Option<MailkitCreds> {
    let id = require(
        pick(&own.client_id, d.map(|d| d.client_id.as_str())),
        "mailkit.client_id",
        missing,
    );
    let md5 = require_secret(
        pick_secret(&own.client_md5, d.and_then(|d| d.client_md5.as_ref())),
        "mailkit.client_md5",
        missing,
    );
    Some(MailkitCreds {
        client_id: id?.to_owned(),
        client_md5: md5?.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Option<Secret> {
        Some(Secret::new(s))
    }

    #[test]
    fn blank_fields_inherit_partner_defaults() {
        let defaults = Connections {
            m3ter: Some(M3terConn {
                access_key_id: "partner-key".into(),
                api_secret: secret("partner-secret"),
                org_id: String::new(),
                environment: "staging".into(),
            }),
            ..Default::default()
        };
        let own = Connections {
            m3ter: Some(M3terConn {
                org_id: "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = EffectiveTenant::resolve("acme", &own, &defaults).unwrap();
        let m = t.m3ter.unwrap();
        assert_eq!(m.access_key_id, "partner-key");
        assert_eq!(m.api_secret.expose(), "partner-secret");
        assert_eq!(m.api_host, "api.staging.m3ter.com");
        assert_eq!(m.ingest_host, "ingest.staging.m3ter.com");
        assert!(t.miradore.is_none() && t.mailkit.is_none());
    }

    #[test]
    fn own_fields_win_and_prod_means_production() {
        let defaults = Connections {
            m3ter: Some(M3terConn {
                environment: "staging".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let own = Connections {
            m3ter: Some(M3terConn {
                access_key_id: "k".into(),
                api_secret: secret("s"),
                org_id: "o".into(),
                environment: "prod".into(),
            }),
            ..Default::default()
        };
        let m = EffectiveTenant::resolve("acme", &own, &defaults)
            .unwrap()
            .m3ter
            .unwrap();
        assert_eq!(m.api_host, "api.m3ter.com");
        assert_eq!(m.environment, "");
    }

    #[test]
    fn every_missing_field_is_named() {
        let own = Connections {
            miradore: Some(MiradoreConn::default()),
            mailkit: Some(MailkitConn {
                client_id: "123".into(),
                client_md5: None,
            }),
            ..Default::default()
        };
        let err = EffectiveTenant::resolve("acme", &own, &Connections::default()).unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["miradore.site", "miradore.api_key", "mailkit.client_md5"]
        );
    }
}
