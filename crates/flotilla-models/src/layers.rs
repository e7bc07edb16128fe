//! Layers holding burn parameters directly, so that names and layouts are ours to choose
//! (PyTorch's), and a builder that creates them from a seeded init or from a ParamSet.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_core::ParamSet;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::ModelError;

/// Where parameter values come from while building a model.
pub(crate) enum Source<'a> {
    /// PyTorch's default initialisation, drawn from a seeded generator.
    Init(Box<ChaCha8Rng>),
    /// Values of an existing collection (PyTorch layouts), looked up by name.
    Params(&'a ParamSet),
}

/// Builds layers in a fixed order under a name prefix.
pub(crate) struct Builder<'a> {
    source: Source<'a>,
    device: Device,
    prefix: Vec<String>,
    /// Names consumed from a `Source::Params`, to detect unused tensors.
    pub(crate) used: usize,
    /// Linear layers built in factored form, by full name → rank (`ModelSpec::ranks`).
    ranks: BTreeMap<String, usize>,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(source: Source<'a>, device: &Device) -> Self {
        Self {
            source,
            device: device.clone(),
            prefix: Vec::new(),
            used: 0,
            ranks: BTreeMap::new(),
        }
    }

    /// Builds the linear layers named in `ranks` in factored form.
    pub(crate) fn set_ranks(&mut self, ranks: &BTreeMap<String, usize>) {
        self.ranks = ranks.clone();
    }

    /// Runs `f` with `name` pushed on the prefix.
    pub(crate) fn scope<T>(
        &mut self,
        name: impl ToString,
        f: impl FnOnce(&mut Self) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        self.prefix.push(name.to_string());
        let out = f(self);
        self.prefix.pop();
        out
    }

    fn full_name(&self, leaf: &str) -> String {
        let mut parts = self.prefix.clone();
        parts.push(leaf.to_string());
        parts.join(".")
    }

    /// A parameter in PyTorch layout `shape`; `init` draws its initial values.
    /// `transpose2d` stores a 2-D tensor transposed (burn's linear layout is `[in, out]`).
    fn param<const D: usize>(
        &mut self,
        leaf: &str,
        shape: [usize; D],
        transpose2d: bool,
        init: impl FnOnce(&mut ChaCha8Rng, usize) -> Vec<f32>,
    ) -> Result<Param<Tensor<D>>, ModelError> {
        let name = self.full_name(leaf);
        let n: usize = shape.iter().product();
        let data = match &mut self.source {
            Source::Init(rng) => init(rng.as_mut(), n),
            Source::Params(p) => {
                let t = p
                    .get(&name)
                    .ok_or_else(|| ModelError::Params(format!("tensor `{name}` is missing")))?;
                if t.shape != shape {
                    return Err(ModelError::Params(format!(
                        "tensor `{name}` has shape {:?}, the model needs {:?}",
                        t.shape, shape
                    )));
                }
                self.used += 1;
                t.data.clone()
            }
        };
        let (data, stored) = if transpose2d && D == 2 {
            let (r, c) = (shape[0], shape[1]);
            let mut out = vec![0f32; n];
            for i in 0..r {
                for j in 0..c {
                    out[j * r + i] = data[i * c + j];
                }
            }
            let mut s = shape;
            s.swap(0, 1);
            (out, s)
        } else {
            (data, shape)
        };
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(data, stored),
            &self.device,
        )))
    }

    fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
    }

    /// A linear layer `in → out` with PyTorch's default init U(±1/√in); factored when the
    /// rank map names it.
    ///
    /// A factored layer starts from the same seeded dense draw as the dense layer (so every
    /// other tensor of the model keeps its initial values) and keeps its truncated SVD: U and
    /// V hold the leading singular vectors (orthonormal columns, as FeDLRT's shared bases
    /// need) and S the leading singular values on its diagonal, so U S Vᵀ is the best rank-r
    /// approximation of the dense initialisation (Eckart–Young).
    pub(crate) fn dense(
        &mut self,
        name: &str,
        inp: usize,
        out: usize,
    ) -> Result<Dense, ModelError> {
        let rank = self.ranks.get(&self.full_name(name)).copied();
        self.scope(name, |b| {
            let bound = 1.0 / (inp as f32).sqrt();
            let layer = match rank {
                None => Dense::Full(FullDense {
                    weight: b.param("weight", [out, inp], true, |r, n| {
                        Self::uniform(r, n, bound)
                    })?,
                    bias: b.param("bias", [out], false, |r, n| Self::uniform(r, n, bound))?,
                }),
                Some(r) => {
                    let init = match &mut b.source {
                        Source::Init(rng) => Some(crate::factored::truncated_svd(
                            &Self::uniform(rng, out * inp, bound),
                            [out, inp],
                            r,
                        )),
                        Source::Params(_) => None,
                    };
                    let (u, s, v) = init.unwrap_or_default();
                    Dense::Factored(Factored {
                        U: b.param("U", [out, r], true, |_, _| u)?,
                        S: b.param("S", [r, r], true, |_, _| s)?,
                        V: b.param("V", [inp, r], true, |_, _| v)?,
                        bias: b.param("bias", [out], false, |r, n| Self::uniform(r, n, bound))?,
                    })
                }
            };
            Ok(layer)
        })
    }

    /// A square convolution with PyTorch's default init U(±1/√fan_in).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv(
        &mut self,
        name: &str,
        inp: usize,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Conv, ModelError> {
        self.scope(name, |b| {
            let bound = 1.0 / ((inp * kernel * kernel) as f32).sqrt();
            let weight = b.param("weight", [out, inp, kernel, kernel], false, |r, n| {
                Self::uniform(r, n, bound)
            })?;
            let bias = if bias {
                Some(b.param("bias", [out], false, |r, n| Self::uniform(r, n, bound))?)
            } else {
                None
            };
            Ok(Conv {
                weight,
                bias,
                stride,
                padding,
            })
        })
    }

    /// A normalisation's affine parameters (weight 1, bias 0).
    pub(crate) fn affine(
        &mut self,
        name: &str,
        channels: usize,
    ) -> Result<(Param<Tensor<1>>, Param<Tensor<1>>), ModelError> {
        self.scope(name, |b| {
            let w = b.param("weight", [channels], false, |_, n| vec![1.0; n])?;
            let bias = b.param("bias", [channels], false, |_, n| vec![0.0; n])?;
            Ok((w, bias))
        })
    }

    /// A free tensor drawn from N(0, std²) (ViT class token and positions).
    pub(crate) fn normal<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        std: f32,
    ) -> Result<Param<Tensor<D>>, ModelError> {
        self.param(name, shape, false, |r, n| {
            let d = Normal::new(0.0, std).expect("positive std");
            (0..n).map(|_| d.sample(r)).collect()
        })
    }
}

