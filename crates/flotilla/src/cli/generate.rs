//! `flotilla generate`: fits FedTSA's server-side generator (a class-conditional latent
//! diffusion model, `flotilla_methods::fedtsa::generator`) on the config's held-out slice and
//! writes samples as IDX files that `[server_data] source = "idx"` reads, grids of generated and
//! held-out images to look at, and `generator.json` with the costs and a quality check.

use super::setup::{load_config, load_data};
use anyhow::{Context, Result, bail};
use flotilla_data::{Dataset, encode_idx};
use flotilla_engine::ClientData;
use flotilla_engine::local::{CrossEntropy, TrainJob, evaluate};
use flotilla_methods::fedtsa::generator::{Generator, GeneratorOptions};
use flotilla_models::{Net, View, flops};
use std::io::IsTerminal;
use std::path::Path;

/// What `flotilla generate` was asked for.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Experiment config whose `[server_data]` keeps a slice from the clients (`source =
    /// "holdout"`, or `"idx"` with `withhold`): the generator fits that slice.
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Folder to write the samples into.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Dataset folder.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Override a config key, e.g. --set seed=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Samples to write (the pool: class i mod C, guidance cycling over --guidance).
    #[arg(long, default_value_t = 5000)]
    pub samples: usize,
    /// Denoiser training steps.
    #[arg(long, default_value_t = GeneratorOptions::default().steps)]
    pub steps: usize,
    /// Principal components of the latent space.
    #[arg(long, default_value_t = GeneratorOptions::default().components)]
    pub components: usize,
    /// Units of the denoiser's hidden layers.
    #[arg(long, default_value_t = GeneratorOptions::default().hidden)]
    pub hidden: usize,
    /// DDIM steps when sampling.
    #[arg(long, default_value_t = GeneratorOptions::default().ddim_steps)]
    pub ddim_steps: usize,
    /// Guidance scales of the pool, e.g. 1,2,4.
    #[arg(long, value_delimiter = ',', default_values_t = GeneratorOptions::default().guidance)]
    pub guidance: Vec<f32>,
}

fn bar(len: u64, what: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] ETA {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    })
}

