//! The control process: an HTTP/JSON API over membership, topics and the pool.
//! API reference: `docs/control-api.md`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use embar_dataplane::pool::coherence::{CoherenceMode, Coherent, NonCoherent};
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::{CreateOptions, OpenOptions, Pool};
use embar_dataplane::PoolError;
use serde_json::{json, Value};

use crate::http::{self, Handler, Limits, Request, Response};
use crate::membership::{Membership, MembershipError};
use crate::metrics::{ControlGauges, ControlMetrics};
use crate::store::{self, Durable, STATE_FORMAT};
use crate::topics::TopicSpec;

/// Connections served at once; more are answered 503.
pub const CONNECTIONS_MAX: usize = 256;
/// Longest long-poll a client may ask for.
pub const LONG_POLL_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub pool_path: PathBuf,
    pub pool: PoolConfig,
    pub pool_options: CreateOptions,
    pub heartbeat: Duration,
    pub miss_limit: u32,
    /// A broker slot without a live broker for this long is excluded from the replica sets
    /// of what it has not made durable (`crate::placement`); `None`: never.
    pub replace_after: Option<Duration>,
}

struct Inner {
    members: Membership,
    durable: Durable,
    /// When a topic was last deleted: a slot freed then is not given to a new topic before
    /// [`SLOT_REUSE_GRACE`] has passed.
    last_delete: Option<Instant>,
    vacancies: crate::placement::Vacancies,
}

/// How long after a deletion before a new topic may take a slot: brokers notice a deleted
/// topic within their 100 ms topic check (and sequencers at their next round); until then one
/// could still publish into the slot's rings, which a new topic's creation zeroes.
const SLOT_REUSE_GRACE: Duration = Duration::from_millis(500);

struct Shared {
    /// Membership and topics. Held briefly, never across a disk write: heartbeats take it.
    inner: Mutex<Inner>,
    /// Serialises the changes that are saved durably (registrations, topics, deaths): the
    /// disk is written under this lock only, so a slow fsync delays other changes, never a
    /// heartbeat.
    admin: Mutex<()>,
    changed: Condvar,
    pool: Pool,
    cfg: ControlConfig,
    start: Instant,
    metrics: ControlMetrics,
}

/// A running control process.
pub struct ControlHandle {
    pub addr: SocketAddr,
    pub epoch: u64,
    _shared: Arc<Shared>,
}

fn now_ns(s: &Shared) -> u64 {
    s.start.elapsed().as_nanos() as u64
}

/// Why the control process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("pool {path}: {source}")]
    Pool { path: PathBuf, source: PoolError },
    #[error("cannot restore topic {name:?} into the pool: {source}")]
    RestoreTopic { name: String, source: PoolError },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Listens where asked; asked for a free port (`:0`) on the address it listened on before
/// (`previous`, from the durable state), it takes that port again, so that the brokers and
/// clients of a restarted control process find it.
fn listen(asked: SocketAddr, previous: Option<SocketAddr>) -> Result<TcpListener, StartError> {
    if let Some(prev) = previous.filter(|p| asked.port() == 0 && p.ip() == asked.ip()) {
        match TcpListener::bind(prev) {
            Ok(l) => return Ok(l),
            Err(e) => log::warn!("cannot listen on {prev} again ({e}); taking a free port"),
        }
    }
    TcpListener::bind(asked).map_err(|source| StartError::Listen {
        addr: asked,
        source,
    })
}

