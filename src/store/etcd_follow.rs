//! Following etcd: after the first load, one watch on the prefix from the loaded revision,
//! each event opened (one record, not the whole store) and handed to the catalog in revision
//! order as a [`StoreEvent`].
//!
//! - Compaction: when etcd has compacted past the revision followed (the watch answers with
//!   a `compact_revision`), or its revision went back (a cluster restored from a backup), the
//!   follower loads everything again and hands over a [`StoreEvent::Reloaded`].
//! - Outages: a broken watch (etcd down, or a keep-alive ping unanswered) marks the
//!   store disconnected ([`super::etcd_conn::Link`]) and is re-established with jittered
//!   exponential backoff, [`BACKOFF_MIN`] to [`BACKOFF_MAX`]. It resumes from the last
//!   revision seen, so every change made meanwhile is caught up.
//! - The raw sealed values seen are mirrored in memory and written to the snapshot cache at
//!   most once per [`CACHE_DELAY`], so the cache only ever holds states etcd sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::sync::mpsc;

use super::etcd_cache::SnapshotCache;
use super::etcd_conn::{Decoded, KeyKind, Shared, etcd_error};
use super::etcd_mirror::Mirror;
use super::{Change, StoreError, StoreEvent};
use crate::model::PartnerRecord;

/// First wait before re-dialling etcd; doubled per failure up to [`BACKOFF_MAX`], each wait
/// drawn at random from its upper half so that a fleet does not reconnect in step.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Changes are written to the snapshot cache at most this often: each write is the whole
/// snapshot (about 1 KiB per tenant), so a burst of changes costs one write per interval.
pub const CACHE_DELAY: Duration = Duration::from_secs(5);

type SharedMirror = Arc<Mutex<Mirror>>;

fn lock(mirror: &SharedMirror) -> std::sync::MutexGuard<'_, Mirror> {
    mirror
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why one watch session ended.
enum End {
    /// The catalog dropped its receiver: stop.
    Closed,
    /// Reload everything, then watch again at once.
    Reload,
}

/// Follows etcd until `tx` is closed. `from` is what the last load read (from etcd or from
/// the cache); without it the follower loads first.
pub(crate) async fn run(
    shared: Arc<Shared>,
    from: Option<Mirror>,
    cache: Option<SnapshotCache>,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut need_load = from.is_none();
    let mirror: SharedMirror = Arc::new(Mutex::new(from.unwrap_or_default()));
    let dirty = cache.map(|cache| {
        let (dirty, wanted) = mpsc::channel(1);
        tokio::spawn(keep_cache(cache, shared.clone(), mirror.clone(), wanted));
        dirty
    });
    if !need_load {
        // What was loaded goes to the cache at once, not with the first change.
        mark_dirty(dirty.as_ref());
    }
    let mut backoff = Backoff::new();
    loop {
        let session = async {
            if need_load {
                let loaded = shared.load_mirror().await?;
                let state = shared.decode_all(&loaded);
                tracing::info!(
                    revision = loaded.revision,
                    tenants = state.tenants.len(),
                    "loaded every record from etcd"
                );
                *lock(&mirror) = loaded;
                if tx.send(StoreEvent::Reloaded(state)).await.is_err() {
                    return Ok(End::Closed);
                }
                mark_dirty(dirty.as_ref());
                need_load = false;
            }
            watch(&shared, &mirror, &tx, dirty.as_ref(), &mut backoff).await
        };
        let outcome = tokio::select! {
            outcome = session => outcome,
            () = tx.closed() => Ok(End::Closed),
        };
        match outcome {
            Ok(End::Closed) => return,
            Ok(End::Reload) => need_load = true,
            Err(e) => {
                shared.link.down(&e.to_string());
                let wait = backoff.next();
                tracing::debug!(error = %e, ?wait, "etcd watch failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
            }
        }
    }
}

/// One watch session: from the mirror's revision until the stream breaks.
async fn watch(
    shared: &Shared,
    mirror: &SharedMirror,
    tx: &mpsc::Sender<StoreEvent>,
    dirty: Option<&mpsc::Sender<()>>,
    backoff: &mut Backoff,
) -> Result<End, StoreError> {
    let mut client = shared.client().await?;
    let from = lock(mirror).revision;
    let start = i64::try_from(from.saturating_add(1)).unwrap_or(i64::MAX);
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let open = client.watch(shared.prefix(), Some(options));
    let mut stream = tokio::time::timeout(shared.timeout(), open)
        .await
        .map_err(|_| StoreError::Unavailable("etcd is unreachable: watching timed out".into()))?
        .map_err(etcd_error)?;
    loop {
        let Some(response) = stream.message().await.map_err(etcd_error)? else {
            return Err(StoreError::Unavailable(
                "etcd is unreachable: the watch stream ended".into(),
            ));
        };
        if response.compact_revision() > 0 {
            tracing::info!(
                followed = from,
                compacted = response.compact_revision(),
                "etcd compacted past the revision followed: reloading every record"
            );
            return Ok(End::Reload);
        }
        if response.canceled() {
            // etcd refuses a watch whose auth token it no longer knows (simple tokens do not
            // survive an etcd restart) by cancelling it in the stream, not with a status the
            // client would re-authenticate on: authenticate again before the next attempt.
            // Without a user this only drops an absent token.
            let refreshed = tokio::time::timeout(shared.timeout(), client.refresh_token()).await;
            if let Ok(Err(e)) = refreshed {
                tracing::debug!(error = %e, "re-authenticating to etcd failed");
            }
            return Err(StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            )));
        }
        if response.created() {
            let now = response.header().map_or(0, |h| h.revision());
            if u64::try_from(now).unwrap_or(0) < from {
                tracing::warn!(
                    followed = from,
                    etcd = now,
                    "etcd's revision is behind the one followed (restored from a backup?): \
                     reloading every record"
                );
                return Ok(End::Reload);
            }
            shared.link.up();
            backoff.reset();
        }
        let events = apply(shared, mirror, &response);
        if !events.is_empty() {
            mark_dirty(dirty);
        }
        for event in events {
            if tx.send(event).await.is_err() {
                return Ok(End::Closed);
            }
        }
    }
}

