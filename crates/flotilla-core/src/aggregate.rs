//! Aggregation rules: plain functions over parameter collections.
//!
//! The weighted mean sums exactly on a fixed-point grid ([`MeanFold`]), so its result does not
//! depend on the order of the contributions: a server may fold replies in as they arrive and
//! keep none. The other rules sum in f64 in the order given (the engine sorts replies by client
//! id before handing them over), so their results do not depend on thread counts either.

use crate::{CoreError, ParamSet, Tensor};

mod exact;
use exact::{Fixed, FixedVec, MAX_TERMS, TERM_LIMIT};

/// One client's contribution: its parameters and its weight (usually its example count).
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    /// Parameters sent by the client (possibly only a subset of the model).
    pub params: &'a ParamSet,
    /// Non-negative weight.
    pub weight: f64,
}

fn check_weights(contribs: &[Contribution<'_>]) -> Result<(), CoreError> {
    if contribs.is_empty() {
        return Err(CoreError::Aggregation(
            "no contribution to aggregate".into(),
        ));
    }
    if let Some(c) = contribs
        .iter()
        .find(|c| !c.weight.is_finite() || c.weight < 0.0)
    {
        return Err(CoreError::Aggregation(format!(
            "weight {} is not a finite non-negative number",
            c.weight
        )));
    }
    if contribs.iter().map(|c| c.weight).sum::<f64>() <= 0.0 {
        return Err(CoreError::Aggregation("weights sum to zero".into()));
    }
    Ok(())
}

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

/// How tensors that only some contributions hold are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Average over every contribution; a contribution lacking a tensor counts with the
    /// current global value (FlexTrain's rule: untrained blocks are filled with the global).
    All,
    /// Average each tensor only over the contributions that hold it (HeteroFL-style);
    /// a tensor nobody holds keeps its global value.
    Holders,
}

