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
//! Each poll first stats the file and the secret files it references; only when one of them
//! changed are they read (on the blocking pool, size-capped) and hashed.
//!
//! A file being written is never applied half-way: a version is applied only once every
//! file it was read from had gone unmodified for [`QUIET_PERIOD`] when it was read (a
//! writer moves the modification time with each write, before its bytes can be read), or
//! else once two reads one poll apart found the same content. At start-up a version not yet
//! quiet is read again as soon as it can be, so start-up waits at most about a second for a
//! file written just before it. An empty declaration must be explicit (`tenants: []`): an
//! empty file, a comment, or `tenants:` alone is refused.
//!
//! Tenants the file declared before and no longer declares are deleted, but a version that
//! would delete more than `max_delete_percent` of them at once (more than one tenant) is
//! refused: that is a truncated or mistaken file far more often than an intent. The ids the
//! file last declared are kept in `<data-dir>/tenants-file.applied` (ids only, no secret), so
//! a removal made while sidekey was down is applied at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::watch;

use crate::control::convert::connections_in;
use crate::document::{
    MAX_DOCUMENT_BYTES, MAX_SECRET_FILE_BYTES, PartnerDefaultsDoc, READ_DEADLINE, Sources,
    TenantDoc, kept_secrets, read_regular_file,
};
use crate::tenants::{ApplyReport, Catalog, CatalogError, Declared, DeclaredTenant};

/// How often the file is re-read when no interval is configured.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// `--tenants-file-interval`: a duration in humantime's syntax (`5s`, `500ms`), above zero.
/// Zero would re-read the file without pause, and tokio's interval refuses it with a panic,
/// which would end the watch while sidekey kept serving the version it had.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval.is_zero() {
        return Err("must be above 0".to_owned());
    }
    Ok(interval)
}

/// Largest share of the previously declared tenants, in percent, one version of the file may
/// delete when no other share is configured (`--tenants-file-max-delete`). Deleting a
/// single tenant is always allowed.
pub const DEFAULT_MAX_DELETE_PERCENT: u8 = 50;

/// At start-up, for how many poll intervals the file may keep changing before sidekey
/// gives up.
const START_ATTEMPTS: u32 = 10;

/// How long every file a version is read from must have gone unmodified for that version
/// to be applied at its first read (or the poll interval, if shorter). A writer pausing
/// longer than this half-way through a file is the case the deletion guard still covers.
pub const QUIET_PERIOD: Duration = Duration::from_secs(1);

