//! The generator's noise predictor ε(z_t, t, y): a small MLP with SiLU activations, trained by
//! hand-written backpropagation and Adam. It works on latent vectors of a few dozen numbers,
//! where a matrix library's products are all that is needed.

use nalgebra::DMatrix;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Width of the sinusoidal time embedding.
pub const TIME_FEATURES: usize = 32;

/// A fully connected layer, `y = x W + b` with `x` one sample per row.
#[derive(Debug, Clone)]
struct Layer {
    w: DMatrix<f32>,
    b: DMatrix<f32>,
    /// Adam's first and second moments of `w` and `b`.
    m: (DMatrix<f32>, DMatrix<f32>),
    v: (DMatrix<f32>, DMatrix<f32>),
}

impl Layer {
    /// He-style initialisation: N(0, 1/fan_in).
    fn new(fan_in: usize, fan_out: usize, rng: &mut ChaCha8Rng) -> Self {
        let scale = (1.0 / fan_in as f32).sqrt();
        let w = DMatrix::from_fn(fan_in, fan_out, |_, _| {
            let z: f32 = StandardNormal.sample(rng);
            z * scale
        });
        let zeros = |r, c| DMatrix::zeros(r, c);
        Self {
            w,
            b: zeros(1, fan_out),
            m: (zeros(fan_in, fan_out), zeros(1, fan_out)),
            v: (zeros(fan_in, fan_out), zeros(1, fan_out)),
        }
    }

    fn forward(&self, x: &DMatrix<f32>) -> DMatrix<f32> {
        let mut y = x * &self.w;
        for mut row in y.row_iter_mut() {
            row += &self.b;
        }
        y
    }