/// Attaches to (or creates and formats) the pool, loads durable state, raises the epoch,
/// takes back the brokers that were live, and starts serving.
pub fn start(cfg: ControlConfig) -> Result<ControlHandle, StartError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StartError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let mut durable = store::load(&cfg.state_dir)?.unwrap_or(Durable {
        format: STATE_FORMAT,
        ..Durable::default()
    });
    let listener = listen(cfg.listen, durable.listen)?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listen,
        source,
    })?;
    durable.epoch += 1;
    durable.listen = Some(addr);
    store::save(&cfg.state_dir, &durable)?;
    // Where `embar cluster down` finds this process (also in `status`).
    let _ = std::fs::write(
        cfg.state_dir.join("control.pid"),
        std::process::id().to_string(),
    );
    let pool_err = |source| StartError::Pool {
        path: cfg.pool_path.clone(),
        source,
    };
    let pool = if cfg.pool_path.exists() {
        let p = Pool::open(
            &cfg.pool_path,
            &OpenOptions {
                expect_bytes: Some(cfg.pool.pool_bytes),
                ..Default::default()
            },
        )
        .map_err(pool_err)?;
        log::info!("attached to pool {}", cfg.pool_path.display());
        p
    } else {
        let p = Pool::create(&cfg.pool_path, &cfg.pool, &cfg.pool_options).map_err(pool_err)?;
        log::info!("created pool {}", cfg.pool_path.display());
        p
    };
    NonCoherent::detect().publish_epoch(&pool, durable.epoch);
    for t in &durable.topics {
        match pool.find_topic(Coherent, &t.name) {
            Ok(_) => {}
            Err(PoolError::UnknownTopic(_)) => {
                pool.create_topic(Coherent, &t.name, &t.config())
                    .map_err(|source| StartError::RestoreTopic {
                        name: t.name.clone(),
                        source,
                    })?;
            }
            Err(source) => return Err(pool_err(source)),
        }
    }
    // This process is the placement tables' only writer: one it was killed in the middle
    // of writing is completed, or every reader would wait for it.
    for t in &durable.topics {
        if let Ok(slot) = pool.find_topic(Coherent, &t.name) {
            if embar_dataplane::replication::placement::Placement::repair(
                Coherent,
                &pool.tinode(slot).placement,
            ) {
                log::warn!(
                    "topic {:?}: completed a placement table write left half done",
                    t.name
                );
            }
        }
    }
    let mut members = Membership::new(
        durable.next_broker_id,
        pool.geometry().max_brokers,
        cfg.heartbeat.as_nanos() as u64,
        cfg.miss_limit,
    );
    if !durable.members.is_empty() {
        members.restore(&durable.members, 0);
        log::info!(
            "took back brokers {:?}: live while they heartbeat within {} intervals",
            durable.members.iter().map(|m| m.id).collect::<Vec<_>>(),
            cfg.miss_limit
        );
    }
    let epoch = durable.epoch;
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            members,
            durable,
            last_delete: None,
            vacancies: Default::default(),
        }),
        admin: Mutex::new(()),
        changed: Condvar::new(),
        pool,
        cfg,
        start: Instant::now(),
        metrics: ControlMetrics::new(),
    });
    let thread = |what| move |source| StartError::Thread { what, source };
    let s = shared.clone();
    std::thread::Builder::new()
        .name("control-ticker".into())
        .spawn(move || ticker(&s))
        .map_err(thread("ticker"))?;
    let limits = Limits {
        connections_max: CONNECTIONS_MAX,
        ..Limits::default()
    };
    http::spawn("control-http", listener, limits, shared.clone()).map_err(thread("accept"))?;
    Ok(ControlHandle {
        addr,
        epoch,
        _shared: shared,
    })
}

trait EpochWriter {
    fn publish_epoch(&self, pool: &Pool, epoch: u64);
}

