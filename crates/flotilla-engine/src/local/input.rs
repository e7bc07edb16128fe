//! Turning a client's samples into model inputs.

use crate::EngineError;
use burn::tensor::{Device, Tensor};
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, Net};

/// Refuses data whose images or classes the model does not take.
pub(crate) fn check_shape(spec: &ModelSpec, data: &Dataset) -> Result<(), EngineError> {
    if data.shape != spec.input || data.num_classes > spec.classes {
        return Err(EngineError::Task(format!(
            "the data holds {:?} images of {} classes but the model takes {:?} inputs and {} classes",
            data.shape, data.num_classes, spec.input, spec.classes
        )));
    }
    Ok(())
}

/// The normalised input tensor and the labels of the samples `idx`; `pixels` is a reusable
/// buffer.
pub(crate) fn batch_input(
    data: &Dataset,
    idx: &[usize],
    mean: &[f32],
    std: &[f32],
    pixels: &mut Vec<f32>,
    device: &Device,
) -> Result<(Tensor<4>, Vec<u8>), EngineError> {
    data.try_normalized_batch(idx, mean, std, pixels)?;
    let labels = idx.iter().map(|&i| data.labels[i]).collect();
    let x = Net::input(std::mem::take(pixels), idx.len(), data.shape, device);
    Ok((x, labels))
}
