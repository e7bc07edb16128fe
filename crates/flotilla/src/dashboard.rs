//! The live dashboard: an HTTP server inside the `flotilla` process that shows a run as it goes.
//!
//! - `/`: one self-contained page (HTML, CSS and JS compiled into the binary; nothing is fetched
//!   from elsewhere) with accuracy and loss per round, cumulative bytes, simulated and wall
//!   time, per-client peak memory against its tier's budget, the current round's clients, the
//!   fleet's tiers and the method's own metrics;
//! - `/api/run`: the run so far as JSON (config, every round's record, the last round's
//!   clients, status, summary);
//! - `/api/events`: server-sent events: first a `snapshot` (the same JSON as `/api/run`), then
//!   `started`, `round`, `checkpoint` and `finished` as they happen.
//!
//! `flotilla report --serve` shows finished runs the same way: each run's page and API under
//! `/runs/<i>/`, and at `/` the runs side by side.
//!
//! The dashboard is read-only. It binds to loopback unless told otherwise, and beyond loopback
//! it refuses to start without a token (`FLOTILLA_DASHBOARD_TOKEN`), which every request must
//! then carry as `Authorization: Bearer <token>` or `?token=<token>`. On a `serve` with TLS
//! it speaks HTTPS with the server's own certificate (a token sent in the clear would be no
//! secret).

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use flotilla_engine::EngineError;
use flotilla_engine::sink::{Event, Sink};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// The page, served at `/`.
const PAGE: &str = include_str!("dashboard.html");

/// Environment variable holding the token a dashboard beyond loopback requires.
pub const TOKEN_ENV: &str = "FLOTILLA_DASHBOARD_TOKEN";

/// One run as the dashboard shows it, shared between the run (through [`DashboardSink`]) and
/// the HTTP handlers.
struct RunShared {
    /// The run as `/api/run` returns it.
    state: Mutex<Value>,
    /// Live events, as (event name, JSON data).
    events: broadcast::Sender<(String, String)>,
}

impl RunShared {
    fn new(state: Value) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            state: Mutex::new(state),
            events,
        })
    }
}

/// What a handler needs: its run and the token, if one is required.
#[derive(Clone)]
struct Ctx {
    run: Arc<RunShared>,
    token: Option<Arc<str>>,
}

/// A running dashboard server. It stops when the process exits.
pub struct Dashboard {
    run: Arc<RunShared>,
    token: Option<Arc<str>>,
    addr: SocketAddr,
    /// "http" or "https".
    scheme: &'static str,
}

/// The token a dashboard on `addr` requires: `FLOTILLA_DASHBOARD_TOKEN`, which must be set
/// beyond loopback (`flag` names the option in the error).
fn token_for(addr: SocketAddr, flag: &str) -> Result<Option<Arc<str>>> {
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    if !addr.ip().is_loopback() && token.is_none() {
        bail!(
            "{flag} {addr} listens beyond loopback; set {TOKEN_ENV} to a secret the page must present, or use 127.0.0.1"
        );
    }
    Ok(token.map(Arc::from))
}

/// The page and API of one run under `prefix` ("" or "/runs/<i>").
fn run_routes(prefix: &str, ctx: Ctx) -> Router {
    Router::new()
        .route(&format!("{prefix}/"), get(page))
        .route(&format!("{prefix}/api/run"), get(api_run))
        .route(&format!("{prefix}/api/events"), get(api_events))
        .with_state(ctx)
}

/// Binds `addr` now (so that errors and the chosen port are known before anything runs) and
/// serves `app` on a thread and runtime of its own, over TLS when `tls` is given.
fn spawn(
    addr: SocketAddr,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} for the dashboard"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("flotilla-dashboard".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "the dashboard cannot start");
                    return;
                }
            };
            rt.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => match tls {
                        Some(tls) => serve_tls(l, app, tls).await,
                        None => axum::serve(l, app).await,
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "the dashboard stopped");
                }
            });
        })?;
    Ok(addr)
}