/// Name of the file in the data directory listing the ids the tenants file last declared.
pub const APPLIED_IDS_FILE: &str = "tenants-file.applied";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDoc {
    #[serde(default, alias = "partner_defaults")]
    partner_defaults: Option<PartnerDefaultsDoc>,
    /// Required, even when empty: `tenants: []`. An absent or null list is refused, so that
    /// a truncated file cannot read as "no tenants".
    #[serde(default)]
    tenants: Option<Vec<TenantDoc>>,
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
    let doc: FileDoc = crate::document::parse_yaml(text)
        .map_err(|e| format!("{} is not a valid tenants file: {e}", path.display()))?;
    let Some(declared_tenants) = doc.tenants else {
        return Err(format!(
            "{}: tenants is missing or empty; to declare no tenants, write `tenants: []`",
            path.display()
        ));
    };
    let env = sources;
    // A fingerprint names a value without carrying it; a file has no stored value to keep.
    let refuse_kept = |prefix: &str, kept: Vec<(String, &str)>| match kept.first() {
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
        refuse_kept("partnerDefaults", kept_secrets(p.into()))?;
    }
    let partner = partner.map(|p| connections_in((&p).into()));
    let mut tenants = Vec::with_capacity(declared_tenants.len());
    for (index, t) in declared_tenants.into_iter().enumerate() {
        let at = crate::tenants::validate::declared_tenant_path(index, &t.id);
        let t = t.into_proto(env).map_err(|e| format!("{at}.{e}"))?;
        refuse_kept(&at, kept_secrets((&t).into()))?;
        tenants.push(DeclaredTenant {
            connections: connections_in((&t).into()),
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

/// The process environment, and files read from disk (size-capped, regular files only) and
/// remembered, so the next poll can tell whether anything the declaration came from has
/// changed.
#[derive(Default)]
struct RecordingSources {
    files: std::cell::RefCell<Vec<(PathBuf, Option<Stamp>, String)>>,
}

impl Sources for RecordingSources {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn file(&self, path: &Path) -> std::io::Result<String> {
        // Stamped before the read: a change during the read shows at the next poll. A file
        // that cannot be read is recorded too (with no stamp, so it is read again at every
        // poll): its appearance is a change.
        let stamp = Stamp::of(path);
        let result = read_regular_file(path, MAX_SECRET_FILE_BYTES);
        let (stamp, content) = match &result {
            Ok(content) => (stamp, content.clone()),
            Err(_) => (None, String::new()),
        };
        self.files
            .borrow_mut()
            .push((path.to_owned(), stamp, content));
        result
    }
}

/// What `stat` says of a file (symlinks followed): if none of it changed, the content has
/// not either, and the file need not be read and hashed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// When the file's content was last modified.
    fn modified(&self) -> Option<SystemTime> {
        let ns = u64::try_from(self.mtime_ns).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_nanos(ns))
    }

    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// One read of the file: the declaration it states, what it was made from, and the stamps
/// of the files read.
struct Reading {
    declared: Result<Declared, String>,
    /// SHA-256 of the file's bytes and of every secret file it referenced (never the
    /// secrets themselves).
    digest: [u8; 32],
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    /// The latest modification time of the files read, if each of them was stat'ed the same
    /// before and after its read (so no write landed during it): nothing read can be newer.
    last_modified: Option<SystemTime>,
}

impl Reading {
    /// Whether no file it was read from was modified in the `quiet` before `now`. A
    /// modification time in the future (a skewed clock) is not quiet.
    fn quiet_for(&self, quiet: Duration, now: SystemTime) -> bool {
        self.last_modified
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age >= quiet)
    }
}

fn digest_of(text: &str, files: &[(PathBuf, Option<Stamp>, String)]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(text.len() as u64).to_be_bytes());
    ctx.update(text.as_bytes());
    for (path, _, content) in files {
        let path = path.as_os_str().as_encoded_bytes();
        ctx.update(&(path.len() as u64).to_be_bytes());
        ctx.update(path);
        ctx.update(&(content.len() as u64).to_be_bytes());
        ctx.update(content.as_bytes());
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ctx.finish().as_ref());
    digest
}

/// Reads and parses the file and its secret files. Blocking: run on the blocking pool.
fn read(path: &Path) -> Result<Reading, String> {
    let stamp = Stamp::of(path);
    let text = read_regular_file(path, MAX_DOCUMENT_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sources = RecordingSources::default();
    let declared = parse_declared(path, &text, &sources);
    let files = sources.files.into_inner();
    let digest = digest_of(&text, &files);
    let mut stamps = vec![(path.to_owned(), stamp)];
    stamps.extend(files.into_iter().map(|(p, s, _)| (p, s)));
    // Stat'ed again after every read: a write bumps the modification time before its bytes
    // can be read, so a file stat'ed the same on both sides was read whole as of that time.
    let last_modified = stamps
        .iter()
        .map(|(p, before)| match before {
            Some(before) if Stamp::of(p).as_ref() == Some(before) => before.modified(),
            _ => None,
        })
        .try_fold(UNIX_EPOCH, |latest, t| t.map(|t| latest.max(t)));
    Ok(Reading {
        declared,
        digest,
        stamps,
        last_modified,
    })
}

/// `sidekey_tenants_file_applies_total{outcome}`: versions applied or rejected.
pub const METRIC_APPLIES: &str = "sidekey_tenants_file_applies_total";

/// Registers the help text of [`METRIC_APPLIES`].
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_APPLIES,
        "Tenants-file versions applied or rejected (the start-up apply included), by outcome"
    );
}

