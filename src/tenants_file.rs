//! `--tenants-file`: tenants declared in a YAML file, typically a mounted Kubernetes
//! Secret, applied at start-up and again whenever the declared state changes.
//!
//! The file is `{ partnerDefaults?: <connections>, tenants: [<tenant documents>] }`, the
//! documents being those of `sidekey tenants apply` (secrets inline or `valueFrom` a file or
//! an environment variable). Each apply is all or nothing (one store transaction): a file
//! that does not parse or validate is rejected whole with an error log line, and the state
//! before it stays in force.
//!
//! The file is re-read every poll interval rather than watched with inotify: Kubernetes
//! updates a mounted Secret by swapping a symlink, which a re-read by path always follows,
//! and a secret referenced with `valueFrom: { file }` can change without the file changing.
//!
//! Tenants the file declared before and no longer declares are deleted. The ids the file
//! last declared are kept in `<data-dir>/tenants-file.applied` (ids only, no secret), so a
//! removal made while sidekey was down is applied at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::control::convert::connections_in;
use crate::document::{PartnerDefaultsDoc, Sources, TenantDoc, kept_secrets};
use crate::tenants::{ApplyReport, Catalog, CatalogError, Declared, DeclaredTenant};

/// How often the file is re-read when no interval is configured.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// Name of the file in the data directory listing the ids the tenants file last declared.
pub const APPLIED_IDS_FILE: &str = "tenants-file.applied";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDoc {
    #[serde(default, alias = "partner_defaults")]
    partner_defaults: Option<PartnerDefaultsDoc>,
    #[serde(default)]
    tenants: Vec<TenantDoc>,
}

/// What the watcher has done so far; the error is the last rejection's reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantsFileStatus {
    /// Applies that changed something.
    pub applied: u64,
    /// Files (or file versions) rejected.
    pub rejected: u64,
    pub last_error: Option<String>,
}

/// The declaration `text` states (without `removed`), secrets read through `sources`.
fn parse_declared(path: &Path, text: &str, sources: &dyn Sources) -> Result<Declared, String> {
    let doc: FileDoc = serde_yaml_ng::from_str(text)
        .map_err(|e| format!("{} is not a valid tenants file: {e}", path.display()))?;
    let env = sources;
    // A fingerprint names a value without carrying it; a file has no stored value to keep.
    let refuse_kept = |prefix: &str, kept: Vec<(&str, &str)>| match kept.first() {
        Some((path, _)) => Err(format!(
            "{prefix}.{path}: only a fingerprint is given; give value or valueFrom"
        )),
        None => Ok(()),
    };
    let partner = doc
        .partner_defaults
        .map(|p| p.into_proto(env))
        .transpose()
        .map_err(|e| e.to_string())?;
    if let Some(p) = &partner {
        refuse_kept(
            "partnerDefaults",
            kept_secrets(&p.miradore, &p.m3ter, &p.mailkit),
        )?;
    }
    let partner = partner.map(|p| connections_in(&p.miradore, &p.m3ter, &p.mailkit));
    let mut tenants = Vec::with_capacity(doc.tenants.len());
    for t in doc.tenants {
        let id = t.id.clone();
        let t = t
            .into_proto(env)
            .map_err(|e| format!("tenants[{id}].{e}"))?;
        refuse_kept(
            &format!("tenants[{id}]"),
            kept_secrets(&t.miradore, &t.m3ter, &t.mailkit),
        )?;
        tenants.push(DeclaredTenant {
            connections: connections_in(&t.miradore, &t.m3ter, &t.mailkit),
            id: t.id,
            display_name: t.display_name,
        });
    }
    Ok(Declared {
        partner,
        tenants,
        removed: Vec::new(),
    })
}

enum Rejection {
    /// The file is wrong: reported once, retried only when it changes.
    Invalid(String),
    /// Something else failed: retried at the next poll.
    Transient(String),
}

