//! Server-side evaluation: the models a method names, on the test set, split over the worker
//! threads so that results do not depend on their number; linear probes and their floors.

use super::{Driver, Fleet, ProbeFloor, RoundEval};
use crate::EngineError;
use crate::local::{self, evaluate, evaluate_views};
use crate::method::{EvalModel, Readout};
use crate::sink::ClientRecord;
use crate::sink::ClientStatus;
use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, View};

impl Driver {
    /// The round's evaluation, every `evaluation.every` rounds and after the last: the
    /// method's models on the test set (their device-weighted mean when they carry device
    /// counts) and, with `evaluation.per_client`, the first model on each participating
    /// client's held-out data (written to its record). The method's round metrics always.
    pub(super) fn evaluate_round(
        &self,
        round: u64,
        clients: &mut [ClientRecord],
        fleet: &mut dyn Fleet,
    ) -> Result<RoundEval, EngineError> {
        let mut eval = RoundEval {
            accuracy: None,
            loss: None,
            device_accuracy: None,
            extra: self.server.round_metrics(),
        };
        if !(round.is_multiple_of(self.exp.evaluation.every) || round == self.exp.rounds) {
            return Ok(eval);
        }
        let models = self.server.eval_models();
        let results = self.evaluate_models(&models)?;
        if models.len() > 1 {
            for (m, (a, _)) in models.iter().zip(&results) {
                eval.extra
                    .insert(format!("test_accuracy/{}", m.label), (*a).into());
            }
        }
        // Per-device means when the models say how many devices deploy them.
        let weights: Vec<f64> = models
            .iter()
            .map(|m| m.devices.map_or(1.0, |d| d as f64))
            .collect();
        let total: f64 = weights.iter().sum();
        if total > 0.0 {
            let mean = |f: fn(&(f64, Option<f64>)) -> f64| {
                results
                    .iter()
                    .zip(&weights)
                    .map(|(r, w)| f(r) * w)
                    .sum::<f64>()
                    / total
            };
            eval.accuracy = Some(mean(|r| r.0));
            eval.loss = results
                .iter()
                .all(|r| r.1.is_some())
                .then(|| mean(|r| r.1.unwrap_or(0.0)));
            if models.iter().any(|m| m.readout == Readout::LinearProbe) {
                eval.extra
                    .insert("probe_accuracy".into(), eval.accuracy.into());
            }
            if models.iter().any(|m| m.devices.is_some()) {
                eval.extra
                    .insert("mean_device_accuracy".into(), eval.accuracy.into());
                eval.device_accuracy = eval.accuracy;
            }
        }
        if self.exp.evaluation.per_client
            && let Some(m) = models.into_iter().next()
        {
            let mut accs = Vec::new();
            for c in clients.iter_mut().filter(|c| c.status == ClientStatus::Ok) {
                let Some(data) = fleet.holdout(c.client)? else {
                    continue;
                };
                let (a, _) = evaluate(
                    &m.spec,
                    &m.view,
                    &m.params,
                    &data.holdout,
                    &self.mean,
                    &self.std,
                )?;
                c.extra.insert("holdout_accuracy".into(), a.into());
                accs.push(a);
            }
            if !accs.is_empty() {
                let mean = accs.iter().sum::<f64>() / accs.len() as f64;
                let var = accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / accs.len() as f64;
                eval.extra
                    .insert("client_accuracy_mean".into(), mean.into());
                eval.extra
                    .insert("client_accuracy_std".into(), var.sqrt().into());
            }
        }
        Ok(eval)
    }

    /// Evaluates the models on the test set, one (accuracy, loss) each; a model scored by a
    /// linear probe has no loss. Models that share architecture and parameters and differ
    /// only in their view are evaluated together, so depth prefixes of one model share their
    /// trunk.
    pub(super) fn evaluate_models(
        &self,
        models: &[EvalModel],
    ) -> Result<Vec<(f64, Option<f64>)>, EngineError> {
        let mut results = vec![(0.0, None); models.len()];
        let mut done = vec![false; models.len()];
        for i in 0..models.len() {
            if done[i] {
                continue;
            }
            if models[i].readout == Readout::LinearProbe {
                let m = &models[i];
                results[i] = (self.probe(&m.spec, &m.view, &m.params)?, None);
                done[i] = true;
                continue;
            }
            let group: Vec<usize> = (i..models.len())
                .filter(|&j| {
                    !done[j]
                        && models[j].readout == Readout::Classifier
                        && models[j].spec == models[i].spec
                        && models[j].params == models[i].params
                })
                .collect();
            let views: Vec<View> = group.iter().map(|&j| models[j].view.clone()).collect();
            let r = self.evaluate_parallel_views(
                &models[i].spec,
                &views,
                &models[i].params,
                &self.test,
            )?;
            for (&j, (a, l)) in group.iter().zip(r) {
                results[j] = (a, Some(l));
                done[j] = true;
            }
        }
        Ok(results)
    }

