//! FLOP counts from per-layer formulas.
//!
//! A multiply-add counts as 2 FLOPs. Convolutions, linear layers and attention products are
//! counted; element-wise work (bias, ReLU, pooling, normalisation, softmax) is left out: it is
//! under 1% of the total for these models and runs at memory speed, not at FLOP speed.
//!
//! Training costs each product by what the backward pass does with it (see [`Pass`]): a
//! product whose weight is trainable costs 3× its forward FLOPs (forward, gradient w.r.t. the
//! input, gradient w.r.t. the weight: the usual convention, Kaplan et al. 2020, and the one the
//! W1 reference uses); a frozen one that a gradient must cross, because a trainable tensor
//! comes before it in forward order, costs 2× (forward and input gradient); a frozen one
//! before the first trainable tensor costs 1×, since autodiff builds no graph for it. With
//! nothing frozen every product costs 3×. A factored linear layer (FeDLRT, see
//! [`ModelSpec::ranks`]) is three products, x·V, ·Sᵀ and ·Uᵀ, each judged by its own factor.

use crate::{Architecture, ModelSpec, View};

/// Multiplier from forward FLOPs to training FLOPs for a trainable product.
pub const TRAINING_FACTOR: f64 = 3.0;

/// What the backward pass does with one product (a convolution, a linear layer or one of
/// its factors, an attention product) under a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Before the first trainable tensor in forward order: its inputs need no gradient, so
    /// autodiff records nothing; forward only (1×).
    Inference,
    /// Frozen weight after a trainable tensor: forward and the gradient w.r.t. the input (2×).
    Backprop,
    /// Trainable weight (or, for a product of two activations, any tracked operand): forward
    /// and the gradients w.r.t. both operands (3×).
    Train,
}

impl Pass {
    /// Training FLOPs per forward FLOP.
    pub fn factor(self) -> f64 {
        match self {
            Pass::Inference => 1.0,
            Pass::Backprop => 2.0,
            Pass::Train => TRAINING_FACTOR,
        }
    }
}

/// Walks a model's layers in forward order under a view and says, for each, what autodiff
/// does with it: whether a trainable tensor came before (the layer's input is tracked) and
/// whether the layer's own tensors are trainable. Shared by the FLOP count and the memory
/// estimate so that both draw the frozen-prefix line in the same place.
#[derive(Debug, Clone)]
pub(crate) struct Tracker<'a> {
    view: &'a View,
    /// Whether the activations reaching the current point carry a gradient.
    tracked: bool,
}

impl<'a> Tracker<'a> {
    pub(crate) fn new(view: &'a View) -> Self {
        Self {
            view,
            tracked: false,
        }
    }

    /// Whether the activations after the layers walked so far carry a gradient (autodiff
    /// keeps what the ops producing them need for backward).
    pub(crate) fn tracked(&self) -> bool {
        self.tracked
    }

    /// Whether any tensor of `names` is trainable.
    pub(crate) fn any_trainable(&self, names: &[String]) -> bool {
        names.iter().any(|n| !self.view.is_frozen(n))
    }

    /// A product with weight `weight` (a full tensor name) followed by parameter tensors
    /// `after` (bias, norm affine parameters) that cost no counted FLOPs; moves past it.
    pub(crate) fn product(&mut self, weight: &str, after: &[String]) -> Pass {
        let pass = if !self.view.is_frozen(weight) {
            Pass::Train
        } else if self.tracked {
            Pass::Backprop
        } else {
            Pass::Inference
        };
        self.tracked |= pass == Pass::Train || self.any_trainable(after);
        pass
    }

    /// Parameter tensors without a counted product (norms, class token, positions).
    pub(crate) fn params(&mut self, names: &[String]) {
        self.tracked |= self.any_trainable(names);
    }

    /// A product of two activations (attention scores, weighted sum): both operands need a
    /// gradient once either is tracked.
    pub(crate) fn activation_product(&self) -> Pass {
        if self.tracked {
            Pass::Train
        } else {
            Pass::Inference
        }
    }

