//! `sidekey store copy`: every tenant and the partner defaults of one store written into
//! another (typically an embedded store moved into etcd for fleet mode), through the
//! [`Store`] trait, so records are opened and sealed again in memory only and no plaintext
//! ever reaches a disk.
//!
//! The copy refuses, before writing anything, when the destination already holds a tenant
//! (or written partner defaults) that the source has too, unless `overwrite` is set; then
//! those records are replaced, compared on their revision so that a concurrent write makes
//! the copy stop rather than be lost. Writes go in batches of at most `batch` records (etcd's
//! per-transaction limit): each batch is atomic, the copy as a whole is not; running it again
//! after a failure with `overwrite` completes it.

use std::collections::HashMap;

use super::{Expect, Mutation, Store, StoreError};

/// What a copy wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub created: usize,
    pub replaced: usize,
    pub partner: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "the destination already has {} of the tenants to copy ({}); nothing was written. \
         Give --overwrite to replace them",
        ids.len(),
        names(ids)
    )]
    Exists { ids: Vec<String> },
    #[error("reading the source store: {0}")]
    Source(StoreError),
    #[error("reading the destination store: {0}")]
    Destination(StoreError),
    #[error(
        "writing to the destination failed after {written} of {total} records were copied: \
         {error}. Run the copy again with --overwrite to complete it"
    )]
    Write {
        written: usize,
        total: usize,
        error: StoreError,
    },
}

fn names(ids: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = ids[..ids.len().min(SHOWN)].join(", ");
    if ids.len() > SHOWN {
        s.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    s
}

/// Copies everything `from` holds into `to`, `batch` records per transaction.
pub async fn copy(
    from: &dyn Store,
    to: &dyn Store,
    overwrite: bool,
    batch: usize,
) -> Result<CopyReport, CopyError> {
    let source = from.load().await.map_err(CopyError::Source)?;
    let target = to.load().await.map_err(CopyError::Destination)?;
    let existing: HashMap<&str, u64> = target
        .tenants
        .iter()
        .map(|t| (t.id.as_str(), t.revision))
        .collect();

    let mut report = CopyReport::default();
    let mut writes = Vec::with_capacity(source.tenants.len() + 1);
    let mut clashes = Vec::new();
    let partner_written = source.partner.update_time.is_some() || source.partner.revision > 0;
    if partner_written {
        let expect = match target.partner.revision {
            0 => Expect::Absent,
            r if overwrite => Expect::Revision(r),
            _ => {
                clashes.push("(partner defaults)".to_owned());
                Expect::Absent
            }
        };
        report.partner = true;
        writes.push((Mutation::PutPartner(source.partner.clone()), expect));
    }
    for tenant in source.tenants {
        let expect = match existing.get(tenant.id.as_str()) {
            None => {
                report.created += 1;
                Expect::Absent
            }
            Some(&r) if overwrite => {
                report.replaced += 1;
                Expect::Revision(r)
            }
            Some(_) => {
                clashes.push(tenant.id.clone());
                continue;
            }
        };
        writes.push((Mutation::PutTenant(tenant), expect));
    }
    if !clashes.is_empty() {
        return Err(CopyError::Exists { ids: clashes });
    }

    let total = writes.len();
    let mut written = 0;
    let mut rest = writes.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<_> = rest.by_ref().take(batch.max(1)).collect();
        let n = chunk.len();
        to.commit_batch(chunk)
            .await
            .map_err(|error| CopyError::Write {
                written,
                total,
                error,
            })?;
        written += n;
    }
    Ok(report)
}
