//! Factored linear layers (FeDLRT, methods.md §4): W = U S Vᵀ with orthonormal U and V.
//!
//! [`ModelSpec::ranks`] names the layers; [`crate::Net`] builds them as three tensors
//! `<name>.U` `[out, r]`, `<name>.S` `[r, r]` and `<name>.V` `[in, r]` and never forms W.
//! [`crate::Net::export`] keeps the factors (the federated method exchanges them);
//! [`dense_export`] multiplies them out for the unfactored model.

use flotilla_core::{ParamSet, Tensor as NamedTensor};
use nalgebra::DMatrix;

use crate::{ModelError, ModelSpec};

/// Factors `(U [out, r], S [r, r], V [in, r])`, row-major in PyTorch's layout, of the rank-`r`
/// truncated SVD of `w` (`[out, in]`, row-major): the leading singular vectors and values
/// (descending), computed in f64 by nalgebra. S is diagonal.
pub(crate) fn truncated_svd(
    w: &[f32],
    [out, inp]: [usize; 2],
    r: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = DMatrix::<f64>::from_row_iterator(out, inp, w.iter().map(|v| f64::from(*v)));
    let svd = m.svd(true, true);
    let (u, vt) = (
        svd.u.expect("U was requested"),
        svd.v_t.expect("Vᵀ was requested"),
    );
    let sigma = svd.singular_values;
    let mut uu = vec![0f32; out * r];
    let mut ss = vec![0f32; r * r];
    let mut vv = vec![0f32; inp * r];
    for a in 0..r {
        for i in 0..out {
            uu[i * r + a] = u[(i, a)] as f32;
        }
        ss[a * r + a] = sigma[a] as f32;
        for j in 0..inp {
            vv[j * r + a] = vt[(a, j)] as f32;
        }
    }
    (uu, ss, vv)
}

