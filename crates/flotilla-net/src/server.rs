//! The server: the gRPC service in front, [`Driver`]'s round loop behind, on its own thread.
//!
//! The service only queues: joins update the roster, pulls take the task waiting for the
//! caller, pushes hand the reply bytes to the round loop and wait for its verdict, so a
//! refused update gets its reason back. The round loop ([`NetFleet`]) decides everything:
//! sampling among live clients, deadlines, liveness, validation, aggregation, checkpoints.
//! A slow or dead client never holds a round beyond the deadline, and one that stops
//! calling is declared gone after `liveness_s`.

use crate::NetError;
use crate::proto::service::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::*;
use flotilla_core::device::DeviceProfile;
use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_engine::config::ServerConfig;
use flotilla_engine::driver::{ClientRun, Fleet, Prepared, ReplyCheck, blank_record, judge_reply};
use flotilla_engine::method::KnownMasks;
use flotilla_engine::sink::ClientStatus;
use flotilla_engine::sink::Sink;
use flotilla_engine::{ClientInfo, Driver, EngineError};
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};
use tonic::{Request, Response, Status};

/// gRPC prefixes every message with 5 bytes (compression flag and length); counted in the
/// bytes on the wire.
pub const GRPC_FRAME_BYTES: u64 = 5;

/// The longest a pull waits for a task before answering `Wait`. A pull also answers after
/// `heartbeat_s`, so a waiting client calls at least that often and stays live.
const LONG_POLL: Duration = Duration::from_secs(10);

/// TLS material of the server.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// CA whose client certificates are required (mutual TLS), PEM.
    pub client_ca: Option<PathBuf>,
}

/// Bound on a client's declared example count when neither the options nor the config set
/// one: 2³², far above any single client's data, far below what would drown the others.
pub const DEFAULT_MAX_EXAMPLES: u64 = 1 << 32;

/// What the caller's bearer token authorises, put on each request by the interceptor.
#[derive(Debug, Clone)]
struct Authorised(Option<Arc<crate::Grant>>);

impl Authorised {
    fn of<T>(req: &Request<T>) -> Self {
        req.extensions()
            .get::<Authorised>()
            .cloned()
            .unwrap_or(Authorised(None))
    }

    /// Refuses a call for a client id the token does not cover.
    fn check(&self, client: u64) -> Result<(), Status> {
        match &self.0 {
            Some(g) if !g.allows(client) => {
                tracing::warn!(client, token = %g.label, "call refused: the token does not cover this client id");
                Err(Status::permission_denied(format!(
                    "the bearer token{} does not authorise client id {client}; use the token issued for that client",
                    if g.label.is_empty() {
                        String::new()
                    } else {
                        format!(" `{}`", g.label)
                    }
                )))
            }
            _ => Ok(()),
        }
    }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// TLS; `None` serves plaintext (the CLI requires `--insecure` for that).
    pub tls: Option<ServerTls>,
    /// Accepted bearer tokens and the client ids each may act as; `None` accepts any caller
    /// as any client (only with `--insecure`).
    pub tokens: Option<Vec<crate::Grant>>,
    /// Most training examples a client may declare when it joins (a reply never weighs more
    /// than its client declared); `None`: `server.max_examples` of the config, else
    /// [`DEFAULT_MAX_EXAMPLES`].
    pub max_examples: Option<u64>,
    /// Where to write the bound address once listening (for scripts and tests).
    pub address_file: Option<PathBuf>,
}

/// A member of the run: a client that joined.
#[derive(Debug, Clone)]
struct Member {
    session: u64,
    profile: DeviceProfile,
    num_examples: u64,
    last_seen: Instant,
}

/// A task for a client: waiting to be pulled (`pull_reply` holds it), then outstanding until
/// its reply (`pull_reply` is `None`: the bytes went to the client and are not kept).
struct Outgoing {
    session: u64,
    pull_reply: Option<PullReply>,
    /// The task, to send again in full what the puller's inventory lacks.
    prepared: Arc<Prepared>,
    /// Bytes of the pull reply that carried the task, frame included, once delivered.
    delivered_bytes: u64,
}

