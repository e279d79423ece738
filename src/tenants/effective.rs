//! A tenant's effective credentials: its connections with blank fields filled from the
//! partner defaults. This is what the data plane injects and what `TestTenant` uses.

use std::sync::Arc;

use super::model::{
    Connection, Connections, FieldMut, FieldRef, M3terConn, MailkitConn, MiradoreConn, VendorKind,
};
use super::validate::FieldViolation;
use crate::secret::{CredentialKey, Secret};

#[derive(Clone, Debug)]
pub struct MiradoreCreds {
    pub site: String,
    pub api_key: Secret,
}

/// Made with [`M3terCreds::new`] and not changed after: the token key is derived from the
/// API host, the access key ID and the secret when it is made.
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
    /// Keys the bearer token cache: computed here, when the snapshot is built, not per
    /// request.
    token_key: CredentialKey,
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
        let miradore = resolve(&own.miradore, &defaults.miradore, &mut missing)
            .and_then(MiradoreCreds::from_resolved);
        let m3ter =
            resolve(&own.m3ter, &defaults.m3ter, &mut missing).and_then(M3terCreds::from_resolved);
        let mailkit = resolve(&own.mailkit, &defaults.mailkit, &mut missing)
            .and_then(MailkitCreds::from_resolved);
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
fn m3ter_hosts(environment: &str) -> (String, String) {
    if environment.is_empty() || environment == "prod" {
        ("api.m3ter.com".to_owned(), "ingest.m3ter.com".to_owned())
    } else {
        (
            format!("api.{environment}.m3ter.com"),
            format!("ingest.{environment}.m3ter.com"),
        )
    }
}

/// `own` with every blank field filled from `defaults`, following the vendor's declared
/// fields ([`Connection::FIELDS`]); `None` when the tenant does not use the vendor or when
/// a required field is blank in both (each such field is added to `missing`, by its path).
fn resolve<C: Connection>(
    own: &Option<C>,
    defaults: &Option<C>,
    missing: &mut Vec<FieldViolation>,
) -> Option<C> {
    let mut conn = own.clone()?;
    let mut complete = true;
    for field in C::FIELDS {
        if (field.get)(&conn).is_blank() {
            match (
                defaults.as_ref().map(|d| (field.get)(d)),
                (field.get_mut)(&mut conn),
            ) {
                (Some(FieldRef::Text(d)), FieldMut::Text(v)) => d.clone_into(v),
                (Some(FieldRef::Secret(d)), FieldMut::Secret(v)) => v.clone_from(d),
                _ => {}
            }
        }
        if field.required && (field.get)(&conn).is_blank() {
            missing.push(FieldViolation::missing(&format!(
                "{}.{}",
                C::VENDOR.as_str(),
                field.name
            )));
            complete = false;
        }
    }
    complete.then_some(conn)
}

// The typed credentials of each vendor, from a connection [`resolve`] returned (its required
// secrets are set, so `None` does not happen).

impl MiradoreCreds {
    fn from_resolved(c: MiradoreConn) -> Option<Self> {
        Some(Self {
            site: c.site,
            api_key: c.api_key?,
        })
    }
}

impl M3terCreds {
    /// `environment` `prod` is the same as empty (production).
    pub fn new(
        access_key_id: String,
        api_secret: Secret,
        org_id: String,
        environment: String,
    ) -> Self {
        let (api_host, ingest_host) = m3ter_hosts(&environment);
        let token_key = CredentialKey::of(&[&api_host, &access_key_id], &api_secret);
        Self {
            access_key_id,
            api_secret,
            org_id,
            environment: if environment == "prod" {
                String::new()
            } else {
                environment
            },
            api_host,
            ingest_host,
            token_key,
        }
    }

    fn from_resolved(c: M3terConn) -> Option<Self> {
        Some(Self::new(
            c.access_key_id,
            c.api_secret?,
            c.org_id,
            c.environment,
        ))
    }

    /// Identifies the credential a bearer token is issued for (API host, access key id,
    /// secret): two tenants with the same credential share a token.
    pub fn token_key(&self) -> CredentialKey {
        self.token_key
    }
}

impl MailkitCreds {
    fn from_resolved(c: MailkitConn) -> Option<Self> {
        Some(Self {
            client_id: c.client_id,
            client_md5: c.client_md5?,
        })
    }
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
