//! The four architectures. Field names are PyTorch's state_dict names (see docs/pytorch.md).

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::{Tensor, TensorData};

use crate::layers::{Builder, Conv, Dense, GroupNorm, LayerNorm};
use crate::{Architecture, ModelError, ModelSpec, View};

/// The FedAvg CNN.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv,
    conv2: Conv,
    fc1: Dense,
    fc2: Dense,
}

impl Cnn {
    pub(crate) fn build(spec: &ModelSpec, b: &mut Builder) -> Result<Self, ModelError> {
        let [c, h, w] = spec.input;
        let (c1, c2, f) = (spec.scaled(32), spec.scaled(64), spec.scaled(512));
        Ok(Self {
            conv1: b.conv("conv1", c, c1, 5, 1, 2, true)?,
            conv2: b.conv("conv2", c1, c2, 5, 1, 2, true)?,
            fc1: b.dense("fc1", c2 * (h / 4) * (w / 4), f)?,
            fc2: b.dense("fc2", f, spec.classes)?,
        })
    }

    /// The hidden layer after its ReLU, `[batch, 512·width]`: what `fc2` reads.
    pub(crate) fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.conv1.forward_relu_pool2(x);
        let x = self.conv2.forward_relu_pool2(x);
        let [b, c, h, w] = x.dims();
        relu(self.fc1.forward(x.reshape([b, c * h * w])))
    }

    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc2.forward(self.features(x))
    }
}

/// A ReLU multilayer perceptron on flattened inputs.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Dense>,
}

impl Mlp {
    pub(crate) fn build(
        spec: &ModelSpec,
        hidden: &[usize],
        b: &mut Builder,
    ) -> Result<Self, ModelError> {
        let mut widths = vec![spec.input.iter().product::<usize>()];
        widths.extend(hidden.iter().map(|h| spec.scaled(*h)));
        widths.push(spec.classes);
        let layers = b.scope("layers", |b| {
            widths
                .windows(2)
                .enumerate()
                .map(|(i, w)| b.dense(&i.to_string(), w[0], w[1]))
                .collect()
        })?;
        Ok(Self { layers })
    }

    /// The last hidden layer after its ReLU (the flattened input when there is no hidden
    /// layer): what the output layer reads.
    pub(crate) fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let [b, c, h, w] = x.dims();
        let mut x = x.reshape([b, c * h * w]);
        let last = self.layers.len() - 1;
        for layer in &self.layers[..last] {
            x = relu(layer.forward(x));
        }
        x
    }

    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers[last].forward(self.features(x))
    }
}

/// A basic residual block: conv3×3 → norm → ReLU → conv3×3 → norm, plus shortcut, ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv,
    norm1: GroupNorm,
    conv2: Conv,
    norm2: GroupNorm,
    #[module(skip)]
    in_channels: usize,
    #[module(skip)]
    out_channels: usize,
    #[module(skip)]
    stride: usize,
}

fn group_norm(b: &mut Builder, name: &str, channels: usize) -> Result<GroupNorm, ModelError> {
    let (weight, bias) = b.affine(name, channels)?;
    Ok(GroupNorm {
        weight,
        bias,
        groups: GroupNorm::groups_for(channels),
    })
}

impl BasicBlock {
    fn build(b: &mut Builder, inp: usize, out: usize, stride: usize) -> Result<Self, ModelError> {
        Ok(Self {
            conv1: b.conv("conv1", inp, out, 3, stride, 1, false)?,
            norm1: group_norm(b, "norm1", out)?,
            conv2: b.conv("conv2", out, out, 3, 1, 1, false)?,
            norm2: group_norm(b, "norm2", out)?,
            in_channels: inp,
            out_channels: out,
            stride,
        })
    }

    /// The parameter-free option-A shortcut: stride subsampling and zero channel padding.
    fn shortcut(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = x;
        if self.stride == 2 {
            let [b, c, h, w] = x.dims();
            let device = x.device();
            // Pad odd sides with one zero row/column so the reshape below takes x[::2, ::2].
            if h % 2 == 1 {
                x = Tensor::cat(vec![x, Tensor::zeros([b, c, 1, w], &device)], 2);
            }
            let hp = h.div_ceil(2) * 2;
            if w % 2 == 1 {
                x = Tensor::cat(vec![x, Tensor::zeros([b, c, hp, 1], &device)], 3);
            }
            let wp = w.div_ceil(2) * 2;
            x = x
                .reshape([b, c, hp / 2, 2, wp / 2, 2])
                .narrow(3, 0, 1)
                .narrow(5, 0, 1)
                .reshape([b, c, hp / 2, wp / 2]);
        }
        if self.out_channels > self.in_channels {
            let [b, _, h, w] = x.dims();
            let extra = self.out_channels - self.in_channels;
            let lo = extra / 2;
            let device = x.device();
            let mut parts = Vec::with_capacity(3);
            if lo > 0 {
                parts.push(Tensor::zeros([b, lo, h, w], &device));
            }
            parts.push(x);
            parts.push(Tensor::zeros([b, extra - lo, h, w], &device));
            x = Tensor::cat(parts, 1);
        }
        x
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let short = self.shortcut(x.clone());
        let y = relu(self.norm1.forward(self.conv1.forward(x)));
        let y = self.norm2.forward(self.conv2.forward(y));
        relu(y + short)
    }
}