/// Reply bytes waiting for the round loop's verdict.
struct Incoming {
    client: u64,
    session: u64,
    reply: Vec<u8>,
    wire_bytes: u64,
    verdict: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct State {
    members: BTreeMap<u64, Member>,
    outbox: HashMap<u64, Outgoing>,
    inbox: Vec<Incoming>,
    restarted: Vec<u64>,
    done: bool,
    /// Why the run ended, when it ended in an error.
    failure: Option<String>,
    released: HashSet<u64>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the round loop (a join, a push, a heartbeat).
    changed: Condvar,
    /// Wakes long-polling pulls (a task posted, the run over).
    posted: Notify,
    cfg: ServerConfig,
    experiment_toml: String,
    num_clients: u64,
    max_examples: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping the server, so a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller's membership, refreshed; unknown sessions must join again.
    fn touch(&self, client: u64, session: u64) -> Result<(), Status> {
        let mut st = self.lock();
        match st.members.get_mut(&client) {
            Some(m) if m.session == session => {
                m.last_seen = Instant::now();
                Ok(())
            }
            _ => Err(Status::failed_precondition(format!(
                "unknown session for client {client}; join again"
            ))),
        }
    }
}

impl crate::push_gate::PushPolicy for Shared {
    fn may_push(&self, client: u64, session: u64) -> Result<(), Status> {
        let st = self.lock();
        if st.members.get(&client).is_none_or(|m| m.session != session) {
            return Err(Status::failed_precondition(format!(
                "unknown session for client {client}; join again"
            )));
        }
        match st.outbox.get(&client) {
            Some(out) if out.session == session && out.pull_reply.is_none() => Ok(()),
            _ => Err(Status::failed_precondition(format!(
                "no task outstanding for client {client}: a late, duplicate or replayed update"
            ))),
        }
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "client speaks protocol version {v}, this server speaks {PROTOCOL_VERSION}; use matching flotilla versions"
        )));
    }
    Ok(())
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl Coordinator for Service {
    async fn describe(
        &self,
        req: Request<DescribeRequest>,
    ) -> Result<Response<DescribeReply>, Status> {
        check_version(req.get_ref().protocol_version)?;
        Ok(Response::new(DescribeReply {
            experiment_toml: self.0.experiment_toml.clone(),
            heartbeat_s: self.0.cfg.heartbeat_s,
            protocol_version: PROTOCOL_VERSION,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let auth = Authorised::of(&req);
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let profile = DeviceProfile::from_join(&r.profile_json, &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.num_examples == 0 {
            return Err(Status::invalid_argument(
                "a client needs at least one training example to join",
            ));
        }
        let shared = &self.0;
        if r.num_examples > shared.max_examples {
            return Err(Status::invalid_argument(format!(
                "a client may declare at most {} training examples (server.max_examples), got {}",
                shared.max_examples, r.num_examples
            )));
        }
        let mut st = shared.lock();
        let client = match r.client {
            Some(c) if c >= shared.num_clients => {
                return Err(Status::invalid_argument(format!(
                    "client id {c} is outside this run's 0..{} (data.num_clients)",
                    shared.num_clients
                )));
            }
            Some(c) => {
                auth.check(c)?;
                c
            }
            None => {
                let taken = |c: u64| st.members.contains_key(&c);
                let free = match &auth.0 {
                    Some(g) => g.first_free(shared.num_clients, taken),
                    None => (0..shared.num_clients).find(|c| !taken(*c)),
                };
                free.ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "every client id of this run that the token may use is taken ({} ids in the run)",
                        shared.num_clients
                    ))
                })?
            }
        };
        let session = rand::random::<u64>();
        if st.members.contains_key(&client) {
            // The same id joining again: a restarted process or a lost connection. It holds
            // no masks any more, and a task it was given is lost with the old session.
            st.restarted.push(client);
            tracing::info!(client, name = %r.name, "client joined again");
        } else {
            tracing::info!(client, name = %r.name, tier = %profile.tier, examples = r.num_examples, "client joined");
        }
        st.members.insert(
            client,
            Member {
                session,
                profile,
                num_examples: r.num_examples,
                last_seen: Instant::now(),
            },
        );
        drop(st);
        shared.changed.notify_all();
        Ok(Response::new(JoinReply { client, session }))
    }

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullReply>, Status> {
        let auth = Authorised::of(&req);
        let r = req.into_inner();
        auth.check(r.client)?;
        let shared = &self.0;
        shared.touch(r.client, r.session)?;
        let wait = LONG_POLL.min(Duration::from_secs_f64(shared.cfg.heartbeat_s));
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            let notified = shared.posted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = shared.lock();
                if let Some(out) = st.outbox.get_mut(&r.client)
                    && out.session == r.session
                    && let Some(mut task) = out.pull_reply.take()
                {
                    // A client that lacks a mask or tensor the task names by fingerprint (a
                    // restarted process, a restored server, an evicted entry) gets it in full.
                    if let Some(fixed) = out.prepared.reconcile(&r.inventory()) {
                        tracing::info!(
                            client = r.client,
                            "the client lacks what it was thought to hold; sending it in full"
                        );
                        task.task = fixed
                            .encode()
                            .map_err(|e| Status::internal(e.to_string()))?;
                    }
                    out.delivered_bytes = task.encoded_len() as u64 + GRPC_FRAME_BYTES;
                    // Liveness counts from the delivery: training starts now.
                    if let Some(m) = st.members.get_mut(&r.client) {
                        m.last_seen = Instant::now();
                    }
                    return Ok(Response::new(task));
                }
                if st.done {
                    st.released.insert(r.client);
                    let (status, reason) = match &st.failure {
                        Some(r) => (PullStatus::Failed, r.clone()),
                        None => (PullStatus::Done, String::new()),
                    };
                    drop(st);
                    shared.changed.notify_all();
                    return Ok(Response::new(PullReply {
                        status: status as i32,
                        task: Vec::new(),
                        reason,
                    }));
                }
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                shared.touch(r.client, r.session)?;
                return Ok(Response::new(PullReply {
                    status: PullStatus::Wait as i32,
                    task: Vec::new(),
                    reason: String::new(),
                }));
            }
        }
    }

    async fn push(&self, req: Request<PushRequest>) -> Result<Response<PushReply>, Status> {
        let auth = Authorised::of(&req);
        // The gate admitted this push from its headers before its body was read.
        let declared = req
            .extensions()
            .get::<crate::push_gate::Admitted>()
            .map(|a| a.declared);
        let r = req.into_inner();
        auth.check(r.client)?;
        let shared = &self.0;
        shared.touch(r.client, r.session)?;
        let encoded = r.encoded_len() as u64;
        match declared {
            Some(d) if encoded <= d => {}
            Some(d) => {
                return Err(Status::invalid_argument(format!(
                    "update refused: {encoded} bytes sent, {d} declared in `{}`",
                    crate::push_gate::PUSH_BYTES
                )));
            }
            None => return Err(Status::internal("push not admitted by the gate")),
        }
        let wire_bytes = encoded + GRPC_FRAME_BYTES;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.lock();
            match st.outbox.get(&r.client) {
                Some(out) if out.session == r.session && out.pull_reply.is_none() => {}
                _ => {
                    tracing::warn!(client = r.client, "update refused: no task outstanding");
                    return Err(Status::failed_precondition(format!(
                        "no task outstanding for client {}: a late, duplicate or replayed update",
                        r.client
                    )));
                }
            }
            st.inbox.push(Incoming {
                client: r.client,
                session: r.session,
                reply: r.reply,
                wire_bytes,
                verdict: tx,
            });
        }
        shared.changed.notify_all();
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(PushReply {
                accepted: true,
                reason: String::new(),
            })),
            Ok(Err(reason)) => Err(Status::invalid_argument(format!(
                "update refused: {reason}"
            ))),
            Err(_) => Err(Status::unavailable("the server is shutting down")),
        }
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let auth = Authorised::of(&req);
        let r = req.into_inner();
        auth.check(r.client)?;
        self.0.touch(r.client, r.session)?;
        self.0.changed.notify_all();
        Ok(Response::new(HeartbeatReply {}))
    }
}

