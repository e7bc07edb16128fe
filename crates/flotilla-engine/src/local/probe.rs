//! Linear-probe evaluation: how linearly separable the classes are in a model's features.
//!
//! Self-supervised methods (FLL) train an encoder without labels; their usual measure is a
//! multinomial logistic regression fitted on the frozen features of a labelled training subset
//! and scored on the test set. The regression here is full-batch Adam on standardised
//! features with a small L2 penalty, a fixed number of iterations and zero initial weights,
//! so the result is deterministic and independent of threads.

use crate::EngineError;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, View, compute_device};

/// How the probe's logistic regression is fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeConfig {
    /// Full-batch Adam iterations.
    pub iterations: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 penalty on the weights (not the bias).
    pub l2: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            iterations: 300,
            lr: 0.05,
            l2: 1e-4,
        }
    }
}

/// Features `[n, feature_dim]` of `data` under `view`, computed in fixed chunks.
pub fn features(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<Vec<f32>, EngineError> {
    super::eval::per_sample_outputs(
        spec,
        params,
        data,
        (mean, std),
        spec.feature_dim(),
        |model, x| model.features(x, view),
    )
}

/// Test accuracy of a linear probe on the features of `spec` under `view`: fitted on `train`
/// (labelled), scored on `test`.
#[allow(clippy::too_many_arguments)]
pub fn probe_accuracy(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    train: &Dataset,
    test: &Dataset,
    mean: &[f32],
    std: &[f32],
    config: &ProbeConfig,
) -> Result<f64, EngineError> {
    let d = spec.feature_dim();
    let train_f = features(spec, view, params, train, mean, std)?;
    let test_f = features(spec, view, params, test, mean, std)?;
    fit_and_score(
        (&train_f, &train.labels),
        (&test_f, &test.labels),
        d,
        spec.classes,
        config,
    )
}

/// Fits a multinomial logistic regression on row-major features `[n, dim]` with labels and
/// returns its accuracy on the test rows. Features are standardised with the training rows'
/// mean and standard deviation. Usable on any features, raw pixels included (the floor a
/// learned representation must beat).
pub fn fit_and_score(
    train: (&[f32], &[u8]),
    test: (&[f32], &[u8]),
    dim: usize,
    classes: usize,
    config: &ProbeConfig,
) -> Result<f64, EngineError> {
    let (n, m) = (train.1.len(), test.1.len());
    if n == 0 || m == 0 || dim == 0 {
        return Err(EngineError::Task(
            "a linear probe needs training and test samples with features".into(),
        ));
    }
    if train.0.len() != n * dim || test.0.len() != m * dim {
        return Err(EngineError::Task(format!(
            "probe features: expected {dim} values per sample"
        )));
    }
    if let Some(l) = train
        .1
        .iter()
        .chain(test.1)
        .find(|l| **l as usize >= classes)
    {
        return Err(EngineError::Task(format!(
            "probe label {l} is not below the {classes} classes"
        )));
    }
    if !(config.iterations > 0 && config.lr > 0.0 && config.l2 >= 0.0) {
        return Err(EngineError::Task(
            "the probe needs iterations > 0, lr > 0 and l2 ≥ 0".into(),
        ));
    }
    // Standardise with the training rows' statistics (f64 sums).
    let mut mu = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    for row in train.0.chunks(dim) {
        row.iter()
            .zip(&mut mu)
            .for_each(|(x, s)| *s += f64::from(*x));
    }
    mu.iter_mut().for_each(|s| *s /= n as f64);
    for row in train.0.chunks(dim) {
        row.iter()
            .zip(&mu)
            .zip(&mut var)
            .for_each(|((x, m), v)| *v += (f64::from(*x) - m).powi(2));
    }
    let sd: Vec<f64> = var
        .iter()
        .map(|v| (v / n as f64).sqrt().max(1e-6))
        .collect();
    let standardise = |rows: &[f32]| -> Vec<f32> {
        rows.chunks(dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&mu)
                    .zip(&sd)
                    .map(|((x, m), s)| ((f64::from(*x) - m) / s) as f32)
            })
            .collect()
    };
    let device = compute_device();
    let x = Tensor::<2>::from_data(TensorData::new(standardise(train.0), [n, dim]), &device);
    let y = super::objective::one_hot(train.1, classes, &device);
    let (w, b) = fit(x, y, dim, classes, config, &device);
    let xt = Tensor::<2>::from_data(TensorData::new(standardise(test.0), [m, dim]), &device);
    let pred = (xt.matmul(w) + b.unsqueeze_dim(0))
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| EngineError::Task(format!("{e:?}")))?;
    let correct = pred
        .iter()
        .zip(test.1)
        .filter(|(p, l)| **p == i64::from(**l))
        .count();
    Ok(correct as f64 / m as f64)
}

