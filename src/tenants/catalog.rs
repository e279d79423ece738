//! The catalog: the one path every tenant write takes.
//!
//! It keeps the stored records in memory, checks each write (etag, format, completeness
//! against the partner defaults), commits it to the [`Store`] and, once the store has made it
//! durable, publishes a new [`Snapshot`]. Writes are serialised by one async mutex; reads of
//! records take it briefly. The data plane never touches the catalog, only the snapshot.
//!
//! With a shared store (etcd), the catalog also applies the changes other sidekeys make, one
//! record at a time as [`Store::follow`] reports them ([`StoreEvent`]): a change replaces one
//! entry of the snapshot, nothing else is re-opened. A change this catalog made itself comes
//! back too and is skipped, as is any change older than the record held.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use tokio::sync::{Mutex, mpsc, watch};

use super::effective::EffectiveTenant;
use super::model::{Connections, PartnerRecord, TenantRecord};
use super::snapshot::{Snapshot, SnapshotPublisher, SnapshotReader};
use super::validate::{self, FieldViolation};
use crate::store::{Change, Expect, Mutation, Store, StoreError, StoreEvent, StoredState};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("tenant {} not found", validate::echo(.0))]
    NotFound(String),
    #[error("tenant {} already exists", validate::echo(.0))]
    AlreadyExists(String),
    #[error("the etag does not match: the record changed since it was read")]
    Aborted,
    /// Field violations; paths start with `tenant.` or `partner_defaults.`.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A declared state for some tenants, as a tenants file states it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// Replaces the partner defaults when set.
    pub partner: Option<Connections>,
    pub tenants: Vec<DeclaredTenant>,
    /// Ids declared before but no longer: deleted if they exist.
    pub removed: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredTenant {
    pub id: String,
    pub display_name: String,
    pub connections: Connections,
}

/// What [`Catalog::apply_declared`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub partner_changed: bool,
}

struct State {
    tenants: BTreeMap<String, TenantRecord>,
    partner: PartnerRecord,
    /// False until the first load succeeded (a shared store unreachable at start, with no
    /// snapshot cache): reads and writes are refused meanwhile, as the state is not known.
    loaded: bool,
}

impl State {
    fn of(stored: StoredState) -> Self {
        Self {
            tenants: stored
                .tenants
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect(),
            partner: stored.partner,
            loaded: true,
        }
    }

    fn check_loaded(&self) -> Result<(), CatalogError> {
        if self.loaded {
            Ok(())
        } else {
            Err(CatalogError::Store(StoreError::Unavailable(
                "the tenants have not been loaded from the store yet (it has been unreachable \
                 since start-up): nothing was read or written"
                    .into(),
            )))
        }
    }
}

pub struct Catalog {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    publisher: SnapshotPublisher,
    reader: SnapshotReader,
    loaded: watch::Sender<bool>,
    /// The store's changes until [`Catalog::follow`] takes them.
    events: std::sync::Mutex<Option<mpsc::Receiver<StoreEvent>>>,
}

