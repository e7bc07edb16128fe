//! The example-weighted mean, in one batch or folded one contribution at a time, with exact
//! sums so that both give the same bits in any order.

use super::exact::{Fixed, FixedVec, MAX_TERMS, TERM_LIMIT};
use super::{Contribution, check_weights};
use crate::{CoreError, ParamSet, Tensor};

/// FedAvg: Σ wᵢ xᵢ / Σ wᵢ for every tensor. All contributions must share one layout. The
/// result is the same for every order of `contribs` and equals [`MeanFold`]'s.
pub fn weighted_mean(contribs: &[Contribution<'_>]) -> Result<ParamSet, CoreError> {
    check_weights(contribs)?;
    let first = contribs[0].params;
    for c in contribs {
        first.check_same_layout(c.params)?;
        check_terms(c)?;
    }
    if contribs.len() > MAX_TERMS {
        return Err(CoreError::Aggregation(format!(
            "more than {MAX_TERMS} contributions to one mean"
        )));
    }
    let total = exact_total(contribs.iter().map(|c| c.weight));
    // A block of values at a time over all contributions, so the exact sums (32 bytes per
    // value) stay in cache instead of streaming a whole tensor's worth per contribution.
    const BLOCK: usize = 2048;
    let tensors: Vec<Vec<&Tensor>> = contribs.iter().map(|c| c.params.iter().collect()).collect();
    let mut acc = FixedVec::zeros(BLOCK);
    let mut out = Vec::with_capacity(first.len());
    for (ti, t) in first.iter().enumerate() {
        let mut data = Vec::with_capacity(t.numel());
        for start in (0..t.numel()).step_by(BLOCK) {
            let end = (start + BLOCK).min(t.numel());
            acc.reset(end - start);
            for (c, ts) in contribs.iter().zip(&tensors) {
                acc.add_scaled(&ts[ti].data[start..end], c.weight);
            }
            data.extend(finish_mean(&acc, total));
        }
        out.push(Tensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data,
        });
    }
    ParamSet::from_tensors(out)
}

/// Σ weights, exactly.
fn exact_total(weights: impl Iterator<Item = f64>) -> f64 {
    let mut total = Fixed::default();
    for w in weights {
        total.add(w);
    }
    total.to_f64()
}

/// The mean from exact sums and the exact total weight, rounded once to f32.
fn finish_mean(acc: &FixedVec, total: f64) -> Vec<f32> {
    (0..acc.len())
        .map(|i| (acc.get(i).to_f64() / total) as f32)
        .collect()
}

/// Refuses a contribution whose weighted values could overflow the exact sum: every
/// |weight · value| and the weight must stay below 2⁶⁴ (≈ 1.8·10¹⁹), which any update of a
/// model that trains well does by many orders of magnitude.
fn check_terms(c: &Contribution<'_>) -> Result<(), CoreError> {
    if !(c.weight.is_finite() && c.weight >= 0.0 && c.weight < TERM_LIMIT) {
        return Err(CoreError::Aggregation(format!(
            "weight {} is not a finite non-negative number below 2^64",
            c.weight
        )));
    }
    for t in c.params.iter() {
        // One branch-free pass (it vectorises); the offending value is looked up only on failure.
        let w = c.weight;
        let bad = |v: &f32| !(w * f64::from(*v)).abs().lt(&TERM_LIMIT);
        if t.data.iter().fold(false, |any, v| any | bad(v))
            && let Some(v) = t.data.iter().find(|v| bad(v))
        {
            return Err(CoreError::Aggregation(format!(
                "tensor `{}` holds {v}, which weighted by {} is too large to average (|weight · value| must stay below 2^64); the training diverged: lower the learning rate",
                t.name, c.weight
            )));
        }
    }
    Ok(())
}

/// A weighted mean folded one contribution at a time, for a server that must not hold every
/// reply at once. Sums are exact ([`weighted_mean`]'s), so the result is the same for every
/// order in which contributions are added, and equals [`weighted_mean`] over all of them.
#[derive(Debug, Clone)]
pub struct MeanFold {
    layout: Vec<(String, Vec<usize>)>,
    sums: Vec<FixedVec>,
    total: Fixed,
    count: usize,
}

impl MeanFold {
    /// An empty fold for contributions with the layout of `template` (names, order, shapes).
    pub fn new(template: &ParamSet) -> Self {
        Self {
            layout: template
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
            sums: template
                .iter()
                .map(|t| FixedVec::zeros(t.numel()))
                .collect(),
            total: Fixed::default(),
            count: 0,
        }
    }

    /// Adds one contribution; on `Err` (another layout, a bad weight, values too large to
    /// average) the fold is unchanged.
    pub fn add(&mut self, c: &Contribution<'_>) -> Result<(), CoreError> {
        if c.params.len() != self.layout.len() {
            return Err(CoreError::Incompatible(format!(
                "{} tensors vs {} tensors",
                self.layout.len(),
                c.params.len()
            )));
        }
        for ((name, shape), t) in self.layout.iter().zip(c.params.iter()) {
            if *name != t.name || *shape != t.shape {
                return Err(CoreError::Incompatible(format!(
                    "`{name}` {shape:?} vs `{}` {:?}",
                    t.name, t.shape
                )));
            }
        }
        check_terms(c)?;
        if self.count >= MAX_TERMS {
            return Err(CoreError::Aggregation(format!(
                "more than {MAX_TERMS} contributions to one mean"
            )));
        }
        for (acc, t) in self.sums.iter_mut().zip(c.params.iter()) {
            acc.add_scaled(&t.data, c.weight);
        }
        self.total.add(c.weight);
        self.count += 1;
        Ok(())
    }