/// Most seconds a peer may take over its TLS handshake before the dashboard drops it, so that
/// idle connections cannot hold the server's resources.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most dashboard connections served at once (pages, API calls and event streams together).
const MAX_CONNECTIONS: usize = 64;

/// Serves `app` over TLS: each accepted connection does its handshake (bounded in time) and
/// is then served as HTTP/1.1 on a task of its own.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot before accepting, so excess peers queue in the kernel's
        // backlog instead of holding descriptors here.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "the dashboard cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "dashboard TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "dashboard TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "dashboard connection ended");
            }
        });
    }
}

/// The TLS configuration of a dashboard that shares the gRPC server's certificate and key
/// (PEM files). Browsers carry no client certificates, so none is asked for: the dashboard's
/// token is what authorises a viewer.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!("cannot read the certificate chain {}: {e}", cert.display())
        })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read the private key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup for the dashboard")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the dashboard's certificate and key do not make a TLS identity")?;
    Ok(Arc::new(config))
}

impl Dashboard {
    /// Starts the server on `addr` (port 0: any free port) for the run named `name` with the
    /// resolved config `config`. Beyond loopback the token comes from
    /// `FLOTILLA_DASHBOARD_TOKEN`, and its absence is an error.
    ///
    /// With `tls` (see [`tls_config`]) the dashboard speaks HTTPS only.
    pub fn start(
        addr: SocketAddr,
        name: &str,
        config: Value,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self> {
        let token = token_for(addr, "--dashboard")?;
        let run = RunShared::new(json!({
            "name": name,
            "method": config["method"]["name"],
            "config": config,
            "rounds_total": config["rounds"],
            "status": "starting",
            "rounds": [],
            "clients": [],
            "summary": null,
        }));
        let ctx = Ctx {
            run: run.clone(),
            token: token.clone(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = spawn(addr, run_routes("", ctx), tls)?;
        Ok(Self {
            run,
            token,
            addr,
            scheme,
        })
    }

    /// Serves finished runs (each as the JSON of `/api/run`) on `addr`: run `i` at
    /// `/runs/<i>/` and all of them side by side at `/`. Returns the address and the URL of
    /// `/`; the server runs until the process exits.
    pub fn serve_finished(addr: SocketAddr, runs: Vec<Value>) -> Result<(SocketAddr, String)> {
        let token = token_for(addr, "--serve")?;
        let query = token
            .as_ref()
            .map(|t| format!("?token={t}"))
            .unwrap_or_default();
        let mut frames = String::new();
        let mut app = Router::new();
        for (i, run) in runs.into_iter().enumerate() {
            let name = run["name"].as_str().unwrap_or("run").to_string();
            frames.push_str(&format!(
                "<iframe src=\"/runs/{i}/{query}\" title=\"{}\"></iframe>\n",
                escape_html(&name)
            ));
            let ctx = Ctx {
                run: RunShared::new(run),
                token: token.clone(),
            };
            app = app.merge(run_routes(&format!("/runs/{i}"), ctx));
        }
        let index: Arc<str> = Arc::from(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>flotilla runs</title>\
             <style>body{{margin:0;display:flex;height:100vh}}\
             iframe{{flex:1;border:0;border-right:2px solid #1d2330}}</style></head>\
             <body>{frames}</body></html>"
        ));
        let index_token = token.clone();
        app = app.route(
            "/",
            get(
                move |headers: HeaderMap, Query(q): Query<HashMap<String, String>>| async move {
                    if authorised(index_token.as_deref(), &headers, &q) {
                        Html(index.to_string()).into_response()
                    } else {
                        unauthorised()
                    }
                },
            ),
        );
        let addr = spawn(addr, app, None)?;
        Ok((addr, format!("http://{addr}/{query}")))
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "https" when the dashboard speaks TLS, else "http".
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// The page's URL (with the token, when one is needed).
    pub fn url(&self) -> String {
        match &self.token {
            Some(t) => format!("{}://{}/?token={t}", self.scheme, self.addr),
            None => format!("{}://{}/", self.scheme, self.addr),
        }
    }

    /// A sink that feeds the dashboard with the run's events.
    pub fn sink(&self) -> DashboardSink {
        DashboardSink {
            run: self.run.clone(),
        }
    }
}

/// Feeds a [`Dashboard`] with a run's events.
pub struct DashboardSink {
    run: Arc<RunShared>,
}

impl DashboardSink {
    /// The members of a served run (client, session, tier, examples, seconds since last seen,
    /// whether a task is outstanding), shown in their own table.
    pub fn members(&self, members: Value) {
        self.publish("members", json!({ "members": members }), |s| {
            s["members"] = members.clone();
        });
    }

    /// Marks the run failed with `error` (the page says so).
    pub fn failed(&self, error: &str) {
        self.publish("failed", json!({ "error": error }), |s| {
            s["status"] = "failed".into();
            s["error"] = error.into();
        });
    }

    /// Updates the state and broadcasts the event under the same lock, so that a client that
    /// subscribes while holding the snapshot misses nothing and sees nothing twice.
    fn publish(&self, kind: &str, data: Value, update: impl FnOnce(&mut Value)) {
        let mut state = self.run.state.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut state);
        // No receiver is not an error: nobody is watching.
        let _ = self.run.events.send((kind.to_string(), data.to_string()));
    }
}

impl Sink for DashboardSink {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), EngineError> {
        match event {
            Event::Started {
                first_round,
                rounds,
            } => self.publish(
                "started",
                json!({ "first_round": first_round, "rounds": rounds }),
                |s| {
                    s["status"] = "running".into();
                    s["rounds_total"] = (*rounds).into();
                },
            ),
            Event::Round { round, clients } => {
                let round = to_json(*round);
                let clients = to_json(*clients);
                self.publish(
                    "round",
                    json!({ "round": round, "clients": clients }),
                    |s| {
                        if let Some(rounds) = s["rounds"].as_array_mut() {
                            rounds.push(round.clone());
                        }
                        s["clients"] = clients.clone();
                    },
                )
            }
            Event::Checkpoint { round } => {
                self.publish("checkpoint", json!({ "round": round }), |s| {
                    s["last_checkpoint"] = (*round).into();
                })
            }
            Event::Finished { summary } => {
                self.publish("finished", json!({ "summary": summary }), |s| {
                    s["status"] = "finished".into();
                    s["summary"] = (*summary).clone();
                })
            }
        }
        Ok(())
    }
}

/// A record as JSON (records are plain data: serialising them cannot fail).
fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Whether a request carries the token, when one is set.
fn authorised(token: Option<&str>, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer == Some(token) || query.get("token").map(String::as_str) == Some(token)
}

/// The answer to a request without the token.
fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "this dashboard needs its token: ?token=… or Authorization: Bearer …",
    )
        .into_response()
}

/// Text safe to place in HTML.
fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn page(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if authorised(ctx.token.as_deref(), &headers, &query) {
        Html(PAGE).into_response()
    } else {
        unauthorised()
    }
}

async fn api_run(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorised(ctx.token.as_deref(), &headers, &query) {
        return unauthorised();
    }
    let state = ctx
        .run
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    axum::Json(state).into_response()
}

async fn api_events(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorised(ctx.token.as_deref(), &headers, &query) {
        return unauthorised();
    }
    // Subscribe while holding the state, so the snapshot and the live events join exactly.
    let (snapshot, rx) = {
        let state = ctx.run.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.to_string(), ctx.run.events.subscribe())
    };
    let first = futures_util::stream::once(async move {
        Ok::<_, Infallible>(SseEvent::default().event("snapshot").data(snapshot))
    });
    // A receiver that falls too far behind ends its stream; the browser's EventSource then
    // reconnects and starts again from a fresh snapshot.
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok((kind, data)) => Some((
                Ok::<_, Infallible>(SseEvent::default().event(kind).data(data)),
                rx,
            )),
            Err(_) => None,
        }
    });
    Sse::new(futures_util::StreamExt::chain(first, live))
        .keep_alive(KeepAlive::default())
        .into_response()
}
