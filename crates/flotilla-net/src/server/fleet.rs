//! The round loop's view of a network run: the live members, and a round's tasks delivered
//! through the service and judged as their replies arrive or their deadline passes.

use super::*;

/// The clients of a network run, as the round loop sees them.
pub struct NetFleet {
    pub(super) shared: Arc<Shared>,
    pub(super) roster: BTreeMap<u64, Member>,
}

impl NetFleet {
    pub(super) fn live(&self, st: &State) -> Vec<u64> {
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
        mut fold: Option<&mut MeanFold>,
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
            // Tasks are encoded when their clients pull them (the service), not here.
            let mut st = self.shared.lock();
            for p in tasks {
                let c = p.client;
                let mut rec = blank_record(p.task.round, c, &self.roster[&c].profile);
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
                let p = Arc::new(p);
                st.outbox.insert(
                    c,
                    Outgoing {
                        session,
                        delivered: false,
                        prepared: p.clone(),
                        delivered_bytes: 0,
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
                let lost: Vec<(u64, String, u64)> = lost
                    .into_iter()
                    .map(|(c, reason)| {
                        let sent = st.outbox.remove(&c).map_or(0, |o| o.delivered_bytes);
                        (c, reason, sent)
                    })
                    .collect();
                (incoming, lost)
            };
            for (c, reason, sent) in lost {
                if let Some((_, _, rec)) = pending.get_mut(&c) {
                    rec.bytes_down = sent;
                }
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
                        let (mut run, mut verdict) =
                            judge_reply(rec, &inc.reply, server_masks, &p.task, check, profile);
                        // Folded now, the reply's tensors are not kept until the round ends.
                        if let (Ok(()), Some(f)) = (&verdict, fold.as_deref_mut()) {
                            verdict = fold_reply(&mut run, f);
                        }
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
                    rec.bytes_down = st.outbox.remove(&c).map_or(0, |o| o.delivered_bytes);
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