impl EpochWriter for NonCoherent {
    fn publish_epoch(&self, pool: &Pool, epoch: u64) {
        use embar_dataplane::pool::coherence::Coherence;
        self.publish(&pool.superblock().epoch, epoch);
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn admin(s: &Shared) -> MutexGuard<'_, ()> {
    s.admin.lock().unwrap_or_else(|p| p.into_inner())
}

/// Saves the durable state as it is now, with `change` applied to the copy being saved. The
/// caller holds the admin lock (`_admin`); the inner lock is held only to take the copy.
fn persist(
    s: &Shared,
    _admin: &MutexGuard<'_, ()>,
    change: impl FnOnce(&mut Durable),
) -> Result<(), store::StoreError> {
    let mut d = {
        let g = lock(s);
        let mut d = g.durable.clone();
        d.members = g.members.durable();
        d
    };
    change(&mut d);
    store::save(&s.cfg.state_dir, &d)
}

fn ticker(s: &Shared) {
    let period = (s.cfg.heartbeat / 4).max(Duration::from_millis(5));
    loop {
        std::thread::sleep(period);
        let died = lock(s).members.tick(now_ns(s));
        if !died.is_empty() {
            log::warn!(
                "brokers {died:?} missed {} heartbeats: dead",
                s.cfg.miss_limit
            );
            s.changed.notify_all();
            let a = admin(s);
            if let Err(e) = persist(s, &a, |_| {}) {
                log::error!("cannot save that brokers {died:?} died: {e}");
            }
        }
        if let Some(after) = s.cfg.replace_after {
            replace_vacant(s, after);
        }
    }
}

/// Excludes the slots vacant for `after` from the replica sets (`crate::placement`).
fn replace_vacant(s: &Shared, after: Duration) {
    let overdue = {
        let mut g = lock(s);
        let live = g.members.live_slots();
        let slots = s.pool.geometry().max_brokers;
        g.vacancies.overdue(slots, &live, Instant::now(), after)
    };
    // A slot every topic passes over already (the usual state of an empty slot once
    // re-placed) costs a look at the tables each tick, not the admin lock.
    let names = topic_names(s);
    let overdue: Vec<u32> = overdue
        .into_iter()
        .filter(|x| crate::placement::pending(&s.pool, &names, *x))
        .collect();
    if overdue.is_empty() {
        return;
    }
    let _a = admin(s);
    // Again under the lock: topic changes take it too.
    let names = topic_names(s);
    // Registrations take the admin lock too: a slot taken meanwhile is not replaced.
    let live = lock(s).members.live_slots();
    for slot in overdue.into_iter().filter(|x| !live.contains(x)) {
        for (topic, r) in crate::placement::replace(&s.pool, &names, slot) {
            let ms = after.as_millis();
            match r {
                Ok(from) => log::warn!(
                    "broker slot {slot} has had no live broker for {ms} ms: topic {topic:?}: re-placed from total order {from}"
                ),
                Err(why) if lock(s).vacancies.first_report(slot, &topic) => log::warn!(
                    "broker slot {slot} has had no live broker for {ms} ms: topic {topic:?}: not re-placed: {why}"
                ),
                Err(_) => {}
            }
        }
    }
}

/// The slots a new topic's replica sets pass over: those the existing topics exclude now,
/// and those vacant for `--replace-after-ms` (with no replicated topic yet, no table says
/// so).
fn replaced_slots(s: &Shared, g: &Inner) -> std::collections::BTreeSet<u32> {
    let names: Vec<String> = g.durable.topics.iter().map(|t| t.name.clone()).collect();
    let mut r = crate::placement::replaced(&s.pool, &names);
    if let Some(after) = s.cfg.replace_after {
        let live = g.members.live_slots();
        r.extend(
            g.vacancies
                .overdue_as_of(Instant::now(), after)
                .into_iter()
                .filter(|x| !live.contains(x)),
        );
    }
    r
}

fn topic_names(s: &Shared) -> Vec<String> {
    lock(s)
        .durable
        .topics
        .iter()
        .map(|t| t.name.clone())
        .collect()
}

impl Handler for Shared {
    fn handle(&self, req: &Request) -> Response {
        route(self, req)
    }

    fn answered(&self, status: u16) {
        self.metrics.answered(status);
    }

    fn refused(&self) {
        // A heartbeat may be among the refused: this time is not the brokers' silence.
        lock(self).members.stall(now_ns(self));
    }
}

fn route(s: &Shared, req: &Request) -> Response {
    let parts: Vec<String> = req
        .path
        .trim_matches('/')
        .split('/')
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    // Everything but membership reads the pool: a truncated pool file is reported instead of
    // faulting on it.
    if !matches!(parts.as_slice(), ["v1", "brokers", ..]) {
        if let Err(e) = s.pool.check_backing() {
            return Response::error(500, e.to_string());
        }
    }
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["v1", "brokers"]) => register(s, req),
        ("POST", ["v1", "brokers", id, "heartbeat"]) => heartbeat(s, id),
        ("GET", ["v1", "brokers"]) => brokers(s, req),
        ("POST", ["v1", "topics"]) => create_topic(s, req),
        ("GET", ["v1", "topics"]) => list_topics(s),
        ("GET", ["v1", "topics", name]) => describe_topic(s, name),
        ("DELETE", ["v1", "topics", name]) => delete_topic(s, name),
        ("GET", ["v1", "status"]) => status(s),
        ("GET", ["metrics"]) => metrics(s),
        (_, ["v1", "brokers" | "topics" | "status", ..]) | (_, ["metrics"]) => Response::error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        _ => Response::error(
            404,
            format!("no such endpoint: {} {}", req.method, req.path),
        ),
    }
}

