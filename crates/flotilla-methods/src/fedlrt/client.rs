//! FeDLRT's client half: the reply a task expects, and the model it trains assembled from the
//! held and the new tensors.

use super::*;

pub(super) fn describe(list: &[(&str, &[usize])]) -> String {
    const SHOWN: usize = 6;
    let mut s: Vec<String> = list
        .iter()
        .take(SHOWN)
        .map(|(n, sh)| format!("{n} {sh:?}"))
        .collect();
    if list.len() > SHOWN {
        s.push(format!("… {} more", list.len() - SHOWN));
    }
    s.join(", ")
}

/// The tensors, with shapes, that the reply to `task` must hold, in order.
pub(super) fn expected_reply(task: &Task) -> Result<Vec<(String, Vec<usize>)>, EngineError> {
    let opts: LrtTask = serde_json::from_value(task.options.clone())
        .map_err(|e| EngineError::Task(format!("fedlrt task options: {e}")))?;
    let (_, params, _) = assemble(task)?;
    let shape = |n: &str| -> Result<(String, Vec<usize>), EngineError> {
        Ok((n.to_string(), params.require(n)?.shape.clone()))
    };
    if task.kind == BASIS || task.kind == CORE_GRADIENTS {
        opts.upload.iter().map(|n| shape(n)).collect()
    } else if task.kind == TRAIN_CORE {
        params
            .iter()
            .filter(|t| !task.view.is_frozen(&t.name))
            .map(|t| shape(&t.name))
            .collect()
    } else {
        Err(EngineError::Task(format!(
            "unknown fedlrt task kind `{}`",
            task.kind
        )))
    }
}

/// The model a client builds from a task: for each factored layer of `task.model` whose U
/// and V arrive with new directions, Ũ = [U | U_new], Ṽ = [V | V_new] and S̃⁰ = [[S, 0],
/// [0, 0]]; the corrections `vc.<tensor>` become a correction set (an r × r S correction is
/// the top-left block of the augmented one). Returns (spec, params, correction).
pub(super) fn assemble(task: &Task) -> Result<(ModelSpec, ParamSet, ParamSet), EngineError> {
    let spec = task.model.clone();
    let p = &task.params;
    let mut params = Vec::with_capacity(p.len());
    let mut correction = Vec::new();
    for t in p.iter() {
        if let Some(target) = t.name.strip_prefix(CORRECTION_PREFIX) {
            correction.push(Tensor {
                name: target.to_string(),
                ..t.clone()
            });
            continue;
        }
        let Some((layer, leaf)) = t.name.rsplit_once('.') else {
            params.push(t.clone());
            continue;
        };
        let Some(a) = spec.rank_of(layer) else {
            params.push(t.clone());
            continue;
        };
        match leaf {
            "U" | "V" => {
                let extra = format!("{layer}.{}", if leaf == "U" { NEW_U } else { NEW_V });
                let base = matrix_checked(t)?;
                let full = match p.get(&extra) {
                    Some(n) => hcat(&base, &matrix_checked(n)?),
                    None => base,
                };
                if full.ncols() != a {
                    return Err(EngineError::Task(format!(
                        "`{}` has {} columns with its new directions, the model's rank is {a}",
                        t.name,
                        full.ncols()
                    )));
                }
                params.push(tensor(&t.name, &full));
            }
            "S" => params.push(embed(t, a)?),
            NEW_U | NEW_V => {}
            _ => params.push(t.clone()),
        }
    }
    let correction = correction
        .into_iter()
        .map(|t| match t.name.rsplit_once('.') {
            Some((layer, "S")) => match spec.rank_of(layer) {
                Some(a) => embed(&t, a),
                None => Ok(t),
            },
            _ => Ok(t),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        spec,
        ParamSet::from_tensors(params)?,
        ParamSet::from_tensors(correction)?,
    ))
}

pub(super) fn matrix_checked(t: &Tensor) -> Result<DMatrix<f64>, EngineError> {
    if t.shape.len() != 2 {
        return Err(EngineError::Task(format!(
            "`{}` must be a matrix, it has shape {:?}",
            t.name, t.shape
        )));
    }
    Ok(matrix(t))
}

/// An `r × r` matrix as the top-left block of an `a × a` zero matrix.
pub(super) fn embed(t: &Tensor, a: usize) -> Result<Tensor, EngineError> {
    let r = match t.shape.as_slice() {
        [r, c] if r == c && *r <= a => *r,
        _ => {
            return Err(EngineError::Task(format!(
                "`{}` has shape {:?}; a core of rank {a} needs a square matrix of at most {a} × {a}",
                t.name, t.shape
            )));
        }
    };
    let mut data = vec![0f32; a * a];
    for i in 0..r {
        data[i * a..i * a + r].copy_from_slice(&t.data[i * r..(i + 1) * r]);
    }
    Ok(Tensor {
        name: t.name.clone(),
        shape: vec![a, a],
        data,
    })
}

/// The client half of FeDLRT and FedLin: gradient passes and core training.
pub struct FedLrtClient;

impl ClientHalf for FedLrtClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        require_kind(task, &[BASIS, CORE_GRADIENTS, TRAIN_CORE], "fedlrt")?;
        let opts: LrtTask = serde_json::from_value(task.options.clone())
            .map_err(|e| EngineError::Task(format!("fedlrt task options: {e}")))?;
        if opts.grad_batches == 0 || opts.steps == Some(0) {
            return Err(EngineError::Task(
                "fedlrt task options: grad_batches and steps must be positive".into(),
            ));
        }
        let (model, params, correction) = assemble(task)?;
        let local = Task {
            model,
            params,
            ..task.clone()
        };
        let ce = || Ok(CrossEntropy::under(&task.view));
        if task.kind == TRAIN_CORE {
            let correction = (!correction.is_empty()).then_some(&correction);
            return train_task_with(&local, data, ctx, ce, correction, opts.steps);
        }
        gradient_task(&local, data, ctx, ce, opts.grad_batches, &opts.upload)
    }
}