/// Runs `flotilla generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let exp = load_config(&args.config, &args.overrides)?;
    if exp.server_data.as_ref().is_none_or(|sd| sd.withheld() == 0) {
        bail!(
            "`flotilla generate` fits the generator on the server's held-out slice: {} needs a [server_data] section with source = \"holdout\" and a size, or source = \"idx\" with withhold (see examples/fedtsa.toml)",
            args.config.display()
        );
    }
    let data = load_data(&exp, args.data_dir.as_deref())?;
    let train = data.train;
    // The same slice a run with this config holds out (never given to a client); the server
    // owns it, labels included.
    let held = train.subset(&flotilla_engine::server_data::holdout_indices(
        &exp,
        train.len(),
    )?)?;
    let opts = GeneratorOptions {
        components: args.components,
        hidden: args.hidden,
        steps: args.steps,
        ddim_steps: args.ddim_steps,
        guidance: args.guidance.clone(),
        seed: exp.seed,
        ..GeneratorOptions::default()
    };
    opts.validate()?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    eprintln!(
        "fitting the generator on {} held-out images ({} components, {} denoiser steps)",
        held.len(),
        opts.components,
        opts.steps
    );
    let fit_bar = bar(opts.steps as u64, "denoiser step");
    let mut generator = Generator::fit(&held, &opts, &|s| {
        if let Some(b) = &fit_bar {
            b.set_position(s as u64);
        } else if s % 1000 == 0 {
            tracing::info!(step = s, "generator training");
        }
    })?;
    if let Some(b) = fit_bar {
        b.finish_and_clear();
    }
    let sample_bar = bar(args.samples as u64, "sample");
    let samples = generator.sample(args.samples, &|n| {
        if let Some(b) = &sample_bar {
            b.set_position(n as u64);
        }
    });
    if let Some(b) = sample_bar {
        b.finish_and_clear();
    }
    let [c, h, w] = samples.shape;
    let dims = if c == 1 {
        vec![samples.len(), h, w]
    } else {
        vec![samples.len(), c, h, w]
    };
    let images_path = args.out.join("images-idx3-ubyte");
    let labels_path = args.out.join("labels-idx1-ubyte");
    write(&images_path, &encode_idx(&dims, &samples.images))?;
    write(&labels_path, &encode_idx(&[samples.len()], &samples.labels))?;
    write_grid(&args.out.join("samples.png"), &samples, 10)?;
    write_grid(&args.out.join("held-out.png"), &held, 10)?;

    // How recognisable the samples are: a classifier trained on the held-out images (the
    // config's model and recipe, 3 epochs) labels the generated ones.
    let spec = exp.model_spec();
    let view = View::full();
    let (mean, std) = exp.data.dataset.normalization();
    let held_data = ClientData {
        holdout: held.take_first(0),
        train: held.clone(),
        mean: mean.clone(),
        std: std.clone(),
    };
    let mut recipe = exp.training.clone();
    recipe.epochs = 3;
    let init = Net::init_params(&spec, exp.seed)?;
    let objective = CrossEntropy::under(&view);
    eprintln!("checking the samples with a classifier trained on the held-out images");
    let trained = TrainJob::new(&spec, &view, &init, &held_data, &recipe, &objective).train()?;
    let (test_acc, _) = evaluate(&spec, &view, &trained.params, &data.test, &mean, &std)?;
    let (gen_acc, _) = evaluate(&spec, &view, &trained.params, &samples, &mean, &std)?;
    let check_flops = flops::training(&spec, &view, trained.samples);
    let report = &generator.report;
    let json = serde_json::json!({
        "fitted_on": "the slice [server_data] keeps from the clients (size of a holdout, or withhold)",
        "options": opts,
        "report": report,
        "samples": samples.len(),
        "classifier_check": {
            "what": "the config's model trained 3 epochs on the held-out images, scored on the test set and on the samples (their pool labels)",
            "test_accuracy": test_acc,
            "sample_accuracy": gen_acc,
            "training_flops": check_flops,
        },
        "files": {
            "images": images_path,
            "labels": labels_path,
            "grid": args.out.join("samples.png"),
            "held_out_grid": args.out.join("held-out.png"),
        },
    });
    write(
        &args.out.join("generator.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    println!("generator fitted on      {} held-out images", held.len());
    println!(
        "PCA                      {} components, {:.1}% of the pixel variance, reconstruction MSE {:.4}",
        opts.components,
        100.0 * report.explained_variance,
        report.reconstruction_mse
    );
    println!(
        "denoiser                 {} parameters, loss {:.3} -> {:.3}",
        report.denoiser_parameters, report.loss_first, report.loss_last
    );
    println!(
        "fit                      {:.1} s, {:.1} GFLOP",
        report.fit_wall_s,
        report.fit_flops / 1e9
    );
    println!(
        "sampling                 {} images in {:.1} s, {:.1} GFLOP",
        samples.len(),
        report.sample_wall_s,
        report.sample_flops / 1e9
    );
    println!(
        "classifier check         {:.2}% on the test set, {:.2}% on the samples",
        100.0 * test_acc,
        100.0 * gen_acc
    );
    println!("written                  {}", args.out.display());
    println!(
        "use with                 [server_data] source = \"idx\", images = \"{}\", labels = \"{}\"",
        images_path.display(),
        labels_path.display()
    );
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// A PNG of up to `per_class` images of each class, one row per class, at twice the size.
fn write_grid(path: &Path, data: &Dataset, per_class: usize) -> Result<()> {
    let [c, h, w] = data.shape;
    let classes = data.num_classes;
    let (cell_h, cell_w) = (2 * h + 2, 2 * w + 2);
    let (height, width) = (classes * cell_h, per_class * cell_w);
    let channels = if c == 3 { 3 } else { 1 };
    let mut pixels = vec![255u8; height * width * channels];
    let mut count = vec![0usize; classes];
    for i in 0..data.len() {
        let class = usize::from(data.labels[i]);
        if class >= classes || count[class] >= per_class {
            continue;
        }
        let img = &data.images[i * c * h * w..(i + 1) * c * h * w];
        let (top, left) = (class * cell_h + 1, count[class] * cell_w + 1);
        for y in 0..2 * h {
            for x in 0..2 * w {
                for ch in 0..channels {
                    let v = img[ch * h * w + (y / 2) * w + x / 2];
                    pixels[((top + y) * width + left + x) * channels + ch] = v;
                }
            }
        }
        count[class] += 1;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(if channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    Ok(())
}