fn parse<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("malformed request body: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    addresses: BTreeMap<String, String>,
    /// A live broker this process does not know (it restarted without its state) rejoins with
    /// the id and slot it holds.
    #[serde(default)]
    rejoin: Option<Rejoin>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rejoin {
    broker_id: u32,
    slot: u32,
}

/// Whether the process a registration names is known to have exited: it ran on this host
/// (same host name) and its process is gone, a zombie, or its pid now names a later process. A broker on another host is never known
/// gone; its slot waits for its grace.
fn process_gone(addresses: &BTreeMap<String, String>) -> bool {
    let here = embar_sys::process::host_name();
    let same_host = addresses
        .get("host")
        .is_some_and(|h| Some(h) == here.as_ref());
    let pid = addresses.get("pid").and_then(|p| p.parse::<u32>().ok());
    // The start time makes a reused pid count as gone (absent: only the pid is checked).
    let start = addresses
        .get("pid_start")
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0);
    match pid {
        Some(pid) if same_host || addresses.get("host").is_none() => {
            !embar_sys::process::ProcessId { pid, start }.alive()
        }
        _ => false,
    }
}

fn register(s: &Shared, req: &Request) -> Response {
    let body: RegisterBody = match parse(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let a = admin(s);
    let (id, slot, status) = {
        let mut g = lock(s);
        let now = now_ns(s);
        match body.rejoin {
            Some(r) => match g.members.rejoin(r.broker_id, r.slot, body.addresses, now) {
                Ok(()) => (r.broker_id, r.slot, 200),
                Err(e @ MembershipError::Dead(_)) => return Response::error(410, e.to_string()),
                Err(e) => return Response::error(409, e.to_string()),
            },
            None => match g.members.register(body.addresses, now, &process_gone) {
                Ok((id, slot)) => {
                    g.durable.next_broker_id = g.members.next_id();
                    (id, slot, 201)
                }
                Err(e) => return Response::error(503, e.to_string()),
            },
        }
    };
    // The id is durable before anyone hears of it: a restarted control never reuses it.
    if let Err(e) = persist(s, &a, |_| {}) {
        if status == 201 {
            lock(s).members.forget(id);
            return Response::error(500, e.to_string());
        }
        log::error!("broker {id} rejoined, but the state could not be saved: {e}");
    }
    for line in crate::placement::readmit(&s.pool, &topic_names(s), slot) {
        log::info!("broker slot {slot} is in the replica sets again: {line}");
    }
    drop(a);
    s.changed.notify_all();
    if status == 201 {
        log::info!("broker {id} registered in slot {slot}");
    } else {
        log::info!("broker {id} rejoined slot {slot}");
    }
    Response::json(
        status,
        &json!({
            "broker_id": id,
            "slot": slot,
            "heartbeat_ms": s.cfg.heartbeat.as_millis() as u64,
            "epoch": lock(s).durable.epoch,
        }),
    )
}

fn heartbeat(s: &Shared, id: &str) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        return Response::error(400, format!("broker id {id:?} is not a number"));
    };
    let mut g = lock(s);
    match g.members.heartbeat(id, now_ns(s)) {
        Ok(()) => {
            let sequencer = g.members.sequencer() == Some(id);
            Response::json(200, &json!({ "broker_id": id, "sequencer": sequencer }))
        }
        Err(e @ MembershipError::Dead(_)) => Response::error(410, e.to_string()),
        Err(e) => Response::error(404, e.to_string()),
    }
}

