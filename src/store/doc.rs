//! The records as stored, by every backend: serde_json of these `*Doc` structs, which mirror
//! the model with each secret replaced by its sealed string (see [`crate::store::sealing`]),
//! so the plain value never reaches the encoder. The whole document is then sealed as a
//! record ([`crate::store::record`]; for etcd, [`crate::store::codec`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::model::{
    Connections, M3terConn, MailkitConn, MiradoreConn, PartnerRecord, TenantRecord,
};
use crate::secret::Secret;
use crate::store::StoreError;
use crate::store::master_key::{KeyId, MasterKeys};
use crate::store::sealing::{self, SealError};

/// Sealing errors name the place and key id, never the value, so they pass through as is.
pub(crate) fn seal_error(e: SealError) -> StoreError {
    match e {
        SealError::Random => StoreError::Backend(e.to_string()),
        other => StoreError::Key(other.to_string()),
    }
}

pub(crate) const PARTNER_PLACE: &str = "partner";

pub(crate) fn tenant_place(id: &str) -> String {
    format!("tenant/{id}")
}

#[derive(Serialize, Deserialize)]
pub(crate) struct TenantDoc {
    id: String,
    display_name: String,
    pub(crate) connections: ConnectionsDoc,
    pub(crate) revision: u64,
    create_time: TimeDoc,
    update_time: TimeDoc,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct PartnerDoc {
    pub(crate) connections: ConnectionsDoc,
    pub(crate) revision: u64,
    update_time: Option<TimeDoc>,
}

/// Each `Option<String>` secret below holds a sealed value (see [`sealing`]), never a plain one.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct ConnectionsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    miradore: Option<MiradoreDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m3ter: Option<M3terDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mailkit: Option<MailkitDoc>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MiradoreDoc {
    site: String,
    api_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct M3terDoc {
    access_key_id: String,
    api_secret: Option<String>,
    org_id: String,
    environment: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct MailkitDoc {
    client_id: String,
    client_md5: Option<String>,
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize)]
pub(crate) struct TimeDoc {
    secs: u64,
    nanos: u32,
}

impl TimeDoc {
    pub(crate) fn from_time(t: SystemTime) -> Result<Self, StoreError> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| StoreError::Backend("a record time is before 1970".into()))?;
        Ok(Self {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        })
    }

    pub(crate) fn to_time(&self) -> Result<SystemTime, StoreError> {
        let bad = || StoreError::Backend("a stored time is out of range: corrupted".into());
        // Duration::new panics when nanos carry past u64::MAX seconds.
        if self.nanos >= 1_000_000_000 {
            return Err(bad());
        }
        UNIX_EPOCH
            .checked_add(Duration::new(self.secs, self.nanos))
            .ok_or_else(bad)
    }
}

impl TenantDoc {
    pub(crate) fn seal(keys: &MasterKeys, r: &TenantRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id.clone(),
            display_name: r.display_name.clone(),
            connections: ConnectionsDoc::seal(keys, &tenant_place(&r.id), &r.connections)?,
            revision: r.revision,
            create_time: TimeDoc::from_time(r.create_time)?,
            update_time: TimeDoc::from_time(r.update_time)?,
        })
    }

    /// `key` is the table key the record was read under; the secrets are opened for that
    /// place, so a record moved under another id fails to open.
    pub(crate) fn open(self, keys: &MasterKeys, key: &str) -> Result<TenantRecord, StoreError> {
        if self.id != key {
            return Err(StoreError::Backend(format!(
                "the record stored under tenant {key:?} names tenant {:?}: corrupted",
                self.id
            )));
        }
        Ok(TenantRecord {
            connections: self.connections.open(keys, &tenant_place(key))?,
            create_time: self.create_time.to_time()?,
            update_time: self.update_time.to_time()?,
            id: self.id,
            display_name: self.display_name,
            revision: self.revision,
        })
    }
}

impl PartnerDoc {
    pub(crate) fn seal(keys: &MasterKeys, r: &PartnerRecord) -> Result<Self, StoreError> {
        Ok(Self {
            connections: ConnectionsDoc::seal(keys, PARTNER_PLACE, &r.connections)?,
            revision: r.revision,
            update_time: r.update_time.map(TimeDoc::from_time).transpose()?,
        })
    }

    pub(crate) fn open(self, keys: &MasterKeys) -> Result<PartnerRecord, StoreError> {
        Ok(PartnerRecord {
            connections: self.connections.open(keys, PARTNER_PLACE)?,
            revision: self.revision,
            update_time: self
                .update_time
                .as_ref()
                .map(TimeDoc::to_time)
                .transpose()?,
        })
    }
}