/// CIFAR-style ResNet-(6n+2) with individually skippable blocks.
#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv,
    norm1: GroupNorm,
    blocks: Vec<BasicBlock>,
    fc: Dense,
}

impl ResNet {
    pub(crate) fn build(spec: &ModelSpec, n: usize, b: &mut Builder) -> Result<Self, ModelError> {
        let widths = [spec.scaled(16), spec.scaled(32), spec.scaled(64)];
        let conv1 = b.conv("conv1", spec.input[0], widths[0], 3, 1, 1, false)?;
        let norm1 = group_norm(b, "norm1", widths[0])?;
        let blocks = b.scope("blocks", |b| {
            let mut blocks = Vec::with_capacity(3 * n);
            let mut inp = widths[0];
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..n {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let k = blocks.len();
                    blocks.push(b.scope(k, |b| BasicBlock::build(b, inp, out, stride))?);
                    inp = out;
                }
            }
            Ok(blocks)
        })?;
        let fc = b.dense("fc", widths[2], spec.classes)?;
        Ok(Self {
            conv1,
            norm1,
            blocks,
            fc,
        })
    }

    /// The globally average-pooled output of the last stage, `[batch, 64·width]`: what `fc`
    /// reads.
    pub(crate) fn features(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        let mut x = relu(self.norm1.forward(self.conv1.forward(x)));
        for (k, block) in self.blocks.iter().enumerate() {
            x = if view.block_active(k) {
                block.forward(x)
            } else {
                block.shortcut(x)
            };
        }
        Self::pool(x)
    }

    pub(crate) fn forward(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        self.fc.forward(self.features(x, view))
    }

    fn pool(x: Tensor<4>) -> Tensor<2> {
        let [b, c, h, w] = x.dims();
        x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
    }

    fn head(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc.forward(Self::pool(x))
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Logits of the depth-`d` prefix for every `d` of `depths` (ascending, at most the
    /// number of blocks), computed on one shared trunk: the prefix of depth `d` is the trunk
    /// after block `d`, then the shortcuts of the deeper blocks, the pooling and the classifier.
    pub(crate) fn forward_depths(&self, x: Tensor<4>, depths: &[usize]) -> Vec<Tensor<2>> {
        let mut x = relu(self.norm1.forward(self.conv1.forward(x)));
        let mut out = Vec::with_capacity(depths.len());
        let mut next = depths.iter().peekable();
        for k in 0..=self.blocks.len() {
            while next.next_if(|&&d| d == k).is_some() {
                let mut y = x.clone();
                for block in &self.blocks[k..] {
                    y = block.shortcut(y);
                }
                out.push(self.head(y));
            }
            if k < self.blocks.len() && next.peek().is_some() {
                x = self.blocks[k].forward(x);
            }
        }
        out
    }
}

/// Multi-head self-attention with separate q, k, v projections.
#[derive(Module, Debug)]
pub struct Attention {
    q: Dense,
    k: Dense,
    v: Dense,
    proj: Dense,
    #[module(skip)]
    heads: usize,
}

impl Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let h = self.heads;
        let dh = d / h;
        let split = |t: Tensor<3>| t.reshape([b, n, h, dh]).swap_dims(1, 2);
        let q = split(self.q.forward(x.clone()));
        let k = split(self.k.forward(x.clone()));
        let v = split(self.v.forward(x));
        let scores = q.matmul(k.swap_dims(2, 3)) / (dh as f32).sqrt();
        let out = softmax(scores, 3).matmul(v);
        self.proj.forward(out.swap_dims(1, 2).reshape([b, n, d]))
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
pub struct VitBlock {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
}

impl VitBlock {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x));
        let y = self
            .fc2
            .forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + y
    }
}

/// A small isotropic vision transformer with individually skippable blocks.
#[derive(Module, Debug)]
pub struct Vit {
    patch_embed: Conv,
    cls_token: Param<Tensor<3>>,
    pos_embed: Param<Tensor<3>>,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    head: Dense,
}

fn layer_norm(b: &mut Builder, name: &str, d: usize) -> Result<LayerNorm, ModelError> {
    let (weight, bias) = b.affine(name, d)?;
    Ok(LayerNorm { weight, bias })
}