    /// Contributions added so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True before the first contribution.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The mean of the contributions added; an error when there is none or their weights sum
    /// to zero.
    pub fn finish(self) -> Result<ParamSet, CoreError> {
        if self.count == 0 {
            return Err(CoreError::Aggregation(
                "no contribution to aggregate".into(),
            ));
        }
        let total = self.total.to_f64();
        if total <= 0.0 {
            return Err(CoreError::Aggregation("weights sum to zero".into()));
        }
        let tensors = self
            .layout
            .into_iter()
            .zip(&self.sums)
            .map(|((name, shape), acc)| Tensor {
                name,
                shape,
                data: finish_mean(acc, total),
            })
            .collect();
        ParamSet::from_tensors(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(vals: &[(&str, Vec<f32>)]) -> ParamSet {
        ParamSet::from_tensors(
            vals.iter()
                .map(|(n, v)| Tensor::new(*n, vec![v.len()], v.clone()).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn weighted_mean_is_exact_on_hand_made_tensors() {
        let a = set(&[("w", vec![1.0, 2.0]), ("b", vec![0.0])]);
        let b = set(&[("w", vec![4.0, -2.0]), ("b", vec![3.0])]);
        let out = weighted_mean(&[
            Contribution {
                params: &a,
                weight: 1.0,
            },
            Contribution {
                params: &b,
                weight: 2.0,
            },
        ])
        .unwrap();
        assert_eq!(out.get("w").unwrap().data, vec![3.0, -2.0 / 3.0]);
        assert_eq!(out.get("b").unwrap().data, vec![2.0]);
    }

    #[test]
    fn the_fold_equals_the_batch_mean_in_any_order() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let sets: Vec<ParamSet> = (0..40)
            .map(|_| {
                let w: Vec<f32> = (0..257).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..3).map(|_| rng.random_range(-1e-6..1e-6)).collect();
                set(&[("w", w), ("b", b)])
            })
            .collect();
        let weights: Vec<f64> = (0..40).map(|i| f64::from(1 + (i * 37) % 600)).collect();
        let contribs: Vec<Contribution<'_>> = sets
            .iter()
            .zip(&weights)
            .map(|(p, &weight)| Contribution { params: p, weight })
            .collect();
        let batch = weighted_mean(&contribs).unwrap();
        let mut order: Vec<usize> = (0..contribs.len()).collect();
        for _ in 0..4 {
            order.shuffle(&mut rng);
            let mut fold = MeanFold::new(&sets[0]);
            for &i in &order {
                fold.add(&contribs[i]).unwrap();
            }
            assert_eq!(fold.len(), 40);
            assert_eq!(fold.finish().unwrap(), batch);
        }
        // And the exact mean is the plain f64 mean up to float rounding.
        let total: f64 = weights.iter().sum();
        for (i, v) in batch.get("w").unwrap().data.iter().enumerate() {
            let want: f64 = contribs
                .iter()
                .map(|c| c.weight * f64::from(c.params.get("w").unwrap().data[i]))
                .sum::<f64>()
                / total;
            assert!(
                (f64::from(*v) - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{v} {want}"
            );
        }
    }

    #[test]
    fn the_fold_refuses_what_it_cannot_average_and_stays_unchanged() {
        let a = set(&[("w", vec![1.0, 2.0])]);
        assert!(MeanFold::new(&a).finish().is_err(), "nothing to average");
        let mut fold = MeanFold::new(&a);
        let wrong = set(&[("w", vec![1.0])]);
        let huge = set(&[("w", vec![1.0, 3e38])]);
        for bad in [
            Contribution {
                params: &wrong,
                weight: 1.0,
            },
            Contribution {
                params: &huge,
                weight: 1.0,
            },
            Contribution {
                params: &a,
                weight: f64::INFINITY,
            },
            Contribution {
                params: &a,
                weight: -1.0,
            },
        ] {
            assert!(fold.add(&bad).is_err());
        }
        assert!(fold.is_empty());
        fold.add(&Contribution {
            params: &a,
            weight: 2.0,
        })
        .unwrap();
        assert_eq!(fold.finish().unwrap(), a);
        // The batch mean refuses the same overflow with a reason.
        let err = weighted_mean(&[Contribution {
            params: &huge,
            weight: 1.0,
        }])
        .unwrap_err();
        assert!(err.to_string().contains("too large to average"), "{err}");
    }

    #[test]
    fn weighted_mean_rejects_bad_input() {
        let a = set(&[("w", vec![1.0, 2.0])]);
        let b = set(&[("w", vec![1.0])]);
        assert!(weighted_mean(&[]).is_err());
        assert!(
            weighted_mean(&[
                Contribution {
                    params: &a,
                    weight: 1.0
                },
                Contribution {
                    params: &b,
                    weight: 1.0
                }
            ])
            .is_err()
        );
        assert!(
            weighted_mean(&[Contribution {
                params: &a,
                weight: f64::NAN
            }])
            .is_err()
        );
        assert!(
            weighted_mean(&[Contribution {
                params: &a,
                weight: 0.0
            }])
            .is_err()
        );
    }
}
