//! The client process: describe, set up data, join, then pull tasks, train, push replies;
//! reconnect with backoff after a dropped connection; exit when the server says the run is
//! over.

use crate::NetError;
use crate::proto::service::coordinator_client::CoordinatorClient;
use crate::proto::*;
use flotilla_core::device::DeviceProfile;
use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_engine::held::{self, TensorCache};
use flotilla_engine::method::KnownMasks;
use flotilla_engine::{ClientCtx, ClientData, ClientHalf, EngineError, Experiment, Task};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// TLS material of a client.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA that signed the server certificate, PEM.
    pub ca: PathBuf,
    /// Client certificate and key for mutual TLS, PEM.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to check the server certificate against (default: the URL's host).
    pub domain: Option<String>,
}

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Server URL, `https://host:port` (or `http://` with an `--insecure` server).
    pub server: String,
    /// Bearer token sent with every call.
    pub token: Option<String>,
    /// TLS; `None` for `http://`.
    pub tls: Option<ClientTls>,
    /// Client id asked for (the partition index); `None`: any free id.
    pub client_id: Option<u64>,
    /// This device's profile.
    pub profile: DeviceProfile,
    /// A name for the server's logs.
    pub name: String,
    /// Give up after the server has been unreachable this long, seconds.
    pub give_up_s: f64,
    /// Threads for local training (0: all cores).
    pub threads: usize,
}

/// What a client did over the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientReport {
    /// The id the server gave this client (last one).
    pub client: u64,
    /// Updates the server accepted.
    pub accepted: u64,
    /// Updates the server refused.
    pub refused: u64,
    /// Times the client joined (1 + reconnections).
    pub joins: u64,
}

/// Builds the client's method half and data once the experiment is known.
pub type Setup<'a> =
    dyn FnOnce(&Experiment) -> Result<(Arc<dyn ClientHalf>, ClientData), EngineError> + 'a;

/// Adds the bearer token to every call.
pub type Interceptor = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// A push with the headers the server's gate admits it by (client, session, size), read
/// before its body ([`crate::push_gate`]).
pub fn push_request(msg: PushRequest) -> Request<PushRequest> {
    use prost::Message;
    let (client, session, bytes) = (msg.client, msg.session, msg.encoded_len());
    let mut req = Request::new(msg);
    let m = req.metadata_mut();
    for (name, value) in [
        (crate::push_gate::PUSH_CLIENT, client.to_string()),
        (crate::push_gate::PUSH_SESSION, session.to_string()),
        (crate::push_gate::PUSH_BYTES, bytes.to_string()),
    ] {
        m.insert(
            name,
            value.parse().expect("digits are a valid header value"),
        );
    }
    req
}

/// A connected client of the `Coordinator` service.
pub type Api =
    CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, Interceptor>>;

/// The calls are unary; this is how a failure is handled.
enum Failure {
    /// Connection trouble: reconnect and join again.
    Transport(Status),
    /// Our session is gone (server restarted): join again.
    Rejoin,
    /// Refused for good: token, protocol, bad request.
    Fatal(Status),
}

fn classify(s: Status) -> Failure {
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal => Failure::Transport(s),
        Code::FailedPrecondition if s.message().starts_with("unknown session") => Failure::Rejoin,
        _ => Failure::Fatal(s),
    }
}