    /// The labelled images probes are fitted on, or an error that says how to provide them.
    pub(super) fn probe_train(&self) -> Result<&Dataset, EngineError> {
        self.probe_train.as_ref().ok_or_else(|| {
            EngineError::Config(format!(
                "method `{}` scores its model with a linear probe, which needs labelled training images; this driver was given none (Driver::set_probe_data)",
                self.server.name()
            ))
        })
    }

    /// Test accuracy of a linear probe on the features of `params` under `view`, the features
    /// computed on the workers in chunks aligned to the evaluator's, so the result is
    /// identical for any number of workers.
    pub(super) fn probe(
        &self,
        spec: &ModelSpec,
        view: &View,
        params: &ParamSet,
    ) -> Result<f64, EngineError> {
        let train = self.probe_train()?;
        let features = |data: &Dataset| -> Result<Vec<f32>, EngineError> {
            let parts = self.on_workers(data.len(), |a, b| {
                let idx: Vec<usize> = (a..b).collect();
                let part = data.subset(&idx)?;
                local::probe::features(spec, view, params, &part, &self.mean, &self.std)
            })?;
            Ok(parts.into_iter().flatten().collect())
        };
        let (train_f, test_f) = (features(train)?, features(&self.test)?);
        local::fit_and_score(
            (&train_f, &train.labels),
            (&test_f, &self.test.labels),
            spec.feature_dim(),
            self.test.num_classes,
            &local::ProbeConfig::default(),
        )
    }

    /// Before round 1, when a model is scored by a linear probe: the probe's test accuracy on
    /// raw pixels and on the untrained models, the floors the trained encoder must beat.
    pub(super) fn measure_probe_floor(&mut self) -> Result<(), EngineError> {
        let models = self.server.eval_models();
        let Some(m) = models.iter().find(|m| m.readout == Readout::LinearProbe) else {
            return Ok(());
        };
        let train = self.probe_train()?;
        let pixels = |d: &Dataset| -> Vec<f32> { d.images.iter().map(|&p| f32::from(p)).collect() };
        let dim = train.image_size();
        let raw_pixels = local::fit_and_score(
            (&pixels(train), &train.labels),
            (&pixels(&self.test), &self.test.labels),
            dim,
            self.test.num_classes,
            &local::ProbeConfig::default(),
        )?;
        let initial_model = self.probe(&m.spec, &m.view, &m.params)?;
        tracing::info!(
            raw_pixels,
            initial_model,
            "linear-probe floors: raw pixels and the untrained model"
        );
        self.totals.probe_floor = Some(ProbeFloor {
            raw_pixels,
            initial_model,
        });
        Ok(())
    }

    /// Runs `work(start, end)` on each worker for consecutive ranges of `0..n`, aligned to the
    /// evaluator's fixed chunk, and returns the results in range order.
    pub(super) fn on_workers<T: Send>(
        &self,
        n: usize,
        work: impl Fn(usize, usize) -> Result<T, EngineError> + Sync,
    ) -> Result<Vec<T>, EngineError> {
        let workers = self.pools.len().max(1);
        let chunk = crate::local::EVAL_CHUNK;
        let per = n.div_ceil(workers).div_ceil(chunk) * chunk;
        let ranges: Vec<(usize, usize)> = (0..workers)
            .map(|w| (w * per, ((w + 1) * per).min(n)))
            .filter(|(a, b)| a < b)
            .collect();
        let work = &work;
        std::thread::scope(|s| {
            let hs: Vec<_> = ranges
                .iter()
                .enumerate()
                .map(|(w, &(a, b))| s.spawn(move || self.pools[w].install(|| work(a, b))))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Task("evaluation thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// Test-set evaluation split over the workers in chunks aligned to the evaluator's fixed
    /// chunk size, so the result is identical for any number of workers.
    pub fn evaluate_parallel(
        &self,
        spec: &flotilla_models::ModelSpec,
        view: &flotilla_models::View,
        params: &ParamSet,
        data: &Dataset,
    ) -> Result<(f64, f64), EngineError> {
        Ok(self.evaluate_parallel_views(spec, std::slice::from_ref(view), params, data)?[0])
    }

    /// [`Driver::evaluate_parallel`] for several views of the same parameters.
    pub fn evaluate_parallel_views(
        &self,
        spec: &flotilla_models::ModelSpec,
        views: &[View],
        params: &ParamSet,
        data: &Dataset,
    ) -> Result<Vec<(f64, f64)>, EngineError> {
        let n = data.len();
        let results = self.on_workers(n, |a, b| {
            let idx: Vec<usize> = (a..b).collect();
            let part = data.subset(&idx)?;
            let r = evaluate_views(spec, views, params, &part, &self.mean, &self.std)?;
            Ok((r, b - a))
        })?;
        let mut sums = vec![(0.0, 0.0); views.len()];
        for (part, k) in results {
            for (s, (a, l)) in sums.iter_mut().zip(part) {
                s.0 += a * k as f64;
                s.1 += l * k as f64;
            }
        }
        Ok(sums
            .into_iter()
            .map(|(a, l)| (a / n as f64, l / n as f64))
            .collect())
    }
}
