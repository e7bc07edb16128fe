//! The self-supervised objective of FLL and FedSSL: SimCLR's NT-Xent (Chen et al. 2020) on two
//! augmented views of every image, with augmentations for small grey images.
//!
//! Each step draws one seed from the engine's per-client, per-round stream; the two views of
//! every image of the batch derive from it, so a run is reproducible and two clients (or two
//! rounds) never see the same augmentations.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};
use flotilla_engine::EngineError;
use flotilla_engine::local::{Batch, Objective, cross_entropy};
use flotilla_models::{ModelSpec, Net, View};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What a client minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// NT-Xent between two augmented views of each image; labels are never read.
    #[default]
    Contrastive,
    /// Cross-entropy of the projection's first `classes` outputs against the labels, for
    /// clients that have labels (the projection is wider than the number of classes; the
    /// other outputs are pushed down like any wrong class).
    Supervised,
}

/// The augmentations of one view, for `[C, H, W]` images in normalised units (0 = the
/// dataset's mean pixel). Defaults suit 28×28 grey images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Smallest area fraction a random resized crop keeps (the largest is 1); 1 = no crop.
    pub crop_min_scale: f64,
    /// Probability of a horizontal flip.
    pub flip: f64,
    /// Standard deviation of the added Gaussian noise, in normalised units.
    pub noise: f64,
    /// Probability of erasing one random rectangle (2–20 % of the area) to the mean pixel.
    pub erase: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            crop_min_scale: 0.35,
            flip: 0.5,
            noise: 0.1,
            erase: 0.25,
        }
    }
}

impl Augment {
    /// Checks that every probability is in [0, 1] and the rest in range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.crop_min_scale > 0.0 && self.crop_min_scale <= 1.0) {
            return Err(format!(
                "`augment.crop_min_scale` must be in (0, 1], got {}",
                self.crop_min_scale
            ));
        }
        for (key, p) in [("flip", self.flip), ("erase", self.erase)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("`augment.{key}` must be in [0, 1], got {p}"));
            }
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(format!(
                "`augment.noise` must be finite and non-negative, got {}",
                self.noise
            ));
        }
        Ok(())
    }

    /// One augmented view of `image` (`[c, h, w]`, row-major) written to `out`.
    pub fn apply(&self, image: &[f32], shape: [usize; 3], rng: &mut ChaCha8Rng, out: &mut [f32]) {
        let [c, h, w] = shape;
        // Random resized crop: area fraction and aspect ratio, bilinear back to h × w.
        // `crop_min_scale = 1` turns cropping off.
        let (ch, cw, top, left) = if self.crop_min_scale < 1.0 {
            let area = rng.random_range(self.crop_min_scale..=1.0) * (h * w) as f64;
            let ratio = (rng.random_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln())).exp();
            let ch = (area / ratio).sqrt().clamp(1.0, h as f64);
            let cw = (area * ratio).sqrt().clamp(1.0, w as f64);
            let top = rng.random_range(0.0..=(h as f64 - ch));
            let left = rng.random_range(0.0..=(w as f64 - cw));
            (ch, cw, top, left)
        } else {
            (h as f64, w as f64, 0.0, 0.0)
        };
        let flip = rng.random_bool(self.flip);
        for k in 0..c {
            let src = &image[k * h * w..(k + 1) * h * w];
            for y in 0..h {
                let sy = (top + (y as f64 + 0.5) * ch / h as f64 - 0.5).clamp(0.0, (h - 1) as f64);
                let (y0, fy) = (sy.floor() as usize, sy - sy.floor());
                let y1 = (y0 + 1).min(h - 1);
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx =
                        (left + (xx as f64 + 0.5) * cw / w as f64 - 0.5).clamp(0.0, (w - 1) as f64);
                    let (x0, fx) = (sx.floor() as usize, sx - sx.floor());
                    let x1 = (x0 + 1).min(w - 1);
                    let v = (1.0 - fy)
                        * ((1.0 - fx) * f64::from(src[y0 * w + x0])
                            + fx * f64::from(src[y0 * w + x1]))
                        + fy * ((1.0 - fx) * f64::from(src[y1 * w + x0])
                            + fx * f64::from(src[y1 * w + x1]));
                    out[k * h * w + y * w + x] = v as f32;
                }
            }
        }
        if self.noise > 0.0 {
            for v in out.iter_mut() {
                *v += (self.noise * gaussian(rng)) as f32;
            }
        }
        if rng.random_bool(self.erase) {
            let frac = rng.random_range(0.02..=0.2) * (h * w) as f64;
            let ratio = (rng.random_range((0.3f64).ln()..=(1.0f64 / 0.3).ln())).exp();
            let eh = ((frac / ratio).sqrt().round() as usize).clamp(1, h);
            let ew = ((frac * ratio).sqrt().round() as usize).clamp(1, w);
            let top = rng.random_range(0..=h - eh);
            let left = rng.random_range(0..=w - ew);
            for k in 0..c {
                for y in top..top + eh {
                    out[k * h * w + y * w + left..k * h * w + y * w + left + ew].fill(0.0);
                }
            }
        }
    }
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Two augmented views of each of the `n` images of `x` (`[n, c, h, w]`, row-major): the
/// first `n` images of the result are the first views, the next `n` the second views.
pub fn two_views(x: &[f32], n: usize, shape: [usize; 3], augment: &Augment, seed: u64) -> Vec<f32> {
    let size = shape.iter().product::<usize>();
    let mut out = vec![0f32; 2 * n * size];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (first, second) = out.split_at_mut(n * size);
    for i in 0..n {
        let img = &x[i * size..(i + 1) * size];
        augment.apply(img, shape, &mut rng, &mut first[i * size..(i + 1) * size]);
        augment.apply(img, shape, &mut rng, &mut second[i * size..(i + 1) * size]);
    }
    out
}