impl Catalog {
    /// Loads the store and publishes the first snapshot. A stored tenant that no longer
    /// resolves (possible only if the store was edited behind sidekey's back) is left out of
    /// the snapshot with an error log rather than failing start-up.
    ///
    /// For a store others write to ([`Store::follow`]), [`Catalog::follow`] then applies
    /// their changes; if such a store is unreachable now ([`StoreError::Unavailable`]), the
    /// catalog starts empty and not loaded ([`Catalog::loaded`]) and loads as soon as the
    /// store can (once followed).
    pub async fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let loaded = store.load().await;
        let events = store.follow();
        let state = match (loaded, &events) {
            (Ok(stored), _) => State::of(stored),
            (Err(StoreError::Unavailable(reason)), Some(_)) => {
                tracing::warn!(
                    reason,
                    "the store is unreachable and nothing is cached: \
                    not ready until the first load"
                );
                State {
                    tenants: BTreeMap::new(),
                    partner: PartnerRecord::default(),
                    loaded: false,
                }
            }
            (Err(e), _) => return Err(e),
        };
        let (publisher, reader) = SnapshotPublisher::new(build_snapshot(&state));
        // Exported from the start: a restart that changes nothing publishes no new snapshot.
        publisher.export_count();
        Ok(Self {
            store,
            loaded: watch::Sender::new(state.loaded),
            state: Mutex::new(state),
            publisher,
            reader,
            events: std::sync::Mutex::new(events),
        })
    }

    /// Applies the store's changes from now on, for as long as the catalog lives (a task
    /// holding it weakly). Does nothing for a store only this process writes, or when
    /// called again.
    pub fn follow(self: &Arc<Self>) {
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(events) = events {
            tokio::spawn(follow(Arc::downgrade(self), events));
        }
    }

    pub fn snapshot(&self) -> SnapshotReader {
        self.reader.clone()
    }

    /// Whether the tenants have been loaded (always, except for a shared store unreachable
    /// since start-up with nothing cached); turns true once, with the first load.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Applies one change reported by the store (see the module documentation).
    async fn apply_event(&self, event: StoreEvent) {
        let mut state = self.state.lock().await;
        let (revision, change) = match event {
            StoreEvent::Reloaded(stored) => {
                *state = State::of(stored);
                self.publisher.publish(build_snapshot(&state));
                self.loaded.send_replace(true);
                return;
            }
            StoreEvent::Changed { revision, change } => (revision, change),
        };
        let seen = |held: Option<u64>| held.is_some_and(|held| held >= revision);
        match change {
            Change::PutTenant(record) => {
                if seen(state.tenants.get(&record.id).map(|t| t.revision)) {
                    return;
                }
                let resolved = EffectiveTenant::resolve(
                    &record.id,
                    &record.connections,
                    &state.partner.connections,
                );
                let mut map = self.publisher.current().map().clone();
                match resolved {
                    Ok(effective) => {
                        map.insert(effective.id.clone(), Arc::new(effective));
                    }
                    Err(missing) => {
                        let fields: Vec<_> = missing.iter().map(|v| v.field.as_str()).collect();
                        tracing::error!(tenant = %record.id, missing = ?fields,
                            "stored tenant has incomplete credentials; its requests will be refused");
                        map.remove(record.id.as_str());
                    }
                }
                state.tenants.insert(record.id.clone(), record);
                self.publisher.publish(Snapshot::new(map, revision));
            }
            Change::RemoveTenant(id) => {
                let Some(held) = state.tenants.get(&id) else {
                    return;
                };
                if held.revision >= revision {
                    return;
                }
                state.tenants.remove(&id);
                let mut map = self.publisher.current().map().clone();
                map.remove(id.as_str());
                self.publisher.publish(Snapshot::new(map, revision));
            }
            Change::PutPartner(partner) => {
                if state.partner.revision >= revision {
                    return;
                }
                state.partner = partner;
                self.publisher.publish(build_snapshot(&state));
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<TenantRecord, CatalogError> {
        let state = self.state.lock().await;
        state.check_loaded()?;
        state
            .tenants
            .get(id)
            .cloned()
            .ok_or_else(|| CatalogError::NotFound(id.to_owned()))
    }

    /// Up to `limit` tenants with ids after `after`, in id order, and whether more follow.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<TenantRecord>, bool), CatalogError> {
        use std::ops::Bound;
        let state = self.state.lock().await;
        state.check_loaded()?;
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        let mut iter = state
            .tenants
            .range((lower, Bound::Unbounded))
            .map(|(_, t)| t);
        let page: Vec<_> = iter.by_ref().take(limit).cloned().collect();
        let more = iter.next().is_some();
        Ok((page, more))
    }

    pub async fn partner(&self) -> Result<PartnerRecord, CatalogError> {
        let state = self.state.lock().await;
        state.check_loaded()?;
        Ok(state.partner.clone())
    }

    /// Creates a tenant from `id`, `display_name` and `connections`.
    pub async fn create(
        &self,
        id: String,
        display_name: String,
        connections: Connections,
    ) -> Result<TenantRecord, CatalogError> {
        let mut violations = Vec::new();
        validate::validate_tenant_id(&id, "tenant.id", &mut violations);
        check_tenant_fields(&display_name, &connections, &mut violations);
        reject(violations)?;

        let mut state = self.state.lock().await;
        state.check_loaded()?;
        if state.tenants.contains_key(&id) {
            return Err(CatalogError::AlreadyExists(id));
        }
        let effective = resolve_tenant(&id, &connections, &state.partner.connections)?;
        let now = SystemTime::now();
        let mut record = TenantRecord {
            id,
            display_name,
            connections,
            revision: 0,
            create_time: now,
            update_time: now,
        };
        record.revision = self
            .commit(Mutation::PutTenant(record.clone()), Expect::Absent)
            .await?;
        self.publish_tenant(&mut state, record.clone(), effective);
        Ok(record)
    }

    /// Applies `change` to the stored tenant `id`. With `etag` set, the stored revision must
    /// match it.
    pub async fn update(
        &self,
        id: &str,
        etag: Option<u64>,
        change: impl FnOnce(&mut TenantRecord),
    ) -> Result<TenantRecord, CatalogError> {
        let mut state = self.state.lock().await;
        state.check_loaded()?;
        let current = state
            .tenants
            .get(id)
            .ok_or_else(|| CatalogError::NotFound(id.to_owned()))?;
        if etag.is_some_and(|e| e != current.revision) {
            return Err(CatalogError::Aborted);
        }
        let mut record = current.clone();
        change(&mut record);
        let mut violations = Vec::new();
        check_tenant_fields(&record.display_name, &record.connections, &mut violations);
        reject(violations)?;
        let effective = resolve_tenant(id, &record.connections, &state.partner.connections)?;

        record.update_time = SystemTime::now();
        let expect = Expect::Revision(current.revision);
        record.revision = self
            .commit(Mutation::PutTenant(record.clone()), expect)
            .await?;
        self.publish_tenant(&mut state, record.clone(), effective);
        Ok(record)
    }

    pub async fn delete(&self, id: &str, etag: Option<u64>) -> Result<(), CatalogError> {
        let mut state = self.state.lock().await;
        state.check_loaded()?;
        let current = state
            .tenants
            .get(id)
            .ok_or_else(|| CatalogError::NotFound(id.to_owned()))?;
        if etag.is_some_and(|e| e != current.revision) {
            return Err(CatalogError::Aborted);
        }
        let expect = Expect::Revision(current.revision);
        let revision = self
            .commit(Mutation::DeleteTenant(id.to_owned()), expect)
            .await?;
        state.tenants.remove(id);
        let mut map = self.publisher.current().map().clone();
        map.remove(id);
        self.publisher.publish(Snapshot::new(map, revision));
        Ok(())
    }

    /// Applies `change` to the partner defaults. Refused when any tenant's connection would
    /// no longer resolve: one violation per partner field, naming the tenants relying on it.
    pub async fn update_partner(
        &self,
        etag: Option<u64>,
        change: impl FnOnce(&mut PartnerRecord),
    ) -> Result<PartnerRecord, CatalogError> {
        let mut state = self.state.lock().await;
        state.check_loaded()?;
        if etag.is_some_and(|e| e != state.partner.revision) {
            return Err(CatalogError::Aborted);
        }
        let mut record = state.partner.clone();
        change(&mut record);
        let mut violations = Vec::new();
        validate::validate_connections(&record.connections, "partner_defaults", &mut violations);
        reject(violations)?;

        let broken = tenants_left_incomplete(state.tenants.values(), &record.connections);
        reject(broken)?;

        let expect = match state.partner.revision {
            0 => Expect::Absent,
            r => Expect::Revision(r),
        };
        record.update_time = Some(SystemTime::now());
        record.revision = self
            .commit(Mutation::PutPartner(record.clone()), expect)
            .await?;
        state.partner = record.clone();
        self.publisher.publish(build_snapshot(&state));
        Ok(record)
    }

    /// Applies a declared state (a tenants file) all at once: every declared tenant is
    /// created or replaced, `removed` ids are deleted, the partner defaults replaced when
    /// given. Everything is validated first and committed in one transaction; one invalid
    /// field rejects the whole declaration and changes nothing. Records already equal to
    /// their declaration are not rewritten, so an unchanged file bumps no etag.
    pub async fn apply_declared(&self, declared: Declared) -> Result<ApplyReport, CatalogError> {
        let mut state = self.state.lock().await;
        state.check_loaded()?;
        let mut report = ApplyReport::default();
        let defaults = declared
            .partner
            .clone()
            .unwrap_or_else(|| state.partner.connections.clone());

        let mut violations = Vec::new();
        if let Some(p) = &declared.partner {
            validate::validate_connections(p, "partner_defaults", &mut violations);
        }
        let mut declared_ids: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (index, t) in declared.tenants.iter().enumerate() {
            let prefix = validate::declared_tenant_path(index, &t.id);
            if !declared_ids.insert(t.id.clone()) {
                violations.push(FieldViolation::new(
                    format!("{prefix}.id"),
                    "declared twice",
                ));
                continue;
            }
            let mut own = Vec::new();
            validate::validate_tenant_id(&t.id, &format!("{prefix}.id"), &mut own);
            validate::validate_display_name(
                &t.display_name,
                &format!("{prefix}.display_name"),
                &mut own,
            );
            validate::validate_connections(&t.connections, &prefix, &mut own);
            if own.is_empty()
                && let Err(missing) = EffectiveTenant::resolve(&t.id, &t.connections, &defaults)
            {
                own.extend(missing.into_iter().map(|v| v.prefixed(&prefix)));
            }
            violations.extend(own);
        }
        if declared.partner.is_some() {
            let others = state.tenants.values().filter(|t| {
                !declared_ids.contains(t.id.as_str()) && !declared.removed.contains(&t.id)
            });
            violations.extend(tenants_left_incomplete(others, &defaults));
        }
        reject(violations)?;

        let now = SystemTime::now();
        let mut batch = Vec::new();
        if let Some(p) = declared.partner
            && p != state.partner.connections
        {
            report.partner_changed = true;
            let expect = match state.partner.revision {
                0 => Expect::Absent,
                r => Expect::Revision(r),
            };
            let record = PartnerRecord {
                connections: p,
                revision: 0,
                update_time: Some(now),
            };
            batch.push((Mutation::PutPartner(record), expect));
        }
        for t in declared.tenants {
            let (record, expect) = match state.tenants.get(&t.id) {
                Some(cur)
                    if cur.display_name == t.display_name && cur.connections == t.connections =>
                {
                    report.unchanged += 1;
                    continue;
                }
                Some(cur) => {
                    report.updated += 1;
                    let mut record = cur.clone();
                    record.display_name = t.display_name;
                    record.connections = t.connections;
                    record.update_time = now;
                    (record, Expect::Revision(cur.revision))
                }
                None => {
                    report.created += 1;
                    let record = TenantRecord {
                        id: t.id,
                        display_name: t.display_name,
                        connections: t.connections,
                        revision: 0,
                        create_time: now,
                        update_time: now,
                    };
                    (record, Expect::Absent)
                }
            };
            batch.push((Mutation::PutTenant(record), expect));
        }
        for id in declared.removed {
            if declared_ids.contains(id.as_str()) {
                continue;
            }
            if let Some(cur) = state.tenants.get(&id) {
                report.deleted += 1;
                batch.push((Mutation::DeleteTenant(id), Expect::Revision(cur.revision)));
            }
        }
        if batch.is_empty() {
            return Ok(report);
        }

        let revision = match self.store.commit_batch(batch.clone()).await {
            Ok(r) => r,
            Err(StoreError::Conflict) => return Err(CatalogError::Aborted),
            Err(e) => return Err(e.into()),
        };
        for (mutation, _) in batch {
            match mutation {
                Mutation::PutTenant(mut r) => {
                    r.revision = revision;
                    state.tenants.insert(r.id.clone(), r);
                }
                Mutation::DeleteTenant(id) => {
                    state.tenants.remove(&id);
                }
                Mutation::PutPartner(mut p) => {
                    p.revision = revision;
                    state.partner = p;
                }
            }
        }
        self.publisher.publish(build_snapshot(&state));
        Ok(report)
    }

    async fn commit(&self, mutation: Mutation, expect: Expect) -> Result<u64, CatalogError> {
        match self.store.commit(mutation, expect).await {
            Ok(revision) => Ok(revision),
            // Only another writer of a shared store can get here: our state is stale.
            Err(StoreError::Conflict) => Err(CatalogError::Aborted),
            Err(e) => Err(e.into()),
        }
    }

    fn publish_tenant(&self, state: &mut State, record: TenantRecord, effective: EffectiveTenant) {
        let mut map = self.publisher.current().map().clone();
        map.insert(effective.id.clone(), Arc::new(effective));
        let revision = record.revision;
        state.tenants.insert(record.id.clone(), record);
        self.publisher.publish(Snapshot::new(map, revision));
    }
}

/// Applies the store's changes while the catalog lives.
async fn follow(catalog: Weak<Catalog>, mut events: mpsc::Receiver<StoreEvent>) {
    while let Some(event) = events.recv().await {
        let Some(catalog) = catalog.upgrade() else {
            return;
        };
        catalog.apply_event(event).await;
    }
}

fn check_tenant_fields(display_name: &str, conns: &Connections, out: &mut Vec<FieldViolation>) {
    validate::validate_display_name(display_name, "tenant.display_name", out);
    validate::validate_connections(conns, "tenant", out);
}

fn reject(violations: Vec<FieldViolation>) -> Result<(), CatalogError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Invalid(violations))
    }
}