impl ConnectionsDoc {
    pub(crate) fn seal(
        keys: &MasterKeys,
        owner: &str,
        c: &Connections,
    ) -> Result<Self, StoreError> {
        let seal = |field: &str, s: &Option<Secret>| -> Result<Option<String>, StoreError> {
            s.as_ref()
                .map(|s| {
                    sealing::seal(keys, &format!("{owner}/{field}"), s.expose().as_bytes())
                        .map_err(seal_error)
                })
                .transpose()
        };
        Ok(Self {
            miradore: c
                .miradore
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreDoc {
                        site: m.site.clone(),
                        api_key: seal("miradore.api_key", &m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: c
                .m3ter
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terDoc {
                        access_key_id: m.access_key_id.clone(),
                        api_secret: seal("m3ter.api_secret", &m.api_secret)?,
                        org_id: m.org_id.clone(),
                        environment: m.environment.clone(),
                    })
                })
                .transpose()?,
            mailkit: c
                .mailkit
                .as_ref()
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitDoc {
                        client_id: m.client_id.clone(),
                        client_md5: seal("mailkit.client_md5", &m.client_md5)?,
                    })
                })
                .transpose()?,
        })
    }

    pub(crate) fn open(self, keys: &MasterKeys, owner: &str) -> Result<Connections, StoreError> {
        let open = |field: &str, s: Option<String>| -> Result<Option<Secret>, StoreError> {
            s.map(|s| open_secret(keys, &format!("{owner}/{field}"), &s))
                .transpose()
        };
        Ok(Connections {
            miradore: self
                .miradore
                .map(|m| -> Result<_, StoreError> {
                    Ok(MiradoreConn {
                        site: m.site,
                        api_key: open("miradore.api_key", m.api_key)?,
                    })
                })
                .transpose()?,
            m3ter: self
                .m3ter
                .map(|m| -> Result<_, StoreError> {
                    Ok(M3terConn {
                        access_key_id: m.access_key_id,
                        api_secret: open("m3ter.api_secret", m.api_secret)?,
                        org_id: m.org_id,
                        environment: m.environment,
                    })
                })
                .transpose()?,
            mailkit: self
                .mailkit
                .map(|m| -> Result<_, StoreError> {
                    Ok(MailkitConn {
                        client_id: m.client_id,
                        client_md5: open("mailkit.client_md5", m.client_md5)?,
                    })
                })
                .transpose()?,
        })
    }

    /// The sealed secrets with their field paths, for rotation.
    pub(crate) fn sealed_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        let mut out = Vec::new();
        if let Some(s) = self.miradore.as_mut().and_then(|m| m.api_key.as_mut()) {
            out.push(("miradore.api_key", s));
        }
        if let Some(s) = self.m3ter.as_mut().and_then(|m| m.api_secret.as_mut()) {
            out.push(("m3ter.api_secret", s));
        }
        if let Some(s) = self.mailkit.as_mut().and_then(|m| m.client_md5.as_mut()) {
            out.push(("mailkit.client_md5", s));
        }
        out
    }

    /// Re-seals under the active key each secret an older key sealed; returns how many.
    pub(crate) fn reseal(
        &mut self,
        keys: &MasterKeys,
        owner: &str,
        old_ids: &mut Vec<KeyId>,
    ) -> Result<usize, StoreError> {
        let active = keys.active().id();
        let mut count = 0;
        for (field, sealed) in self.sealed_mut() {
            let place = format!("{owner}/{field}");
            let id = sealing::key_id(sealed).ok_or_else(|| {
                seal_error(SealError::Malformed {
                    place: place.clone(),
                })
            })?;
            if id == active {
                continue;
            }
            let plain = sealing::open(keys, &place, sealed).map_err(seal_error)?;
            *sealed = sealing::seal(keys, &place, &plain).map_err(seal_error)?;
            old_ids.push(id);
            count += 1;
        }
        Ok(count)
    }
}

fn open_secret(keys: &MasterKeys, place: &str, sealed: &str) -> Result<Secret, StoreError> {
    let mut plain = sealing::open(keys, place, sealed).map_err(seal_error)?;
    // Moved, not copied, into the Secret, so no unzeroed copy is left behind.
    match String::from_utf8(std::mem::take(&mut *plain)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(StoreError::Key(format!(
                "the secret at {place} is not UTF-8 after opening: corrupted"
            )))
        }
    }
}