/// NT-Xent of projections `z` `[2n, d]` whose rows `i` and `i + n` are the two views of one
/// image: the mean over the 2n rows of the cross-entropy that picks the other view among the
/// 2n − 1 other rows, by cosine similarity at temperature `tau`.
pub fn nt_xent(z: Tensor<2>, tau: f64) -> Tensor<1> {
    let [rows, _] = z.dims();
    let device = z.device();
    let n = rows / 2;
    let norm = z.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-8);
    let z = z / norm;
    let sim = z.clone().matmul(z.transpose()) / tau as f32;
    // A row never picks itself: its own similarity is pushed far below every other.
    let mut self_mask = vec![0f32; rows * rows];
    let mut positive = vec![0f32; rows * rows];
    for i in 0..rows {
        self_mask[i * rows + i] = 1e9;
        positive[i * rows + (i + n) % rows] = 1.0;
    }
    let self_mask = Tensor::<2>::from_data(TensorData::new(self_mask, [rows, rows]), &device);
    let positive = Tensor::<2>::from_data(TensorData::new(positive, [rows, rows]), &device);
    (log_softmax(sim - self_mask, 1) * positive).sum().neg() / rows as f32
}

/// The loss of one FLL or FedSSL client, under the task's view.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfSupervised {
    /// Contrastive or supervised.
    pub loss: Loss,
    /// NT-Xent temperature τ.
    pub temperature: f64,
    /// The augmentations of each view.
    pub augment: Augment,
    /// What of the model runs and trains.
    pub view: View,
}

impl Objective for SelfSupervised {
    /// The seed of the step's augmentations.
    type Step = u64;

    /// Two views of every image go through the model.
    const INPUTS_PER_SAMPLE: usize = 2;