/// Where the watcher stands after a poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Nothing new: the version in force (applied or rejected) is still the file's.
    Unchanged,
    /// A new version was read; it is applied at the next poll if it is still the same.
    Settling,
    /// A settled version was applied.
    Applied(ApplyReport),
    /// A settled version was rejected, or the file could not be read; the state before it
    /// stays in force.
    Rejected(String),
}

/// Applies the tenants file and keeps applying it as it changes.
pub struct TenantsFile {
    path: PathBuf,
    applied_ids: PathBuf,
    catalog: Arc<Catalog>,
    max_delete_percent: u8,
    /// The stamps of the files last read, so that an unchanged file is not read again.
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    /// The digest of the version last applied or rejected: not applied or reported again.
    settled: Option<[u8; 32]>,
    /// The digest of a version read once, waiting for a second read to confirm it.
    pending: Option<[u8; 32]>,
    /// How long every file a version is read from must have gone unmodified for that
    /// version to be applied at its first read; otherwise a second read confirms it.
    quiet: Duration,
    /// The last poll could not read the file (reported once until it can).
    unreadable: bool,
    status: watch::Sender<TenantsFileStatus>,
    /// [`METRIC_APPLIES`] by outcome, registered when the watcher is made so that both are
    /// exported (at 0) before the first apply.
    applied: metrics::Counter,
    rejected: metrics::Counter,
}

impl TenantsFile {
    pub fn new(path: PathBuf, data_dir: &Path, catalog: Arc<Catalog>) -> Self {
        Self {
            path,
            applied_ids: data_dir.join(APPLIED_IDS_FILE),
            catalog,
            max_delete_percent: DEFAULT_MAX_DELETE_PERCENT,
            stamps: Vec::new(),
            settled: None,
            pending: None,
            quiet: QUIET_PERIOD,
            unreadable: false,
            status: watch::Sender::new(TenantsFileStatus::default()),
            applied: metrics::counter!(METRIC_APPLIES, "outcome" => "applied"),
            rejected: metrics::counter!(METRIC_APPLIES, "outcome" => "rejected"),
        }
    }

    /// Largest share (percent, 0-100) of the previously declared tenants one version may
    /// delete; more than one tenant beyond it is refused. Default [`DEFAULT_MAX_DELETE_PERCENT`].
    pub fn max_delete_percent(mut self, percent: u8) -> Self {
        self.max_delete_percent = percent.min(100);
        self
    }