    /// Joins a branch walked from the same point (parallel q, k, v projections).
    pub(crate) fn join(&mut self, branch: &Tracker) {
        self.tracked |= branch.tracked;
    }
}

fn conv(cin: usize, cout: usize, k: usize, hout: usize, wout: usize) -> f64 {
    2.0 * (cout * cin * k * k * hout * wout) as f64
}

fn linear(inp: usize, out: usize) -> f64 {
    2.0 * (inp * out) as f64
}

/// `<layer>.<leaf>`.
pub(crate) fn leaf(layer: &str, leaf: &str) -> String {
    format!("{layer}.{leaf}")
}

/// The products of linear layer `name` (`inp → out`), dense or factored, with their passes.
fn dense(
    spec: &ModelSpec,
    tr: &mut Tracker,
    name: &str,
    inp: usize,
    out: usize,
    ops: &mut Vec<(f64, Pass)>,
) {
    let bias = [leaf(name, "bias")];
    match spec.rank_of(name) {
        None => ops.push((linear(inp, out), tr.product(&leaf(name, "weight"), &bias))),
        Some(r) => {
            // x·V, then ·Sᵀ, then ·Uᵀ + b: never the dense W = U S Vᵀ.
            ops.push((linear(inp, r), tr.product(&leaf(name, "V"), &[])));
            ops.push((linear(r, r), tr.product(&leaf(name, "S"), &[])));
            ops.push((linear(r, out), tr.product(&leaf(name, "U"), &bias)));
        }
    }
}

/// Every counted product of one forward pass of one sample under `view`, in forward order,
/// with its FLOPs and what the backward pass does with it.
pub fn products(spec: &ModelSpec, view: &View) -> Vec<(f64, Pass)> {
    let [c, h, w] = spec.input;
    let mut tr = Tracker::new(view);
    let mut ops = Vec::new();
    match &spec.arch {
        Architecture::Cnn => {
            let (c1, c2, f) = (spec.scaled(32), spec.scaled(64), spec.scaled(512));
            for (name, cin, cout, hh, ww) in
                [("conv1", c, c1, h, w), ("conv2", c1, c2, h / 2, w / 2)]
            {
                let pass = tr.product(&leaf(name, "weight"), &[leaf(name, "bias")]);
                ops.push((conv(cin, cout, 5, hh, ww), pass));
            }
            dense(spec, &mut tr, "fc1", c2 * (h / 4) * (w / 4), f, &mut ops);
            dense(spec, &mut tr, "fc2", f, spec.classes, &mut ops);
        }
        Architecture::Mlp { .. } => {
            for (name, inp, out) in spec.linear_layers() {
                dense(spec, &mut tr, &name, inp, out, &mut ops);
            }
        }
        Architecture::Resnet { blocks_per_stage } => {
            let widths = [spec.scaled(16), spec.scaled(32), spec.scaled(64)];
            let norm = |p: &str| [leaf(p, "weight"), leaf(p, "bias")];
            ops.push((
                conv(c, widths[0], 3, h, w),
                tr.product("conv1.weight", &norm("norm1")),
            ));
            let (mut hh, mut ww, mut inp) = (h, w, widths[0]);
            let mut k = 0;
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..*blocks_per_stage {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let (ho, wo) = (hh.div_ceil(stride), ww.div_ceil(stride));
                    // A skipped block is its parameter-free shortcut: no products, and its
                    // tensors take no part in the graph.
                    if view.block_active(k) {
                        let b = format!("blocks.{k}");
                        let p1 =
                            tr.product(&format!("{b}.conv1.weight"), &norm(&format!("{b}.norm1")));
                        ops.push((conv(inp, out, 3, ho, wo), p1));
                        let p2 =
                            tr.product(&format!("{b}.conv2.weight"), &norm(&format!("{b}.norm2")));
                        ops.push((conv(out, out, 3, ho, wo), p2));
                    }
                    (hh, ww, inp) = (ho, wo, out);
                    k += 1;
                }
            }
            dense(spec, &mut tr, "fc", widths[2], spec.classes, &mut ops);
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
            let tf = t as f64;
            let pe = tr.product("patch_embed.weight", &["patch_embed.bias".into()]);
            ops.push((conv(c, d, *patch, h / patch, w / patch), pe));
            tr.params(&["cls_token".into(), "pos_embed".into()]);
            let norm = |p: &str| [leaf(p, "weight"), leaf(p, "bias")];
            let scale = |v: &mut Vec<(f64, Pass)>, from: usize| {
                // The linear layers of a block run once per token.
                v[from..].iter_mut().for_each(|o| o.0 *= tf);
            };
            for k in 0..*depth {
                if !view.block_active(k) {
                    continue;
                }
                let b = format!("blocks.{k}");
                tr.params(&norm(&format!("{b}.norm1")));
                // q, k and v all read the normalised input: each is judged from the same point.
                let start = tr.clone();
                let from = ops.len();
                for p in ["q", "k", "v"] {
                    let mut branch = start.clone();
                    dense(spec, &mut branch, &format!("{b}.attn.{p}"), d, d, &mut ops);
                    tr.join(&branch);
                }
                scale(&mut ops, from);
                // scores and weighted sum
                let pass = tr.activation_product();
                ops.push((2.0 * 2.0 * (t * t * d) as f64, pass));
                let from = ops.len();
                dense(spec, &mut tr, &format!("{b}.attn.proj"), d, d, &mut ops);
                tr.params(&norm(&format!("{b}.norm2")));
                dense(
                    spec,
                    &mut tr,
                    &format!("{b}.fc1"),
                    d,
                    mlp_ratio * d,
                    &mut ops,
                );
                dense(
                    spec,
                    &mut tr,
                    &format!("{b}.fc2"),
                    mlp_ratio * d,
                    d,
                    &mut ops,
                );
                scale(&mut ops, from);
            }
            tr.params(&norm("norm"));
            dense(spec, &mut tr, "head", d, spec.classes, &mut ops);
        }
    }
    ops
}

