//! FedTSA's server-side generator, the offline substitute for the paper's pretrained
//! text-to-image diffusion model (methods.md §2.3, option A): a class-conditional *latent*
//! diffusion model fitted to the server's held-out slice of the training set, which no client
//! gets.
//!
//! - **Autoencoder**: PCA. The images (pixels / 255) are centred and projected on the top
//!   `components` eigenvectors of their covariance; each code is divided by the square root of
//!   its eigenvalue, so that every latent coordinate has unit variance, as a diffusion model
//!   expects. Decoding multiplies back, maps out of the latent space and clamps to [0, 1].
//! - **Denoiser**: an MLP ε(z_t, t, y) ([`Denoiser`]) trained on ‖ε − ε̂‖² with the cosine noise
//!   schedule ᾱ(t) = cos²(((t + s)/(1 + s))·π/2) / cos²((s/(1 + s))·π/2), s = 0.008, over
//!   `timesteps` discrete steps. The label is replaced by "none" with probability
//!   `label_dropout`, which trains the unconditional model classifier-free guidance needs.
//! - **Sampling**: deterministic DDIM (η = 0) over `ddim_steps` steps, guided as
//!   ε̂ = ε̂(z, none) + g·(ε̂(z, y) − ε̂(z, none)). The paper's prompt pool becomes a pool of
//!   (class, guidance g, seed): sample i has class i mod C, guidance `guidance[(i / C) mod G]`
//!   and its own seed, so samples do not depend on the batch they are drawn in.

use super::denoiser::{Denoiser, normal};
use flotilla_core::seed::{self, Purpose};
use flotilla_data::Dataset;
use flotilla_engine::EngineError;
use nalgebra::DMatrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The generator's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorOptions {
    /// Principal components of the latent space.
    pub components: usize,
    /// Units of each of the denoiser's two hidden layers.
    pub hidden: usize,
    /// Adam steps of the denoiser.
    pub steps: usize,
    /// Latent codes per step.
    pub batch: usize,
    /// Adam's learning rate at the start (cosine decay to a tenth of it).
    pub lr: f32,
    /// Probability of training a sample without its label.
    pub label_dropout: f64,
    /// Discrete noise levels of the schedule.
    pub timesteps: usize,
    /// DDIM steps when sampling.
    pub ddim_steps: usize,
    /// Guidance scales of the pool.
    pub guidance: Vec<f32>,
    /// Seed of the fit and of the samples.
    pub seed: u64,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        Self {
            components: 64,
            hidden: 384,
            steps: 6000,
            batch: 256,
            lr: 1e-3,
            label_dropout: 0.15,
            timesteps: 1000,
            ddim_steps: 50,
            guidance: vec![1.0, 2.0, 4.0],
            seed: 0,
        }
    }
}

impl GeneratorOptions {
    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::Config(format!("generator: {what}")));
        if self.components == 0 || self.hidden == 0 || self.batch == 0 || self.timesteps < 2 {
            return bad("components, hidden, batch must be positive and timesteps at least 2");
        }
        if self.steps == 0 || self.ddim_steps == 0 || self.ddim_steps > self.timesteps {
            return bad("steps must be positive and ddim_steps in 1..=timesteps");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if !(0.0..1.0).contains(&self.label_dropout) {
            return bad("label_dropout must be in [0, 1)");
        }
        if self.guidance.is_empty() || self.guidance.iter().any(|g| !(g.is_finite() && *g >= 0.0)) {
            return bad("guidance must list non-negative scales");
        }
        Ok(())
    }
}

/// What fitting and sampling cost and how well the fit went.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GeneratorReport {
    /// Images the generator was fitted on.
    pub fitted_on: usize,
    /// Share of the pixel variance the PCA keeps.
    pub explained_variance: f64,
    /// Mean squared error (pixels in [0, 1]) of encoding and decoding the fitted images.
    pub reconstruction_mse: f64,
    /// The denoiser's weights and biases.
    pub denoiser_parameters: usize,
    /// Mean denoising loss over the first and the last 100 steps.
    pub loss_first: f64,
    /// See `loss_first`.
    pub loss_last: f64,
    /// FLOPs of fitting: the covariance (2·n·D²) and the denoiser's steps (3 forward passes'
    /// worth per code); the eigendecomposition is not counted.
    pub fit_flops: f64,
    /// Measured wall time of fitting, seconds.
    pub fit_wall_s: f64,
    /// FLOPs of the last [`Generator::sample`] call (denoiser passes and decoding).
    pub sample_flops: f64,
    /// Its measured wall time, seconds.
    pub sample_wall_s: f64,
}