/// Full-batch Adam on the mean cross-entropy plus (l2/2)‖W‖²; gradients in closed form:
/// ∂/∂W = Xᵀ(P − Y)/n + l2·W, ∂/∂b = Σ(P − Y)/n.
fn fit(
    x: Tensor<2>,
    y: Tensor<2>,
    dim: usize,
    classes: usize,
    config: &ProbeConfig,
    device: &Device,
) -> (Tensor<2>, Tensor<1>) {
    let n = x.dims()[0] as f32;
    let (lr, l2) = (config.lr as f32, config.l2 as f32);
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut w = Tensor::<2>::zeros([dim, classes], device);
    let mut b = Tensor::<1>::zeros([classes], device);
    let (mut mw, mut vw) = (w.zeros_like(), w.zeros_like());
    let (mut mb, mut vb) = (b.zeros_like(), b.zeros_like());
    let xt = x.clone().transpose();
    for t in 1..=config.iterations {
        let p = softmax(x.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0), 1);
        let err = (p - y.clone()) / n;
        let gw = xt.clone().matmul(err.clone()) + w.clone() * l2;
        let gb = err.sum_dim(0).squeeze_dim::<1>(0);
        mw = mw * beta1 + gw.clone() * (1.0 - beta1);
        vw = vw * beta2 + gw.square() * (1.0 - beta2);
        mb = mb * beta1 + gb.clone() * (1.0 - beta1);
        vb = vb * beta2 + gb.square() * (1.0 - beta2);
        let c1 = 1.0 - beta1.powi(t as i32);
        let c2 = 1.0 - beta2.powi(t as i32);
        w = w - (mw.clone() / c1) / ((vw.clone() / c2).sqrt() + eps) * lr;
        b = b - (mb.clone() / c1) / ((vb.clone() / c2).sqrt() + eps) * lr;
    }
    (w, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_models::Net;

    /// Two Gaussian-ish clusters per class along separate axes: linearly separable.
    fn separable(n: usize, dim: usize, classes: usize, seed: u32) -> (Vec<f32>, Vec<u8>) {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut noise = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 1000) as f32 / 1000.0 - 0.5
        };
        let mut x = Vec::with_capacity(n * dim);
        let labels: Vec<u8> = (0..n).map(|i| (i % classes) as u8).collect();
        for l in &labels {
            for j in 0..dim {
                x.push(if j == *l as usize { 3.0 } else { 0.0 } + noise());
            }
        }
        (x, labels)
    }

    #[test]
    fn separable_features_probe_near_perfectly_and_noise_probes_at_chance() {
        let (dim, classes) = (8, 4);
        let (tx, ty) = separable(400, dim, classes, 1);
        let (sx, sy) = separable(200, dim, classes, 2);
        let cfg = ProbeConfig::default();
        let acc = fit_and_score((&tx, &ty), (&sx, &sy), dim, classes, &cfg).unwrap();
        assert!(acc > 0.97, "{acc}");
        // The same features with labels unrelated to them: near chance (0.25).
        let shuffled: Vec<u8> = (0..200)
            .map(|i| ((i * 7 + 3) / 5 % classes) as u8)
            .collect();
        let chance = fit_and_score((&tx, &ty), (&sx, &shuffled), dim, classes, &cfg).unwrap();
        assert!(chance < 0.45, "{chance}");
        // Deterministic.
        assert_eq!(
            acc,
            fit_and_score((&tx, &ty), (&sx, &sy), dim, classes, &cfg).unwrap()
        );
        assert!(fit_and_score((&tx, &ty), (&sx[..10], &sy), dim, classes, &cfg).is_err());
        assert!(fit_and_score((&tx, &ty), (&sx, &sy), dim, 2, &cfg).is_err());
    }

    #[test]
    fn probe_accuracy_reads_the_models_features() {
        let spec = ModelSpec {
            width: 0.25,
            ..ModelSpec::mlp_2nn()
        };
        let params = Net::init_params(&spec, 1).unwrap();
        let data = |n: usize, k: u64| Dataset {
            images: (0..n * 784)
                .map(|i| {
                    let label = (i / 784) % 10;
                    // Each class lights a band of pixels.
                    if (i % 784) / 78 == label {
                        200
                    } else {
                        ((i as u64 * 31 + k) % 40) as u8
                    }
                })
                .collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            shape: [1, 28, 28],
            num_classes: 10,
        };
        let (train, test) = (data(300, 1), data(100, 2));
        let view = View::full();
        let f = features(&spec, &view, &params, &test, &[0.5], &[0.5]).unwrap();
        assert_eq!(f.len(), 100 * spec.feature_dim());
        let acc = probe_accuracy(
            &spec,
            &view,
            &params,
            &train,
            &test,
            &[0.5],
            &[0.5],
            &ProbeConfig::default(),
        )
        .unwrap();
        // Even a random encoder keeps these bands apart.
        assert!(acc > 0.9, "{acc}");
    }
}