impl Vit {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        spec: &ModelSpec,
        patch: usize,
        dim: usize,
        depth: usize,
        heads: usize,
        mlp_ratio: usize,
        b: &mut Builder,
    ) -> Result<Self, ModelError> {
        let d = spec.scaled(dim);
        let [c, h, w] = spec.input;
        let tokens = (h / patch) * (w / patch) + 1;
        let patch_embed = b.conv("patch_embed", c, d, patch, patch, 0, true)?;
        let cls_token = b.normal("cls_token", [1, 1, d], 0.02)?;
        let pos_embed = b.normal("pos_embed", [1, tokens, d], 0.02)?;
        let blocks = b.scope("blocks", |b| {
            (0..depth)
                .map(|i| {
                    b.scope(i, |b| {
                        let norm1 = layer_norm(b, "norm1", d)?;
                        let attn = b.scope("attn", |b| {
                            Ok(Attention {
                                q: b.dense("q", d, d)?,
                                k: b.dense("k", d, d)?,
                                v: b.dense("v", d, d)?,
                                proj: b.dense("proj", d, d)?,
                                heads,
                            })
                        })?;
                        let norm2 = layer_norm(b, "norm2", d)?;
                        let fc1 = b.dense("fc1", d, mlp_ratio * d)?;
                        let fc2 = b.dense("fc2", mlp_ratio * d, d)?;
                        Ok(VitBlock {
                            norm1,
                            attn,
                            norm2,
                            fc1,
                            fc2,
                        })
                    })
                })
                .collect()
        })?;
        let norm = layer_norm(b, "norm", d)?;
        let head = b.dense("head", d, spec.classes)?;
        Ok(Self {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            head,
        })
    }

    /// The class token after the final LayerNorm, `[batch, dim·width]`: what `head` reads.
    pub(crate) fn features(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        let mut x = self.embed(x);
        for (k, block) in self.blocks.iter().enumerate() {
            if view.block_active(k) {
                x = block.forward(x);
            }
        }
        self.class_token(x)
    }

    pub(crate) fn forward(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        self.head.forward(self.features(x, view))
    }

    fn class_token(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = x.dims();
        self.norm.forward(x).narrow(1, 0, 1).reshape([b, d])
    }

    fn classify(&self, x: Tensor<3>) -> Tensor<2> {
        self.head.forward(self.class_token(x))
    }

    fn embed(&self, x: Tensor<4>) -> Tensor<3> {
        let p = self.patch_embed.forward(x);
        let [b, d, gh, gw] = p.dims();
        let tokens = p.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = self.cls_token.val().repeat_dim(0, b);
        Tensor::cat(vec![cls, tokens], 1) + self.pos_embed.val()
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Logits of the depth-`d` prefix for every `d` of `depths` (ascending), on one shared
    /// trunk: skipped transformer blocks are the identity.
    pub(crate) fn forward_depths(&self, x: Tensor<4>, depths: &[usize]) -> Vec<Tensor<2>> {
        let mut x = self.embed(x);
        let mut out = Vec::with_capacity(depths.len());
        let mut next = depths.iter().peekable();
        for k in 0..=self.blocks.len() {
            while next.next_if(|&&d| d == k).is_some() {
                out.push(self.classify(x.clone()));
            }
            if k < self.blocks.len() && next.peek().is_some() {
                x = self.blocks[k].forward(x);
            }
        }
        out
    }
}

/// Builds the architecture of `spec`.
pub(crate) fn build_arch(spec: &ModelSpec, b: &mut Builder) -> Result<crate::Net, ModelError> {
    b.set_ranks(&spec.ranks);
    Ok(match &spec.arch {
        Architecture::Cnn => crate::Net::Cnn(Cnn::build(spec, b)?),
        Architecture::Mlp { hidden } => crate::Net::Mlp(Mlp::build(spec, hidden, b)?),
        Architecture::Resnet { blocks_per_stage } => {
            crate::Net::ResNet(ResNet::build(spec, *blocks_per_stage, b)?)
        }
        Architecture::Vit {
            patch,
            dim,
            depth,
            heads,
            mlp_ratio,
        } => crate::Net::Vit(Vit::build(
            spec, *patch, *dim, *depth, *heads, *mlp_ratio, b,
        )?),
    })
}

/// Input tensor from normalised pixels `[batch, C, H, W]`.
pub(crate) fn input_tensor(
    pixels: Vec<f32>,
    batch: usize,
    shape: [usize; 3],
    device: &burn::tensor::Device,
) -> Tensor<4> {
    Tensor::from_data(
        TensorData::new(pixels, [batch, shape[0], shape[1], shape[2]]),
        device,
    )
}