/// Principal components of flattened images.
#[derive(Debug, Clone)]
struct Pca {
    mean: Vec<f32>,
    /// D × K, one component per column.
    basis: DMatrix<f32>,
    /// √eigenvalue of each component.
    scale: Vec<f32>,
}

impl Pca {
    fn fit(x: &DMatrix<f32>, k: usize) -> (Self, f64) {
        let (n, d) = (x.nrows(), x.ncols());
        let mean: Vec<f32> = (0..d).map(|c| x.column(c).mean()).collect();
        let centred = DMatrix::from_fn(n, d, |r, c| x[(r, c)] - mean[c]);
        let cov = (centred.transpose() * &centred).map(|v| f64::from(v) / (n - 1).max(1) as f64);
        let eig = cov.symmetric_eigen();
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|a, b| eig.eigenvalues[*b].total_cmp(&eig.eigenvalues[*a]));
        let k = k.min(d);
        let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        let kept: f64 = order[..k]
            .iter()
            .map(|&i| eig.eigenvalues[i].max(0.0))
            .sum();
        let basis = DMatrix::from_fn(d, k, |r, c| eig.eigenvectors[(r, order[c])] as f32);
        let scale = order[..k]
            .iter()
            .map(|&i| (eig.eigenvalues[i].max(1e-12)).sqrt() as f32)
            .collect();
        (
            Self { mean, basis, scale },
            kept / total.max(f64::MIN_POSITIVE),
        )
    }

    /// Whitened codes, one row per image.
    fn encode(&self, x: &DMatrix<f32>) -> DMatrix<f32> {
        let centred = DMatrix::from_fn(x.nrows(), x.ncols(), |r, c| x[(r, c)] - self.mean[c]);
        let mut z = centred * &self.basis;
        for (c, s) in self.scale.iter().enumerate() {
            z.column_mut(c).apply(|v| *v /= s);
        }
        z
    }

    /// Images in [0, 1], one row per code.
    fn decode(&self, z: &DMatrix<f32>) -> DMatrix<f32> {
        let mut z = z.clone();
        for (c, s) in self.scale.iter().enumerate() {
            z.column_mut(c).apply(|v| *v *= s);
        }
        let mut x = z * self.basis.transpose();
        for (c, m) in self.mean.iter().enumerate() {
            x.column_mut(c).apply(|v| *v = (*v + m).clamp(0.0, 1.0));
        }
        x
    }
}

