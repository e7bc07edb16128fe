//! Width-sliced sub-models and their average (HeteroFL, Diao et al. 2021): a client of width p
//! holds the *leading* block of every global tensor (the first ⌈p·C⌉ output units, the first
//! ⌈p·C⌉ input units); the server averages each global value over the clients whose block
//! holds it, weighted, and keeps it where no client holds it.
//!
//! Leading blocks are the right slices also for a flattened convolution output feeding a
//! linear layer, when the flattening is channel-major ([C, H, W] → C·H·W, as PyTorch's
//! `flatten`): the first C'·H·W features are exactly the first C' channels.

use super::{Contribution, check_weights};
use crate::{CoreError, ParamSet, Tensor};

/// Calls `f(sub_offset, global_offset, len)` for every contiguous run (one per row of the last
/// dimension) of the leading block `sub` of a tensor shaped `global`.
fn for_each_row(sub: &[usize], global: &[usize], mut f: impl FnMut(usize, usize, usize)) {
    let rank = sub.len();
    if rank == 0 {
        f(0, 0, 1);
        return;
    }
    if sub.contains(&0) {
        return;
    }
    let row = sub[rank - 1];
    let rows: usize = sub[..rank - 1].iter().product();
    // Global strides, row-major.
    let mut stride = vec![1usize; rank];
    for d in (0..rank - 1).rev() {
        stride[d] = stride[d + 1] * global[d + 1];
    }
    let mut idx = vec![0usize; rank - 1];
    for r in 0..rows {
        let offset: usize = idx.iter().zip(&stride).map(|(i, s)| i * s).sum();
        f(r * row, offset, row);
        for d in (0..rank - 1).rev() {
            idx[d] += 1;
            if idx[d] < sub[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Checks that `sub` is a leading block of `global` (same rank, no dimension larger).
fn check_block(name: &str, sub: &[usize], global: &[usize]) -> Result<(), CoreError> {
    if sub.len() != global.len() || sub.iter().zip(global).any(|(s, g)| s > g) {
        return Err(CoreError::Incompatible(format!(
            "tensor `{name}` has shape {sub:?}, which is not a slice of the global {global:?}"
        )));
    }
    Ok(())
}

/// The sub-model of `global` with the names and shapes of `layout`: the leading block of each
/// global tensor. Every tensor of `layout` must be a slice of the global tensor of its name.
pub fn leading_slice(global: &ParamSet, layout: &ParamSet) -> Result<ParamSet, CoreError> {
    let tensors = layout
        .iter()
        .map(|l| {
            let g = global.require(&l.name)?;
            check_block(&l.name, &l.shape, &g.shape)?;
            let mut data = vec![0f32; l.numel()];
            for_each_row(&l.shape, &g.shape, |s, o, n| {
                data[s..s + n].copy_from_slice(&g.data[o..o + n]);
            });
            Tensor::new(l.name.clone(), l.shape.clone(), data)
        })
        .collect::<Result<Vec<_>, _>>()?;
    ParamSet::from_tensors(tensors)
}

/// HeteroFL's average: every value of `global` becomes the weighted mean over the
/// contributions whose leading block holds it, and keeps its value where none does. A
/// contribution may leave out tensors (it then holds none of their values). f64 sums in the
/// order given.
pub fn sliced_weighted_mean(
    global: &ParamSet,
    contribs: &[Contribution<'_>],
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
            check_block(&t.name, &t.shape, &g.shape)?;
        }
    }
    let mut out = global.clone();
    for g in out.iter_mut() {
        let mut acc = vec![0f64; g.numel()];
        let mut weight = vec![0f64; g.numel()];
        for c in contribs {
            let Some(t) = c.params.get(&g.name) else {
                continue;
            };
            for_each_row(&t.shape, &g.shape, |s, o, n| {
                for k in 0..n {
                    acc[o + k] += c.weight * f64::from(t.data[s + k]);
                    weight[o + k] += c.weight;
                }
            });
        }
        for ((dst, a), w) in g.data.iter_mut().zip(&acc).zip(&weight) {
            if *w > 0.0 {
                *dst = (a / w) as f32;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> ParamSet {
        ParamSet::from_tensors(
            tensors
                .iter()
                .map(|(n, s, d)| Tensor::new(*n, s.clone(), d.clone()).unwrap())
                .collect(),
        )
        .unwrap()
    }

    /// A 3×4 matrix 0..12 and a vector 0..3.
    fn global() -> ParamSet {
        set(&[
            ("w", vec![3, 4], (0..12).map(|v| v as f32).collect()),
            ("b", vec![3], vec![0.0, 1.0, 2.0]),
        ])
    }

    #[test]
    fn a_leading_slice_takes_the_first_rows_and_columns() {
        let layout = set(&[
            ("w", vec![2, 3], vec![0.0; 6]),
            ("b", vec![2], vec![0.0; 2]),
        ]);
        let s = leading_slice(&global(), &layout).unwrap();
        assert_eq!(s.get("w").unwrap().data, vec![0.0, 1.0, 2.0, 4.0, 5.0, 6.0]);
        assert_eq!(s.get("b").unwrap().data, vec![0.0, 1.0]);
        // The whole shape is the whole tensor.
        assert_eq!(leading_slice(&global(), &global()).unwrap(), global());
        // A block larger than the tensor is refused with its name.
        let big = set(&[("w", vec![4, 4], vec![0.0; 16])]);
        let err = leading_slice(&global(), &big).unwrap_err().to_string();
        assert!(err.contains("`w`"), "{err}");
    }

    #[test]
    fn each_value_is_averaged_over_the_clients_that_hold_it() {
        // A full client (all 1s, weight 1) and a half client (2×2 block of 4s, weight 3).
        let full = set(&[
            ("w", vec![3, 4], vec![1.0; 12]),
            ("b", vec![3], vec![1.0; 3]),
        ]);
        let half = set(&[
            ("w", vec![2, 2], vec![4.0; 4]),
            ("b", vec![2], vec![4.0; 2]),
        ]);
        let out = sliced_weighted_mean(
            &global(),
            &[
                Contribution {
                    params: &full,
                    weight: 1.0,
                },
                Contribution {
                    params: &half,
                    weight: 3.0,
                },
            ],
        )
        .unwrap();
        // Inside the block: (1·1 + 3·4) / 4 = 3.25; outside: the full client's 1.
        assert_eq!(
            out.get("w").unwrap().data,
            vec![
                3.25, 3.25, 1.0, 1.0, //
                3.25, 3.25, 1.0, 1.0, //
                1.0, 1.0, 1.0, 1.0
            ]
        );
        assert_eq!(out.get("b").unwrap().data, vec![3.25, 3.25, 1.0]);
        // Only the half client: values outside its block keep the global's.
        let only = sliced_weighted_mean(
            &global(),
            &[Contribution {
                params: &half,
                weight: 1.0,
            }],
        )
        .unwrap();
        assert_eq!(
            only.get("w").unwrap().data,
            vec![4.0, 4.0, 2.0, 3.0, 4.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
        );
    }

    #[test]
    fn with_every_client_at_full_width_it_is_the_weighted_mean() {
        let a = set(&[
            ("w", vec![3, 4], (0..12).map(|v| v as f32 * 0.5).collect()),
            ("b", vec![3], vec![1.0, -1.0, 0.25]),
        ]);
        let b = global();
        let contribs = [
            Contribution {
                params: &a,
                weight: 2.0,
            },
            Contribution {
                params: &b,
                weight: 5.0,
            },
        ];
        let sliced = sliced_weighted_mean(&global(), &contribs).unwrap();
        let plain = super::super::weighted_mean(&contribs).unwrap();
        assert!(sliced.max_abs_diff(&plain).unwrap() < 1e-6);
    }

    #[test]
    fn a_four_dimensional_block_maps_to_its_channels() {
        // A conv weight [out 2, in 2, 1, 2] and its [1, 1, 1, 2] block: the first two values.
        let g = set(&[("c", vec![2, 2, 1, 2], (0..8).map(|v| v as f32).collect())]);
        let layout = set(&[("c", vec![1, 1, 1, 2], vec![0.0; 2])]);
        assert_eq!(
            leading_slice(&g, &layout).unwrap().get("c").unwrap().data,
            vec![0.0, 1.0]
        );
        let layout = set(&[("c", vec![2, 1, 1, 2], vec![0.0; 4])]);
        assert_eq!(
            leading_slice(&g, &layout).unwrap().get("c").unwrap().data,
            vec![0.0, 1.0, 4.0, 5.0]
        );
    }
}