/// Forward FLOPs of one sample under `view`.
pub fn forward_per_sample(spec: &ModelSpec, view: &View) -> f64 {
    products(spec, view).iter().map(|(f, _)| f).sum()
}

/// Training FLOPs for `samples` samples under `view`: each product's forward FLOPs times its
/// [`Pass::factor`].
pub fn training(spec: &ModelSpec, view: &View, samples: usize) -> f64 {
    let per_sample: f64 = products(spec, view)
        .iter()
        .map(|(f, p)| f * p.factor())
        .sum();
    per_sample * samples as f64
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

    fn mlp_ops(view: &View) -> (Vec<f64>, f64) {
        let spec = ModelSpec::mlp_2nn();
        let f = vec![linear(784, 200), linear(200, 200), linear(200, 10)];
        (f, training(&spec, view, 1))
    }

    fn frozen(names: &[&str]) -> View {
        View {
            active_blocks: None,
            frozen: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn frozen_prefix_costs_one_forward_and_frozen_after_trainable_two() {
        let (f, full) = mlp_ops(&View::full());
        assert_eq!(full, 3.0 * (f[0] + f[1] + f[2]));
        // layer 0 frozen before anything trainable: forward only
        let (_, t) = mlp_ops(&frozen(&["layers.0"]));
        assert_eq!(t, f[0] + 3.0 * (f[1] + f[2]));
        // layer 1 frozen behind trainable layer 0: forward and input gradient
        let (_, t) = mlp_ops(&frozen(&["layers.1"]));
        assert_eq!(t, 3.0 * f[0] + 2.0 * f[1] + 3.0 * f[2]);
        // a frozen weight with a trainable bias: the product needs no input gradient, but the
        // bias makes what follows tracked
        let (_, t) = mlp_ops(&frozen(&["layers.0.weight", "layers.1"]));
        assert_eq!(t, f[0] + 2.0 * f[1] + 3.0 * f[2]);

        // CNN with both convolutions frozen: the trunk runs as inference
        let cnn = ModelSpec::fedavg_cnn();
        let convs = 1_254_400.0 + 20_070_400.0;
        let fcs = 3_211_264.0 + 10_240.0;
        assert_eq!(
            training(&cnn, &frozen(&["conv1", "conv2"]), 2),
            2.0 * (convs + 3.0 * fcs)
        );
        // only the classifier frozen: it still passes the gradient back
        assert_eq!(
            training(&cnn, &frozen(&["fc2"]), 1),
            3.0 * (convs + 3_211_264.0) + 2.0 * 10_240.0
        );
    }

    fn vit(depth: usize) -> ModelSpec {
        ModelSpec {
            arch: Architecture::Vit {
                patch: 7,
                dim: 32,
                depth,
                heads: 4,
                mlp_ratio: 2,
            },
            input: [1, 28, 28],
            classes: 10,
            width: 1.0,
            ranks: Default::default(),
        }
    }

    #[test]
    fn vit_frozen_prefix_blocks_cost_one_forward() {
        let spec = vit(3);
        let ops = |v: &View| products(&spec, v);
        let full = ops(&View::full());
        assert!(full.iter().all(|(_, p)| *p == Pass::Train));
        assert_eq!(
            training(&spec, &View::full(), 1),
            3.0 * forward_per_sample(&spec, &View::full())
        );
        let view = frozen(&["patch_embed", "cls_token", "pos_embed", "blocks.0"]);
        let passes = ops(&view);
        assert_eq!(passes.len(), full.len());
        // patch embedding, then block 0's q, k, v, attention products, proj, fc1, fc2
        let per_block = 7;
        assert!(
            passes[..1 + per_block]
                .iter()
                .all(|(_, p)| *p == Pass::Inference)
        );
        assert!(
            passes[1 + per_block..]
                .iter()
                .all(|(_, p)| *p == Pass::Train)
        );
        let front: f64 = full[..1 + per_block].iter().map(|o| o.0).sum();
        let rest: f64 = full[1 + per_block..].iter().map(|o| o.0).sum();
        assert_eq!(training(&spec, &view, 1), front + 3.0 * rest);
        // the class token alone trainable makes every block after it tracked
        let view = frozen(&["patch_embed", "pos_embed", "blocks"]);
        let passes = ops(&view);
        assert_eq!(passes[0].1, Pass::Inference);
        assert!(
            passes[1..passes.len() - 1]
                .iter()
                .all(|(_, p)| *p != Pass::Inference)
        );
        assert_eq!(
            passes[4].1,
            Pass::Train,
            "attention products need both gradients"
        );
        assert_eq!(passes[1].1, Pass::Backprop);
    }

    #[test]
    fn factored_layers_count_their_factors() {
        let mut spec = ModelSpec::mlp_2nn();
        spec.ranks.insert("layers.0".into(), 8);
        let dense_rest = linear(200, 200) + linear(200, 10);
        let factored = linear(784, 8) + linear(8, 8) + linear(8, 200);
        assert_eq!(
            forward_per_sample(&spec, &View::full()),
            factored + dense_rest
        );
        // FeDLRT's coefficient step: U and V frozen, S trainable. x·V runs before anything
        // trainable (1×), ·Sᵀ trains (3×), ·Uᵀ passes the gradient back (2×).
        let view = frozen(&["layers.0.U", "layers.0.V"]);
        assert_eq!(
            training(&spec, &view, 1),
            linear(784, 8) + 3.0 * linear(8, 8) + 2.0 * linear(8, 200) + 3.0 * dense_rest
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
            ranks: Default::default(),
        };
        let full = forward_per_sample(&spec, &View::full());
        let half = forward_per_sample(&spec, &View::depth_prefix(4, 9));
        let none = forward_per_sample(&spec, &View::depth_prefix(0, 9));
        assert!(none < half && half < full);
        // ResNet-20 on CIFAR is about 41 MMAC = 82 MFLOP forward
        assert!((full / 1e6 - 81.0).abs() < 2.0, "{full}");
    }
}