/// A fully connected layer, dense or factored. The variant is not part of tensor names.
#[derive(Module, Debug)]
pub enum Dense {
    /// One weight matrix.
    Full(FullDense),
    /// W = U S Vᵀ (FeDLRT's low-rank layer).
    Factored(Factored),
}

/// Dense weight stored `[in, out]` (exported as PyTorch's `[out, in]`).
#[derive(Module, Debug)]
pub struct FullDense {
    pub(crate) weight: Param<Tensor<2>>,
    pub(crate) bias: Param<Tensor<1>>,
}

pub use factors::Factored;

// The field names are the tensor names (`<layer>.U`, `.S`, `.V`), hence upper case; the
// module scopes the lint's exception to them and to the code derived from them.
#[allow(non_snake_case)]
mod factors {
    use burn::module::{Module, Param};
    use burn::tensor::Tensor;

    /// Factors of W = U S Vᵀ. Like every matrix here each is stored transposed and exported
    /// in PyTorch's layout: `U` `[out, r]` is stored `[r, out]`, `S` `[r, r]` as Sᵀ, `V`
    /// `[in, r]` as `[r, in]`.
    #[derive(Module, Debug)]
    pub struct Factored {
        pub(crate) U: Param<Tensor<2>>,
        pub(crate) S: Param<Tensor<2>>,
        pub(crate) V: Param<Tensor<2>>,
        pub(crate) bias: Param<Tensor<1>>,
    }
}

impl Dense {
    pub(crate) fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // Leading dimensions (batch, tokens) flatten into the rows of one product.
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let x = x.reshape([rows, dims[D - 1]]);
        let y = match self {
            Dense::Full(l) => crate::kernels::linear(x, l.weight.val(), l.bias.val()),
            // y = x V Sᵀ Uᵀ + b, right to left through the thin factors: O(r·(in + r + out))
            // per row instead of O(in·out), and no dense W.
            Dense::Factored(l) => {
                let h = x.matmul(l.V.val().transpose()).matmul(l.S.val());
                crate::kernels::linear(h, l.U.val(), l.bias.val())
            }
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }
}

/// 2-D convolution with square kernels, PyTorch layout `[out, in, k, k]`.
#[derive(Module, Debug)]
pub struct Conv {
    pub(crate) weight: Param<Tensor<4>>,
    pub(crate) bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub(crate) stride: usize,
    #[module(skip)]
    pub(crate) padding: usize,
}

impl Conv {
    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        crate::kernels::conv2d(
            x,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            self.stride,
            self.padding,
        )
    }

    /// `max_pool2(relu(self.forward(x)))`, fused into one op when the layer has a bias.
    pub(crate) fn forward_relu_pool2(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.bias {
            Some(b) => crate::kernels::conv_relu_pool2(
                x,
                self.weight.val(),
                b.val(),
                self.stride,
                self.padding,
            ),
            None => crate::kernels::relu_max_pool2(self.forward(x)),
        }
    }
}

/// Group normalisation over `[B, C, H, W]`.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub(crate) weight: Param<Tensor<1>>,
    pub(crate) bias: Param<Tensor<1>>,
    #[module(skip)]
    pub(crate) groups: usize,
}

impl GroupNorm {
    /// Largest of 8, 4, 2, 1 groups that divides the channels.
    pub(crate) fn groups_for(channels: usize) -> usize {
        [8, 4, 2, 1]
            .into_iter()
            .find(|g| channels.is_multiple_of(*g))
            .unwrap_or(1)
    }

    pub(crate) fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let g = self.groups;
        let xg = x.reshape([b, g, (c / g) * h * w]);
        let mean = xg.clone().mean_dim(2);
        let centered = xg - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = (centered / (var + 1e-5).sqrt()).reshape([b, c, h, w]);
        let scale = self.weight.val().reshape([1, c, 1, 1]);
        let shift = self.bias.val().reshape([1, c, 1, 1]);
        normed * scale + shift
    }
}

/// Layer normalisation over the last dimension of `[B, N, D]`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub(crate) weight: Param<Tensor<1>>,
    pub(crate) bias: Param<Tensor<1>>,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = centered / (var + 1e-5).sqrt();
        normed * self.weight.val().reshape([1, 1, d]) + self.bias.val().reshape([1, 1, d])
    }
}
