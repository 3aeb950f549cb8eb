//! The registry: a map from unit name to the unit's handle, sorted by name, and every
//! operation the API offers on units. It validates, records through the store, and hands
//! work to each unit's loop; it never holds the map's lock across an `.await` (it clones the
//! handle out).

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dashmap::DashMap;
use jiff::Timestamp;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::exec;
use crate::executor::LocalExecutor;
use crate::fleet::Fleet;
use crate::fleet::remote::RemoteExecutor;
use crate::metrics::{Gauges, Metrics};
use crate::run::{RunRecord, Trigger};
use crate::store::{DispatchRecord, EventKind, RunFilter, Store, StoredUnit};
use crate::unit::definition::{FIELDS, merge_patch};
use crate::unit::runner::{self, InitialState, RunnerEnv};
use crate::unit::{
    Control, DispatchOp, UnitConfig, UnitDef, UnitHandle, UnitState, UnitStatus, ValidateCtx,
};

/// A point-in-time view of one unit.
#[derive(Debug, Clone)]
pub struct UnitSnapshot {
    /// The definition in force.
    pub config: Arc<UnitConfig>,
    /// What its loop last published.
    pub status: UnitStatus,
}

/// Filter and page for [`Registry::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only units in this state.
    pub state: Option<UnitState>,
    /// Only names matching this glob (`*` and `?`).
    pub name_glob: Option<String>,
    /// Only names after this one (the last name of the previous page).
    pub after: Option<String>,
    /// At most this many units (`0`: no limit).
    pub limit: usize,
}

/// How the registry is set up.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Validation context (root or not, allowed directories).
    pub validate: ValidateCtx,
    /// Where unit files live.
    pub units_dir: PathBuf,
    /// Where runs work by default.
    pub work_dir: PathBuf,
    /// Runs kept per unit by default.
    pub keep_runs: u32,
    /// At most this many units.
    pub max_units: usize,
    /// Where runs started and ended are counted.
    pub metrics: Metrics,
    /// Sends the units' webhooks.
    pub notifier: crate::notify::Notifier,
}

#[derive(Clone)]
enum Slot {
    /// The name is taken by an `Add` that is still being recorded.
    Reserved,
    /// A stored unit whose definition no longer loads: not listed, but its name stays taken
    /// until it is deleted.
    Unloadable,
    Live(UnitHandle),
}

/// The units by name: a `DashMap` for the lookups every call makes, concurrently, and a
/// sorted set of the names beside it, so that a page of `list` starts where the previous one
/// ended without looking at the units before it.
///
/// Changes take the set's write lock first and change the map under it, so the two always
/// agree for anyone holding the set's lock; `list` holds its read lock, then reads the map. The
/// lock order (set, then a map shard) is the same everywhere.
#[derive(Default)]
struct Units {
    map: DashMap<String, Slot>,
    names: RwLock<BTreeSet<String>>,
    /// Woken at each change of a slot (see [`Registry::settled`]).
    changed: tokio::sync::Notify,
}

impl Units {
    fn names(&self) -> RwLockReadGuard<'_, BTreeSet<String>> {
        self.names.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn names_mut(&self) -> RwLockWriteGuard<'_, BTreeSet<String>> {
        self.names.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, name: &str) -> Option<Slot> {
        self.map.get(name).map(|s| s.value().clone())
    }

    fn insert(&self, name: String, slot: Slot) {
        let mut names = self.names_mut();
        if self.map.insert(name.clone(), slot).is_none() {
            names.insert(name);
        }
        self.changed.notify_waiters();
    }

    /// Takes `name` for an `Add` in progress, if it is free and there is room.
    fn reserve(&self, name: &str, max: usize) -> Result<()> {
        let mut names = self.names_mut();
        if names.len() >= max {
            return Err(Error::Limit(format!(
                "at most {max} units (max_units); delete some first"
            )));
        }
        match self.map.entry(name.to_string()) {
            dashmap::Entry::Occupied(_) => return Err(Error::UnitExists(name.to_string())),
            dashmap::Entry::Vacant(v) => {
                v.insert(Slot::Reserved);
            }
        }
        names.insert(name.to_string());
        Ok(())
    }

    /// Removes `name`, or only if its slot is `which`.
    fn remove_if(&self, name: &str, which: impl FnOnce(&Slot) -> bool) {
        let mut names = self.names_mut();
        if self.map.remove_if(name, |_, s| which(s)).is_some() {
            names.remove(name);
            self.changed.notify_waiters();
        }
    }

    fn remove(&self, name: &str) {
        self.remove_if(name, |_| true);
    }
}

