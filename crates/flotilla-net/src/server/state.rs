//! What the service and the round loop share: the roster of members, the tasks waiting to be
//! pulled or answered, the replies waiting for a verdict, and what a caller's token allows.

use super::*;

/// What the caller's bearer token authorises, put on each request by the interceptor.
#[derive(Debug, Clone)]
pub(super) struct Authorised(pub(super) Option<Arc<crate::Grant>>);

impl Authorised {
    pub(super) fn of<T>(req: &Request<T>) -> Self {
        req.extensions()
            .get::<Authorised>()
            .cloned()
            .unwrap_or(Authorised(None))
    }

    /// Refuses a call for a client id the token does not cover.
    pub(super) fn check(&self, client: u64) -> Result<(), Status> {
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

/// A member of the run: a client that joined.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) session: u64,
    pub(super) profile: DeviceProfile,
    pub(super) num_examples: u64,
    pub(super) last_seen: Instant,
}

/// A task for a client: waiting to be pulled, then outstanding until its reply. Its bytes are
/// encoded only when the client pulls and are not kept, so tasks waiting for their clients
/// hold no encoded copies.
pub(super) struct Outgoing {
    pub(super) session: u64,
    /// Whether the client has pulled it.
    pub(super) delivered: bool,
    /// The task.
    pub(super) prepared: Arc<Prepared>,
    /// Bytes of the pull reply that carried the task, frame included, once delivered.
    pub(super) delivered_bytes: u64,
}

/// Reply bytes waiting for the round loop's verdict.
pub(super) struct Incoming {
    pub(super) client: u64,
    pub(super) session: u64,
    pub(super) reply: Vec<u8>,
    pub(super) wire_bytes: u64,
    pub(super) verdict: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) members: BTreeMap<u64, Member>,
    pub(super) outbox: HashMap<u64, Outgoing>,
    pub(super) inbox: Vec<Incoming>,
    pub(super) restarted: Vec<u64>,
    pub(super) done: bool,
    /// Why the run ended, when it ended in an error.
    pub(super) failure: Option<String>,
    pub(super) released: HashSet<u64>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Wakes the round loop (a join, a push, a heartbeat).
    pub(super) changed: Condvar,
    /// Wakes long-polling pulls (a task posted, the run over).
    pub(super) posted: Notify,
    pub(super) cfg: ServerConfig,
    pub(super) experiment_toml: String,
    pub(super) num_clients: u64,
    pub(super) max_examples: u64,
    /// Room for encoded tasks on their way out (`server.max_task_mib_in_flight`).
    pub(super) delivery: crate::delivery::DeliveryBudget,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping the server, so a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller's membership, refreshed; unknown sessions must join again.
    pub(super) fn touch(&self, client: u64, session: u64) -> Result<(), Status> {
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
            Some(out) if out.session == session && out.delivered => Ok(()),
            _ => Err(Status::failed_precondition(format!(
                "no task outstanding for client {client}: a late, duplicate or replayed update"
            ))),
        }
    }
}