fn brokers(s: &Shared, req: &Request) -> Response {
    let since: u64 = match req.query("since").map(str::parse).transpose() {
        Ok(v) => v.unwrap_or(0),
        Err(_) => return Response::error(400, "since must be a number"),
    };
    let wait = match req.query("wait_ms").map(str::parse::<u64>).transpose() {
        Ok(v) => Duration::from_millis(v.unwrap_or(0)).min(LONG_POLL_MAX),
        Err(_) => return Response::error(400, "wait_ms must be a number"),
    };
    let deadline = Instant::now() + wait;
    let mut g = lock(s);
    while g.members.version() <= since {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        g = s
            .changed
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    Response::json(
        200,
        &json!({ "version": g.members.version(), "brokers": g.members.brokers(now_ns(s)) }),
    )
}

fn pool_error_status(e: &PoolError) -> u16 {
    match e {
        PoolError::TopicExists(_) => 409,
        PoolError::UnknownTopic(_) => 404,
        PoolError::TopicTableFull(_) => 507,
        _ => 422,
    }
}

fn create_topic(s: &Shared, req: &Request) -> Response {
    let spec: TopicSpec = match parse(req) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let a = admin(s);
    // Wait out the grace of a recent deletion, without holding the lock (heartbeats go on).
    loop {
        let left = lock(s).last_delete.map_or(Duration::ZERO, |t| {
            SLOT_REUSE_GRACE.saturating_sub(t.elapsed())
        });
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left);
    }
    {
        let g = lock(s);
        let replaced = replaced_slots(s, &g);
        if let Err(e) = spec.check_cluster(
            g.members.live_count(),
            replaced.len() as u32,
            s.pool.geometry().max_brokers,
        ) {
            return Response::error(422, e);
        }
        if g.durable.topics.iter().any(|t| t.name == spec.name) {
            return Response::error(409, format!("topic {:?} already exists", spec.name));
        }
    }
    let table = crate::placement::start_table(&replaced_slots(s, &lock(s)));
    let slot = match s
        .pool
        .create_topic_placed(Coherent, &spec.name, &spec.config(), &table)
    {
        Ok(slot) => slot,
        Err(e) => return Response::error(pool_error_status(&e), e.to_string()),
    };
    if let Err(e) = persist(s, &a, |d| d.topics.push(spec.clone())) {
        let _ = s.pool.delete_topic(Coherent, &spec.name);
        return Response::error(500, e.to_string());
    }
    lock(s).durable.topics.push(spec.clone());
    log::info!("topic {:?} created in slot {slot}", spec.name);
    Response::json(201, &json!({ "topic": spec, "slot": slot }))
}

fn topic_json(s: &Shared, spec: &TopicSpec) -> Value {
    let Ok(slot) = s.pool.find_topic(Coherent, &spec.name) else {
        return json!({ "topic": spec, "slot": null });
    };
    let t = s.pool.tinode(slot);
    let brokers = s.pool.geometry().max_brokers as usize;
    let progress: Vec<Value> = (0..brokers)
        .map(|b| {
            let e = &t.brokers[b];
            json!({
                "broker": b,
                "written": e.broker.written.load(Ordering::Acquire),
                "consumed": e.sequencer.ring_consumed.load(Ordering::Acquire),
                "ordered_messages": e.sequencer.ordered.load(Ordering::Acquire),
                // Replication: the delivery index and total order below which every batch
                // of this broker's replica sets is synced on its disk.
                "durable_delivery": e.replication.durable_delivery.load(Ordering::Acquire),
                "durable_total_order": e.replication.durable_total_order.load(Ordering::Acquire),
            })
        })
        .collect();
    let placement =
        embar_dataplane::replication::placement::Placement::read(Coherent, &t.placement);
    let excluded: Vec<Value> = placement
        .exclusions()
        .iter()
        .map(|e| {
            json!({
                "slot": e.slot,
                "from_total_order": e.from,
                "until_total_order": (!e.is_open()).then_some(e.until),
            })
        })
        .collect();
    let seq = s.pool.sequencer_state(slot);
    json!({
        "topic": spec,
        "slot": slot,
        "sequencer": {
            "epoch": seq.epoch.load(Ordering::Acquire),
            "next_total_order": seq.next_global.load(Ordering::Acquire),
            "duplicates_dropped": seq.duplicates.load(Ordering::Acquire),
            "clients_fenced": seq.fences.load(Ordering::Acquire),
            // Publishers the ORDER 4/5 client table tracks now (bounded: ended ones are
            // reclaimed).
            "clients_tracked": s.pool.sequencer_clients_in_use(Coherent, slot),
        },
        "brokers": progress,
        // Slots passed over by the replica sets (`crate::placement`); `until_total_order`
        // null: still.
        "excluded_slots": excluded,
    })
}

fn list_topics(s: &Shared) -> Response {
    let g = lock(s);
    Response::json(200, &json!({ "topics": g.durable.topics }))
}

fn describe_topic(s: &Shared, name: &str) -> Response {
    let g = lock(s);
    match g.durable.topics.iter().find(|t| t.name == name) {
        Some(spec) => Response::json(200, &topic_json(s, spec)),
        None => Response::error(404, format!("unknown topic {name:?}")),
    }
}