async fn connect(opts: &JoinOptions) -> Result<Api, NetError> {
    let mut ep = Endpoint::from_shared(opts.server.clone())
        .map_err(|e| NetError::Setup(format!("server URL `{}`: {e}", opts.server)))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| NetError::Setup(format!("{}: {e}", p.display())))
        };
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&tls.ca)?));
        if let Some(d) = &tls.domain {
            cfg = cfg.domain_name(d.clone());
        }
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        ep = ep
            .tls_config(cfg)
            .map_err(|e| NetError::Setup(format!("TLS setup: {e}")))?;
    }
    let channel = ep
        .connect()
        .await
        .map_err(|e| NetError::Unreachable(format!("cannot connect to {}: {e}", opts.server)))?;
    let header = match &opts.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<tonic::metadata::MetadataValue<_>>()
                .map_err(|_| {
                    NetError::Setup("the token holds characters not allowed in a header".into())
                })?,
        ),
        None => None,
    };
    let auth: Interceptor = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    Ok(CoordinatorClient::with_interceptor(channel, auth)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Connects with exponential backoff (0.5 s doubling to 8 s) until `give_up`.
async fn connect_retrying(opts: &JoinOptions, give_up: Instant) -> Result<Api, NetError> {
    let mut wait = Duration::from_millis(500);
    loop {
        match connect(opts).await {
            Ok(api) => return Ok(api),
            Err(NetError::Unreachable(msg)) if Instant::now() + wait < give_up => {
                tracing::info!("{msg}; retrying in {:.1} s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(8));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs a client until the server ends the run. `setup` builds the method's client half and
/// the local data once the experiment is known.
pub fn run(opts: JoinOptions, setup: Box<Setup<'_>>) -> Result<ClientReport, NetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NetError::Setup(format!("cannot start the network runtime: {e}")))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| NetError::Setup(format!("cannot start training threads: {e}")))?;
    runtime.block_on(run_async(opts, setup, pool))
}

async fn run_async(
    opts: JoinOptions,
    setup: Box<Setup<'_>>,
    pool: rayon::ThreadPool,
) -> Result<ClientReport, NetError> {
    let give_up = || Instant::now() + Duration::from_secs_f64(opts.give_up_s);
    let mut api = connect_retrying(&opts, give_up()).await?;
    let described = api
        .describe(DescribeRequest {
            protocol_version: PROTOCOL_VERSION,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let exp = Experiment::from_toml(&described.experiment_toml)?;
    let (half, data) = setup(&exp)?;
    let pool = Arc::new(pool);
    let data = Arc::new(data);
    let mut report = ClientReport::default();
    let heartbeat = Duration::from_secs_f64(described.heartbeat_s.max(0.1));
    // Masks and kept tensors outlive a session: a server restored from its checkpoint still
    // counts on them, and every pull says what is held, so nothing stale is ever used.
    let mut known = KnownMasks::new();
    let mut cache = TensorCache::new(held::cache_bytes(exp.fleet.held_cache_mib()));
    'session: loop {
        let joined = match api
            .join(JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                client: opts.client_id,
                profile_json: serde_json::to_string(&opts.profile).expect("serialisable"),
                num_examples: data.train.len() as u64,
                name: opts.name.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => match classify(s) {
                Failure::Fatal(s) => return Err(refused(s)),
                Failure::Transport(_) | Failure::Rejoin => {
                    api = connect_retrying(&opts, give_up()).await?;
                    continue 'session;
                }
            },
        };
        report.joins += 1;
        report.client = joined.client;
        tracing::info!(client = joined.client, "joined");
        let (client, session) = (joined.client, joined.session);
        loop {
            let held = inventory(&known, &cache);
            let pulled = match api
                .pull(PullRequest {
                    client,
                    session,
                    held,
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => match classify(s) {
                    Failure::Fatal(s) => return Err(refused(s)),
                    Failure::Transport(s) => {
                        tracing::warn!(error = %s.message(), "connection lost; reconnecting");
                        api = connect_retrying(&opts, give_up()).await?;
                        continue 'session;
                    }
                    Failure::Rejoin => continue 'session,
                },
            };
            match PullStatus::try_from(pulled.status) {
                Ok(PullStatus::Done) => {
                    tracing::info!(
                        accepted = report.accepted,
                        refused = report.refused,
                        "the run is over"
                    );
                    return Ok(report);
                }
                Ok(PullStatus::Failed) => {
                    return Err(NetError::Refused(format!(
                        "the server ended the run with an error: {}",
                        pulled.reason
                    )));
                }
                Ok(PullStatus::Wait) => continue,
                Ok(PullStatus::Task) => {}
                Err(_) => {
                    return Err(NetError::Refused(format!(
                        "the server answered an unknown pull status {}",
                        pulled.status
                    )));
                }
            }
            let task = match Task::decode_with(&pulled.task, &mut known, &mut cache) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable task; skipping it");
                    continue;
                }
            };
            tracing::info!(round = task.round, phase = task.phase, "training");
            let ctx = ClientCtx {
                seed: exp.seed,
                profile: opts.profile.clone(),
                masks: known.clone(),
            };
            let (half2, data2, pool2) = (half.clone(), data.clone(), pool.clone());
            let task = Arc::new(task);
            let task2 = task.clone();
            let mut work = tokio::task::spawn_blocking(move || {
                pool2.install(|| half2.execute(&task2, &data2, &ctx))
            });
            // Heartbeats while training, so the server knows this client is alive.
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tokio::time::sleep(heartbeat) => {
                        if let Err(s) = api.heartbeat(HeartbeatRequest { client, session }).await {
                            tracing::debug!(error = %s.message(), "heartbeat failed");
                        }
                    }
                }
            };
            let reply = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(round = task.round, error = %e, "task failed");
                    continue;
                }
                Err(e) => {
                    return Err(NetError::Setup(format!("training thread failed: {e}")));
                }
            };
            let bytes = reply.encode(&known)?;
            match api
                .push(push_request(PushRequest {
                    client,
                    session,
                    reply: bytes,
                }))
                .await
            {
                Ok(_) => {
                    report.accepted += 1;
                    tracing::info!(round = task.round, "update accepted");
                }
                Err(s) => match classify(s) {
                    Failure::Fatal(s) => {
                        report.refused += 1;
                        tracing::warn!(round = task.round, reason = %s.message(), "update refused");
                    }
                    Failure::Transport(s) => {
                        tracing::warn!(error = %s.message(), "connection lost; reconnecting");
                        api = connect_retrying(&opts, give_up()).await?;
                        continue 'session;
                    }
                    Failure::Rejoin => continue 'session,
                },
            }
        }
    }
}

/// What the client holds, as a pull declares it.
fn inventory(known: &KnownMasks, cache: &TensorCache) -> Vec<HeldRef> {
    let masks = known.values().map(|m| HeldRef {
        name: m.name.clone(),
        fingerprint: m.fingerprint(),
        mask: true,
    });
    let tensors = cache
        .inventory()
        .into_iter()
        .map(|(name, fingerprint)| HeldRef {
            name,
            fingerprint,
            mask: false,
        });
    masks.chain(tensors).collect()
}

fn refused(s: Status) -> NetError {
    match s.code() {
        Code::Unavailable => NetError::Unreachable(format!("server unreachable: {}", s.message())),
        _ => NetError::Refused(format!(
            "the server refused: {} ({:?})",
            s.message(),
            s.code()
        )),
    }
}

/// Named device profiles for `--profile`: `weak` (embedded board), `mid` (old PC), `strong`.
pub fn profile_preset(name: &str) -> Option<DeviceProfile> {
    let (mem_mib, gflops, up, down) = match name {
        "weak" => (256.0, 2.0, 10.0, 20.0),
        "mid" => (1024.0, 10.0, 50.0, 100.0),
        "strong" => (8192.0, 50.0, 1000.0, 1000.0),
        _ => return None,
    };
    Some(DeviceProfile {
        tier: name.into(),
        memory_bytes: (mem_mib * 1024.0 * 1024.0) as u64,
        flops_per_s: gflops * 1e9,
        uplink_bps: up * 1e6,
        downlink_bps: down * 1e6,
        dropout: 0.0,
        availability: Vec::new(),
    })
}
