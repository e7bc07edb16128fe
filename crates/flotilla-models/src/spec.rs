//! Model specifications and views.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Errors building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The specification is not buildable.
    #[error("model spec: {0}")]
    Spec(String),
    /// Parameters do not fit the model.
    #[error("model parameters: {0}")]
    Params(String),
    /// A view does not fit the model.
    #[error("model view: {0}")]
    View(String),
}

/// Which architecture, with its own depth knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Architecture {
    /// The CNN of McMahan et al. (FedAvg): conv 5×5×32 'same', ReLU, maxpool 2, conv 5×5×64
    /// 'same', ReLU, maxpool 2, fc → 512, ReLU, fc → classes.
    Cnn,
    /// A multilayer perceptron with ReLU; the 2NN of FedAvg is `hidden = [200, 200]`.
    Mlp {
        /// Hidden layer widths (before the width multiplier).
        #[serde(default = "default_mlp_hidden")]
        hidden: Vec<usize>,
    },
    /// CIFAR-style ResNet (He et al. 2016, §4.2): a 3×3 stem, three stages of
    /// `blocks_per_stage` basic blocks with 16, 32, 64 channels (× width), global average
    /// pooling and a linear classifier; depth 6n+2 (n = 1: ResNet-8, 3: ResNet-20, 9: ResNet-56).
    /// Shape-changing blocks use the parameter-free option-A shortcut (stride-2 subsampling and
    /// zero channel padding), so every block can be skipped. GroupNorm replaces BatchNorm:
    /// no running statistics to average or to corrupt with non-IID clients (Hsieh et al. 2020).
    Resnet {
        /// Basic blocks per stage (n).
        blocks_per_stage: usize,
    },
    /// A small isotropic vision transformer: patch embedding, class token, learned positions,
    /// `depth` pre-norm blocks (multi-head attention + GELU MLP), final LayerNorm, linear head.
    Vit {
        /// Patch side in pixels; must divide the image side.
        patch: usize,
        /// Token width (before the width multiplier).
        dim: usize,
        /// Number of transformer blocks.
        depth: usize,
        /// Attention heads; must divide the width.
        heads: usize,
        /// MLP hidden width as a multiple of `dim`.
        #[serde(default = "default_mlp_ratio")]
        mlp_ratio: usize,
    },
}

fn default_mlp_hidden() -> Vec<usize> {
    vec![200, 200]
}

fn default_mlp_ratio() -> usize {
    2
}

fn default_width() -> f64 {
    1.0
}

/// A buildable model: architecture, input shape, classes and width multiplier.
/// (No `deny_unknown_fields` here: serde cannot combine it with the flattened architecture.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture and its depth knobs.
    #[serde(flatten)]
    pub arch: Architecture,
    /// Input shape `[channels, height, width]`.
    pub input: [usize; 3],
    /// Number of output classes.
    pub classes: usize,
    /// Width multiplier for hidden channels/units (HeteroFL-style width reduction): each hidden
    /// layer keeps ⌈width·C⌉ units; input channels and classes are unchanged.
    #[serde(default = "default_width")]
    pub width: f64,
    /// Linear layers held in factored form (FeDLRT), by layer name (see
    /// [`ModelSpec::linear_layers`]) → rank r. Such a layer's weight W = U S Vᵀ travels as
    /// `<name>.U` `[out, r]`, `<name>.S` `[r, r]` and `<name>.V` `[in, r]` (its bias stays
    /// `<name>.bias`), and its forward pass never forms W. Empty (the default) = every layer
    /// dense; an empty map is not serialised, so specs without ranks keep their bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranks: BTreeMap<String, usize>,
}

impl ModelSpec {
    /// The W1 model: the FedAvg CNN for 28×28 grey images and 10 classes.
    pub fn fedavg_cnn() -> Self {
        Self {
            arch: Architecture::Cnn,
            input: [1, 28, 28],
            classes: 10,
            width: 1.0,
            ranks: BTreeMap::new(),
        }
    }

    /// The W2 model: the 2NN MLP (784→200→200→10).
    pub fn mlp_2nn() -> Self {
        Self {
            arch: Architecture::Mlp {
                hidden: vec![200, 200],
            },
            input: [1, 28, 28],
            classes: 10,
            width: 1.0,
            ranks: BTreeMap::new(),
        }
    }

    /// A hidden width after the multiplier.
    pub fn scaled(&self, units: usize) -> usize {
        ((units as f64 * self.width).ceil() as usize).max(1)
    }

