//! Aggregation rules: plain functions over parameter collections.
//!
//! The weighted mean sums exactly on a fixed-point grid ([`MeanFold`]), so its result does not
//! depend on the order of the contributions: a server may fold replies in as they arrive and
//! keep none. The other rules sum in f64 in the order given (the engine sorts replies by client
//! id before handing them over), so their results do not depend on thread counts either.

use crate::{CoreError, ParamSet, Tensor};

mod exact;
mod mean;
mod sliced;
pub use mean::{MeanFold, weighted_mean};
pub use sliced::{SliceIndex, SliceMap, gather, leading_map, leading_slice, sliced_weighted_mean};

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

/// The global tensor a contribution's tensor `name` updates, or the error naming it.
fn global_tensor<'a>(global: &'a ParamSet, name: &str) -> Result<&'a Tensor, CoreError> {
    global.get(name).ok_or_else(|| {
        CoreError::Incompatible(format!("tensor `{name}` is not part of the global model"))
    })
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
            let g = global_tensor(global, &t.name)?;
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