/// `params` of the factored model `spec` with every factored layer multiplied out:
/// `<name>.U`, `<name>.S` and `<name>.V` become `<name>.weight = U S Vᵀ` (`[out, in]`, in
/// the place of `U`), everything else is copied. The result is the parameter set of `spec`
/// without ranks (same names, order and layouts as its [`crate::Net::export`]), so the
/// unfactored PyTorch module loads it with `strict=True`. Errors name a missing or misshapen
/// factor.
pub fn dense_export(spec: &ModelSpec, params: &ParamSet) -> Result<ParamSet, ModelError> {
    spec.validate()?;
    let layers = spec.linear_layers();
    let mut out = Vec::with_capacity(params.len());
    for t in params.iter() {
        let Some((layer, leaf)) = t.name.rsplit_once('.') else {
            out.push(t.clone());
            continue;
        };
        let Some(r) = spec.rank_of(layer) else {
            out.push(t.clone());
            continue;
        };
        match leaf {
            "U" => {
                let (_, inp, o) = layers
                    .iter()
                    .find(|(n, _, _)| n == layer)
                    .expect("validated rank names are linear layers");
                let factor = |leaf: &str, shape: [usize; 2]| {
                    let name = format!("{layer}.{leaf}");
                    let f = params
                        .get(&name)
                        .ok_or_else(|| ModelError::Params(format!("tensor `{name}` is missing")))?;
                    if f.shape != shape {
                        return Err(ModelError::Params(format!(
                            "tensor `{name}` has shape {:?}, the model needs {shape:?}",
                            f.shape
                        )));
                    }
                    let v = f.data.iter().map(|x| f64::from(*x));
                    Ok(DMatrix::<f64>::from_row_iterator(shape[0], shape[1], v))
                };
                let u = factor("U", [*o, r])?;
                let s = factor("S", [r, r])?;
                let v = factor("V", [*inp, r])?;
                let w = u * s * v.transpose();
                // nalgebra is column-major: the columns of Wᵀ are the rows of W.
                let data = w.transpose().as_slice().iter().map(|x| *x as f32).collect();
                out.push(NamedTensor {
                    name: format!("{layer}.weight"),
                    shape: vec![*o, *inp],
                    data,
                });
            }
            "S" | "V" => {}
            _ => out.push(t.clone()),
        }
    }
    // A layer whose U was absent produced no weight above.
    if let Some(layer) = spec
        .ranks
        .keys()
        .find(|l| !out.iter().any(|t| t.name == format!("{l}.weight")))
    {
        return Err(ModelError::Params(format!("tensor `{layer}.U` is missing")));
    }
    ParamSet::from_tensors(out).map_err(|e| ModelError::Params(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, Net, View, compute_device, training_device};

    fn mlp(ranks: &[(&str, usize)]) -> ModelSpec {
        let mut spec = ModelSpec::mlp_2nn();
        spec.arch = Architecture::Mlp {
            hidden: vec![64, 48],
        };
        spec.ranks = ranks.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        spec
    }

    fn unfactored(spec: &ModelSpec) -> ModelSpec {
        ModelSpec {
            ranks: Default::default(),
            ..spec.clone()
        }
    }

    fn cnn(ranks: &[(&str, usize)]) -> ModelSpec {
        ModelSpec {
            width: 0.25,
            ranks: ranks.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
            ..ModelSpec::fedavg_cnn()
        }
    }

    fn vit(ranks: &[(&str, usize)]) -> ModelSpec {
        ModelSpec {
            arch: Architecture::Vit {
                patch: 7,
                dim: 32,
                depth: 2,
                heads: 4,
                mlp_ratio: 2,
            },
            input: [1, 28, 28],
            classes: 10,
            width: 1.0,
            ranks: ranks.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn logits(spec: &ModelSpec, p: &ParamSet, device: &burn::tensor::Device) -> Vec<f32> {
        let net = Net::from_params(spec, p, device).unwrap();
        let x = Net::input(
            (0..4 * 784).map(|i| (i as f32 * 0.13).sin()).collect(),
            4,
            spec.input,
            device,
        );
        net.forward(x, &View::full())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn factors_are_orthonormal_bases_and_descending_singular_values() {
        let spec = mlp(&[("layers.0", 16), ("layers.1", 8)]);
        let p = Net::init_params(&spec, 1).unwrap();
        let names: Vec<&str> = p.names().collect();
        assert_eq!(
            names,
            [
                "layers.0.U",
                "layers.0.S",
                "layers.0.V",
                "layers.0.bias",
                "layers.1.U",
                "layers.1.S",
                "layers.1.V",
                "layers.1.bias",
                "layers.2.weight",
                "layers.2.bias"
            ]
        );
        for (layer, out, inp, r) in [("layers.0", 64, 784, 16), ("layers.1", 48, 64, 8)] {
            let get = |leaf: &str| p.get(&format!("{layer}.{leaf}")).unwrap();
            assert_eq!(get("U").shape, vec![out, r]);
            assert_eq!(get("S").shape, vec![r, r]);
            assert_eq!(get("V").shape, vec![inp, r]);
            for (f, rows) in [(get("U"), out), (get("V"), inp)] {
                let m = DMatrix::from_row_slice(rows, r, &f.data);
                let gram = m.transpose() * &m;
                let err = (gram - DMatrix::<f32>::identity(r, r)).abs().max();
                assert!(err < 1e-5, "{layer}: ‖FᵀF − I‖ = {err}");
            }
            let s = &get("S").data;
            for a in 0..r {
                for b in 0..r {
                    if a != b {
                        assert_eq!(s[a * r + b], 0.0);
                    }
                }
                assert!(s[a * r + a] > 0.0);
                if a > 0 {
                    assert!(s[a * r + a] <= s[(a - 1) * r + a - 1]);
                }
            }
        }
        // The dense layers' and biases' values are those of the unfactored init: the factored
        // init draws the same numbers.
        let dense = Net::init_params(&unfactored(&spec), 1).unwrap();
        for name in [
            "layers.0.bias",
            "layers.1.bias",
            "layers.2.weight",
            "layers.2.bias",
        ] {
            assert_eq!(p.get(name), dense.get(name), "{name}");
        }
    }

    #[test]
    fn full_rank_factors_reproduce_the_dense_init() {
        let spec = mlp(&[("layers.1", 48)]);
        let p = Net::init_params(&spec, 4).unwrap();
        let back = dense_export(&spec, &p).unwrap();
        let dense = Net::init_params(&unfactored(&spec), 4).unwrap();
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            dense.names().collect::<Vec<_>>()
        );
        for (a, b) in back.iter().zip(dense.iter()) {
            assert_eq!(a.shape, b.shape);
            assert!(max_diff(&a.data, &b.data) < 1e-5, "{}", a.name);
        }
    }

    #[test]
    fn factored_forward_equals_the_dense_export() {
        for spec in [
            mlp(&[("layers.0", 32), ("layers.1", 20)]),
            cnn(&[("fc1", 24), ("fc2", 5)]),
            vit(&[("blocks.0.attn.q", 4), ("blocks.1.fc1", 8), ("head", 3)]),
        ] {
            let p = Net::init_params(&spec, 2).unwrap();
            // export/import keeps the factors bit for bit
            let net = Net::from_params(&spec, &p, &compute_device()).unwrap();
            assert_eq!(net.export(), p);
            let dense_spec = unfactored(&spec);
            let dense = dense_export(&spec, &p).unwrap();
            assert_eq!(
                dense.names().collect::<Vec<_>>(),
                Net::init_params(&dense_spec, 0)
                    .unwrap()
                    .names()
                    .collect::<Vec<_>>()
            );
            for device in [compute_device(), training_device()] {
                let a = logits(&spec, &p, &device);
                let b = logits(&dense_spec, &dense, &device);
                let diff = max_diff(&a, &b);
                assert!(diff < 1e-5, "{:?}: {diff}", spec.arch);
            }
            // and the factored forward is not the dense init's: the rank is truncated
            let full = Net::init_params(&dense_spec, 2).unwrap();
            assert!(
                max_diff(
                    &logits(&spec, &p, &compute_device()),
                    &logits(&dense_spec, &full, &compute_device())
                ) > 1e-4
            );
        }
    }

    #[test]
    fn frozen_bases_get_no_gradient() {
        let spec = mlp(&[("layers.0", 8)]);
        let p = Net::init_params(&spec, 0).unwrap();
        let view = View {
            active_blocks: None,
            frozen: vec!["layers.0.U".into(), "layers.0.V".into()],
        };
        let net = Net::from_params(&spec, &p, &training_device())
            .unwrap()
            .apply_freezing(&view);
        let x = Net::input(vec![0.5; 2 * 784], 2, spec.input, &training_device());
        let grads = net.forward(x, &View::full()).sum().backward();
        let grads = burn::optim::GradientsParams::from_grads(grads, &net);
        for (name, id, rank) in net.param_ids() {
            let has = match rank {
                1 => grads.get::<1>(id).is_some(),
                _ => grads.get::<2>(id).is_some(),
            };
            assert_eq!(has, !view.is_frozen(&name), "{name}");
        }
    }

    #[test]
    fn rank_errors_name_the_key() {
        for (ranks, needle) in [
            (vec![("layers.7", 4)], "`ranks.layers.7`"),
            (vec![("layers.0", 0)], "`ranks.layers.0` must be in 1..=64"),
            (vec![("layers.1", 49)], "`ranks.layers.1` must be in 1..=48"),
        ] {
            let err = mlp(&ranks).validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(Net::init_params(&mlp(&ranks), 0).is_err());
        }
        assert!(cnn(&[("conv1", 2)]).validate().is_err());
        let spec = mlp(&[("layers.0", 4)]);
        let mut p = Net::init_params(&spec, 0).unwrap();
        p = p.filter(|n| n != "layers.0.S");
        let err = dense_export(&spec, &p).unwrap_err().to_string();
        assert!(err.contains("layers.0.S"), "{err}");
        let err = Net::from_params(&spec, &p, &compute_device())
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers.0.S"), "{err}");
    }

    #[test]
    fn specs_without_ranks_serialise_as_before() {
        let json = serde_json::to_string(&ModelSpec::mlp_2nn()).unwrap();
        assert!(!json.contains("ranks"), "{json}");
        let back: ModelSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ModelSpec::mlp_2nn());
        let spec = mlp(&[("layers.0", 4)]);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""ranks":{"layers.0":4}"#), "{json}");
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
    }
}