/// Weighted mean where contributions may hold any subset of the global tensors (same shapes).
pub fn weighted_mean_partial(
    global: &ParamSet,
    contribs: &[Contribution<'_>],
    support: Support,
) -> Result<ParamSet, CoreError> {
    check_weights(contribs)?;
    for c in contribs {
        for t in c.params.iter() {
            let g = global.get(&t.name).ok_or_else(|| {
                CoreError::Incompatible(format!(
                    "tensor `{}` is not part of the global model",
                    t.name
                ))
            })?;
            if g.shape != t.shape {
                return Err(CoreError::Incompatible(format!(
                    "tensor `{}` has shape {:?}, global has {:?}",
                    t.name, t.shape, g.shape
                )));
            }
        }
    }
    let mut out = global.clone();
    for g in out.iter_mut() {
        let mut acc = vec![0f64; g.numel()];
        let mut total = 0.0;
        for c in contribs {
            match c.params.get(&g.name) {
                Some(t) => {
                    total += c.weight;
                    for (a, v) in acc.iter_mut().zip(&t.data) {
                        *a += c.weight * f64::from(*v);
                    }
                }
                None if support == Support::All => {
                    total += c.weight;
                    for (a, v) in acc.iter_mut().zip(&g.data) {
                        *a += c.weight * f64::from(*v);
                    }
                }
                None => {}
            }
        }
        if total > 0.0 {
            for (dst, a) in g.data.iter_mut().zip(acc) {
                *dst = (a / total) as f32;
            }
        }
    }
    Ok(out)
}

/// Coordinate-wise median (robust to a minority of broken or hostile clients; ignores weights).
pub fn coordinate_median(contribs: &[Contribution<'_>]) -> Result<ParamSet, CoreError> {
    robust(contribs, |vals| {
        let n = vals.len();
        if n % 2 == 1 {
            vals[n / 2]
        } else {
            0.5 * (vals[n / 2 - 1] + vals[n / 2])
        }
    })
}

/// Coordinate-wise trimmed mean: drops the `trim` smallest and largest values per coordinate.
pub fn trimmed_mean(contribs: &[Contribution<'_>], trim: usize) -> Result<ParamSet, CoreError> {
    if 2 * trim >= contribs.len() {
        return Err(CoreError::Aggregation(format!(
            "trimming {trim} from each side needs more than {} contributions",
            2 * trim
        )));
    }
    robust(contribs, |vals| {
        let kept = &vals[trim..vals.len() - trim];
        kept.iter().sum::<f32>() / kept.len() as f32
    })
}

/// Multi-Krum (Blanchard et al. 2017): scores each contribution by the sum of its squared
/// distances to its `n − f − 2` nearest others, where `f` is the number of broken or hostile
/// clients to tolerate, and returns the example-weighted mean of the `select` best-scored
/// (`select = 1` is Krum: one client's parameters). Needs `n > 2f + 2`. Ties in the score go
/// to the earlier contribution, so the result is deterministic.
pub fn krum(
    contribs: &[Contribution<'_>],
    byzantine: usize,
    select: usize,
) -> Result<ParamSet, CoreError> {
    check_weights(contribs)?;
    let n = contribs.len();
    if n <= 2 * byzantine + 2 {
        return Err(CoreError::Aggregation(format!(
            "Krum tolerating {byzantine} faulty clients needs more than {} contributions, got {n}",
            2 * byzantine + 2
        )));
    }
    if select == 0 || select > n - byzantine {
        return Err(CoreError::Aggregation(format!(
            "Krum must select between 1 and n − f = {} contributions, got {select}",
            n - byzantine
        )));
    }
    let first = contribs[0].params;
    for c in &contribs[1..] {
        first.check_same_layout(c.params)?;
    }
    let mut dist = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d: f64 = contribs[i]
                .params
                .iter()
                .zip(contribs[j].params.iter())
                .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
                .sum();
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let neighbours = n - byzantine - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| dist[i * n + j])
                .collect();
            row.sort_by(f64::total_cmp);
            (row[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = scores[..select].iter().map(|s| s.1).collect();
    chosen.sort_unstable();
    let picked: Vec<Contribution<'_>> = chosen.iter().map(|&i| contribs[i]).collect();
    if picked.iter().map(|c| c.weight).sum::<f64>() > 0.0 {
        weighted_mean(&picked)
    } else {
        Ok(picked[0].params.clone())
    }
}

fn robust(
    contribs: &[Contribution<'_>],
    pick: impl Fn(&[f32]) -> f32,
) -> Result<ParamSet, CoreError> {
    check_weights(contribs)?;
    let first = contribs[0].params;
    for c in &contribs[1..] {
        first.check_same_layout(c.params)?;
    }
    let mut out = first.clone();
    let mut column = Vec::with_capacity(contribs.len());
    for (ti, t) in out.iter_mut().enumerate() {
        let sources: Vec<&Tensor> = contribs
            .iter()
            .map(|c| c.params.iter().nth(ti).expect("layout checked"))
            .collect();
        for (j, dst) in t.data.iter_mut().enumerate() {
            column.clear();
            column.extend(sources.iter().map(|s| s.data[j]));
            column.sort_by(f32::total_cmp);
            *dst = pick(&column);
        }
    }
    Ok(out)
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
    fn krum_ignores_an_outlier_and_checks_its_bounds() {
        let honest: Vec<ParamSet> = [1.0f32, 1.0, 1.0625, 0.9375, 1.125]
            .iter()
            .map(|v| set(&[("w", vec![*v, -*v])]))
            .collect();
        let evil = set(&[("w", vec![1e6, -1e6])]);
        let mut all: Vec<Contribution<'_>> = honest
            .iter()
            .map(|p| Contribution {
                params: p,
                weight: 1.0,
            })
            .collect();
        all.insert(
            2,
            Contribution {
                params: &evil,
                weight: 100.0,
            },
        );
        // Krum picks one honest client, the most central (1.0, held by two).
        let one = krum(&all, 1, 1).unwrap();
        assert_eq!(one.get("w").unwrap().data, vec![1.0, -1.0]);
        // Multi-Krum averages the 4 best, all honest.
        let four = krum(&all, 1, 4).unwrap();
        let w = four.get("w").unwrap().data[0];
        assert!((w - 1.0).abs() < 0.05, "{w}");
        // The plain mean is ruined by the outlier.
        let mean = weighted_mean(&all).unwrap().get("w").unwrap().data[0];
        assert!(mean > 1e5);
        // n must exceed 2f + 2, and select must be in 1..=n-f.
        assert!(krum(&all[..4], 1, 1).is_err());
        assert!(krum(&all, 1, 0).is_err());
        assert!(krum(&all, 1, 6).is_err());
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

    #[test]
    fn partial_support_rules() {
        let global = set(&[("a", vec![10.0]), ("b", vec![10.0])]);
        let full = set(&[("a", vec![0.0]), ("b", vec![0.0])]);
        let shallow = set(&[("a", vec![4.0])]);
        let c = [
            Contribution {
                params: &full,
                weight: 1.0,
            },
            Contribution {
                params: &shallow,
                weight: 1.0,
            },
        ];
        let all = weighted_mean_partial(&global, &c, Support::All).unwrap();
        assert_eq!(all.get("a").unwrap().data, vec![2.0]);
        assert_eq!(all.get("b").unwrap().data, vec![5.0]); // shallow client counts with global 10
        let holders = weighted_mean_partial(&global, &c, Support::Holders).unwrap();
        assert_eq!(holders.get("b").unwrap().data, vec![0.0]);
        // nobody holds `b`: keeps the global value
        let only = weighted_mean_partial(&global, &c[1..], Support::Holders).unwrap();
        assert_eq!(only.get("b").unwrap().data, vec![10.0]);
        // with everyone at full depth both rules equal FedAvg
        let fedavg = weighted_mean(&[
            c[0],
            Contribution {
                params: &full,
                weight: 3.0,
            },
        ])
        .unwrap();
        let p = weighted_mean_partial(
            &global,
            &[
                c[0],
                Contribution {
                    params: &full,
                    weight: 3.0,
                },
            ],
            Support::All,
        )
        .unwrap();
        assert_eq!(fedavg, p);
    }

    #[test]
    fn robust_rules_ignore_an_outlier() {
        let honest: Vec<ParamSet> = (0..4).map(|i| set(&[("w", vec![i as f32])])).collect();
        let evil = set(&[("w", vec![1e9])]);
        let mut c: Vec<Contribution> = honest
            .iter()
            .map(|p| Contribution {
                params: p,
                weight: 1.0,
            })
            .collect();
        c.push(Contribution {
            params: &evil,
            weight: 1.0,
        });
        assert_eq!(
            coordinate_median(&c).unwrap().get("w").unwrap().data,
            vec![2.0]
        );
        assert_eq!(
            trimmed_mean(&c, 1).unwrap().get("w").unwrap().data,
            vec![2.0]
        );
        assert!(trimmed_mean(&c, 3).is_err());
    }
}
