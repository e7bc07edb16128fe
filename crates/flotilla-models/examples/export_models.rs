//! Writes freshly initialised parameters of every architecture as safetensors files, with
//! one reference input and the logits flotilla computes for it, so that the PyTorch modules
//! in docs/pytorch.md can be checked against them:
//! `cargo run --release -p flotilla-models --example export_models -- OUT_DIR`.

use flotilla_core::{ParamSet, Tensor, safetensors_io};
use flotilla_models::{Architecture, ModelSpec, Net, View, compute_device};
use std::collections::HashMap;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "models".into()));
    std::fs::create_dir_all(&out)?;
    let specs = [
        ("cnn", ModelSpec::fedavg_cnn()),
        ("mlp", ModelSpec::mlp_2nn()),
        (
            "resnet8",
            ModelSpec {
                arch: Architecture::Resnet {
                    blocks_per_stage: 1,
                },
                input: [1, 28, 28],
                classes: 10,
                width: 1.0,
                ranks: Default::default(),
            },
        ),
        (
            "vit",
            ModelSpec {
                arch: Architecture::Vit {
                    patch: 7,
                    dim: 64,
                    depth: 4,
                    heads: 4,
                    mlp_ratio: 2,
                },
                input: [1, 28, 28],
                classes: 10,
                width: 1.0,
                ranks: Default::default(),
            },
        ),
    ];
    for (name, spec) in specs {
        let params = Net::init_params(&spec, 0)?;
        let net = Net::from_params(&spec, &params, &compute_device())?;
        let n = 4;
        let pixels: Vec<f32> = (0..n * 784).map(|i| ((i as f32) * 0.731).sin()).collect();
        let logits = net.forward(
            Net::input(pixels.clone(), n, spec.input, &compute_device()),
            &View::full(),
        );
        let logits = logits
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let meta = HashMap::from([("model".to_string(), serde_json::to_string(&spec)?)]);
        safetensors_io::save(
            &out.join(format!("{name}.safetensors")),
            &params,
            Some(meta),
        )?;
        let check = ParamSet::from_tensors(vec![
            Tensor::new("input", vec![n, 1, 28, 28], pixels)?,
            Tensor::new("logits", vec![n, 10], logits)?,
        ])?;
        safetensors_io::save(&out.join(format!("{name}.check.safetensors")), &check, None)?;
        println!(
            "{name}: {} tensors, {} parameters",
            params.len(),
            params.numel()
        );
    }
    Ok(())
}