fn delete_topic(s: &Shared, name: &str) -> Response {
    let a = admin(s);
    if !lock(s).durable.topics.iter().any(|t| t.name == name) {
        return Response::error(404, format!("unknown topic {name:?}"));
    }
    if let Err(e) = persist(s, &a, |d| d.topics.retain(|t| t.name != name)) {
        return Response::error(500, e.to_string());
    }
    lock(s).durable.topics.retain(|t| t.name != name);
    if let Err(e) = s.pool.delete_topic(Coherent, name) {
        log::warn!("topic {name:?} was not in the pool's table: {e}");
    }
    lock(s).last_delete = Some(Instant::now());
    log::info!("topic {name:?} deleted");
    Response::json(200, &json!({ "deleted": name }))
}

fn status(s: &Shared) -> Response {
    let g = lock(s);
    let geo = s.pool.geometry();
    Response::json(
        200,
        &json!({
            "epoch": g.durable.epoch,
            "pid": std::process::id(),
            "pool": {
                "path": s.cfg.pool_path.display().to_string(),
                "bytes": geo.pool_bytes,
                "coherence": s.pool.coherence_mode().name(),
                "segments": geo.segment_count,
                "segments_in_use": s.pool.segments_in_use(Coherent),
            },
            "membership_version": g.members.version(),
            "live_brokers": g.members.live_count(),
            // Where the sequencer runs: the broker this process assigned it to.
            "sequencer": g.members.sequencer().and_then(|id| {
                g.members.brokers(now_ns(s)).into_iter().find(|b| b.id == id)
            })
            .map(|b| json!({
                "broker_id": b.id,
                "slot": b.slot,
                "mode": b.addresses.get(crate::membership::SEQUENCER),
                "topics": "all",
            })),
            "brokers": g.members.brokers(now_ns(s)),
            "topics": g.durable.topics.iter().map(|t| topic_json(s, t)).collect::<Vec<_>>(),
        }),
    )
}

fn metrics(s: &Shared) -> Response {
    let now = {
        let g = lock(s);
        ControlGauges {
            epoch: g.durable.epoch,
            brokers_registered: g.members.brokers(now_ns(s)).len() as u64,
            brokers_live: u64::from(g.members.live_count()),
            membership_version: g.members.version(),
            topics: g.durable.topics.len() as u64,
            pool_segments_in_use: s.pool.segments_in_use(Coherent),
        }
    };
    Response {
        status: 200,
        content_type: crate::metrics::CONTENT_TYPE,
        body: s.metrics.encode(&now),
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: "127.0.0.1:7400".parse().expect("a valid address"),
            state_dir: PathBuf::from("/var/tmp/embar-control"),
            pool_path: PathBuf::from("/dev/shm/embar.pool"),
            pool: PoolConfig::default(),
            pool_options: CreateOptions {
                coherence: CoherenceMode::Coherent,
                ..CreateOptions::default()
            },
            heartbeat: Duration::from_secs(1),
            miss_limit: 3,
            replace_after: Some(REPLACE_AFTER_DEFAULT),
        }
    }
}