fn resolve_tenant(
    id: &str,
    own: &Connections,
    defaults: &Connections,
) -> Result<EffectiveTenant, CatalogError> {
    EffectiveTenant::resolve(id, own, defaults).map_err(|missing| {
        CatalogError::Invalid(missing.into_iter().map(|v| v.prefixed("tenant")).collect())
    })
}

/// Most tenant ids named in one violation; the rest are counted.
const MAX_TENANTS_NAMED: usize = 20;

fn tenants_left_incomplete<'a>(
    tenants: impl Iterator<Item = &'a TenantRecord>,
    defaults: &Connections,
) -> Vec<FieldViolation> {
    let mut by_field: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for t in tenants {
        if let Err(missing) = EffectiveTenant::resolve(&t.id, &t.connections, defaults) {
            for v in missing {
                by_field.entry(v.field).or_default().push(&t.id);
            }
        }
    }
    by_field
        .into_iter()
        .map(|(field, ids)| {
            let mut names = ids[..ids.len().min(MAX_TENANTS_NAMED)].join(", ");
            if ids.len() > MAX_TENANTS_NAMED {
                names.push_str(&format!(" and {} more", ids.len() - MAX_TENANTS_NAMED));
            }
            FieldViolation::new(
                format!("partner_defaults.{field}"),
                format!("tenants {names} inherit it: set it on them before removing it here"),
            )
        })
        .collect()
}

