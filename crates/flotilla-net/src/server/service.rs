//! The gRPC service: it only queues. Joins update the roster, pulls take the task waiting for
//! the caller, pushes hand the reply bytes to the round loop and wait for its verdict.

use super::*;

pub(super) fn check_version(v: u32) -> Result<(), Status> {
    if v != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "client speaks protocol version {v}, this server speaks {PROTOCOL_VERSION}; use matching flotilla versions"
        )));
    }
    Ok(())
}

pub(super) struct Service(pub(super) Arc<Shared>);

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
            match shared.look_for_task(r.client, r.session) {
                Look::Task { size } => {
                    // Room for the encoded task first (see `delivery`), then take it, unless
                    // it went elsewhere meanwhile (a deadline, a rejoin).
                    // The client is waiting on an open call, so it stays live meanwhile.
                    let reserve = shared.delivery.reserve(size);
                    tokio::pin!(reserve);
                    let permit = loop {
                        tokio::select! {
                            p = &mut reserve => break p,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                shared.touch(r.client, r.session)?;
                            }
                        }
                    };
                    let Some(permit) = permit else {
                        return Err(Status::unavailable("the server is shutting down"));
                    };
                    let Some(prepared) = shared.take_task(r.client, r.session) else {
                        continue;
                    };
                    let task = deliver(shared, &r, &prepared)?;
                    let mut response = Response::new(task);
                    response.extensions_mut().insert(permit);
                    return Ok(response);
                }
                Look::Over { status, reason } => {
                    shared.changed.notify_all();
                    return Ok(Response::new(PullReply {
                        status: status as i32,
                        task: Vec::new(),
                        reason,
                    }));
                }
                Look::Nothing => {}
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
        // The gate admitted this push from its headers before its body was read. Its
        // reservation is held until the verdict: a reply waiting for the round loop still
        // occupies memory (its bytes and the decode buffer), so it must count against the budget.
        let admitted = req
            .extensions()
            .get::<crate::push_gate::Admitted>()
            .cloned();
        let declared = admitted.as_ref().map(|a| a.declared);
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
                Some(out) if out.session == r.session && out.delivered => {}
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
        let verdict = rx.await;
        drop(admitted);
        match verdict {
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

/// What a pull finds.
enum Look {
    /// A task waits for this client: about `size` bytes once encoded.
    Task { size: u64 },
    /// The run is over (and the client is released).
    Over { status: PullStatus, reason: String },
    /// Nothing yet.
    Nothing,
}

impl Shared {
    /// Whether a task waits for (client, session), or the run is over.
    fn look_for_task(&self, client: u64, session: u64) -> Look {
        let mut st = self.lock();
        if let Some(out) = st.outbox.get(&client)
            && out.session == session
            && !out.delivered
        {
            return Look::Task {
                size: 4 * out.prepared.task.params.numel() as u64 + 64 * 1024,
            };
        }
        if st.done {
            st.released.insert(client);
            let (status, reason) = match &st.failure {
                Some(r) => (PullStatus::Failed, r.clone()),
                None => (PullStatus::Done, String::new()),
            };
            return Look::Over { status, reason };
        }
        Look::Nothing
    }

    /// Marks the task of (client, session) delivered and returns it, if it is still waiting.
    fn take_task(&self, client: u64, session: u64) -> Option<Arc<Prepared>> {
        let mut st = self.lock();
        let out = st
            .outbox
            .get_mut(&client)
            .filter(|o| o.session == session && !o.delivered)?;
        out.delivered = true;
        let prepared = out.prepared.clone();
        // Liveness counts from the delivery: training starts now.
        if let Some(m) = st.members.get_mut(&client) {
            m.last_seen = Instant::now();
        }
        Some(prepared)
    }
}

/// Encodes a task for the puller `r` (outside the lock: the slow part for a large model) and
/// records the bytes delivered. A client that lacks a mask or tensor the task names by
/// fingerprint (a restarted process, a restored server, an evicted entry) gets it in full.
fn deliver(shared: &Shared, r: &PullRequest, prepared: &Prepared) -> Result<PullReply, Status> {
    let encoded = match prepared.reconcile(&r.inventory()) {
        Some(fixed) => {
            tracing::info!(
                client = r.client,
                "the client lacks what it was thought to hold; sending it in full"
            );
            fixed.encode()
        }
        None => prepared.encode(),
    };
    let task = PullReply {
        status: PullStatus::Task as i32,
        task: encoded.map_err(|e| Status::internal(e.to_string()))?,
        reason: String::new(),
    };
    let delivered_bytes = task.encoded_len() as u64 + GRPC_FRAME_BYTES;
    if let Some(out) = shared.lock().outbox.get_mut(&r.client)
        && out.session == r.session
    {
        out.delivered_bytes = delivered_bytes;
    }
    Ok(task)
}
