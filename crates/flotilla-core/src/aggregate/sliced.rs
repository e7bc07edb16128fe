//! Width-sliced sub-models and their average. A client of width p holds a sub-tensor of every
//! global tensor: per dimension, a list of the global indices its positions stand for (a
//! [`SliceIndex`]). HeteroFL (Diao et al. 2021) takes the *leading* block (the first ⌈p·C⌉
//! units of every dimension, [`leading_map`]); FedRolex (Alam et al. 2022) a window that rolls
//! one unit per round. The server averages each global value over the clients whose sub-tensor
//! holds it, weighted, and keeps it where no client holds it.
//!
//! Leading blocks are the right slices also for a flattened convolution output feeding a
//! linear layer, when the flattening is channel-major ([C, H, W] → C·H·W, as PyTorch's
//! `flatten`): the first C'·H·W features are exactly the first C' channels.

use super::{Contribution, check_weights, global_tensor};
use crate::{CoreError, ParamSet, Tensor};
use std::collections::BTreeMap;

/// Where a sub-tensor sits in its global tensor: for each dimension, the global index of each
/// of the sub-tensor's indices (distinct, in range).
pub type SliceIndex = Vec<Vec<usize>>;

/// The [`SliceIndex`] of every tensor of a sub-model, by name.
pub type SliceMap = BTreeMap<String, SliceIndex>;

/// The leading block of every tensor of `layout`: indices `0..n` in every dimension.
pub fn leading_map(layout: &ParamSet) -> SliceMap {
    layout
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.iter().map(|&n| (0..n).collect()).collect(),
            )
        })
        .collect()
}

/// Calls `f(sub_offset, global_offset)` for every element of the sub-tensor `index` selects
/// from a tensor shaped `global`.
fn for_each(index: &SliceIndex, global: &[usize], mut f: impl FnMut(usize, usize)) {
    let rank = index.len();
    if rank == 0 {
        f(0, 0);
        return;
    }
    if index.iter().any(Vec::is_empty) {
        return;
    }
    let mut stride = vec![1usize; rank];
    for d in (0..rank - 1).rev() {
        stride[d] = stride[d + 1] * global[d + 1];
    }
    let last = &index[rank - 1];
    let rows: usize = index[..rank - 1].iter().map(Vec::len).product();
    let mut pos = vec![0usize; rank - 1];
    for r in 0..rows {
        let base: usize = (0..rank - 1).map(|d| index[d][pos[d]] * stride[d]).sum();
        for (k, &g) in last.iter().enumerate() {
            f(r * last.len() + k, base + g);
        }
        for d in (0..rank - 1).rev() {
            pos[d] += 1;
            if pos[d] < index[d].len() {
                break;
            }
            pos[d] = 0;
        }
    }
}

/// Checks that `index` selects a sub-tensor of shape `sub` (when given) from `global`: same
/// rank, indices in range and distinct.
fn check_index(
    name: &str,
    index: &SliceIndex,
    sub: Option<&[usize]>,
    global: &[usize],
) -> Result<(), CoreError> {
    let bad = |why: String| {
        Err(CoreError::Incompatible(format!(
            "tensor `{name}`: {why} (global shape {global:?})"
        )))
    };
    if index.len() != global.len() {
        return bad(format!("a slice of rank {} ", index.len()));
    }
    if let Some(sub) = sub {
        let lens: Vec<usize> = index.iter().map(Vec::len).collect();
        if lens != sub {
            return bad(format!("shape {sub:?} is not the slice's {lens:?}"));
        }
    }
    for (d, list) in index.iter().enumerate() {
        let mut seen = vec![false; global[d]];
        for &i in list {
            if i >= global[d] || std::mem::replace(&mut seen[i], true) {
                return bad(format!(
                    "index {i} of dimension {d} is out of range or repeated"
                ));
            }
        }
    }
    Ok(())
}

/// The sub-model `map` selects from `global`: one tensor per entry of `map`, in the global
/// model's order.
pub fn gather(global: &ParamSet, map: &SliceMap) -> Result<ParamSet, CoreError> {
    for name in map.keys() {
        global_tensor(global, name)?;
    }
    let tensors = global
        .iter()
        .filter_map(|g| map.get(&g.name).map(|index| (&g.name, index, g)))
        .map(|(name, index, g)| {
            check_index(name, index, None, &g.shape)?;
            let shape: Vec<usize> = index.iter().map(Vec::len).collect();
            let mut data = vec![0f32; shape.iter().product()];
            for_each(index, &g.shape, |s, o| data[s] = g.data[o]);
            Tensor::new(name.clone(), shape, data)
        })
        .collect::<Result<Vec<_>, _>>()?;
    ParamSet::from_tensors(tensors)
}