/// The cosine schedule's ᾱ at step `k` of `timesteps` (ᾱ(0) = 1), kept above 10⁻⁵ so that the
/// last step still carries a trace of the signal.
fn alpha_bar(k: usize, timesteps: usize) -> f32 {
    let s = 0.008f64;
    let f = |t: f64| {
        ((t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    ((f(k as f64 / timesteps as f64) / f(0.0)).clamp(1e-5, 1.0)) as f32
}

/// A fitted generator.
#[derive(Debug, Clone)]
pub struct Generator {
    pca: Pca,
    denoiser: Denoiser,
    classes: usize,
    shape: [usize; 3],
    opts: GeneratorOptions,
    /// Costs and fit quality.
    pub report: GeneratorReport,
}

fn pixels(data: &Dataset) -> DMatrix<f32> {
    let d = data.images.len() / data.len().max(1);
    DMatrix::from_fn(data.len(), d, |r, c| {
        f32::from(data.images[r * d + c]) / 255.0
    })
}

impl Generator {
    /// Fits the PCA and trains the denoiser on `data` (labelled images). `progress(step)` is
    /// called every 100 denoiser steps.
    pub fn fit(
        data: &Dataset,
        opts: &GeneratorOptions,
        progress: &dyn Fn(usize),
    ) -> Result<Self, EngineError> {
        opts.validate()?;
        if data.len() < 2 {
            return Err(EngineError::Config(format!(
                "the generator needs at least 2 images to fit, got {}",
                data.len()
            )));
        }
        let started = Instant::now();
        let x = pixels(data);
        let (n, d) = (x.nrows(), x.ncols());
        let (pca, explained) = Pca::fit(&x, opts.components);
        let latents = pca.encode(&x);
        let recon = pca.decode(&latents);
        let reconstruction_mse = f64::from((&recon - &x).norm_squared()) / (n * d) as f64;
        let k = latents.ncols();
        let classes = data.num_classes;
        let mut rng = seed::rng(opts.seed, 0, 0, Purpose::Generator);
        let mut denoiser = Denoiser::new(k, classes, opts.hidden, &mut rng);
        let (mut first, mut last) = (Vec::new(), Vec::new());
        for step in 0..opts.steps {
            let rows: Vec<usize> = (0..opts.batch).map(|_| rng.random_range(0..n)).collect();
            let levels: Vec<usize> = (0..opts.batch)
                .map(|_| rng.random_range(1..=opts.timesteps))
                .collect();
            let y: Vec<usize> = rows
                .iter()
                .map(|&r| {
                    if rng.random_bool(opts.label_dropout) {
                        classes
                    } else {
                        usize::from(data.labels[r])
                    }
                })
                .collect();
            let noise = normal(opts.batch, k, &mut rng);
            let zt = DMatrix::from_fn(opts.batch, k, |i, c| {
                let a = alpha_bar(levels[i], opts.timesteps);
                a.sqrt() * latents[(rows[i], c)] + (1.0 - a).sqrt() * noise[(i, c)]
            });
            let t: Vec<f32> = levels
                .iter()
                .map(|&l| l as f32 / opts.timesteps as f32)
                .collect();
            let progress_frac = step as f32 / opts.steps as f32;
            let lr =
                opts.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * progress_frac).cos()));
            let loss = f64::from(denoiser.train_step(&zt, &t, &y, &noise, lr));
            if step < 100 {
                first.push(loss);
            }
            if step + 100 >= opts.steps {
                last.push(loss);
            }
            if (step + 1) % 100 == 0 {
                progress(step + 1);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let report = GeneratorReport {
            fitted_on: n,
            explained_variance: explained,
            reconstruction_mse,
            denoiser_parameters: denoiser.parameters(),
            loss_first: mean(&first),
            loss_last: mean(&last),
            fit_flops: 2.0 * (n * d * d) as f64
                + 3.0 * denoiser.forward_flops() * (opts.steps * opts.batch) as f64,
            fit_wall_s: started.elapsed().as_secs_f64(),
            ..GeneratorReport::default()
        };
        Ok(Self {
            pca,
            denoiser,
            classes,
            shape: data.shape,
            opts: opts.clone(),
            report,
        })
    }

    /// The (class, guidance) of pool entry `i`.
    pub fn prompt(&self, i: usize) -> (u8, f32) {
        let g = &self.opts.guidance;
        ((i % self.classes) as u8, g[(i / self.classes) % g.len()])
    }

    /// `n` samples from the pool, as a labelled dataset of the fitted images' shape.
    /// `progress(done)` is called after each batch of 500.
    pub fn sample(&mut self, n: usize, progress: &dyn Fn(usize)) -> Dataset {
        let started = Instant::now();
        let k = self.pca.scale.len();
        let d: usize = self.shape.iter().product();
        let mut images = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        let mut flops = 0.0;
        let steps = self.opts.ddim_steps;
        let levels: Vec<usize> = (0..=steps)
            .map(|i| (i * self.opts.timesteps).div_ceil(steps))
            .collect();
        for start in (0..n).step_by(500) {
            let count = 500.min(n - start);
            let prompts: Vec<(u8, f32)> = (start..start + count).map(|i| self.prompt(i)).collect();
            let mut z = DMatrix::zeros(count, k);
            for r in 0..count {
                let mut rng = ChaCha8Rng::seed_from_u64(seed::derive(
                    self.opts.seed,
                    1,
                    (start + r) as u64,
                    Purpose::Generator,
                ));
                z.row_mut(r).copy_from(&normal(1, k, &mut rng));
            }
            let y: Vec<usize> = prompts.iter().map(|p| usize::from(p.0)).collect();
            let none = vec![self.classes; count];
            for i in (1..=steps).rev() {
                let (now, prev) = (levels[i], levels[i - 1]);
                let a = alpha_bar(now, self.opts.timesteps);
                let a_prev = if prev == 0 {
                    1.0
                } else {
                    alpha_bar(prev, self.opts.timesteps)
                };
                let t = vec![now as f32 / self.opts.timesteps as f32; count];
                let cond = self.denoiser.predict(&z, &t, &y);
                let uncond = self.denoiser.predict(&z, &t, &none);
                flops += 2.0 * self.denoiser.forward_flops() * count as f64;
                let mut next = DMatrix::zeros(count, k);
                for r in 0..count {
                    let g = prompts[r].1;
                    for c in 0..k {
                        let e = uncond[(r, c)] + g * (cond[(r, c)] - uncond[(r, c)]);
                        // Predicted clean code, clipped to the whitened range, and the noise
                        // consistent with it.
                        let x0 = ((z[(r, c)] - (1.0 - a).sqrt() * e) / a.sqrt()).clamp(-5.0, 5.0);
                        let e = (z[(r, c)] - a.sqrt() * x0) / (1.0 - a).sqrt().max(1e-6);
                        next[(r, c)] = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * e;
                    }
                }
                z = next;
            }
            let x = self.pca.decode(&z);
            flops += 2.0 * (count * k * d) as f64;
            for r in 0..count {
                images.extend(x.row(r).iter().map(|v| (v * 255.0).round() as u8));
            }
            labels.extend(prompts.iter().map(|p| p.0));
            progress(start + count);
        }
        self.report.sample_flops = flops;
        self.report.sample_wall_s = started.elapsed().as_secs_f64();
        Dataset {
            images,
            labels,
            shape: self.shape,
            num_classes: self.classes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes of 8×8 images: a bright left half or a bright right half, with noise.
    fn halves(n: usize) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut images = Vec::new();
        let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
        for &l in &labels {
            for p in 0..64 {
                let left = p % 8 < 4;
                let bright = left == (l == 0);
                let base = if bright { 200.0 } else { 40.0 };
                images.push((base + rng.random_range(-30.0..30.0f32)) as u8);
            }
        }
        Dataset {
            images,
            labels,
            shape: [1, 8, 8],
            num_classes: 2,
        }
    }

    fn small() -> GeneratorOptions {
        GeneratorOptions {
            components: 8,
            hidden: 64,
            steps: 600,
            batch: 64,
            lr: 3e-3,
            ddim_steps: 20,
            guidance: vec![1.0, 3.0],
            ..GeneratorOptions::default()
        }
    }

    #[test]
    fn the_schedule_runs_from_signal_to_noise() {
        assert_eq!(alpha_bar(0, 1000), 1.0);
        assert!(alpha_bar(1, 1000) > 0.999);
        assert!(alpha_bar(1000, 1000) <= 1e-4);
        assert!((1..1000).all(|k| alpha_bar(k + 1, 1000) <= alpha_bar(k, 1000)));
    }

    #[test]
    fn pca_with_every_component_reconstructs_and_whitens() {
        let data = halves(200);
        let x = pixels(&data);
        let (pca, explained) = Pca::fit(&x, 64);
        assert!((explained - 1.0).abs() < 1e-6);
        let z = pca.encode(&x);
        assert!((&pca.decode(&z) - &x).abs().max() < 1e-3);
        // Whitened: the leading components have unit variance.
        for c in 0..4 {
            let col = z.column(c);
            let var = col.iter().map(|v| v * v).sum::<f32>() / (col.len() - 1) as f32;
            assert!((var - 1.0).abs() < 0.05, "component {c}: variance {var}");
        }
    }

    #[test]
    fn samples_follow_their_class_and_do_not_depend_on_the_batch() {
        let data = halves(400);
        let mut g = Generator::fit(&data, &small(), &|_| {}).unwrap();
        assert!(g.report.loss_last < g.report.loss_first);
        let samples = g.sample(40, &|_| {});
        assert_eq!(samples.len(), 40);
        assert_eq!(samples.shape, [1, 8, 8]);
        // Class 0 is bright on the left, class 1 on the right: the generated images say so.
        let mut right = 0;
        for i in 0..samples.len() {
            let img = &samples.images[i * 64..(i + 1) * 64];
            let left: u32 = (0..64)
                .filter(|p| p % 8 < 4)
                .map(|p| u32::from(img[p]))
                .sum();
            let rest: u32 = (0..64)
                .filter(|p| p % 8 >= 4)
                .map(|p| u32::from(img[p]))
                .sum();
            if (left > rest) == (samples.labels[i] == 0) {
                right += 1;
            }
        }
        assert!(right >= 36, "{right} of 40 samples look like their class");
        assert!(g.report.sample_flops > 0.0);
        // The same pool entries come out the same when drawn again.
        let again = g.sample(40, &|_| {});
        assert_eq!(again.images, samples.images);
    }
}
