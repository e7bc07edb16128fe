//! Commands that look at a config or a model without training: `plan`, `evaluate`,
//! `partition`.

use super::setup::{load_config, load_data};
use anyhow::{Context, Result};
use flotilla_core::safetensors_io;
use std::path::Path;

/// `flotilla plan`: round 1's plan per device tier, with the estimate it planned by.
pub(super) fn plan(config: &Path, overrides: &[String]) -> Result<()> {
    use flotilla_engine::{Assignment, ClientInfo, PhaseCtx};
    let exp = load_config(config, overrides)?;
    let (mut server, _) = flotilla_methods::build(&exp)?;
    let profiles = flotilla_engine::sim::build_fleet(&exp)?;
    let infos: Vec<ClientInfo> = profiles
        .into_iter()
        .enumerate()
        .map(|(i, profile)| ClientInfo {
            id: i as u64,
            profile,
            num_examples: 1,
        })
        .collect();
    server.observe(&infos);
    let ctx = PhaseCtx {
        round: 1,
        phase: 0,
        seed: exp.seed,
    };
    let blocks = exp.model_spec().num_blocks();
    println!(
        "{:<14} {:>7} {:>10} {:>10} {:>12} {:>10}  plan of `{}` for round 1",
        "tier",
        "devices",
        "memory MiB",
        "est. MiB",
        "MFLOP/sample",
        "MB sent",
        server.name()
    );
    let mut tiers: Vec<(String, Vec<&ClientInfo>)> = Vec::new();
    for info in &infos {
        match tiers.iter_mut().find(|(t, _)| *t == info.profile.tier) {
            Some((_, v)) => v.push(info),
            None => tiers.push((info.profile.tier.clone(), vec![info])),
        }
    }
    tiers.sort_by_key(|(_, m)| m[0].profile.memory_bytes);
    for (tier, members) in &tiers {
        let first = members[0];
        // The estimate the method planned by, training FLOPs per sample and the task's bytes.
        let mut figures = ("-".to_string(), "-".to_string(), "-".to_string());
        let decision = match server.plan(&ctx, std::slice::from_ref(first))?.pop() {
            Some(Assignment::Run(task)) => {
                let cost = server.task_cost(&task);
                let bytes = task.encode(&Default::default())?.len();
                figures = (
                    format!("{:.1}", cost.memory_bytes as f64 / 1048576.0),
                    format!("{:.1}", cost.flops_per_sample / 1e6),
                    format!("{:.2}", bytes as f64 / 1e6),
                );
                let depth = match task.view.prefix_depth(blocks) {
                    Some(d) if blocks > 0 => format!("depth {d}/{blocks}, "),
                    _ => String::new(),
                };
                let options = if task.options.is_null() {
                    String::new()
                } else {
                    format!(", options {}", task.options)
                };
                format!(
                    "train {depth}{} tensors, {} parameters sent{options}",
                    task.params.len(),
                    task.params.numel()
                )
            }
            Some(Assignment::Skip(reason)) => format!("skipped: {reason}"),
            None => "no assignment".into(),
        };
        let budget = if first.profile.memory_bytes
            == flotilla_core::device::DeviceProfile::unlimited().memory_bytes
        {
            "unlimited".to_string()
        } else {
            format!("{:.1}", first.profile.memory_bytes as f64 / 1048576.0)
        };
        println!(
            "{tier:<14} {:>7} {budget:>10} {:>10} {:>12} {:>10}  {decision}",
            members.len(),
            figures.0,
            figures.1,
            figures.2
        );
    }
    Ok(())
}

/// `flotilla evaluate`: a saved model on the test set.
pub(super) fn evaluate(config: &Path, model: &Path, data_dir: Option<&Path>) -> Result<()> {
    let exp = load_config(config, &[])?;
    let data = load_data(&exp, data_dir)?;
    let (params, meta) = safetensors_io::load(model)?;
    let spec = match meta.get("model") {
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!(
                "{}: the `model` metadata is not a model spec",
                model.display()
            )
        })?,
        None => exp.model_spec(),
    };
    let (mean, std) = exp.data.dataset.normalization();
    let test = data.test;
    let (acc, loss) = flotilla_engine::local::evaluate(
        &spec,
        &flotilla_models::View::full(),
        &params,
        &test,
        &mean,
        &std,
    )?;
    println!("test_accuracy: {acc:.4}");
    println!("test_loss:     {loss:.4}");
    println!("samples:       {}", test.len());
    Ok(())
}

/// `flotilla partition`: how the config splits the data among clients.
pub(super) fn partition(config: &Path, data_dir: Option<&Path>, json: bool) -> Result<()> {
    let exp = load_config(config, &[])?;
    let data = load_data(&exp, data_dir)?;
    let train = data.train;
    // The simulator's partition, which leaves out a server holdout slice.
    let parts = flotilla_engine::sim::partition_clients(&exp, &train)?;
    let summary = flotilla_data::summarize(&parts, &train.labels, train.num_classes);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} over {} clients ({})",
            exp.data.dataset, exp.data.num_clients, exp.data.partition
        );
        let held = flotilla_engine::server_data::holdout_indices(&exp, train.len())?.len();
        if held > 0 {
            println!("{held} training samples held out for the server ([server_data])");
        }
        println!("{summary}");
    }
    Ok(())
}
