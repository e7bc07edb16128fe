//! FLOP counts from per-layer formulas.
//!
//! A multiply-add counts as 2 FLOPs. Convolutions, linear layers and attention products are
//! counted; element-wise work (bias, ReLU, pooling, normalisation, softmax) is left out: it is
//! under 1% of the total for these models and runs at memory speed, not at FLOP speed.
//! Training costs 3× the forward pass (forward, gradient w.r.t. inputs, gradient w.r.t.
//! weights), the usual convention (Kaplan et al. 2020) and the one the W1 reference uses.

use crate::{Architecture, ModelSpec, View};

/// Multiplier from forward FLOPs to training FLOPs.
pub const TRAINING_FACTOR: f64 = 3.0;

fn conv(cin: usize, cout: usize, k: usize, hout: usize, wout: usize) -> f64 {
    2.0 * (cout * cin * k * k * hout * wout) as f64
}

fn linear(inp: usize, out: usize) -> f64 {
    2.0 * (inp * out) as f64
}

/// Forward FLOPs of one sample under `view`.
pub fn forward_per_sample(spec: &ModelSpec, view: &View) -> f64 {
    let [c, h, w] = spec.input;
    match &spec.arch {
        Architecture::Cnn => {
            let (c1, c2, f) = (spec.scaled(32), spec.scaled(64), spec.scaled(512));
            conv(c, c1, 5, h, w)
                + conv(c1, c2, 5, h / 2, w / 2)
                + linear(c2 * (h / 4) * (w / 4), f)
                + linear(f, spec.classes)
        }
        Architecture::Mlp { hidden } => {
            let mut widths = vec![c * h * w];
            widths.extend(hidden.iter().map(|x| spec.scaled(*x)));
            widths.push(spec.classes);
            widths.windows(2).map(|p| linear(p[0], p[1])).sum()
        }
        Architecture::Resnet { blocks_per_stage } => {
            let widths = [spec.scaled(16), spec.scaled(32), spec.scaled(64)];
            let mut total = conv(c, widths[0], 3, h, w);
            let (mut hh, mut ww, mut inp) = (h, w, widths[0]);
            let mut k = 0;
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..*blocks_per_stage {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let (ho, wo) = (hh.div_ceil(stride), ww.div_ceil(stride));
                    if view.block_active(k) {
                        total += conv(inp, out, 3, ho, wo) + conv(out, out, 3, ho, wo);
                    }
                    (hh, ww, inp) = (ho, wo, out);
                    k += 1;
                }
            }
            total + linear(widths[2], spec.classes)
        }
        Architecture::Vit {
            patch,
            dim,
            depth,
            mlp_ratio,
            ..
        } => {
            let d = spec.scaled(*dim);
            let n = (h / patch) * (w / patch);
            let t = n + 1;
            let mut total = conv(c, d, *patch, h / patch, w / patch);
            for k in 0..*depth {
                if view.block_active(k) {
                    total += 4.0 * t as f64 * linear(d, d) // q, k, v, proj
                        + 2.0 * 2.0 * (t * t * d) as f64 // scores and weighted sum
                        + t as f64 * (linear(d, mlp_ratio * d) + linear(mlp_ratio * d, d));
                }
            }
            total + linear(d, spec.classes)
        }
    }
}

/// Training FLOPs for `samples` samples under `view`.
pub fn training(spec: &ModelSpec, view: &View, samples: usize) -> f64 {
    TRAINING_FACTOR * forward_per_sample(spec, view) * samples as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w1_cnn_matches_the_hand_count() {
        // conv1 2·32·1·25·28·28 + conv2 2·64·32·25·14·14 + fc1 2·3136·512 + fc2 2·512·10
        let hand = 1_254_400.0 + 20_070_400.0 + 3_211_264.0 + 10_240.0;
        let f = forward_per_sample(&ModelSpec::fedavg_cnn(), &View::full());
        assert_eq!(f, hand);
        assert!((f / 1e6 - 24.5).abs() < 0.1, "{f}");
        assert_eq!(
            training(&ModelSpec::fedavg_cnn(), &View::full(), 32),
            3.0 * 32.0 * hand
        );
    }

    #[test]
    fn skipped_blocks_cost_nothing() {
        let spec = ModelSpec {
            arch: Architecture::Resnet {
                blocks_per_stage: 3,
            },
            input: [3, 32, 32],
            classes: 10,
            width: 1.0,
        };
        let full = forward_per_sample(&spec, &View::full());
        let half = forward_per_sample(&spec, &View::depth_prefix(4, 9));
        let none = forward_per_sample(&spec, &View::depth_prefix(0, 9));
        assert!(none < half && half < full);
        // ResNet-20 on CIFAR is about 41 MMAC = 82 MFLOP forward
        assert!((full / 1e6 - 81.0).abs() < 2.0, "{full}");
    }
}