    fn check(&self, spec: &ModelSpec, _view: &View) -> Result<(), EngineError> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EngineError::Task(format!(
                "the NT-Xent temperature must be positive, got {}",
                self.temperature
            )));
        }
        self.augment.validate().map_err(EngineError::Task)?;
        if self.loss == Loss::Supervised && spec.classes < 2 {
            return Err(EngineError::Task(
                "the supervised loss needs a projection of at least 2 outputs".into(),
            ));
        }
        Ok(())
    }

    /// NT-Xent couples the samples of a batch: every image is a negative of every other.
    fn mixes_samples(&self) -> bool {
        self.loss == Loss::Contrastive
    }

    fn begin_step(&self, rng: &mut ChaCha8Rng) -> u64 {
        rng.random()
    }

    fn loss(&self, model: &Net, batch: Batch<'_>, seed: &u64) -> Result<Tensor<1>, EngineError> {
        let [n, c, h, w] = batch.x.dims();
        let pixels = batch
            .x
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| EngineError::Task(format!("batch pixels: {e:?}")))?;
        let views = two_views(&pixels, n, [c, h, w], &self.augment, *seed);
        let x2 = Tensor::<4>::from_data(TensorData::new(views, [2 * n, c, h, w]), batch.device);
        let z = model.forward(x2, &self.view);
        match self.loss {
            Loss::Contrastive => Ok(nt_xent(z, self.temperature)),
            Loss::Supervised => {
                // Both views are labelled with their image's label.
                let labels: Vec<u8> = batch.labels.iter().chain(batch.labels).copied().collect();
                let [_, d] = z.dims();
                Ok(cross_entropy(z, &labels, d, batch.device))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_models::compute_device;

    #[test]
    fn views_differ_from_each_other_and_repeat_with_the_seed() {
        let shape = [1, 28, 28];
        let x: Vec<f32> = (0..2 * 784)
            .map(|i| ((i % 29) as f32 * 0.1).sin())
            .collect();
        let a = two_views(&x, 2, shape, &Augment::default(), 5);
        let b = two_views(&x, 2, shape, &Augment::default(), 5);
        let c = two_views(&x, 2, shape, &Augment::default(), 6);
        assert_eq!(a, b, "same seed, same views");
        assert_ne!(a, c, "another seed, other views");
        assert_ne!(
            a[..784],
            a[2 * 784..3 * 784],
            "the two views of an image differ"
        );
        assert!(a.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn without_augmentation_a_view_is_the_image() {
        let none = Augment {
            crop_min_scale: 1.0,
            flip: 0.0,
            noise: 0.0,
            erase: 0.0,
        };
        let x: Vec<f32> = (0..784).map(|i| (i as f32 * 0.37).cos()).collect();
        let v = two_views(&x, 1, [1, 28, 28], &none, 1);
        for (a, b) in v[..784].iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn nt_xent_matches_a_hand_computation() {
        // 2 images, 2-d projections: rows 0,1 = first views; rows 2,3 = second views.
        let z = [[1.0f32, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]];
        let tau = 0.5;
        let t = Tensor::<2>::from_data(
            TensorData::new(z.iter().flatten().copied().collect::<Vec<_>>(), [4, 2]),
            &compute_device(),
        );
        let got: f32 = nt_xent(t, tau).into_scalar();
        let cos = |a: [f32; 2], b: [f32; 2]| {
            let d = a[0] * b[0] + a[1] * b[1];
            d / ((a[0] * a[0] + a[1] * a[1]).sqrt() * (b[0] * b[0] + b[1] * b[1]).sqrt())
        };
        let mut want = 0.0f64;
        for i in 0..4 {
            let pos = (i + 2) % 4;
            let denom: f64 = (0..4)
                .filter(|&k| k != i)
                .map(|k| (f64::from(cos(z[i], z[k])) / tau).exp())
                .sum();
            want -= (f64::from(cos(z[i], z[pos])) / tau).exp().ln() - denom.ln();
        }
        want /= 4.0;
        assert!((f64::from(got) - want).abs() < 1e-5, "{got} vs {want}");
    }
}
