//! Admission of updates before their bytes are read.
//!
//! A `Push` carries its client id, session and encoded size in headers
//! ([`PUSH_CLIENT`], [`PUSH_SESSION`], [`PUSH_BYTES`]). The gate runs after the token check
//! and before the body is buffered and decoded: a push for an unknown session, for a client
//! with no task outstanding, while another push of the same client is in flight, or declaring
//! more than the message limit is refused at once; an admitted push reserves its declared
//! bytes from the budget of bytes in flight (`server.max_push_mib_in_flight`) and waits for
//! room. The handler then refuses a body larger than declared. So a peer cannot make the
//! server buffer updates it will not accept, and honest pushes together never hold more than
//! the budget.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// Header: the pushing client's id.
pub const PUSH_CLIENT: &str = "x-flotilla-client";
/// Header: the pushing client's session.
pub const PUSH_SESSION: &str = "x-flotilla-session";
/// Header: the encoded size of the `PushRequest`, bytes.
pub const PUSH_BYTES: &str = "x-flotilla-push-bytes";

/// What the gate knows of one push: the declared size, and the reservation it holds until the
/// request is done.
#[derive(Clone)]
pub(crate) struct Admitted {
    pub declared: u64,
    _hold: Arc<Hold>,
}

struct Hold {
    client: u64,
    pushing: Arc<Mutex<HashSet<u64>>>,
    _bytes: OwnedSemaphorePermit,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pushing.lock() {
            p.remove(&self.client);
        }
    }
}

/// Decides whether (client, session) may push now; the server's state answers.
pub(crate) trait PushPolicy: Send + Sync + 'static {
    /// `Err` with the refusal when the client has no live session `session` or no task
    /// outstanding.
    fn may_push(&self, client: u64, session: u64) -> Result<(), Status>;
}

/// The budget and the pushes in flight, shared by all connections.
pub(crate) struct Gate<P> {
    policy: Arc<P>,
    limit: u64,
    budget: Arc<Semaphore>,
    budget_kib: u32,
    pushing: Arc<Mutex<HashSet<u64>>>,
}

impl<P: PushPolicy> Gate<P> {
    /// A gate refusing pushes over `limit` bytes, holding at most `budget` bytes in flight.
    pub fn new(policy: Arc<P>, limit: u64, budget: u64) -> Arc<Self> {
        let budget_kib = (budget / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        Arc::new(Self {
            policy,
            limit,
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            pushing: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    async fn admit(&self, headers: &http::HeaderMap) -> Result<Admitted, Status> {
        let number = |name: &str| -> Result<u64, Status> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "an update must carry the `{name}` header; use a matching flotilla version"
                    ))
                })
        };
        let (client, session, declared) = (
            number(PUSH_CLIENT)?,
            number(PUSH_SESSION)?,
            number(PUSH_BYTES)?,
        );
        if declared > self.limit {
            return Err(Status::out_of_range(format!(
                "an update of {declared} bytes is over the server's limit of {} (server.max_message_mib)",
                self.limit
            )));
        }
        self.policy.may_push(client, session)?;
        if !self
            .pushing
            .lock()
            .map_err(|_| Status::internal("push state poisoned"))?
            .insert(client)
        {
            return Err(Status::failed_precondition(format!(
                "client {client} is already pushing an update"
            )));
        }
        // From here the client is marked; the hold clears the mark when dropped.
        let kib = declared.div_ceil(1024).clamp(1, u64::from(self.budget_kib)) as u32;
        let bytes = match self.budget.clone().acquire_many_owned(kib).await {
            Ok(p) => p,
            Err(_) => {
                self.pushing.lock().map(|mut p| p.remove(&client)).ok();
                return Err(Status::unavailable("the server is shutting down"));
            }
        };
        Ok(Admitted {
            declared,
            _hold: Arc::new(Hold {
                client,
                pushing: self.pushing.clone(),
                _bytes: bytes,
            }),
        })
    }
}

/// The service wrapper that applies the gate to `Push` calls.
pub(crate) struct PushGate<S, P> {
    pub inner: S,
    pub gate: Arc<Gate<P>>,
}

impl<S: Clone, P> Clone for PushGate<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S: NamedService, P> NamedService for PushGate<S, P> {
    const NAME: &'static str = S::NAME;
}

impl<S, P> Service<http::Request<Body>> for PushGate<S, P>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    P: PushPolicy,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if req.uri().path().ends_with("/Pull") {
            // A task's reservation of the delivery budget lasts until its bytes are sent.
            let sent = self.inner.call(req);
            return Box::pin(async move { sent.await.map(crate::delivery::hold_until_sent) });
        }
        if !req.uri().path().ends_with("/Push") {
            return Box::pin(self.inner.call(req));
        }
        // The service that was polled ready serves this call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            match gate.admit(req.headers()).await {
                Ok(admitted) => {
                    req.extensions_mut().insert(admitted);
                    inner.call(req).await
                }
                Err(status) => {
                    tracing::warn!(reason = %status.message(), "update refused before reading it");
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Client 1 with session 7 has a task outstanding; nobody else.
    struct One;

    impl PushPolicy for One {
        fn may_push(&self, client: u64, session: u64) -> Result<(), Status> {
            if (client, session) == (1, 7) {
                Ok(())
            } else {
                Err(Status::failed_precondition("unknown session"))
            }
        }
    }

    fn headers(client: u64, session: u64, bytes: u64) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(PUSH_CLIENT, client.to_string().parse().unwrap());
        h.insert(PUSH_SESSION, session.to_string().parse().unwrap());
        h.insert(PUSH_BYTES, bytes.to_string().parse().unwrap());
        h
    }

    #[tokio::test]
    async fn pushes_are_admitted_from_their_headers_one_per_client_within_the_budget() {
        let gate = Gate::new(Arc::new(One), 1 << 20, 100 * 1024);
        // Forged session, missing headers, over the limit: refused, nothing reserved.
        assert!(gate.admit(&headers(1, 8, 10)).await.is_err());
        assert!(gate.admit(&http::HeaderMap::new()).await.is_err());
        let over = gate.admit(&headers(1, 7, 2 << 20)).await.err().unwrap();
        assert_eq!(over.code(), tonic::Code::OutOfRange);
        assert_eq!(gate.budget.available_permits(), 100);
        // One push at a time per client.
        let first = gate.admit(&headers(1, 7, 60 * 1024)).await.unwrap();
        assert_eq!(gate.budget.available_permits(), 40);
        let again = gate.admit(&headers(1, 7, 10)).await.err().unwrap();
        assert!(again.message().contains("already pushing"));
        drop(first);
        assert_eq!(gate.budget.available_permits(), 100);
        // A push that does not fit waits for room.
        let first = gate.admit(&headers(1, 7, 60 * 1024)).await.unwrap();
        let gate2 = gate.clone();
        let waiter = tokio::spawn(async move {
            // Another client's push admitted by a policy that allows it.
            let other = Gate {
                policy: Arc::new(One),
                limit: gate2.limit,
                budget: gate2.budget.clone(),
                budget_kib: gate2.budget_kib,
                pushing: Arc::new(Mutex::new(HashSet::new())),
            };
            other
                .admit(&headers(1, 7, 60 * 1024))
                .await
                .map(|a| a.declared)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "60 + 60 KiB do not fit a 100 KiB budget"
        );
        drop(first);
        assert_eq!(waiter.await.unwrap().unwrap(), 60 * 1024);
    }
}