struct Shared {
    units: Units,
    store: Store,
    env: Arc<RunnerEnv>,
    cfg: RegistryConfig,
    root: CancellationToken,
    tracker: TaskTracker,
}

/// A cheap-to-clone handle to the registry.
#[derive(Clone)]
pub struct Registry(Arc<Shared>);

/// Units loaded from the store at a time at start-up.
const LOAD_PAGE: u32 = 1000;

/// Longest `name_glob` accepted.
pub const MAX_GLOB: usize = 256;

/// Whether `name` matches `glob` (`*` any run of characters, `?` one character). Iterative,
/// with one backtrack point, so no pattern can take more than `O(glob × name)` steps.
pub fn glob_match(glob: &str, name: &str) -> bool {
    glob_match_bytes(glob.as_bytes(), name)
}

/// The literal start of a glob (up to its first `*` or `?`): every name it matches begins
/// with it.
fn glob_prefix(glob: &str) -> &str {
    // Both wildcards are ASCII, so the cut is on a character boundary.
    &glob[..glob.find(['*', '?']).unwrap_or(glob.len())]
}

fn glob_match_bytes(glob: &[u8], name: &str) -> bool {
    let (g, n) = (glob, name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match g.get(gi) {
            Some(b'*') => {
                star = Some((gi, ni));
                gi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                gi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sg, sn)) => {
                    gi = sg + 1;
                    ni = sn + 1;
                    star = Some((sg, sn + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

impl Registry {
    /// Recovers from a previous daemon (stale runs become `lost`, their process groups are
    /// killed), loads every unit and starts its loop.
    pub async fn open(
        store: Store,
        fleet: Fleet,
        cfg: RegistryConfig,
        root: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Registry> {
        let executor = Arc::new(
            LocalExecutor::new(
                store.clone(),
                store.dir(),
                cfg.work_dir.clone(),
                cfg.validate.clone(),
            )
            .await?,
        );
        let stale = store.recover_stale_runs().await?;
        executor.recover(&stale, &root, &tracker).await;
        let remote = Arc::new(RemoteExecutor::new(fleet));
        let env = Arc::new(RunnerEnv {
            store: store.clone(),
            keep_runs: cfg.keep_runs,
            executor,
            remote,
            metrics: cfg.metrics.clone(),
            notifier: cfg.notifier.clone(),
        });
        let mut open: HashMap<String, Vec<(DispatchRecord, Vec<RunRecord>)>> = HashMap::new();
        for (d, runs) in store.open_dispatches().await? {
            open.entry(d.unit.clone()).or_default().push((d, runs));
        }
        let reg = Registry(Arc::new(Shared {
            units: Units::default(),
            store: store.clone(),
            env,
            cfg,
            root,
            tracker,
        }));
        let started = std::time::Instant::now();
        // A page at a time: the stored form of 100,000 units never sits in memory beside the
        // loaded one.
        let mut after = String::new();
        loop {
            let page = store.load_units_page(after.clone(), LOAD_PAGE).await?;
            let full = page.len() == LOAD_PAGE as usize;
            if let Some((u, _)) = page.last() {
                after = u.name.clone();
            }
            for (u, last_run) in page {
                let dispatches = open.remove(&u.name).unwrap_or_default();
                reg.load(u, last_run, dispatches);
            }
            if !full {
                break;
            }
        }
        tracing::info!(
            units = reg.len(),
            ms = started.elapsed().as_millis() as u64,
            "units loaded and their loops started"
        );
        // Runs a previous daemon left active ended `lost` (or `cancelled`) at recovery: their
        // units' webhooks are told, as for any run's end.
        for s in &stale {
            if let Ok(u) = reg.get(&s.record.unit)
                && !u.config.notify.is_empty()
            {
                reg.0.env.notifier.run_ended(&u.config.name, &u.config.notify, &s.record);
            }
        }
        Ok(reg)
    }

    /// Starts the loop of a stored unit; one whose definition no longer parses or validates
    /// is skipped, and says why.
    fn load(
        &self,
        u: StoredUnit,
        last_run: Option<RunRecord>,
        dispatches: Vec<(DispatchRecord, Vec<RunRecord>)>,
    ) {
        let def = match UnitDef::from_json(u.definition) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(unit = %u.name, error = %e, "stored definition no longer parses; skipped");
                self.0.units.insert(u.name, Slot::Unloadable);
                return;
            }
        };
        let config = match UnitConfig::validate(def, &self.0.cfg.validate) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(unit = %u.name, error = %e, "stored definition no longer validates; skipped");
                self.0.units.insert(u.name, Slot::Unloadable);
                return;
            }
        };
        let init = InitialState {
            paused: u.paused,
            stopped: u.stopped,
            last_fire: u.last_fire,
            runs_total: u.runs_total,
            failures_total: u.failures_total,
            last_run,
            created_at: u.created_at,
            updated_at: u.updated_at,
            anchor: u.anchor,
            fresh: false,
            quiet: false,
            dispatches,
        };
        let h = self.spawn_loop(config, init);
        self.0.units.insert(u.name, Slot::Live(h));
    }

    fn spawn_loop(&self, config: Arc<UnitConfig>, init: InitialState) -> UnitHandle {
        runner::spawn(self.0.env.clone(), config, init, &self.0.root, &self.0.tracker).0
    }

    /// The store behind the registry.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The agents.
    pub fn fleet(&self) -> &Fleet {
        self.0.env.remote.fleet()
    }

    /// The handle of a unit.
    pub fn handle(&self, name: &str) -> Result<UnitHandle> {
        match self.0.units.get(name) {
            Some(Slot::Live(h)) => Ok(h),
            _ => Err(Error::UnitNotFound(name.to_string())),
        }
    }

    /// Waits, at most `within`, until the change that event `kind` of unit `name` tells of
    /// shows in the unit as read (`TaskUnit.Get`, `List`). The store publishes the event at
    /// its commit, a moment before the registry or the unit's loop applies the change: a
    /// subscriber waits here before passing the event on, so that a client that reads the
    /// unit when told of it finds it (`unit.added`), with its new definition
    /// (`unit.edited`) or flag (`unit.paused`, `unit.resumed`): those are made under the
    /// unit's lock, which is free again once they show.
    pub async fn settled(&self, kind: EventKind, name: &str, within: std::time::Duration) {
        match kind {
            EventKind::UnitAdded => self.added(name, within).await,
            EventKind::UnitEdited | EventKind::UnitPaused | EventKind::UnitResumed => {
                if let Ok(h) = self.handle(name) {
                    let _ = tokio::time::timeout(within, h.lock()).await;
                }
            }
            _ => {}
        }
    }

    /// Waits, at most `within`, while an `Add` of `name` is being recorded.
    async fn added(&self, name: &str, within: std::time::Duration) {
        let deadline = tokio::time::sleep(within);
        tokio::pin!(deadline);
        loop {
            let changed = self.0.units.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !matches!(self.0.units.get(name), Some(Slot::Reserved)) {
                return;
            }
            tokio::select! {
                () = changed => {}
                () = &mut deadline => return,
            }
        }
    }

    /// A snapshot of one unit.
    pub fn get(&self, name: &str) -> Result<UnitSnapshot> {
        let h = self.handle(name)?;
        Ok(UnitSnapshot { config: h.config(), status: h.status() })
    }

    /// Shows `each` the units that match `f`, in name order: at most `f.limit`, the first ones
    /// named after `f.after`. `each` sees a unit's definition and status under its status lock,
    /// so a list can write its answer straight from them, copying nothing first (keep `each`
    /// short: the unit's loop waits for that lock). The cost is that of the units looked at,
    /// from the cursor (or the glob's literal prefix) on; a unit filtered out costs no
    /// allocation.
    pub fn list(&self, f: &ListFilter, mut each: impl FnMut(&UnitConfig, &UnitStatus)) {
        let glob = f.name_glob.as_deref().unwrap_or("*");
        let prefix = glob_prefix(glob);
        let start = match f.after.as_deref() {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let limit = if f.limit == 0 { usize::MAX } else { f.limit };
        let mut shown = 0;
        let names = self.0.units.names();
        for name in names.range::<str, _>((start, Bound::Unbounded)) {
            if !name.starts_with(prefix) {
                break;
            }
            if !glob_match_bytes(glob.as_bytes(), name) {
                continue;
            }
            // Borrowed from the map, not cloned: a list touches each unit once.
            let Some(slot) = self.0.units.map.get(name.as_str()) else { continue };
            let Slot::Live(h) = slot.value() else { continue };
            let config = h.config();
            let keep = |s: &UnitStatus| f.state.is_none_or(|st| s.state == st);
            if h.status_if(keep, |s| each(&config, s)).is_some() {
                shown += 1;
                if shown >= limit {
                    break;
                }
            }
        }
    }

    /// How many units exist.
    pub fn len(&self) -> usize {
        self.0.units.map.len()
    }

    /// Whether there are no units.
    pub fn is_empty(&self) -> bool {
        self.0.units.map.is_empty()
    }

    /// Checks what validation cannot know without looking at this machine: that `cwd` leads
    /// to a directory (under `allowed_dirs`, when set) and that `user` is an account (one of
    /// `allowed_users`, when set). Done at `Add` and `Edit`, and again by the run before each
    /// spawn, so a unit whose directory disappears later still loads (its runs fail and say
    /// why).
    async fn check_host(&self, config: &UnitConfig) -> Result<()> {
        self.fleet().check_hosts(&config.hosts)?;
        // A file unit's content is this daemon's to keep: it must be here before the unit.
        if let crate::unit::definition::Action::File(f) = &config.action
            && self.store().content().size(&f.sha256).await?.is_none()
        {
            return Err(Error::invalid(
                "file.source",
                format!(
                    "no file sha256:{} is kept by this daemon: upload it first (taskctl push \
                         does)",
                    f.sha256
                ),
            ));
        }
        // On agents, `cwd` and `user` are each agent's to check, before each run.
        if !config.hosts.iter().any(|h| h == crate::run::LOCAL) {
            return Ok(());
        }
        if config.cwd.is_none() && config.user.is_none() {
            return Ok(());
        }
        let ctx = self.0.cfg.validate.clone();
        let (cwd, user) = (config.cwd.clone(), config.user.clone());
        // canonicalize and NSS lookups block.
        tokio::task::spawn_blocking(move || {
            if let Some(cwd) = &cwd {
                ctx.resolve_cwd(cwd)?;
            }
            if let Some(name) = &user {
                let account = exec::User::lookup(name)
                    .map_err(|e| Error::invalid("user", format!("{name:?}: {e}")))?;
                ctx.check_user(&account.name, account.uid)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| Error::ShuttingDown)?
    }

    /// Adds a unit from a definition. Answers once the unit is durable and its loop started.
    /// The work runs in its own task, so a client that goes away half-way cannot leave the
    /// name reserved.
    pub async fn add(&self, def: UnitDef) -> Result<UnitSnapshot> {
        let config = Arc::new(UnitConfig::validate(def, &self.0.cfg.validate)?);
        self.check_host(&config).await?;
        let this = self.clone();
        self.0
            .tracker
            .spawn(async move { this.add_validated(config).await })
            .await
            .map_err(|_| Error::ShuttingDown)?
    }

    async fn add_validated(&self, config: Arc<UnitConfig>) -> Result<UnitSnapshot> {
        if self.0.root.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let name = config.name.clone();
        self.0.units.reserve(&name, self.0.cfg.max_units)?;
        let now = Timestamp::now();
        let stored = StoredUnit {
            name: name.clone(),
            definition: config.def.to_json(),
            created_at: now,
            updated_at: now,
            paused: config.paused,
            stopped: false,
            last_fire: None,
            anchor: now,
            runs_total: 0,
            failures_total: 0,
        };
        if let Err(e) = self.0.store.insert_unit(stored).await {
            self.0.units.remove(&name);
            return Err(e);
        }
        let init = InitialState {
            paused: config.paused,
            stopped: false,
            last_fire: None,
            runs_total: 0,
            failures_total: 0,
            last_run: None,
            created_at: now,
            updated_at: now,
            anchor: now,
            fresh: true,
            quiet: false,
            dispatches: Vec::new(),
        };
        let (h, ready) =
            runner::spawn(self.0.env.clone(), config, init, &self.0.root, &self.0.tracker);
        self.0.units.insert(name.clone(), Slot::Live(h.clone()));
        // Answer with the run `add` started, if any.
        let _ = ready.await;
        Ok(UnitSnapshot { config: h.config(), status: h.status() })
    }

    /// `TaskUnit.Add` with a bare name: the unit file `<units-dir>/<name>.toml` if it
    /// exists, else a tick unit.
    pub async fn add_name(&self, name: &str) -> Result<UnitSnapshot> {
        crate::unit::definition::validate_name(name)?;
        let path = self.0.cfg.units_dir.join(format!("{name}.toml"));
        let def = match tokio::fs::read_to_string(&path).await {
            Ok(text) => UnitDef::from_toml(&text, name).map_err(|e| match e {
                Error::Invalid { field, reason } => {
                    Error::Invalid { field, reason: format!("{reason} (in {})", path.display()) }
                }
                other => other,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                UnitDef { name: name.to_string(), ..Default::default() }
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        self.add(def).await
    }

    /// Applies a JSON merge patch to a unit's definition. The new definition applies from the
    /// unit's next run; a `paused` in the patch also pauses or resumes the unit.
    pub async fn edit(&self, name: &str, patch: Value) -> Result<UnitSnapshot> {
        let Value::Object(mut obj) = patch else {
            return Err(Error::invalid(
                "definition",
                "an edit is a JSON object of fields to change",
            ));
        };
        match obj.remove("name") {
            None => {}
            Some(Value::String(n)) if n == name => {}
            Some(other) => {
                return Err(Error::invalid(
                    "name",
                    format!(
                        "a unit cannot be renamed (got {other}); add a new one and delete this one"
                    ),
                ));
            }
        }
        // A typo must not pass silently, even as a removal (`"field": null`).
        if let Some(bad) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(Error::invalid(
                bad.clone(),
                format!("unknown field; the fields are: {}", FIELDS.join(", ")),
            ));
        }
        let patch = Value::Object(obj);
        let h = self.handle(name)?;
        let _guard = h.lock().await;
        // A delete (and maybe a new unit of the same name) may have happened while we waited.
        match self.handle(name) {
            Ok(current) if Arc::ptr_eq(&current.0, &h.0) => {}
            _ => return Err(Error::UnitNotFound(name.to_string())),
        }
        // `"paused": null` removes the field, whose default is "not paused": a resume.
        let pause = match patch.get("paused") {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::Null) => Some(false),
            _ => None,
        };
        let old = h.config();
        let mut doc = old.def.to_json();
        merge_patch(&mut doc, &patch);
        let def = UnitDef::from_json(doc)?;
        let config = Arc::new(UnitConfig::validate(def, &self.0.cfg.validate)?);
        self.check_host(&config).await?;
        let rescheduled = (&old.def.every, &old.def.cron, &old.def.tz)
            != (&config.def.every, &config.def.cron, &config.def.tz);
        let now = Timestamp::now();
        let status = h.status();
        let paused = pause.unwrap_or(status.paused);
        self.0
            .store
            .update_definition(
                name,
                status.created_at,
                config.def.to_json(),
                paused,
                now,
                rescheduled,
            )
            .await?;
        h.ask(|reply| Control::Edit { config, at: now, reply }).await??;
        if let Some(p) = pause
            && p != status.paused
        {
            h.ask(|reply| Control::Pause { paused: p, reply }).await??;
        }
        Ok(UnitSnapshot { config: h.config(), status: h.status() })
    }

    /// Deletes a unit: stops its runs, waits for them, then removes it (and, unless
    /// `keep_history`, its runs and logs). Runs in its own task, so a client that goes away
    /// half-way cannot leave a unit that is stopped but not deleted.
    pub async fn delete(&self, name: &str, keep_history: bool) -> Result<()> {
        let this = self.clone();
        let name = name.to_string();
        self.0
            .tracker
            .spawn(async move { this.delete_now(&name, keep_history).await })
            .await
            .map_err(|_| Error::ShuttingDown)?
    }

    async fn delete_now(&self, name: &str, keep_history: bool) -> Result<()> {
        let h = match self.0.units.get(name) {
            Some(Slot::Live(h)) => Some(h),
            Some(Slot::Unloadable) => None,
            // An `Add` still being recorded is not there yet: its row may already be committed,
            // and deleting that would leave a unit running that a restart forgets.
            Some(Slot::Reserved) | None => return Err(Error::UnitNotFound(name.to_string())),
        };
        let Some(h) = h else {
            // Stored, but its definition no longer loads: delete the record all the same.
            let r = self.0.store.delete_unit(name, keep_history).await;
            if matches!(r, Ok(()) | Err(Error::UnitNotFound(_))) {
                self.0.units.remove_if(name, |s| matches!(s, Slot::Unloadable));
            }
            return r;
        };
        let _guard = h.lock().await;
        match self.handle(name) {
            Ok(current) if Arc::ptr_eq(&current.0, &h.0) => {}
            _ => return Err(Error::UnitNotFound(name.to_string())),
        }
        h.ask(|reply| Control::Delete { reply }).await?;
        let r = self.0.store.delete_unit(name, keep_history).await;
        match r {
            Ok(()) | Err(Error::UnitNotFound(_)) => {
                self.0.units.remove(name);
                Ok(())
            }
            Err(e) => {
                // Not deleted: bring the unit back as it was, without starting anything.
                let st = h.status();
                let init = InitialState {
                    paused: st.paused,
                    stopped: true,
                    last_fire: Some(Timestamp::now()),
                    runs_total: st.runs_total,
                    failures_total: st.failures_total,
                    last_run: st.last_run,
                    created_at: st.created_at,
                    updated_at: st.updated_at,
                    anchor: st.updated_at,
                    fresh: false,
                    quiet: true,
                    dispatches: Vec::new(),
                };
                let h2 = self.spawn_loop(h.config(), init);
                self.0.units.insert(name.to_string(), Slot::Live(h2));
                Err(Error::NotRecorded(format!(
                    "unit {name:?} was not deleted ({e}); its runs were stopped"
                )))
            }
        }
    }

    /// Starts a run now (or returns the one that is active, per the overlap policy).
    pub async fn start(&self, name: &str) -> Result<RunRecord> {
        let h = self.handle(name)?;
        h.ask(|reply| Control::Start { trigger: Trigger::Manual, reply }).await?
    }

    /// Stops every active run of a unit; a service stays stopped until started.
    pub async fn stop(&self, name: &str) -> Result<usize> {
        let h = self.handle(name)?;
        h.ask(|reply| Control::Stop { reply }).await?
    }

    /// Pauses (or resumes) a unit's schedule and restarts.
    pub async fn pause(&self, name: &str, paused: bool) -> Result<UnitSnapshot> {
        let h = self.handle(name)?;
        let _guard = h.lock().await;
        h.ask(|reply| Control::Pause { paused, reply }).await??;
        Ok(UnitSnapshot { config: h.config(), status: h.status() })
    }

    /// Cancels a run; answers with the run as it ended.
    pub async fn cancel_run(&self, id: i64) -> Result<RunRecord> {
        let rec = self.0.store.get_run(id).await?;
        if rec.state.is_final() {
            return Err(Error::Conflict(format!("run {id} already ended ({})", rec.state)));
        }
        let h = self.handle(&rec.unit)?;
        h.ask(|reply| Control::Cancel { run: id, reply }).await?
    }

    /// `Dispatch.Cancel`, `Pause`, `Resume`: answered by the dispatch's unit loop.
    pub async fn dispatch_op(&self, id: i64, op: DispatchOp) -> Result<DispatchRecord> {
        let (d, _, _) = self.0.store.get_dispatch(id).await?;
        if d.ended_at.is_some() {
            return Err(Error::Conflict(format!("dispatch {id} already ended ({})", d.state)));
        }
        let h = self.handle(&d.unit)?;
        h.ask(|reply| Control::Dispatch { id, op, reply }).await?
    }

    /// `Run.Redo`: the run of a dispatch again, on its host, as a new attempt.
    pub async fn redo_run(&self, id: i64) -> Result<RunRecord> {
        let rec = self.0.store.get_run(id).await?;
        let h = self.handle(&rec.unit)?;
        h.ask(|reply| Control::Redo { run: id, reply }).await?
    }

    /// `Run.Ignore`: the run no longer counts against its dispatch.
    pub async fn ignore_run(&self, id: i64) -> Result<RunRecord> {
        let rec = self.0.store.get_run(id).await?;
        let h = self.handle(&rec.unit)?;
        h.ask(|reply| Control::Ignore { run: id, reply }).await??;
        self.0.store.get_run(id).await
    }

    /// One run.
    pub async fn run(&self, id: i64) -> Result<RunRecord> {
        self.0.store.get_run(id).await
    }

    /// Runs, newest first.
    pub async fn runs(&self, f: RunFilter) -> Result<Vec<RunRecord>> {
        // The history of a deleted unit may be kept, so only refuse a name with no runs.
        if let Some(u) = &f.unit
            && self.handle(u).is_err()
        {
            let any = RunFilter { unit: Some(u.clone()), limit: 1, ..Default::default() };
            if self.0.store.list_runs(any).await?.is_empty() {
                return Err(Error::UnitNotFound(u.clone()));
            }
        }
        self.0.store.list_runs(f).await
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.env.metrics
    }

    /// The text of a `/metrics` scrape: the counters, with units and agents by state as of now.
    pub fn scrape(&self) -> String {
        let units = self.unit_counts().into_iter().map(|(s, n)| (s.as_str(), n)).collect();
        let agents_now = self.fleet().list();
        let agents = crate::fleet::AgentState::ALL
            .into_iter()
            .map(|s| (s.as_str(), agents_now.iter().filter(|a| a.state == s).count()))
            .collect();
        self.metrics().encode(&Gauges { units, agents })
    }

    /// Counts of units per state.
    pub fn unit_counts(&self) -> Vec<(UnitState, usize)> {
        let mut counts = [0usize; UnitState::ALL.len()];
        for slot in self.0.units.map.iter() {
            if let Slot::Live(h) = slot.value() {
                let st = h.state();
                if let Some(i) = UnitState::ALL.iter().position(|s| *s == st) {
                    counts[i] += 1;
                }
            }
        }
        UnitState::ALL.into_iter().zip(counts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("web-*", "web-01"));
        assert!(!glob_match("web-*", "db-01"));
        assert!(glob_match("b?ck*", "backup"));
        assert!(!glob_match("b?ck", "backup"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
        // Pathological patterns stay linear-ish instead of exploding.
        let name = "a".repeat(64);
        assert!(!glob_match(&format!("{}b", "*a".repeat(20)), &name));
        assert!(glob_match(&"*".repeat(10_000), &name));
    }
}