    /// How long the files must have gone unmodified for a version to be applied at its
    /// first read (default [`QUIET_PERIOD`]).
    pub fn quiet_period(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    pub fn status(&self) -> watch::Receiver<TenantsFileStatus> {
        self.status.subscribe()
    }

    /// Applies the file at start-up: reads it until a version has settled (unmodified for
    /// the quiet period, or two equal reads) and is applied or rejected, every quiet period
    /// or `poll` if shorter. An error here, or a file still changing after
    /// [`START_ATTEMPTS`] polls' time, stops sidekey.
    pub async fn apply_at_start(&mut self, poll: Duration) -> Result<Option<ApplyReport>, String> {
        let patience = poll.saturating_mul(START_ATTEMPTS);
        // `None`: an interval so long that giving up would come after the end of time.
        let give_up = tokio::time::Instant::now().checked_add(patience);
        loop {
            match self.poll().await {
                Poll::Applied(report) => return Ok(Some(report)),
                Poll::Rejected(e) => return Err(e),
                Poll::Unchanged => return Ok(None),
                Poll::Settling => {}
            }
            let next = tokio::time::Instant::now() + self.quiet.min(poll);
            if give_up.is_some_and(|give_up| next > give_up) {
                return Err(format!(
                    "{} kept changing for {patience:?}; it is applied once it has gone unmodified for {:?}",
                    self.path.display(),
                    self.quiet.min(poll),
                ));
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// One poll: stat, read if anything changed, apply a version read twice the same.
    pub async fn poll(&mut self) -> Poll {
        if self.pending.is_none()
            && self.settled.is_some()
            && !self.stamps.is_empty()
            && self
                .stamps
                .iter()
                .all(|(p, s)| s.is_some() && Stamp::of(p) == *s)
        {
            return Poll::Unchanged;
        }
        let path = self.path.clone();
        let job = tokio::task::spawn_blocking(move || read(&path));
        let reading = match tokio::time::timeout(READ_DEADLINE, job).await {
            Ok(Ok(Ok(reading))) => reading,
            Ok(Ok(Err(e))) => return self.unreadable(e),
            Ok(Err(e)) => {
                return self.unreadable(format!("reading {} failed: {e}", self.path.display()));
            }
            Err(_) => {
                return self.unreadable(format!(
                    "reading {} and its secret files took longer than {READ_DEADLINE:?}",
                    self.path.display()
                ));
            }
        };
        self.unreadable = false;
        let quiet = reading.quiet_for(self.quiet, SystemTime::now());
        self.stamps = reading.stamps;
        if self.settled == Some(reading.digest) {
            self.pending = None;
            return Poll::Unchanged;
        }
        if self.pending != Some(reading.digest) && !quiet {
            // First sight of a version modified within the quiet period: it may be half
            // written. Apply it only if the next poll reads the same.
            self.pending = Some(reading.digest);
            return Poll::Settling;
        }
        self.pending = None;
        self.settled = Some(reading.digest);
        let result = match reading.declared {
            Ok(declared) => match self.apply(declared).await {
                Ok(report) => Ok(report),
                Err(Rejection::Invalid(e)) => Err(e),
                Err(Rejection::Transient(e)) => {
                    // Not the file's fault (a concurrent write, the store): the same version
                    // is tried again at the next poll.
                    self.settled = None;
                    self.pending = Some(reading.digest);
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        self.report(&result);
        match result {
            Ok(report) => Poll::Applied(report),
            Err(e) => Poll::Rejected(e),
        }
    }

    /// The file cannot be read: reported once per outage, like any other rejection; the
    /// next readable version is read afresh.
    fn unreadable(&mut self, e: String) -> Poll {
        self.stamps.clear();
        self.pending = None;
        self.settled = None;
        if !self.unreadable {
            self.unreadable = true;
            self.report(&Err(e.clone()));
        }
        Poll::Rejected(e)
    }

    fn report(&self, result: &Result<ApplyReport, String>) {
        match result {
            Ok(report) => {
                self.applied.increment(1);
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
                self.rejected.increment(1);
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
        let before = previous.len();
        declared.removed = previous
            .into_iter()
            .filter(|id| !declared.tenants.iter().any(|t| &t.id == id))
            .collect();
        let removed = declared.removed.len();
        if removed > 1 && removed * 100 > before * usize::from(self.max_delete_percent) {
            return Err(Rejection::Invalid(format!(
                "this version would delete {removed} of the {before} tenants the file declared, more than {}%; \
                 if that is intended, allow it with --tenants-file-max-delete (SIDEKEY_TENANTS_FILE_MAX_DELETE)",
                self.max_delete_percent
            )));
        }
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

    /// Re-reads the file every `poll` (above zero: [`parse_interval`]) until `stop` resolves.
    pub async fn watch(mut self, poll: Duration, stop: impl std::future::Future<Output = ()>) {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; start-up has just polled.
        ticks.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    // Rejections are logged and counted by poll; the loop goes on.
                    let _ = self.poll().await;
                }
                () = &mut stop => break,
            }
        }
    }
}