/// The clients of a network run, as the round loop sees them.
pub struct NetFleet {
    shared: Arc<Shared>,
    roster: BTreeMap<u64, Member>,
}

impl NetFleet {
    fn live(&self, st: &State) -> Vec<u64> {
        let limit = Duration::from_secs_f64(self.shared.cfg.liveness_s);
        st.members
            .iter()
            .filter(|(_, m)| m.last_seen.elapsed() < limit)
            .map(|(c, _)| *c)
            .collect()
    }
}

impl Fleet for NetFleet {
    fn available(&mut self, round: u64) -> Result<Vec<u64>, EngineError> {
        let cfg = &self.shared.cfg;
        let give_up = Instant::now() + Duration::from_secs_f64(cfg.wait_s);
        let mut st = self.shared.lock();
        let mut announced = false;
        loop {
            let live = self.live(&st);
            if live.len() >= cfg.min_clients {
                self.roster = st.members.clone();
                return Ok(live);
            }
            if !announced {
                tracing::info!(
                    round,
                    connected = live.len(),
                    needed = cfg.min_clients,
                    "waiting for clients"
                );
                announced = true;
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(EngineError::Task(format!(
                    "only {} of the {} clients needed (server.min_clients) were connected within {} s (server.wait_s); start more clients or lower server.min_clients",
                    live.len(),
                    cfg.min_clients,
                    cfg.wait_s
                )));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, (give_up - now).min(Duration::from_millis(500)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn info(&self, c: u64) -> ClientInfo {
        let m = &self.roster[&c];
        ClientInfo {
            id: c,
            profile: m.profile.clone(),
            num_examples: m.num_examples as usize,
        }
    }

    fn take_restarted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.shared.lock().restarted)
    }

    fn execute(
        &mut self,
        tasks: Vec<Prepared>,
        server_masks: &KnownMasks,
        check: &ReplyCheck<'_>,
    ) -> Result<(Vec<ClientRun>, f64), EngineError> {
        let started = Instant::now();
        let cfg = self.shared.cfg.clone();
        let deadline = started + Duration::from_secs_f64(cfg.deadline_s);
        let order: Vec<u64> = tasks.iter().map(|p| p.client).collect();
        let mut done: HashMap<u64, ClientRun> = HashMap::new();
        // client -> (task, session, record)
        type Pending = (Arc<Prepared>, u64, flotilla_engine::sink::ClientRecord);
        let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
        {
            // Encode before taking the lock: encoding a large model is the slow part.
            let encoded = tasks
                .into_iter()
                .map(|p| {
                    let b = p.encode();
                    (Arc::new(p), b)
                })
                .collect::<Vec<_>>();
            let mut st = self.shared.lock();
            for (p, bytes) in encoded {
                let c = p.client;
                let mut rec = blank_record(p.task.round, c, &self.roster[&c].profile);
                let bytes = bytes?;
                let Some(member) = st.members.get(&c) else {
                    rec.status = ClientStatus::Failed;
                    rec.reason = Some("left the run before its task was sent".into());
                    done.insert(
                        c,
                        ClientRun {
                            record: rec,
                            reply: None,
                        },
                    );
                    continue;
                };
                let session = member.session;
                let pull_reply = PullReply {
                    status: PullStatus::Task as i32,
                    task: bytes,
                    reason: String::new(),
                };
                let delivered_bytes = pull_reply.encoded_len() as u64 + GRPC_FRAME_BYTES;
                rec.bytes_down = delivered_bytes;
                st.outbox.insert(
                    c,
                    Outgoing {
                        session,
                        pull_reply: Some(pull_reply),
                        prepared: p.clone(),
                        delivered_bytes,
                    },
                );
                pending.insert(c, (p, session, rec));
            }
        }
        self.shared.posted.notify_waiters();
        let liveness = Duration::from_secs_f64(cfg.liveness_s);
        while !pending.is_empty() {
            let (incoming, lost) = {
                let mut st = self.shared.lock();
                let incoming = std::mem::take(&mut st.inbox);
                let mut lost = Vec::new();
                for (c, (_, session, _)) in &pending {
                    match st.members.get(c) {
                        Some(m) if m.session != *session => lost.push((
                            *c,
                            "the client joined again (restarted) during the round".to_string(),
                        )),
                        Some(m) if m.last_seen.elapsed() > liveness => lost.push((
                            *c,
                            format!(
                                "no call or heartbeat for {:.0} s (server.liveness_s)",
                                cfg.liveness_s
                            ),
                        )),
                        Some(_) => {}
                        None => lost.push((*c, "left the run".into())),
                    }
                }
                for (c, _) in &lost {
                    st.outbox.remove(c);
                }
                (incoming, lost)
            };
            for (c, reason) in lost {
                // A reply already queued from this client still counts.
                if incoming.iter().any(|i| i.client == c) {
                    continue;
                }
                let (_, _, mut rec) = pending.remove(&c).expect("pending");
                tracing::warn!(round = rec.round, client = c, %reason, "client lost");
                rec.status = ClientStatus::Failed;
                rec.reason = Some(reason);
                done.insert(
                    c,
                    ClientRun {
                        record: rec,
                        reply: None,
                    },
                );
            }
            for inc in incoming {
                let verdict = match pending.get(&inc.client) {
                    Some((_, session, _)) if *session == inc.session => {
                        let (p, _, mut rec) = pending.remove(&inc.client).expect("pending");
                        if let Some(out) = self.shared.lock().outbox.remove(&inc.client) {
                            rec.bytes_down = out.delivered_bytes;
                        }
                        rec.bytes_up = inc.wire_bytes;
                        let profile = &self.roster[&inc.client].profile;
                        let (run, verdict) =
                            judge_reply(rec, &inc.reply, server_masks, &p.task, check, profile);
                        done.insert(inc.client, run);
                        verdict
                    }
                    _ => Err("no task outstanding: a late, duplicate or replayed update".into()),
                };
                let _ = inc.verdict.send(verdict);
            }
            if pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let mut st = self.shared.lock();
                for (c, (_, _, mut rec)) in std::mem::take(&mut pending) {
                    st.outbox.remove(&c);
                    tracing::warn!(
                        round = rec.round,
                        client = c,
                        "straggler: over the deadline"
                    );
                    rec.status = ClientStatus::Straggler;
                    rec.reason = Some(format!(
                        "not done within the {} s deadline (server.deadline_s)",
                        cfg.deadline_s
                    ));
                    done.insert(
                        c,
                        ClientRun {
                            record: rec,
                            reply: None,
                        },
                    );
                }
                break;
            }
            let st = self.shared.lock();
            if st.inbox.is_empty() {
                let _ = self
                    .shared
                    .changed
                    .wait_timeout(st, (deadline - now).min(Duration::from_millis(250)));
            }
        }
        let runs = order
            .iter()
            .filter_map(|c| done.remove(c))
            .collect::<Vec<_>>();
        Ok((runs, started.elapsed().as_secs_f64()))
    }
}

/// Serves `driver`'s run until its last round, then lets the clients know and stops.
/// Blocks the calling thread; returns the summary.
pub fn serve(
    driver: &mut Driver,
    opts: ServeOptions,
    sinks: &mut [&mut dyn Sink],
) -> Result<serde_json::Value, NetError> {
    let exp = driver.experiment().clone();
    let experiment_toml = toml::to_string(&exp)
        .map_err(|e| NetError::Setup(format!("cannot serialise the experiment: {e}")))?;
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        posted: Notify::new(),
        cfg: exp.server.clone(),
        experiment_toml,
        num_clients: exp.data.num_clients as u64,
        max_examples: opts
            .max_examples
            .or(exp.server.max_examples)
            .unwrap_or(DEFAULT_MAX_EXAMPLES),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NetError::Setup(format!("cannot start the network runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(opts.listen))
        .map_err(|e| NetError::Setup(format!("cannot listen on {}: {e}", opts.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NetError::Setup(e.to_string()))?;
    tracing::info!(address = %bound, tls = opts.tls.is_some(), "listening");
    if let Some(path) = &opts.address_file {
        flotilla_core::safetensors_io::write_atomic(path, bound.to_string().as_bytes())
            .map_err(|e| NetError::Setup(e.to_string()))?;
    }
    let limit = exp.server.max_message_mib * 1024 * 1024;
    let svc = CoordinatorServer::new(Service(shared.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    if let Some(grants) = &opts.tokens {
        for g in grants.iter().filter(|g| g.clients.is_none()) {
            tracing::warn!(token = %g.label, "a fleet-wide token: its holder may join as any client id; bind it to ids in the token file (`LABEL TOKEN IDS`)");
        }
    }
    let tokens: Option<Arc<HashMap<String, Arc<crate::Grant>>>> = opts.tokens.clone().map(|t| {
        Arc::new(
            t.into_iter()
                .map(|g| (g.token.clone(), Arc::new(g)))
                .collect(),
        )
    });
    let auth = move |mut req: Request<()>| -> Result<Request<()>, Status> {
        let Some(tokens) = &tokens else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented.and_then(|t| tokens.get(t)) {
            Some(grant) => {
                let grant = Authorised(Some(grant.clone()));
                req.extensions_mut().insert(grant);
                Ok(req)
            }
            None if presented.is_some() => {
                tracing::warn!("call refused: unknown bearer token");
                Err(Status::unauthenticated(
                    "unknown bearer token; pass a token the server lists (--token)",
                ))
            }
            None => {
                tracing::warn!("call refused: no bearer token");
                Err(Status::unauthenticated("no bearer token; pass --token"))
            }
        }
    };
    let idle = Duration::from_secs_f64(exp.server.idle_timeout_s);
    // Pings keep a healthy but quiet connection above the idle timeout (its peer answers).
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(idle / 3))
        .http2_keepalive_timeout(Some(idle / 3));
    if let Some(tls) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| NetError::Setup(format!("{}: {e}", p.display())))
        };
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?),
        );
        if let Some(ca) = &tls.client_ca {
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(cfg)
            .map_err(|e| NetError::Setup(format!("TLS setup: {e}")))?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let incoming = {
        let _runtime = runtime.enter();
        crate::listener::guarded_incoming(listener, exp.server.max_connections, idle)
    };
    let gate = crate::push_gate::Gate::new(
        shared.clone(),
        limit as u64,
        exp.server.max_push_mib_in_flight as u64 * 1024 * 1024,
    );
    let gated = crate::push_gate::PushGate { inner: svc, gate };
    let router = builder.add_service(tonic::service::interceptor::InterceptedService::new(
        gated, auth,
    ));
    let server_task = runtime.spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
    });

    let mut fleet = NetFleet {
        shared: shared.clone(),
        roster: BTreeMap::new(),
    };
    // Every round is checkpointed: a restarted server loses no completed round.
    let result = driver.run(&mut fleet, sinks, 1);

    // Tell the clients the run is over (they pull `Done`), wait briefly for them to hear it.
    {
        let mut st = shared.lock();
        st.done = true;
        st.failure = result.as_ref().err().map(|e| e.to_string());
        st.outbox.clear();
        for inc in std::mem::take(&mut st.inbox) {
            let _ = inc.verdict.send(Err("the run is over".into()));
        }
    }
    shared.posted.notify_waiters();
    let until = Instant::now() + Duration::from_secs_f64(exp.server.heartbeat_s * 2.0 + 1.0);
    loop {
        let st = shared.lock();
        let live = fleet.live(&st);
        if live.iter().all(|c| st.released.contains(c)) || Instant::now() >= until {
            break;
        }
        let _ = shared.changed.wait_timeout(st, Duration::from_millis(100));
    }
    // Graceful shutdown waits for open connections; a client that keeps its connection open
    // must not keep the server from exiting, so the wait is bounded.
    let _ = stop_tx.send(());
    let mut server_task = server_task;
    let bounded = async { tokio::time::timeout(Duration::from_secs(3), &mut server_task).await };
    match runtime.block_on(bounded) {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server stopped with an error"),
        Err(_) => {
            tracing::debug!("closing connections still open after the run");
            server_task.abort();
        }
        _ => {}
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}
