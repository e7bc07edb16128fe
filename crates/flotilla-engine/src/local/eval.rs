//! Evaluation of global models on the server's test set.

use super::input::{batch_input, check_shape};
use super::objective::cross_entropy;
use crate::EngineError;
use burn::tensor::Tensor;
use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, Net, View, compute_device};

/// Samples per evaluation forward pass. Fixed, so results do not depend on threads; small
/// enough that a convolution's unfolded input stays a few MiB.
pub const EVAL_CHUNK: usize = 100;

/// Accuracy and mean loss of a model on a dataset, in fixed chunks of [`EVAL_CHUNK`] samples
/// (so the result does not depend on threads).
pub fn evaluate(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<(f64, f64), EngineError> {
    Ok(evaluate_views(spec, std::slice::from_ref(view), params, data, mean, std)?[0])
}

/// [`evaluate`] for several views of the same parameters, one (accuracy, loss) per view. When
/// every view is a depth prefix, the blocks the prefixes share run once per batch
/// ([`Net::forward_depths`]).
pub fn evaluate_views(
    spec: &ModelSpec,
    views: &[View],
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<Vec<(f64, f64)>, EngineError> {
    if data.is_empty() {
        return Err(EngineError::Task(
            "cannot evaluate on an empty dataset".into(),
        ));
    }
    check_shape(spec, data)?;
    let device = compute_device();
    let model = Net::from_params(spec, params, &device)?;
    // Shared trunk when every view is a depth prefix (and there is more than one).
    let total = spec.num_blocks();
    let depths: Option<Vec<usize>> = (views.len() > 1 && total > 0)
        .then(|| views.iter().map(|v| v.prefix_depth(total)).collect())
        .flatten();
    let sorted: Option<Vec<usize>> = depths.as_ref().map(|d| {
        let mut s = d.clone();
        s.sort_unstable();
        s.dedup();
        s
    });
    let mut correct = vec![0usize; views.len()];
    let mut loss_sum = vec![0f64; views.len()];
    let mut pixels = Vec::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(EVAL_CHUNK) {
        let (x, labels) = batch_input(data, chunk, mean, std, &mut pixels, &device)?;
        let logits: Vec<Tensor<2>> = match (&depths, &sorted) {
            (Some(depths), Some(sorted)) => {
                let out = model.forward_depths(x, sorted)?;
                depths
                    .iter()
                    .map(|d| out[sorted.binary_search(d).expect("listed")].clone())
                    .collect()
            }
            _ => views.iter().map(|v| model.forward(x.clone(), v)).collect(),
        };
        for (i, logits) in logits.into_iter().enumerate() {
            let pred = logits
                .clone()
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(|e| EngineError::Task(format!("{e:?}")))?;
            correct[i] += pred
                .iter()
                .zip(&labels)
                .filter(|(p, l)| **p == i64::from(**l))
                .count();
            loss_sum[i] += f64::from(
                cross_entropy(logits, &labels, spec.classes, &device).into_scalar::<f32>(),
            ) * chunk.len() as f64;
        }
    }
    let n = data.len() as f64;
    Ok(correct
        .iter()
        .zip(&loss_sum)
        .map(|(c, l)| (*c as f64 / n, l / n))
        .collect())
}

/// Logits `[n, classes]` (row-major) of a model under `view` on every sample of `data`, in
/// fixed chunks of [`EVAL_CHUNK`] samples: what a server distils between models with.
pub fn logits(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<Vec<f32>, EngineError> {
    per_sample_outputs(spec, params, data, (mean, std), spec.classes, |model, x| {
        model.forward(x, view)
    })
}

/// `output(model, batch)` of every sample of `data` (`width` values each, row-major), in
/// fixed chunks of [`EVAL_CHUNK`] samples.
pub(crate) fn per_sample_outputs(
    spec: &ModelSpec,
    params: &ParamSet,
    data: &Dataset,
    (mean, std): (&[f32], &[f32]),
    width: usize,
    output: impl Fn(&Net, Tensor<4>) -> Tensor<2>,
) -> Result<Vec<f32>, EngineError> {
    check_shape(spec, data)?;
    let device = compute_device();
    let model = Net::from_params(spec, params, &device)?;
    let mut out = Vec::with_capacity(data.len() * width);
    let mut pixels = Vec::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(EVAL_CHUNK) {
        let (x, _) = batch_input(data, chunk, mean, std, &mut pixels, &device)?;
        let z = output(&model, x)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| EngineError::Task(format!("model outputs: {e:?}")))?;
        out.extend(z);
    }
    Ok(out)
}
