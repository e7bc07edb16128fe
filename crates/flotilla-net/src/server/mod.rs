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
use flotilla_core::aggregate::MeanFold;
use flotilla_core::device::DeviceProfile;
use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_engine::config::ServerConfig;
use flotilla_engine::driver::{
    ClientRun, Fleet, Prepared, ReplyCheck, blank_record, fold_reply, judge_reply,
};
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

mod fleet;
mod service;
mod state;

pub use fleet::NetFleet;
use service::Service;
use state::{Authorised, Incoming, Member, Outgoing, Shared, State};

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

/// A member of a served run as the operator sees it (`serve --dashboard`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemberView {
    /// Client id.
    pub client: u64,
    /// Its current session (a new one after each join).
    pub session: u64,
    /// Its device tier.
    pub tier: String,
    /// Training examples it declared.
    pub num_examples: u64,
    /// Seconds since its last call or heartbeat.
    pub last_seen_s: f64,
    /// Whether a task of the current round waits for it or for its reply.
    pub task_outstanding: bool,
}

/// Hands the run's members to `watch` when the run starts and after every round.
struct Watch<'a> {
    shared: Arc<Shared>,
    watch: &'a mut dyn FnMut(Vec<MemberView>),
}

impl Sink for Watch<'_> {
    fn on_event(&mut self, e: &flotilla_engine::sink::Event<'_>) -> Result<(), EngineError> {
        use flotilla_engine::sink::Event;
        if matches!(e, Event::Started { .. } | Event::Round { .. }) {
            let members = {
                let st = self.shared.lock();
                st.members
                    .iter()
                    .map(|(&client, m)| MemberView {
                        client,
                        session: m.session,
                        tier: m.profile.tier.clone(),
                        num_examples: m.num_examples,
                        last_seen_s: m.last_seen.elapsed().as_secs_f64(),
                        task_outstanding: st.outbox.contains_key(&client),
                    })
                    .collect()
            };
            (self.watch)(members);
        }
        Ok(())
    }
}

/// Serves `driver`'s run until its last round, then lets the clients know and stops.
/// Blocks the calling thread; returns the summary.
pub fn serve(
    driver: &mut Driver,
    opts: ServeOptions,
    sinks: &mut [&mut dyn Sink],
) -> Result<serde_json::Value, NetError> {
    serve_watched(driver, opts, sinks, &mut |_| {})
}

/// [`serve`], handing the run's members to `watch` when the run starts and after every round
/// (what `serve --dashboard` shows).
pub fn serve_watched(
    driver: &mut Driver,
    opts: ServeOptions,
    sinks: &mut [&mut dyn Sink],
    watch: &mut dyn FnMut(Vec<MemberView>),
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
        delivery: crate::delivery::DeliveryBudget::new(
            exp.server.max_task_mib_in_flight as u64 * 1024 * 1024,
        ),
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
    let window = (exp.server.flow_window_kib * 1024).min(i32::MAX as usize) as u32;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(idle / 3))
        .http2_keepalive_timeout(Some(idle / 3))
        // A push's body flows up to the HTTP/2 window before the push gate has admitted it,
        // so the window bounds what each waiting client can make the server buffer.
        .initial_stream_window_size(Some(window))
        .initial_connection_window_size(Some(window));
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
    let mut watcher = Watch {
        shared: shared.clone(),
        watch,
    };
    let mut all: Vec<&mut dyn Sink> = Vec::with_capacity(sinks.len() + 1);
    for s in sinks.iter_mut() {
        all.push(&mut **s);
    }
    all.push(&mut watcher);
    // Every round is checkpointed: a restarted server loses no completed round.
    let result = driver.run(&mut fleet, &mut all, 1);

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