/// How long a broker slot stays without a live broker before its replicas are re-placed.
pub const REPLACE_AFTER_DEFAULT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ControlClient;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A control process on a free port over a small pool of its own; removes both on drop.
    /// Fail points are global to the test binary: each test holds the scenario lock while its
    /// control process runs, so a fail point one test sets never stalls another's saves.
    struct TestControl {
        _fail_points: fail::FailScenario<'static>,
        handle: ControlHandle,
        dir: PathBuf,
        pool_path: PathBuf,
    }

    impl TestControl {
        fn start(name: &str) -> TestControl {
            let fail_points = fail::FailScenario::setup();
            let id = std::process::id();
            let dir = std::env::temp_dir().join(format!("embar-server-{name}-{id}"));
            let pool_path = PathBuf::from(format!("/dev/shm/embar-server-{name}-{id}"));
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&pool_path);
            let handle = start(ControlConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                state_dir: dir.clone(),
                pool_path: pool_path.clone(),
                pool: PoolConfig {
                    pool_bytes: 16 << 20,
                    max_topics: 2,
                    max_brokers: 2,
                    ring_slots: 64,
                    segment_bytes: 1 << 20,
                },
                ..ControlConfig::default()
            })
            .unwrap();
            TestControl {
                _fail_points: fail_points,
                handle,
                dir,
                pool_path,
            }
        }

        fn client(&self) -> ControlClient {
            ControlClient::new(self.handle.addr)
        }
    }

    impl Drop for TestControl {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&self.pool_path);
        }
    }

    /// Heartbeats of `id` for `period`, each answered within 500 ms.
    fn heartbeats_stay_prompt(client: &ControlClient, id: u32, period: Duration) {
        let start_t = Instant::now();
        while start_t.elapsed() < period {
            let t = Instant::now();
            client.heartbeat(id).unwrap();
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a heartbeat waited {:?}",
                t.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_registration_whose_pid_was_reused_or_is_gone_counts_as_gone() {
        let me = embar_sys::process::ProcessId::current();
        let host = embar_sys::process::host_name().unwrap();
        let reg = |pid: u32, start: u64| -> BTreeMap<String, String> {
            [
                ("host".to_string(), host.clone()),
                ("pid".to_string(), pid.to_string()),
                ("pid_start".to_string(), start.to_string()),
            ]
            .into()
        };
        assert!(!process_gone(&reg(me.pid, me.start)));
        assert!(process_gone(&reg(me.pid, me.start - 1)), "a reused pid");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(process_gone(&reg(pid, 0)), "an exited process");
        let mut elsewhere = reg(pid, 0);
        elsewhere.insert("host".into(), format!("{host}-elsewhere"));
        assert!(
            !process_gone(&elsewhere),
            "another host's process is never known gone"
        );
    }

    #[test]
    fn heartbeats_are_answered_while_a_durable_write_is_stuck() {
        let c = TestControl::start("slow-disk");
        let client = c.client();
        let reg = client.register(&BTreeMap::new()).unwrap();
        // The disk "hangs": every save blocks until the fail point is removed.
        fail::cfg("control-store-save", "pause").unwrap();
        let addr = c.handle.addr;
        let creating = std::thread::spawn(move || {
            ControlClient::new(addr).create_topic(&crate::topics::TopicSpec {
                name: "t".into(),
                order: 5,
                ack: 1,
                replication_factor: 0,
                batch_bytes: 64 << 10,
            })
        });
        heartbeats_stay_prompt(&client, reg.broker_id, Duration::from_secs(2));
        assert!(!creating.is_finished(), "the save was not stuck");
        assert_eq!(client.status().unwrap()["live_brokers"], 1);
        fail::remove("control-store-save");
        creating.join().unwrap().unwrap();
        assert_eq!(client.list_topics().unwrap()["topics"][0]["name"], "t");
    }

    #[test]
    fn garbage_on_the_wire_gets_400_and_changes_nothing() {
        let c = TestControl::start("garbage");
        let client = c.client();
        let reg = client.register(&BTreeMap::new()).unwrap();
        let version = client.status().unwrap()["membership_version"].clone();
        for garbage in [
            &b"\x00\x01\x02\xff\r\n\r\n"[..],
            b"POST /v1/brokers HTTP/1.1\r\nContent-Length: x\r\n\r\n{}",
            b"POST /v1/topics HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"nam",
        ] {
            let mut s = TcpStream::connect(c.handle.addr).unwrap();
            s.write_all(garbage).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
            assert!(text.contains(r#"{"error":"#), "{text}");
        }
        client.heartbeat(reg.broker_id).unwrap();
        let status = client.status().unwrap();
        assert_eq!(status["membership_version"], version);
        assert_eq!(status["topics"], serde_json::json!([]));
        let metrics = client_metrics(&c);
        assert!(
            metrics
                .lines()
                .any(|l| l == "embar_control_request_errors_total 3"),
            "{metrics}"
        );
    }

    fn client_metrics(c: &TestControl) -> String {
        let mut s = TcpStream::connect(c.handle.addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn heartbeats_are_answered_while_connections_send_nothing() {
        let c = TestControl::start("silent");
        let client = c.client();
        let reg = client.register(&BTreeMap::new()).unwrap();
        // Connections that never send a byte, and one that stops inside its head.
        let mut silent: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(c.handle.addr).unwrap())
            .collect();
        silent[0]
            .write_all(b"POST /v1/brokers/0/heartbeat HTTP/1.1\r\nConte")
            .unwrap();
        heartbeats_stay_prompt(&client, reg.broker_id, Duration::from_secs(1));
        assert_eq!(client.status().unwrap()["live_brokers"], 1);
    }
}