/// The sub-model of `global` with the names and shapes of `layout`: the leading block of each
/// global tensor (HeteroFL's slice).
pub fn leading_slice(global: &ParamSet, layout: &ParamSet) -> Result<ParamSet, CoreError> {
    gather(global, &leading_map(layout))
}

/// The sliced average: every value of `global` becomes the weighted mean over the
/// contributions whose sub-tensor holds it (contribution i's tensors sit where `maps[i]` says),
/// and keeps its value where none does. A contribution may leave out tensors. f64 sums in the
/// order given.
pub fn sliced_weighted_mean(
    global: &ParamSet,
    contribs: &[Contribution<'_>],
    maps: &[&SliceMap],
) -> Result<ParamSet, CoreError> {
    check_weights(contribs)?;
    if maps.len() != contribs.len() {
        return Err(CoreError::Aggregation(format!(
            "{} contributions but {} slice maps",
            contribs.len(),
            maps.len()
        )));
    }
    for (c, map) in contribs.iter().zip(maps) {
        for t in c.params.iter() {
            let g = global_tensor(global, &t.name)?;
            let index = map.get(&t.name).ok_or_else(|| {
                CoreError::Incompatible(format!("tensor `{}` has no slice index", t.name))
            })?;
            check_index(&t.name, index, Some(&t.shape), &g.shape)?;
        }
    }
    let mut out = global.clone();
    for g in out.iter_mut() {
        let mut acc = vec![0f64; g.numel()];
        let mut weight = vec![0f64; g.numel()];
        for (c, map) in contribs.iter().zip(maps) {
            let Some(t) = c.params.get(&g.name) else {
                continue;
            };
            for_each(&map[&g.name], &g.shape, |s, o| {
                acc[o] += c.weight * f64::from(t.data[s]);
                weight[o] += c.weight;
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
        // A slice whose shape is not the contribution's is refused.
        let half = set(&[("w", vec![2, 2], vec![0.0; 4])]);
        let err = sliced_weighted_mean(
            &global(),
            &[Contribution {
                params: &half,
                weight: 1.0,
            }],
            &[&leading_map(&layout)],
        )
        .unwrap_err()
        .to_string();
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
        let (full_map, half_map) = (leading_map(&full), leading_map(&half));
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
            &[&full_map, &half_map],
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
            &[&half_map],
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
        let map = leading_map(&global());
        let sliced = sliced_weighted_mean(&global(), &contribs, &[&map, &map]).unwrap();
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

    #[test]
    fn any_index_lists_select_and_average_where_they_say() {
        // Rows {2, 0} and columns {3, 1} of the 3×4 matrix 0..12, in that order.
        let map: SliceMap = [("w".to_string(), vec![vec![2, 0], vec![3, 1]])].into();
        let sub = gather(&global(), &map).unwrap();
        assert_eq!(sub.get("w").unwrap().data, vec![11.0, 9.0, 3.0, 1.0]);
        // Written back through the same lists: those four values move, no other.
        let mut moved = sub.clone();
        moved.get_mut("w").unwrap().data = vec![-1.0, -2.0, -3.0, -4.0];
        let out = sliced_weighted_mean(
            &global(),
            &[Contribution {
                params: &moved,
                weight: 1.0,
            }],
            &[&map],
        )
        .unwrap();
        let mut expected: Vec<f32> = (0..12).map(|v| v as f32).collect();
        for (pos, v) in [(11, -1.0), (9, -2.0), (3, -3.0), (1, -4.0)] {
            expected[pos] = v;
        }
        assert_eq!(out.get("w").unwrap().data, expected);
        // Out of range and repeated indices are refused.
        for bad in [vec![vec![3], vec![0]], vec![vec![0, 0], vec![1, 2]]] {
            let map: SliceMap = [("w".to_string(), bad)].into();
            assert!(gather(&global(), &map).is_err());
        }
    }
}
