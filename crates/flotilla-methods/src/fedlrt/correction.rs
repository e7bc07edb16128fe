//! The server's arithmetic on replies: their mean, and each client's variance-correction terms
//! (the mean gradient minus its own).

use super::*;

/// A client's correction for each tensor of `mean` that `keep` admits: the mean gradient
/// minus the client's own, named `vc.<tensor>`.
pub(super) fn correction_terms(
    mean: &ParamSet,
    own: &ParamSet,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Tensor>, EngineError> {
    let mut out = Vec::new();
    for t in mean.iter().filter(|t| keep(&t.name)) {
        let mine = own.require(&t.name)?;
        out.push(Tensor {
            name: format!("{CORRECTION_PREFIX}{}", t.name),
            shape: t.shape.clone(),
            data: t.data.iter().zip(&mine.data).map(|(g, c)| g - c).collect(),
        });
    }
    Ok(out)
}

/// The example-weighted mean of the replies' tensors.
pub(super) fn weighted(replies: &[Reply]) -> Result<ParamSet, EngineError> {
    let contribs = crate::common::contributions(replies);
    Ok(aggregate::weighted_mean(&contribs)?)
}