fn build_snapshot(state: &State) -> Snapshot {
    let mut map = HashMap::with_capacity(state.tenants.len());
    let mut revision = state.partner.revision;
    for t in state.tenants.values() {
        revision = revision.max(t.revision);
        match EffectiveTenant::resolve(&t.id, &t.connections, &state.partner.connections) {
            Ok(e) => {
                map.insert(e.id.clone(), Arc::new(e));
            }
            Err(missing) => {
                let fields: Vec<_> = missing.iter().map(|v| v.field.as_str()).collect();
                tracing::error!(tenant = %t.id, missing = ?fields,
                    "stored tenant has incomplete credentials; its requests will be refused");
            }
        }
    }
    Snapshot::new(map, revision)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::secret::Secret;
    use crate::tenants::MiradoreConn;

    /// A store whose changes the test feeds by hand; commits get revisions from 100 up.
    struct Fed {
        events: StdMutex<Option<mpsc::Receiver<StoreEvent>>>,
        load: StdMutex<Option<Result<StoredState, StoreError>>>,
        next: StdMutex<u64>,
    }

    #[async_trait]
    impl Store for Fed {
        async fn load(&self) -> Result<StoredState, StoreError> {
            self.load
                .lock()
                .unwrap()
                .take()
                .unwrap_or(Ok(StoredState::default()))
        }
        async fn commit_batch(&self, _: Vec<(Mutation, Expect)>) -> Result<u64, StoreError> {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            Ok(*next)
        }
        fn follow(&self) -> Option<mpsc::Receiver<StoreEvent>> {
            self.events.lock().unwrap().take()
        }
    }

    fn record(id: &str, key: &str, revision: u64) -> TenantRecord {
        TenantRecord {
            id: id.into(),
            display_name: String::new(),
            connections: Connections {
                miradore: Some(MiradoreConn {
                    site: "acme1".into(),
                    api_key: Some(Secret::new(key)),
                }),
                ..Connections::default()
            },
            revision,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
        }
    }

    async fn fed(
        load: Result<StoredState, StoreError>,
    ) -> (Arc<Catalog>, mpsc::Sender<StoreEvent>) {
        let (tx, rx) = mpsc::channel(16);
        let store = Fed {
            events: StdMutex::new(Some(rx)),
            load: StdMutex::new(Some(load)),
            next: StdMutex::new(99),
        };
        let catalog = Arc::new(Catalog::open(Arc::new(store)).await.unwrap());
        catalog.follow();
        (catalog, tx)
    }

    fn key(catalog: &Catalog, id: &str) -> Option<String> {
        let snapshot = catalog.snapshot().load();
        let tenant = snapshot.tenant(id)?;
        Some(tenant.miradore.as_ref()?.api_key.expose().to_owned())
    }

    /// Applies `event` as the follow task does, without the task.
    async fn feed(catalog: &Catalog, event: StoreEvent) {
        catalog.apply_event(event).await;
    }

    fn put(revision: u64, r: TenantRecord) -> StoreEvent {
        StoreEvent::Changed {
            revision,
            change: Change::PutTenant(r),
        }
    }

    #[tokio::test]
    async fn changes_apply_one_record_and_stale_ones_are_skipped() {
        let stored = StoredState {
            tenants: vec![record("acme", "k1", 5), record("beta", "b1", 6)],
            partner: PartnerRecord::default(),
            revision: 6,
        };
        let (catalog, tx) = fed(Ok(stored)).await;
        assert_eq!(key(&catalog, "acme").as_deref(), Some("k1"));

        feed(&catalog, put(7, record("acme", "k2", 7))).await;
        assert_eq!(key(&catalog, "acme").as_deref(), Some("k2"));
        assert_eq!(catalog.get("acme").await.unwrap().revision, 7);
        // beta's entry is the same Arc: nothing else was rebuilt.
        let before = catalog.snapshot().load().tenant("beta").cloned().unwrap();
        feed(&catalog, put(8, record("gamma", "g1", 8))).await;
        let after = catalog.snapshot().load().tenant("beta").cloned().unwrap();
        assert!(Arc::ptr_eq(&before, &after));

        // An older change than the record held (our own write echoed late) is skipped.
        feed(&catalog, put(6, record("acme", "old", 6))).await;
        assert_eq!(key(&catalog, "acme").as_deref(), Some("k2"));
        let removed = StoreEvent::Changed {
            revision: 7,
            change: Change::RemoveTenant("gamma".into()),
        };
        feed(&catalog, removed).await;
        assert_eq!(key(&catalog, "gamma").as_deref(), Some("g1"));

        let removed = StoreEvent::Changed {
            revision: 9,
            change: Change::RemoveTenant("beta".into()),
        };
        feed(&catalog, removed).await;
        assert!(key(&catalog, "beta").is_none());
        assert!(matches!(
            catalog.get("beta").await,
            Err(CatalogError::NotFound(_))
        ));
        assert_eq!(catalog.snapshot().load().revision(), 9);

        // The follow task applies what the store sends.
        let mut changes = catalog.snapshot().changes();
        changes.borrow_and_update();
        tx.send(put(10, record("delta", "d1", 10))).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("applied within the deadline")
            .unwrap();
        assert_eq!(key(&catalog, "delta").as_deref(), Some("d1"));
    }

    #[tokio::test]
    async fn an_unreachable_store_starts_not_loaded_refusing_writes_until_reloaded() {
        let (catalog, _events) = fed(Err(StoreError::Unavailable("etcd down".into()))).await;
        assert!(!*catalog.loaded().borrow());
        let refused = catalog
            .create(
                "acme".into(),
                String::new(),
                record("acme", "k", 0).connections,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, CatalogError::Store(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        let stored = StoredState {
            tenants: vec![record("acme", "k1", 3)],
            partner: PartnerRecord::default(),
            revision: 3,
        };
        feed(&catalog, StoreEvent::Reloaded(stored)).await;
        assert!(*catalog.loaded().borrow());
        assert_eq!(key(&catalog, "acme").as_deref(), Some("k1"));
        catalog
            .update("acme", Some(3), |r| r.display_name = "Acme".into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn other_load_errors_still_fail_the_start() {
        let store = Fed {
            events: StdMutex::new(None),
            load: StdMutex::new(Some(Err(StoreError::Unavailable("down".into())))),
            next: StdMutex::new(0),
        };
        // A store nobody else writes to cannot catch up later: unreachable is fatal.
        assert!(Catalog::open(Arc::new(store)).await.is_err());
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let store = Fed {
            events: StdMutex::new(Some(rx)),
            load: StdMutex::new(Some(Err(StoreError::Key("wrong key".into())))),
            next: StdMutex::new(0),
        };
        assert!(Catalog::open(Arc::new(store)).await.is_err());
    }
}