fn explain(e: CatalogError) -> String {
    match e {
        CatalogError::Invalid(violations) => violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// The process environment, and files read from disk and remembered, so the next poll can
/// tell whether anything the declaration came from has changed.
#[derive(Default)]
struct RecordingSources {
    files: std::cell::RefCell<Vec<(PathBuf, String)>>,
}

impl Sources for RecordingSources {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn file(&self, path: &Path) -> std::io::Result<String> {
        let content = std::fs::read_to_string(path)?;
        self.files
            .borrow_mut()
            .push((path.to_owned(), content.clone()));
        Ok(content)
    }
}

/// What a declaration was made from: the tenants file's bytes and the secret files it
/// referenced (the environment does not change under a running process). Kept as a
/// SHA-256, never as the secrets themselves.
#[derive(Clone, PartialEq, Eq)]
struct Inputs {
    digest: [u8; 32],
    files: Vec<PathBuf>,
}

impl Inputs {
    fn of(text: &str, files: &[(PathBuf, String)]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(text.len() as u64).to_be_bytes());
        ctx.update(text.as_bytes());
        for (path, content) in files {
            let path = path.as_os_str().as_encoded_bytes();
            ctx.update(&(path.len() as u64).to_be_bytes());
            ctx.update(path);
            ctx.update(&(content.len() as u64).to_be_bytes());
            ctx.update(content.as_bytes());
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ctx.finish().as_ref());
        Self {
            digest,
            files: files.iter().map(|(p, _)| p.clone()).collect(),
        }
    }

    /// Whether `text` and the current content of the same secret files are what this
    /// digest was made from. A secret file that cannot be read now counts as a change.
    fn unchanged(&self, text: &str) -> bool {
        let mut files = Vec::with_capacity(self.files.len());
        for path in &self.files {
            match std::fs::read_to_string(path) {
                Ok(content) => files.push((path.clone(), content)),
                Err(_) => return false,
            }
        }
        Self::of(text, &files).digest == self.digest
    }
}

enum Seen {
    /// The file could not be read (reported once until it can be).
    Unreadable,
    /// The inputs of the declaration last applied or rejected.
    Read(Inputs),
}

/// Applies the tenants file and keeps applying it as it changes.
pub struct TenantsFile {
    path: PathBuf,
    applied_ids: PathBuf,
    catalog: Arc<Catalog>,
    /// What the last poll saw, so an unchanged file is neither parsed, re-applied nor
    /// re-reported every poll.
    last_seen: Option<Seen>,
    status: watch::Sender<TenantsFileStatus>,
}

impl TenantsFile {
    pub fn new(path: PathBuf, data_dir: &Path, catalog: Arc<Catalog>) -> Self {
        Self {
            path,
            applied_ids: data_dir.join(APPLIED_IDS_FILE),
            catalog,
            last_seen: None,
            status: watch::Sender::new(TenantsFileStatus::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<TenantsFileStatus> {
        self.status.subscribe()
    }

    /// Reads and applies the file once. At start-up an error here stops sidekey.
    pub async fn apply_now(&mut self) -> Result<Option<ApplyReport>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                // Reported once per outage, like any other rejection.
                let e = format!("cannot read {}: {e}", self.path.display());
                if matches!(self.last_seen, Some(Seen::Unreadable)) {
                    return Ok(None);
                }
                self.last_seen = Some(Seen::Unreadable);
                self.report(&Err(e.clone()));
                return Err(e);
            }
        };
        if let Some(Seen::Read(inputs)) = &self.last_seen
            && inputs.unchanged(&text)
        {
            return Ok(None);
        }
        let sources = RecordingSources::default();
        let declared = parse_declared(&self.path, &text, &sources);
        self.last_seen = Some(Seen::Read(Inputs::of(&text, &sources.files.borrow())));
        drop(text);
        let result = match declared {
            Ok(declared) => match self.apply(declared).await {
                Ok(report) => Ok(report),
                Err(Rejection::Invalid(e)) => Err(e),
                Err(Rejection::Transient(e)) => {
                    // Not the file's fault (a concurrent write, the store): try it again at
                    // the next poll.
                    self.last_seen = None;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        self.report(&result);
        result.map(Some)
    }

    fn report(&self, result: &Result<ApplyReport, String>) {
        match result {
            Ok(report) => {
                metrics::counter!("sidekey_tenants_file_applies_total", "outcome" => "applied")
                    .increment(1);
                tracing::info!(path = %self.path.display(), created = report.created,
                    updated = report.updated, deleted = report.deleted,
                    unchanged = report.unchanged, partner_changed = report.partner_changed,
                    "tenants file applied");
                self.status.send_modify(|s| {
                    s.applied += 1;
                    s.last_error = None;
                });
            }
            Err(e) => {
                metrics::counter!("sidekey_tenants_file_applies_total", "outcome" => "rejected")
                    .increment(1);
                tracing::error!(path = %self.path.display(), error = %e,
                    "tenants file rejected; the previous state stays in force");
                self.status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_error = Some(e.clone());
                });
            }
        }
    }

    async fn apply(&self, mut declared: Declared) -> Result<ApplyReport, Rejection> {
        let previous = self.read_applied_ids();
        declared.removed = previous
            .into_iter()
            .filter(|id| !declared.tenants.iter().any(|t| &t.id == id))
            .collect();
        let ids: Vec<String> = declared.tenants.iter().map(|t| t.id.clone()).collect();
        let report = self
            .catalog
            .apply_declared(declared)
            .await
            .map_err(|e| match e {
                CatalogError::Invalid(_) => Rejection::Invalid(explain(e)),
                other => Rejection::Transient(explain(other)),
            })?;
        self.write_applied_ids(&ids).map_err(Rejection::Transient)?;
        Ok(report)
    }

    fn read_applied_ids(&self) -> Vec<String> {
        match std::fs::read_to_string(&self.applied_ids) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %self.applied_ids.display(), error = %e,
                    "ignoring an unreadable list of previously declared tenants");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Written to a temporary file and renamed over the old one, so it is never half written.
    fn write_applied_ids(&self, ids: &[String]) -> Result<(), String> {
        let tmp = self.applied_ids.with_extension("applied.tmp");
        let text = serde_json::to_string(ids).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.applied_ids))
            .map_err(|e| {
                format!(
                    "applied, but cannot record the declared ids in {}: {e}",
                    self.applied_ids.display()
                )
            })
    }

    /// Re-reads the file every `poll` until `stop` resolves.
    pub async fn watch(mut self, poll: Duration, stop: impl std::future::Future<Output = ()>) {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    // Errors are logged and counted by apply_now; the loop goes on.
                    let _ = self.apply_now().await;
                }
                () = &mut stop => break,
            }
        }
    }
}