    /// The block a tensor belongs to (`blocks.<i>.…`), or `None` for the stem, classifier
    /// and other shared tensors.
    pub fn block_of(name: &str) -> Option<usize> {
        name.strip_prefix("blocks.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// Whether a tensor belongs to the depth-`depth` prefix: the stem, blocks `0..depth` or
    /// the classifier.
    pub fn in_prefix(name: &str, depth: usize) -> bool {
        Self::block_of(name).is_none_or(|b| b < depth)
    }

    /// Number of skippable blocks (0 for models without residual blocks).
    pub fn num_blocks(&self) -> usize {
        match &self.arch {
            Architecture::Resnet { blocks_per_stage } => 3 * blocks_per_stage,
            Architecture::Vit { depth, .. } => *depth,
            _ => 0,
        }
    }

    /// The linear layers, as `(name, in, out)` in forward order: the layers a rank in
    /// [`ModelSpec::ranks`] may factor. CNN: `fc1`, `fc2`; MLP: `layers.<i>`; ResNet: `fc`;
    /// ViT: `blocks.<k>.attn.{q,k,v,proj}`, `blocks.<k>.fc1`, `blocks.<k>.fc2`, `head`.
    /// Convolutions are not listed: they stay dense.
    pub fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        let [c, h, w] = self.input;
        match &self.arch {
            Architecture::Cnn => {
                let (c2, f) = (self.scaled(64), self.scaled(512));
                vec![
                    ("fc1".into(), c2 * (h / 4) * (w / 4), f),
                    ("fc2".into(), f, self.classes),
                ]
            }
            Architecture::Mlp { hidden } => {
                let mut widths = vec![c * h * w];
                widths.extend(hidden.iter().map(|x| self.scaled(*x)));
                widths.push(self.classes);
                widths
                    .windows(2)
                    .enumerate()
                    .map(|(i, p)| (format!("layers.{i}"), p[0], p[1]))
                    .collect()
            }
            Architecture::Resnet { .. } => vec![("fc".into(), self.scaled(64), self.classes)],
            Architecture::Vit {
                dim,
                depth,
                mlp_ratio,
                ..
            } => {
                let d = self.scaled(*dim);
                let mut out = Vec::with_capacity(6 * depth + 1);
                for k in 0..*depth {
                    for p in ["q", "k", "v", "proj"] {
                        out.push((format!("blocks.{k}.attn.{p}"), d, d));
                    }
                    out.push((format!("blocks.{k}.fc1"), d, mlp_ratio * d));
                    out.push((format!("blocks.{k}.fc2"), mlp_ratio * d, d));
                }
                out.push(("head".into(), d, self.classes));
                out
            }
        }
    }

    /// The rank of linear layer `name` when [`ModelSpec::ranks`] factors it.
    pub fn rank_of(&self, name: &str) -> Option<usize> {
        self.ranks.get(name).copied()
    }

    /// Width of [`crate::Net::features`]: the input width of the classifier.
    pub fn feature_dim(&self) -> usize {
        let [c, h, w] = self.input;
        match &self.arch {
            Architecture::Cnn => self.scaled(512),
            Architecture::Mlp { hidden } => hidden.last().map_or(c * h * w, |x| self.scaled(*x)),
            Architecture::Resnet { .. } => self.scaled(64),
            Architecture::Vit { dim, .. } => self.scaled(*dim),
        }
    }

    /// Checks that the spec can be built; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ModelError> {
        let [c, h, w] = self.input;
        if c == 0 || h == 0 || w == 0 {
            return Err(ModelError::Spec(format!(
                "`input` must have positive dimensions, got {:?}",
                self.input
            )));
        }
        if self.classes < 2 {
            return Err(ModelError::Spec(format!(
                "`classes` must be at least 2, got {}",
                self.classes
            )));
        }
        if !(self.width.is_finite() && self.width > 0.0 && self.width <= 8.0) {
            return Err(ModelError::Spec(format!(
                "`width` must be in (0, 8], got {}",
                self.width
            )));
        }
        match &self.arch {
            Architecture::Cnn => {
                if h < 4 || w < 4 {
                    return Err(ModelError::Spec(format!(
                        "the CNN needs images of at least 4×4, got {h}×{w}"
                    )));
                }
            }
            Architecture::Mlp { hidden } => {
                if hidden.contains(&0) {
                    return Err(ModelError::Spec("`hidden` widths must be positive".into()));
                }
            }
            Architecture::Resnet { blocks_per_stage } => {
                if *blocks_per_stage == 0 || *blocks_per_stage > 64 {
                    return Err(ModelError::Spec(format!(
                        "`blocks_per_stage` must be in 1..=64 (1: ResNet-8, 3: ResNet-20, 9: ResNet-56), got {blocks_per_stage}"
                    )));
                }
                if h < 4 || w < 4 {
                    return Err(ModelError::Spec(format!(
                        "the ResNet needs images of at least 4×4, got {h}×{w}"
                    )));
                }
            }
            Architecture::Vit {
                patch,
                dim,
                depth,
                heads,
                mlp_ratio,
            } => {
                if *patch == 0 || h % patch != 0 || w % patch != 0 {
                    return Err(ModelError::Spec(format!(
                        "`patch` must divide the image size {h}×{w}, got {patch}"
                    )));
                }
                if *depth == 0 || *heads == 0 || *mlp_ratio == 0 || *dim == 0 {
                    return Err(ModelError::Spec(
                        "`dim`, `depth`, `heads` and `mlp_ratio` must be positive".into(),
                    ));
                }
                let d = self.scaled(*dim);
                if !d.is_multiple_of(*heads) {
                    return Err(ModelError::Spec(format!(
                        "`heads` ({heads}) must divide the width ({d} after the width multiplier)"
                    )));
                }
            }
        }
        self.validate_ranks()
    }

