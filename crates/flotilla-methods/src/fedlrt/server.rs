//! FeDLRT's server half: the phases of a round, basis augmentation, corrections, averaging and
//! truncation.

use super::*;

/// The server half of FeDLRT (and of FedLin: no factored layer).
pub struct FedLrt {
    pub(super) name: String,
    pub(super) spec: ModelSpec,
    pub(super) recipe: Recipe,
    pub(super) layers: Vec<Layer>,
    pub(super) r_min: usize,
    pub(super) tau: f64,
    pub(super) steps: Option<usize>,
    pub(super) vc: Correction,
    pub(super) grad_batches: usize,
    /// The global model: factors of the factored layers, every other tensor dense.
    pub(super) params: ParamSet,
    pub(super) pending: Option<Pending>,
    /// Ranks after the last augmentation, reported per round.
    pub(super) augmented: BTreeMap<String, usize>,
    /// Names and shapes of the dense model's tensors, in export order.
    pub(super) dense_layout: Vec<(String, Vec<usize>)>,
}

impl FedLrt {
    /// Builds the server half from the `[method]` table: `fedlrt`, or `fedlin` (every layer
    /// dense, the correction of FeDLRT's `simplified` variant on all tensors).
    pub fn from_config(exp: &Experiment, dense: ModelSpec) -> Result<Self, EngineError> {
        let opts: Options = method_options(exp)?;
        let fedlin = opts.name == "fedlin";
        if fedlin {
            for (key, set) in [
                ("layers", opts.layers.is_some()),
                ("r0", opts.r0.is_some()),
                ("r_min", opts.r_min.is_some()),
                ("r_max", opts.r_max.is_some()),
                ("tau", opts.tau.is_some()),
                ("vc", opts.vc.is_some()),
            ] {
                if set {
                    return Err(EngineError::Config(format!(
                        "`method.{key}` applies to fedlrt; fedlin trains every layer dense with its own correction"
                    )));
                }
            }
        }
        let all = dense.linear_layers();
        let names: Vec<String> = match (&opts.layers, fedlin) {
            (_, true) => Vec::new(),
            (Some(l), false) => l.clone(),
            (None, false) => all[..all.len().saturating_sub(1)]
                .iter()
                .map(|(n, _, _)| n.clone())
                .collect(),
        };
        if names.is_empty() && !fedlin {
            return Err(EngineError::Config(
                "`method.layers` names no layer to factor; for the dense variance-corrected baseline use method.name = \"fedlin\"".into(),
            ));
        }
        let r_min = opts.r_min.unwrap_or(DEFAULT_R_MIN);
        if r_min == 0 {
            return Err(EngineError::Config(
                "`method.r_min` must be at least 1".into(),
            ));
        }
        let mut layers = Vec::new();
        let mut spec = dense.clone();
        for name in &names {
            let Some((_, inp, out)) = all.iter().find(|(n, _, _)| n == name) else {
                return Err(EngineError::Config(format!(
                    "`method.layers`: the model has no linear layer `{name}` (its linear layers: {})",
                    all.iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let half = (*inp).min(*out) / 2;
            let r_max = opts.r_max.map_or(half, |r| r.min(half));
            if r_max < r_min {
                return Err(EngineError::Config(format!(
                    "`method.r_max` for layer `{name}` is {r_max} (at most min(in, out)/2 = {half}), below `method.r_min` = {r_min}"
                )));
            }
            let r0 = opts.r0.unwrap_or(DEFAULT_R0).clamp(r_min, r_max);
            spec.ranks.insert(name.clone(), r0);
            layers.push(Layer {
                name: name.clone(),
                inp: *inp,
                out: *out,
                r_max,
            });
        }
        if layers.len() != spec.ranks.len() {
            return Err(EngineError::Config(
                "`method.layers` names a layer twice".into(),
            ));
        }
        let tau = opts.tau.unwrap_or(DEFAULT_TAU);
        if !(tau.is_finite() && (0.0..1.0).contains(&tau)) {
            return Err(EngineError::Config(format!(
                "`method.tau` must be in [0, 1), got {tau}"
            )));
        }
        if opts.s_star == Some(0) {
            return Err(EngineError::Config(
                "`method.s_star` must be at least 1 local step".into(),
            ));
        }
        let vc = match (fedlin, opts.vc) {
            (true, _) => Correction::Simplified,
            (false, vc) => vc.unwrap_or(Correction::Simplified),
        };
        let grad_batches = opts.grad_batches.unwrap_or(if vc == Correction::None {
            BASIS_ONLY_GRAD_BATCHES
        } else {
            FULL_PASS
        });
        if grad_batches == 0 {
            return Err(EngineError::Config(
                "`method.grad_batches` must be at least 1".into(),
            ));
        }
        let params = Net::init_params(&spec, exp.seed)?;
        let dense_layout = Net::init_params(&dense, 0)?
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        Ok(Self {
            name: opts.name,
            spec,
            recipe: exp.training.clone(),
            layers,
            r_min,
            tau,
            steps: opts.s_star,
            vc,
            grad_batches,
            params,
            pending: None,
            augmented: BTreeMap::new(),
            dense_layout,
        })
    }

    /// The current global model (factors and dense tensors).
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// The current model description (its `ranks` are the current ranks).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Zero tensors with the names, shapes and order of the model at `ranks` (a factored
    /// layer exports U, S, V where the dense one has its weight), without the SVDs of an
    /// initialisation.
    pub(super) fn layout(&self, ranks: &BTreeMap<String, usize>) -> Result<ParamSet, EngineError> {
        let mut out = Vec::with_capacity(self.dense_layout.len() + 2 * ranks.len());
        for (name, shape) in &self.dense_layout {
            let factored = name
                .strip_suffix(".weight")
                .and_then(|l| ranks.get(l).map(|r| (l, *r)));
            match factored {
                Some((layer, r)) => {
                    let [out_f, in_f] = shape[..] else {
                        return Err(EngineError::Method(format!(
                            "`{name}` is not a matrix, it cannot be factored"
                        )));
                    };
                    out.push(Tensor::zeros(format!("{layer}.U"), vec![out_f, r]));
                    out.push(Tensor::zeros(format!("{layer}.S"), vec![r, r]));
                    out.push(Tensor::zeros(format!("{layer}.V"), vec![in_f, r]));
                }
                None => out.push(Tensor::zeros(name.clone(), shape.clone())),
            }
        }
        Ok(ParamSet::from_tensors(out)?)
    }

    fn is_factor(&self, name: &str) -> bool {
        self.layers
            .iter()
            .any(|l| ["U", "S", "V"].iter().any(|leaf| name == l.tensor(leaf)))
    }

    /// Names of the tensors trained densely (and FedAvg'd): everything but the factors.
    fn dense_names(&self) -> Vec<String> {
        self.params
            .names()
            .filter(|n| !self.is_factor(n))
            .map(String::from)
            .collect()
    }

    /// The gradients phase 0 asks for.
    fn basis_upload(&self) -> Vec<String> {
        let mut up = Vec::new();
        for l in &self.layers {
            up.push(l.tensor("U"));
            up.push(l.tensor("V"));
            if self.vc == Correction::Simplified {
                up.push(l.tensor("S"));
            }
        }
        if self.vc != Correction::None {
            up.extend(self.dense_names());
        }
        up
    }

    /// U and V of every factored layer: frozen while the core trains.
    fn bases(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| [l.tensor("U"), l.tensor("V")])
            .collect()
    }

    fn pending(&self, ctx: &PhaseCtx) -> Result<&Pending, EngineError> {
        self.pending
            .as_ref()
            .filter(|p| p.round == ctx.round)
            .ok_or_else(|| {
                EngineError::Method(format!(
                    "{}: phase {} of round {} planned before its basis phase was aggregated",
                    self.name, ctx.phase, ctx.round
                ))
            })
    }

    fn task(&self, ctx: &PhaseCtx, client: u64, shape: &TaskShape<'_>, params: ParamSet) -> Task {
        // Everything but the corrections stays on the client until the round ends.
        let hold = params
            .names()
            .filter(|n| !n.starts_with(CORRECTION_PREFIX))
            .map(String::from)
            .collect();
        Task {
            round: ctx.round,
            phase: ctx.phase,
            client,
            kind: shape.kind.clone(),
            model: shape.spec.clone(),
            view: shape.view.clone(),
            recipe: self.recipe.clone(),
            params,
            masks: Vec::new(),
            hold,
            options: serde_json::to_value(&shape.options).expect("serialisable"),
        }
    }

    /// One task per client, or a skip when the assembled model's training does not fit.
    fn plan_with(
        &self,
        ctx: &PhaseCtx,
        clients: &[ClientInfo],
        shape: &TaskShape<'_>,
        params_for: impl Fn(u64) -> Result<ParamSet, EngineError>,
    ) -> Result<Vec<Assignment>, EngineError> {
        // The estimate of the assembled model (what the client builds), not of the pieces.
        let layout = self.layout(&shape.spec.ranks)?;
        let need = estimate_memory(shape.spec, &shape.view, &layout, &self.recipe).total();
        clients
            .iter()
            .map(|c| {
                if need > c.profile.memory_bytes {
                    Ok(Assignment::Skip(format!(
                        "{} at ranks {:?} needs about {:.1} MiB, the {} device has {:.1} MiB",
                        self.name,
                        shape.spec.ranks,
                        need as f64 / 1048576.0,
                        c.profile.tier,
                        c.profile.memory_bytes as f64 / 1048576.0
                    )))
                } else {
                    let task = self.task(ctx, c.id, shape, params_for(c.id)?);
                    Ok(Assignment::Run(Box::new(task)))
                }
            })
            .collect()
    }

    fn core_view(&self) -> View {
        View {
            active_blocks: None,
            frozen: self.bases(),
        }
    }

    /// Phase 0's aggregate: average the gradients, augment the bases, set the corrections.
    fn aggregate_basis(&mut self, ctx: &PhaseCtx, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let mut spec = self.spec.clone();
        let mut dirs = Vec::new();
        for l in &self.layers {
            let r = self.spec.ranks[&l.name];
            let u = matrix(self.params.require(&l.tensor("U"))?);
            let v = matrix(self.params.require(&l.tensor("V"))?);
            let gu = matrix(mean.require(&l.tensor("U"))?);
            let gv = matrix(mean.require(&l.tensor("V"))?);
            let limit = r.min(l.inp.min(l.out) - r);
            let (nu, nv) = (new_directions(&u, &gu), new_directions(&v, &gv));
            let k = limit.min(nu.ncols()).min(nv.ncols());
            spec.ranks.insert(l.name.clone(), r + k);
            dirs.push(tensor(&l.tensor(NEW_U), &nu.columns(0, k).into_owned()));
            dirs.push(tensor(&l.tensor(NEW_V), &nv.columns(0, k).into_owned()));
        }
        // U and V get no correction (they are frozen while the core trains), and no tensor
        // does without one.
        let bases = self.bases();
        let corrected =
            |name: &str| self.vc != Correction::None && !bases.iter().any(|b| b == name);
        let mut corrections = BTreeMap::new();
        for reply in replies {
            let vc = correction_terms(&mean, &reply.params, corrected)?;
            corrections.insert(reply.client, ParamSet::from_tensors(vc)?);
        }
        tracing::debug!(round = ctx.round, ranks = ?spec.ranks, "bases augmented");
        self.pending = Some(Pending {
            round: ctx.round,
            spec,
            new_dirs: ParamSet::from_tensors(dirs)?,
            corrections,
        });
        Ok(())
    }

    /// Full correction: the mean of the core gradients at S̃⁰ sets each client's S̃ term.
    fn aggregate_core_gradients(&mut self, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let pending = self.pending.as_mut().expect("checked by the caller");
        let mut corrections = BTreeMap::new();
        for reply in replies {
            // A client that missed phase 0 has no dense correction: it cannot be here.
            let mut vc = pending
                .corrections
                .remove(&reply.client)
                .unwrap_or_default();
            for t in correction_terms(&mean, &reply.params, |_| true)? {
                vc.push(t)?;
            }
            corrections.insert(reply.client, vc);
        }
        pending.corrections = corrections;
        Ok(())
    }

    /// The last phase's aggregate: average S̃ and the dense tensors, truncate, new factors.
    fn aggregate_core(&mut self, ctx: &PhaseCtx, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let pending = self.pending.take().expect("checked by the caller");
        let mut out = Vec::with_capacity(self.params.len());
        let mut ranks = self.spec.ranks.clone();
        for t in self.params.iter() {
            if !self.is_factor(&t.name) {
                out.push(mean.require(&t.name)?.clone());
            }
        }
        for l in &self.layers {
            let u = matrix(self.params.require(&l.tensor("U"))?);
            let v = matrix(self.params.require(&l.tensor("V"))?);
            let u_aug = hcat(&u, &matrix(pending.new_dirs.require(&l.tensor(NEW_U))?));
            let v_aug = hcat(&v, &matrix(pending.new_dirs.require(&l.tensor(NEW_V))?));
            let s = matrix(mean.require(&l.tensor("S"))?);
            let (nu, ns, nv) = truncate(&u_aug, &s, &v_aug, self.tau, self.r_min, l.r_max);
            ranks.insert(l.name.clone(), ns.nrows());
            out.push(tensor(&l.tensor("U"), &nu));
            out.push(tensor(&l.tensor("S"), &ns));
            out.push(tensor(&l.tensor("V"), &nv));
        }
        let mut spec = self.spec.clone();
        spec.ranks = ranks;
        // Keep the model's tensor order (the layout PyTorch and checkpoints see).
        let order = self.layout(&spec.ranks)?;
        let by_name: HashMap<String, Tensor> =
            out.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut params = Vec::with_capacity(order.len());
        for t in order.iter() {
            params.push(by_name.get(&t.name).cloned().ok_or_else(|| {
                EngineError::Method(format!("{}: no value for `{}`", self.name, t.name))
            })?);
        }
        let params = ParamSet::from_tensors(params)?;
        order.check_same_layout(&params)?;
        tracing::debug!(round = ctx.round, ranks = ?spec.ranks, "cores truncated");
        self.params = params;
        self.spec = spec;
        self.augmented = pending.spec.ranks;
        Ok(())
    }

    fn last_phase(&self) -> u32 {
        if self.vc == Correction::Full { 2 } else { 1 }
    }
}

impl ServerHalf for FedLrt {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        let opts = |upload: Vec<String>| LrtTask {
            grad_batches: self.grad_batches,
            steps: self.steps,
            upload,
        };
        if ctx.phase == 0 {
            let shape = TaskShape {
                kind: BASIS,
                spec: &self.spec,
                view: View::full(),
                options: opts(self.basis_upload()),
            };
            return self.plan_with(ctx, clients, &shape, |_| Ok(self.params.clone()));
        }
        let pending = self.pending(ctx)?;
        let mut base = self.params.clone();
        for t in pending.new_dirs.iter() {
            base.push(t.clone())?;
        }
        if ctx.phase < self.last_phase() {
            // Only S̃'s gradient is wanted: the dense tensors are frozen as well.
            let mut view = self.core_view();
            view.frozen.extend(self.dense_names());
            let shape = TaskShape {
                kind: CORE_GRADIENTS,
                spec: &pending.spec,
                view,
                options: opts(self.layers.iter().map(|l| l.tensor("S")).collect()),
            };
            return self.plan_with(ctx, clients, &shape, |_| Ok(base.clone()));
        }
        let shape = TaskShape {
            kind: TRAIN_CORE,
            spec: &pending.spec,
            view: self.core_view(),
            options: opts(Vec::new()),
        };
        self.plan_with(ctx, clients, &shape, |c| {
            let mut params = base.clone();
            if self.vc != Correction::None {
                let vc = pending.corrections.get(&c).ok_or_else(|| {
                    EngineError::Method(format!(
                        "{}: client {c} has no correction for round {}",
                        self.name, ctx.round
                    ))
                })?;
                for t in vc.iter() {
                    params.push(t.clone())?;
                }
            }
            Ok(params)
        })
    }

    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        let expected = expected_reply(task).map_err(|e| e.to_string())?;
        let got: Vec<(&str, &[usize])> = reply
            .params
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let want: Vec<(&str, &[usize])> = expected
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        if got != want {
            return Err(format!(
                "a `{}` reply must hold exactly {} tensors ({}), got {} ({})",
                task.kind,
                want.len(),
                describe(&want),
                got.len(),
                describe(&got)
            ));
        }
        // The driver has already refused a reply with zero examples.
        Ok(())
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        if ctx.phase == 0 {
            self.aggregate_basis(ctx, replies)?;
            return Ok(PhaseEnd::NextPhase);
        }
        self.pending(ctx)?;
        if ctx.phase < self.last_phase() {
            self.aggregate_core_gradients(replies)?;
            return Ok(PhaseEnd::NextPhase);
        }
        self.aggregate_core(ctx, replies)?;
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "global".into(),
            spec: self.spec.clone(),
            view: View::full(),
            params: self.params.clone(),
            devices: None,
            readout: flotilla_engine::Readout::Classifier,
        }]
    }

    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if self.layers.is_empty() {
            return m;
        }
        let mut sum = 0usize;
        for l in &self.layers {
            let r = self.spec.ranks[&l.name];
            sum += r;
            m.insert(format!("rank/{}", l.name), r.into());
            if let Some(a) = self.augmented.get(&l.name) {
                m.insert(format!("augmented_rank/{}", l.name), (*a).into());
            }
        }
        m.insert(
            "rank_mean".into(),
            (sum as f64 / self.layers.len() as f64).into(),
        );
        // methods.md §4.8: c.r. = 1 − #params(low-rank) / #params(dense).
        let dense: usize = self.layers.iter().map(|l| l.inp * l.out).sum();
        let factored: usize = self
            .layers
            .iter()
            .map(|l| {
                let r = self.spec.ranks[&l.name];
                (l.inp + l.out) * r + r * r
            })
            .sum();
        m.insert(
            "compression".into(),
            (1.0 - factored as f64 / dense as f64).into(),
        );
        m
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("global".to_string(), self.params.clone())]),
            json: serde_json::json!({ "ranks": self.spec.ranks }),
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        let ranks: BTreeMap<String, usize> = serde_json::from_value(state.json["ranks"].clone())
            .map_err(|e| EngineError::Method(format!("checkpoint ranks: {e}")))?;
        if ranks.keys().ne(self.spec.ranks.keys()) {
            return Err(EngineError::Method(format!(
                "the checkpoint factors layers {:?}, the config {:?}",
                ranks.keys().collect::<Vec<_>>(),
                self.spec.ranks.keys().collect::<Vec<_>>()
            )));
        }
        let mut spec = self.spec.clone();
        spec.ranks = ranks;
        spec.validate()?;
        let global = state
            .params
            .get("global")
            .ok_or_else(|| EngineError::Method("checkpoint lacks the global model".into()))?;
        self.layout(&spec.ranks)?.check_same_layout(global)?;
        self.spec = spec;
        self.params = global.clone();
        self.pending = None;
        Ok(())
    }
}