    fn params(&self) -> usize {
        self.w.len() + self.b.len()
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(a: &DMatrix<f32>) -> DMatrix<f32> {
    a.map(|x| x * sigmoid(x))
}

/// d silu / d a, times the incoming gradient.
fn silu_backward(a: &DMatrix<f32>, grad: &DMatrix<f32>) -> DMatrix<f32> {
    a.zip_map(grad, |x, g| {
        let s = sigmoid(x);
        g * s * (1.0 + x * (1.0 - s))
    })
}

/// The noise predictor: [z_t, time embedding, one-hot class (the last class is "none", for
/// classifier-free guidance)] → hidden → hidden → ε̂.
#[derive(Debug, Clone)]
pub struct Denoiser {
    layers: Vec<Layer>,
    latent: usize,
    classes: usize,
    step: i32,
}

impl Denoiser {
    /// A denoiser for `latent`-dimensional codes and `classes` classes (plus "none"), with two
    /// hidden layers of `hidden` units.
    pub fn new(latent: usize, classes: usize, hidden: usize, rng: &mut ChaCha8Rng) -> Self {
        let input = latent + TIME_FEATURES + classes + 1;
        Self {
            layers: vec![
                Layer::new(input, hidden, rng),
                Layer::new(hidden, hidden, rng),
                Layer::new(hidden, latent, rng),
            ],
            latent,
            classes,
            step: 0,
        }
    }

    /// Number of weights and biases.
    pub fn parameters(&self) -> usize {
        self.layers.iter().map(Layer::params).sum()
    }

    /// FLOPs of one forward pass of one sample (2 per multiply-add).
    pub fn forward_flops(&self) -> f64 {
        self.layers.iter().map(|l| 2.0 * l.w.len() as f64).sum()
    }

    /// The network input of a batch: codes `z` (one per row), time fractions `t` in [0, 1] and
    /// class indices (`classes` meaning none).
    fn input(&self, z: &DMatrix<f32>, t: &[f32], y: &[usize]) -> DMatrix<f32> {
        let n = z.nrows();
        let width = self.latent + TIME_FEATURES + self.classes + 1;
        let half = TIME_FEATURES / 2;
        DMatrix::from_fn(n, width, |r, c| {
            if c < self.latent {
                z[(r, c)]
            } else if c < self.latent + TIME_FEATURES {
                let k = c - self.latent;
                // Frequencies 1 … 1000 on a log scale, for t scaled to [0, 1000].
                let freq = (1000f32).powf((k % half) as f32 / half as f32);
                let angle = t[r] * 1000.0 / freq;
                if k < half { angle.sin() } else { angle.cos() }
            } else {
                f32::from(u8::from(c - self.latent - TIME_FEATURES == y[r]))
            }
        })
    }

    /// Predicted noise for each row of `z`.
    pub fn predict(&self, z: &DMatrix<f32>, t: &[f32], y: &[usize]) -> DMatrix<f32> {
        let mut h = self.input(z, t, y);
        for (i, l) in self.layers.iter().enumerate() {
            let a = l.forward(&h);
            h = if i + 1 < self.layers.len() {
                silu(&a)
            } else {
                a
            };
        }
        h
    }

    /// One Adam step on the mean squared error between the predicted and the true noise;
    /// returns the loss before the step.
    pub fn train_step(
        &mut self,
        z: &DMatrix<f32>,
        t: &[f32],
        y: &[usize],
        noise: &DMatrix<f32>,
        lr: f32,
    ) -> f32 {
        let (loss, grads) = self.gradients(z, t, y, noise);
        self.adam(grads, lr);
        loss
    }

    /// The loss and, per layer, the gradients of its weights and biases.
    #[allow(clippy::type_complexity)]
    fn gradients(
        &self,
        z: &DMatrix<f32>,
        t: &[f32],
        y: &[usize],
        noise: &DMatrix<f32>,
    ) -> (f32, Vec<(DMatrix<f32>, DMatrix<f32>)>) {
        // Forward, keeping each layer's input and pre-activation.
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut pre = Vec::with_capacity(self.layers.len());
        let mut h = self.input(z, t, y);
        for (i, l) in self.layers.iter().enumerate() {
            let a = l.forward(&h);
            inputs.push(h);
            h = if i + 1 < self.layers.len() {
                silu(&a)
            } else {
                a.clone()
            };
            pre.push(a);
        }
        let diff = &h - noise;
        let count = diff.len() as f32;
        let loss = diff.norm_squared() / count;
        // Backward.
        let mut grad = diff * (2.0 / count);
        let mut grads = Vec::with_capacity(self.layers.len());
        for i in (0..self.layers.len()).rev() {
            if i + 1 < self.layers.len() {
                grad = silu_backward(&pre[i], &grad);
            }
            let dw = inputs[i].transpose() * &grad;
            let db = DMatrix::from_fn(1, grad.ncols(), |_, c| grad.column(c).sum());
            if i > 0 {
                grad = &grad * self.layers[i].w.transpose();
            }
            grads.push((dw, db));
        }
        grads.reverse();
        (loss, grads)
    }

    /// Adam (β₁ = 0.9, β₂ = 0.999) on every layer.
    fn adam(&mut self, grads: Vec<(DMatrix<f32>, DMatrix<f32>)>, lr: f32) {
        self.step += 1;
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let c1 = 1.0 - b1.powi(self.step);
        let c2 = 1.0 - b2.powi(self.step);
        for (l, (dw, db)) in self.layers.iter_mut().zip(grads) {
            for (p, m, v, g) in [
                (&mut l.w, &mut l.m.0, &mut l.v.0, dw),
                (&mut l.b, &mut l.m.1, &mut l.v.1, db),
            ] {
                for k in 0..p.len() {
                    m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                    v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                    p[k] -= lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps);
                }
            }
        }
    }
}

/// A matrix of standard normal draws.
pub fn normal(rows: usize, cols: usize, rng: &mut impl Rng) -> DMatrix<f32> {
    DMatrix::from_fn(rows, cols, |_, _| StandardNormal.sample(rng))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backpropagation_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let net = Denoiser::new(4, 3, 8, &mut rng);
        let z = normal(5, 4, &mut rng);
        let noise = normal(5, 4, &mut rng);
        let t = [0.1, 0.5, 0.9, 0.3, 0.7];
        let y = [0, 1, 2, 3, 1];
        let (_, grads) = net.gradients(&z, &t, &y, &noise);
        let loss = |n: &Denoiser| {
            let d = n.predict(&z, &t, &y) - &noise;
            d.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / d.len() as f64
        };
        let h = 1e-2f32;
        for (layer, (dw, db)) in grads.iter().enumerate() {
            for k in [0usize, 3, 7, 12] {
                let mut plus = net.clone();
                plus.layers[layer].w[k] += h;
                let mut minus = net.clone();
                minus.layers[layer].w[k] -= h;
                let numeric = (loss(&plus) - loss(&minus)) / f64::from(2.0 * h);
                let analytic = f64::from(dw[k]);
                assert!(
                    (numeric - analytic).abs() <= 1e-3 + 1e-2 * numeric.abs(),
                    "layer {layer} weight {k}: numeric {numeric}, backprop {analytic}"
                );
            }
            let mut plus = net.clone();
            plus.layers[layer].b[1] += h;
            let mut minus = net.clone();
            minus.layers[layer].b[1] -= h;
            let numeric = (loss(&plus) - loss(&minus)) / f64::from(2.0 * h);
            let analytic = f64::from(db[1]);
            assert!(
                (numeric - analytic).abs() <= 1e-3 + 1e-2 * numeric.abs(),
                "layer {layer} bias: numeric {numeric}, backprop {analytic}"
            );
        }
    }

    #[test]
    fn training_fits_a_fixed_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut net = Denoiser::new(6, 2, 32, &mut rng);
        let z = normal(32, 6, &mut rng);
        let noise = normal(32, 6, &mut rng);
        let t: Vec<f32> = (0..32).map(|i| i as f32 / 32.0).collect();
        let y: Vec<usize> = (0..32).map(|i| i % 3).collect();
        let first = net.train_step(&z, &t, &y, &noise, 1e-2);
        let mut last = first;
        for _ in 0..300 {
            last = net.train_step(&z, &t, &y, &noise, 1e-2);
        }
        assert!(last < 0.2 * first, "loss {first} -> {last}");
    }
}