    fn validate_ranks(&self) -> Result<(), ModelError> {
        if self.ranks.is_empty() {
            return Ok(());
        }
        let layers = self.linear_layers();
        for (name, &r) in &self.ranks {
            let Some((_, inp, out)) = layers.iter().find(|(n, _, _)| n == name) else {
                let known: Vec<&str> = layers.iter().take(8).map(|(n, _, _)| n.as_str()).collect();
                return Err(ModelError::Spec(format!(
                    "`ranks.{name}`: the model has no linear layer `{name}` (its linear layers: {}{})",
                    known.join(", "),
                    if layers.len() > known.len() {
                        ", …"
                    } else {
                        ""
                    }
                )));
            };
            let max = (*inp).min(*out);
            if r == 0 || r > max {
                return Err(ModelError::Spec(format!(
                    "`ranks.{name}` must be in 1..={max} (min(in, out) of a {inp} → {out} layer), got {r}"
                )));
            }
        }
        Ok(())
    }
}

/// What a client runs and trains of a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct View {
    /// Per-block activity for ResNet/ViT; `None` = all blocks active. A skipped block passes
    /// its input through its shortcut (identity, or option A for shape-changing blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_blocks: Option<Vec<bool>>,
    /// Name prefixes of frozen tensors: no gradients, no optimizer state, never updated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
}

impl View {
    /// The full model, everything trainable.
    pub fn full() -> Self {
        Self::default()
    }

    /// The first `k` of `total` blocks active, deeper blocks skipped.
    pub fn depth_prefix(k: usize, total: usize) -> Self {
        Self {
            active_blocks: Some((0..total).map(|i| i < k).collect()),
            frozen: Vec::new(),
        }
    }

    /// The first `k` of `total` blocks active and trainable; deeper blocks are skipped and
    /// frozen, so they get no gradients or optimizer state (a FlexTrain device's view).
    pub fn trainable_prefix(k: usize, total: usize) -> Self {
        Self {
            active_blocks: Some((0..total).map(|i| i < k).collect()),
            frozen: (k..total).map(|i| format!("blocks.{i}")).collect(),
        }
    }

    /// The depth `k` when the active blocks are exactly the first `k` (all blocks when no
    /// selection is set: `total`); `None` for any other pattern.
    pub fn prefix_depth(&self, total: usize) -> Option<usize> {
        match &self.active_blocks {
            None => Some(total),
            Some(a) => {
                let k = a.iter().take_while(|x| **x).count();
                (a.len() == total && a[k..].iter().all(|x| !*x)).then_some(k)
            }
        }
    }

    /// Whether block `i` runs.
    pub fn block_active(&self, i: usize) -> bool {
        self.active_blocks
            .as_ref()
            .is_none_or(|a| a.get(i).copied().unwrap_or(true))
    }

    /// Whether the tensor `name` is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen
            .iter()
            .any(|p| name == p || name.starts_with(&format!("{p}.")))
    }

    /// Checks the view against a spec.
    pub fn validate(&self, spec: &ModelSpec) -> Result<(), ModelError> {
        if let Some(a) = &self.active_blocks
            && a.len() != spec.num_blocks()
        {
            return Err(ModelError::View(format!(
                "`active_blocks` lists {} blocks but the model has {}",
                a.len(),
                spec.num_blocks()
            )));
        }
        Ok(())
    }
}