/// Applies one watch response to the mirror and opens each changed record.
fn apply(shared: &Shared, mirror: &SharedMirror, response: &WatchResponse) -> Vec<StoreEvent> {
    let mut events = Vec::with_capacity(response.events().len());
    let mut mirror = lock(mirror);
    for event in response.events() {
        let Some(kv) = event.kv() else { continue };
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            continue;
        };
        let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        mirror.revision = mirror.revision.max(revision);
        let change = match event.event_type() {
            EventType::Put => {
                mirror.insert(kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision());
                let decoded = shared.decode(key, kv.value(), revision);
                shared.mark_readable(key, decoded.is_ok());
                match decoded {
                    Ok(Decoded::Tenant(t)) => Some(Change::PutTenant(t)),
                    Ok(Decoded::Partner(p)) => Some(Change::PutPartner(p)),
                    Ok(Decoded::Foreign) => None,
                    Err(e) => {
                        tracing::error!(key, error = %e,
                            "an etcd record does not open; it is not served");
                        match shared.key_kind(key) {
                            KeyKind::Tenant(id) => Some(Change::RemoveTenant(id)),
                            // The defaults in force stay: nothing can replace them safely.
                            KeyKind::Partner | KeyKind::Foreign => None,
                        }
                    }
                }
            }
            EventType::Delete => {
                mirror.remove(key);
                shared.mark_readable(key, true);
                match shared.key_kind(key) {
                    KeyKind::Tenant(id) => Some(Change::RemoveTenant(id)),
                    KeyKind::Partner => Some(Change::PutPartner(PartnerRecord::default())),
                    KeyKind::Foreign => None,
                }
            }
        };
        if let Some(change) = change {
            events.push(StoreEvent::Changed { revision, change });
        }
    }
    // Only events move the revision followed: a response's header revision is etcd's current
    // one, and the events a new watch still has to deliver from its start revision follow it.
    events
}

fn mark_dirty(dirty: Option<&mpsc::Sender<()>>) {
    if let Some(dirty) = dirty {
        // Full means a write is already due; it will see this change too.
        let _ = dirty.try_send(());
    }
}

/// Writes the mirror to the cache after each change, at most once per [`CACHE_DELAY`];
/// stops when the follower does.
async fn keep_cache(
    cache: SnapshotCache,
    shared: Arc<Shared>,
    mirror: SharedMirror,
    mut wanted: mpsc::Receiver<()>,
) {
    while wanted.recv().await.is_some() {
        let snapshot = lock(&mirror).clone();
        if let Err(e) = cache.write(shared.keys.clone(), snapshot).await {
            tracing::warn!(error = %e, "cannot write the etcd snapshot cache; will retry on the next change");
        }
        tokio::time::sleep(CACHE_DELAY).await;
    }
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The next wait: uniformly in the upper half of the current step.
    fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        let mut bytes = [0u8; 4];
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_or(0.5, |()| {
                f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
            });
        half + half.mul_f64(random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new();
        let mut step = BACKOFF_MIN;
        for _ in 0..10 {
            let wait = b.next();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(BACKOFF_MAX);
        }
        b.reset();
        assert!(b.next() <= BACKOFF_MIN);
    }
}
