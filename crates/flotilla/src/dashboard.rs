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
//! The dashboard is read-only. It binds to loopback unless told otherwise, and beyond loopback
//! it refuses to start without a token (`FLOTILLA_DASHBOARD_TOKEN`), which every request must
//! then carry as `Authorization: Bearer <token>` or `?token=<token>`.

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
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// The page, served at `/`.
const PAGE: &str = include_str!("dashboard.html");

/// Environment variable holding the token a dashboard beyond loopback requires.
pub const TOKEN_ENV: &str = "FLOTILLA_DASHBOARD_TOKEN";

/// What the dashboard shows, shared between the run (through [`DashboardSink`]) and the
/// HTTP handlers.
struct Shared {
    /// The run as `/api/run` returns it.
    state: Mutex<Value>,
    /// Live events, as (event name, JSON data).
    events: broadcast::Sender<(String, String)>,
    token: Option<String>,
}

/// A running dashboard server. It stops when the process exits.
pub struct Dashboard {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Dashboard {
    /// Starts the server on `addr` (port 0: any free port) for the run named `name` with the
    /// resolved config `config`. Beyond loopback the token comes from
    /// `FLOTILLA_DASHBOARD_TOKEN`, and its absence is an error.
    pub fn start(addr: SocketAddr, name: &str, config: Value) -> Result<Self> {
        let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        if !addr.ip().is_loopback() && token.is_none() {
            bail!(
                "--dashboard {addr} listens beyond loopback; set {TOKEN_ENV} to a secret the page must present, or use 127.0.0.1"
            );
        }
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for the dashboard"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(json!({
                "name": name,
                "method": config["method"]["name"],
                "config": config,
                "rounds_total": config["rounds"],
                "status": "starting",
                "rounds": [],
                "clients": [],
                "summary": null,
            })),
            events,
            token,
        });
        let app = Router::new()
            .route("/", get(page))
            .route("/api/run", get(api_run))
            .route("/api/events", get(api_events))
            .with_state(shared.clone());
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
                        Ok(l) => axum::serve(l, app).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "the dashboard stopped");
                    }
                });
            })?;
        Ok(Self { shared, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL (with the token, when one is needed).
    pub fn url(&self) -> String {
        match &self.shared.token {
            Some(t) => format!("http://{}/?token={t}", self.addr),
            None => format!("http://{}/", self.addr),
        }
    }

    /// A sink that feeds the dashboard with the run's events.
    pub fn sink(&self) -> DashboardSink {
        DashboardSink {
            shared: self.shared.clone(),
        }
    }
}

/// Feeds a [`Dashboard`] with a run's events.
pub struct DashboardSink {
    shared: Arc<Shared>,
}

impl DashboardSink {
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
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut state);
        // No receiver is not an error: nobody is watching.
        let _ = self
            .shared
            .events
            .send((kind.to_string(), data.to_string()));
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
fn authorised(shared: &Shared, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    let Some(token) = &shared.token else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer == Some(token.as_str()) || query.get("token") == Some(token)
}

/// The answer to a request without the token.
fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "this dashboard needs its token: ?token=… or Authorization: Bearer …",
    )
        .into_response()
}

async fn page(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if authorised(&shared, &headers, &query) {
        Html(PAGE).into_response()
    } else {
        unauthorised()
    }
}

async fn api_run(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorised(&shared, &headers, &query) {
        return unauthorised();
    }
    let state = shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    axum::Json(state).into_response()
}

async fn api_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorised(&shared, &headers, &query) {
        return unauthorised();
    }
    // Subscribe while holding the state, so the snapshot and the live events join exactly.
    let (snapshot, rx) = {
        let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.to_string(), shared.events.subscribe())
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
