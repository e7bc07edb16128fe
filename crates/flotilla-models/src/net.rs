//! The built model, its forward pass under a view, and parameter export/import.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use flotilla_core::{ParamSet, Tensor as NamedTensor, seed};

use crate::arch::{Cnn, Mlp, ResNet, Vit, build_arch, input_tensor};
use crate::layers::{Builder, Source};
use crate::{ModelError, ModelSpec, View};

/// The device for inference: burn's pure-Rust `flex` CPU backend.
pub fn compute_device() -> Device {
    Device::flex()
}

/// The device for training: `flex` with autodiff.
pub fn training_device() -> Device {
    Device::flex().autodiff()
}

/// A built model of one of the four architectures.
#[derive(Module, Debug)]
pub enum Net {
    /// FedAvg CNN.
    Cnn(Cnn),
    /// Multilayer perceptron.
    Mlp(Mlp),
    /// CIFAR-style ResNet.
    ResNet(ResNet),
    /// Isotropic ViT.
    Vit(Vit),
}

impl Net {
    /// Initial parameters of `spec` (PyTorch's default initialisation), drawn from `seed`.
    pub fn init_params(spec: &ModelSpec, run_seed: u64) -> Result<ParamSet, ModelError> {
        spec.validate()?;
        let rng = seed::rng(run_seed, 0, 0, seed::Purpose::Init);
        // Built on the plain device: only the exported values are needed.
        let net = {
            let mut b = Builder::new(Source::Init(Box::new(rng)), &compute_device());
            build_arch(spec, &mut b)?
        };
        Ok(net.export())
    }

    /// Builds `spec` on `device` with the given parameters (PyTorch names and layouts).
    /// Every tensor of the model must be present with the right shape, and no other.
    pub fn from_params(
        spec: &ModelSpec,
        params: &ParamSet,
        device: &Device,
    ) -> Result<Self, ModelError> {
        spec.validate()?;
        let mut b = Builder::new(Source::Params(params), device);
        let net = build_arch(spec, &mut b)?;
        if b.used != params.len() {
            let expected: std::collections::HashSet<String> =
                net.export_names().into_iter().collect();
            let extra: Vec<&str> = params
                .names()
                .filter(|n| !expected.contains(*n))
                .take(5)
                .collect();
            return Err(ModelError::Params(format!(
                "{} tensors are not part of this model, e.g. {:?}",
                params.len() - b.used,
                extra
            )));
        }
        Ok(net)
    }

    /// Logits `[batch, classes]` for normalised pixels under `view`.
    pub fn forward(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        match self {
            Net::Cnn(m) => m.forward(x),
            Net::Mlp(m) => m.forward(x),
            Net::ResNet(m) => m.forward(x, view),
            Net::Vit(m) => m.forward(x, view),
        }
    }

    /// The representation the classifier reads, `[batch, spec.feature_dim()]`, under `view`
    /// (the classifier applied to it gives [`Net::forward`]):
    /// - CNN: the 512-unit (× width) hidden layer after its ReLU;
    /// - MLP: the last hidden layer after its ReLU (the flattened input when there is none);
    /// - ResNet: the last stage's output, globally average-pooled;
    /// - ViT: the class token of the final LayerNorm's output. The classifier reads the class
    ///   token, not the mean over tokens, so this is the class token too.
    pub fn features(&self, x: Tensor<4>, view: &View) -> Tensor<2> {
        match self {
            Net::Cnn(m) => m.features(x),
            Net::Mlp(m) => m.features(x),
            Net::ResNet(m) => m.features(x, view),
            Net::Vit(m) => m.features(x, view),
        }
    }

    /// Logits of several depth prefixes of a ResNet or ViT from one forward pass: the blocks
    /// shared by the prefixes run once. `depths` must be ascending, each at most the number
    /// of blocks (0 = stem and classifier only). Entry `i` equals
    /// `forward(x, &View::depth_prefix(depths[i], K))`.
    pub fn forward_depths(
        &self,
        x: Tensor<4>,
        depths: &[usize],
    ) -> Result<Vec<Tensor<2>>, ModelError> {
        let blocks = match self {
            Net::ResNet(m) => m.num_blocks(),
            Net::Vit(m) => m.num_blocks(),
            _ => {
                return Err(ModelError::View(
                    "depth prefixes need a model with blocks (resnet or vit)".into(),
                ));
            }
        };
        if depths.windows(2).any(|w| w[0] > w[1]) || depths.iter().any(|&d| d > blocks) {
            return Err(ModelError::View(format!(
                "depths {depths:?} must be ascending and at most {blocks}"
            )));
        }
        Ok(match self {
            Net::ResNet(m) => m.forward_depths(x, depths),
            Net::Vit(m) => m.forward_depths(x, depths),
            _ => unreachable!("checked above"),
        })
    }

    /// Number of skippable blocks (ResNet and ViT; 0 for the others).
    pub fn num_blocks(&self) -> usize {
        match self {
            Net::ResNet(m) => m.num_blocks(),
            Net::Vit(m) => m.num_blocks(),
            _ => 0,
        }
    }

    /// Builds an input tensor from normalised pixels in CHW order.
    pub fn input(pixels: Vec<f32>, batch: usize, shape: [usize; 3], device: &Device) -> Tensor<4> {
        input_tensor(pixels, batch, shape, device)
    }

    /// All parameters with PyTorch names and layouts, in canonical order.
    pub fn export(&self) -> ParamSet {
        let mut v = Exporter {
            path: Vec::new(),
            out: Vec::new(),
            values: true,
        };
        self.visit(&mut v);
        ParamSet::from_tensors(v.out).expect("parameter paths are unique")
    }

    fn export_names(&self) -> Vec<String> {
        let mut v = Exporter {
            path: Vec::new(),
            out: Vec::new(),
            values: false,
        };
        self.visit(&mut v);
        v.out.into_iter().map(|t| t.name).collect()
    }

    /// Every parameter's PyTorch name, burn id and rank, in canonical order (to address
    /// gradients by name, e.g. to mask them).
    pub fn param_ids(&self) -> Vec<(String, burn::module::ParamId, usize)> {
        let mut v = Ids {
            path: Vec::new(),
            out: Vec::new(),
        };
        self.visit(&mut v);
        v.out
    }

    /// Stops gradients for the tensors the view freezes (no grads, no optimizer state).
    pub fn apply_freezing(self, view: &View) -> Self {
        if view.frozen.is_empty() {
            return self;
        }
        let mut m = Freezer {
            path: Vec::new(),
            view,
        };
        self.map(&mut m)
    }

    /// A copy that shares the parameter values and ids, whose trainable tensors are fresh
    /// autodiff leaves. Forward and backward passes on separate forks build separate graphs,
    /// so several threads can each run one micro-batch of a step at the same time; their
    /// gradients come back under the same `ParamId`s, ready to be summed.
    pub fn fork(&self) -> Self {
        self.clone().map(&mut Forker)
    }
}

struct Forker;

impl ModuleMapper for Forker {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            if t.is_require_grad() {
                t.detach().require_grad()
            } else {
                t
            }
        })
    }
}

/// Dotted name from the module path; enum variants are not part of names.
fn dotted(path: &[(String, bool)]) -> String {
    path.iter()
        .filter(|(_, is_enum)| !is_enum)
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(".")
}

struct Exporter {
    path: Vec<(String, bool)>,
    out: Vec<NamedTensor>,
    values: bool,
}

impl ModuleVisitor for Exporter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.starts_with("Enum:")));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = dotted(&self.path);
        if !self.values {
            self.out.push(NamedTensor::zeros(name, vec![]));
            return;
        }
        let value = param.val();
        let mut shape = value.dims().to_vec();
        let mut data = value
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 parameters");
        // Linear weights are stored [in, out]; PyTorch's layout is [out, in].
        if D == 2 {
            let (r, c) = (shape[0], shape[1]);
            let mut t = vec![0f32; data.len()];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = data[i * c + j];
                }
            }
            data = t;
            shape.swap(0, 1);
        }
        self.out.push(NamedTensor { name, shape, data });
    }
}

struct Ids {
    path: Vec<(String, bool)>,
    out: Vec<(String, burn::module::ParamId, usize)>,
}

impl ModuleVisitor for Ids {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.starts_with("Enum:")));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push((dotted(&self.path), param.id, D));
    }
}

struct Freezer<'a> {
    path: Vec<(String, bool)>,
    view: &'a View,
}

impl ModuleMapper for Freezer<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.starts_with("Enum:")));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.view.is_frozen(&dotted(&self.path)) {
            param.set_require_grad(false)
        } else {
            param
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Architecture;

    fn specs() -> Vec<ModelSpec> {
        vec![
            ModelSpec::fedavg_cnn(),
            ModelSpec::mlp_2nn(),
            ModelSpec {
                arch: Architecture::Resnet {
                    blocks_per_stage: 1,
                },
                input: [1, 28, 28],
                classes: 10,
                width: 0.5,
                ranks: Default::default(),
            },
            ModelSpec {
                arch: Architecture::Vit {
                    patch: 7,
                    dim: 32,
                    depth: 2,
                    heads: 4,
                    mlp_ratio: 2,
                },
                input: [1, 28, 28],
                classes: 10,
                width: 1.0,
                ranks: Default::default(),
            },
        ]
    }

    #[test]
    fn w1_cnn_has_the_published_parameter_count_and_pytorch_layout() {
        let p = Net::init_params(&ModelSpec::fedavg_cnn(), 0).unwrap();
        assert_eq!(p.numel(), 1_663_370);
        assert_eq!(p.get("conv1.weight").unwrap().shape, vec![32, 1, 5, 5]);
        assert_eq!(p.get("fc1.weight").unwrap().shape, vec![512, 3136]);
        assert_eq!(
            p.names().collect::<Vec<_>>(),
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
        let mlp = Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap();
        assert_eq!(
            mlp.numel(),
            784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
        );
        assert_eq!(mlp.get("layers.0.weight").unwrap().shape, vec![200, 784]);
    }

    #[test]
    fn export_import_round_trip_is_bit_identical() {
        for spec in specs() {
            let p = Net::init_params(&spec, 3).unwrap();
            let net = Net::from_params(&spec, &p, &training_device()).unwrap();
            let back = net.export();
            assert_eq!(back, p, "{:?}", spec.arch);
        }
    }

    #[test]
    fn init_is_seeded() {
        let spec = ModelSpec::mlp_2nn();
        assert_eq!(
            Net::init_params(&spec, 1).unwrap(),
            Net::init_params(&spec, 1).unwrap()
        );
        assert_ne!(
            Net::init_params(&spec, 1).unwrap(),
            Net::init_params(&spec, 2).unwrap()
        );
    }

    #[test]
    fn wrong_params_are_errors() {
        let spec = ModelSpec::mlp_2nn();
        let mut p = Net::init_params(&spec, 0).unwrap();
        let cnn = Net::init_params(&ModelSpec::fedavg_cnn(), 0).unwrap();
        assert!(Net::from_params(&spec, &cnn, &compute_device()).is_err());
        p.push(NamedTensor::zeros("extra", vec![1])).unwrap();
        let err = Net::from_params(&spec, &p, &compute_device())
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn forward_shapes_for_every_architecture() {
        for spec in specs() {
            let p = Net::init_params(&spec, 0).unwrap();
            let net = Net::from_params(&spec, &p, &compute_device()).unwrap();
            let x = Net::input(vec![0.1; 3 * 784], 3, spec.input, &compute_device());
            let y = net.forward(x, &View::full());
            assert_eq!(y.dims(), [3, 10]);
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn features_are_what_the_classifier_reads() {
        let mut mlp_deep = ModelSpec::mlp_2nn();
        mlp_deep.arch = Architecture::Mlp {
            hidden: vec![64, 48, 32],
        };
        let mut linear = ModelSpec::mlp_2nn();
        linear.arch = Architecture::Mlp { hidden: vec![] };
        let mut all = specs();
        all.extend([mlp_deep, linear]);
        for spec in all {
            let p = Net::init_params(&spec, 7).unwrap();
            let net = Net::from_params(&spec, &p, &compute_device()).unwrap();
            let b = 3;
            let x = || {
                Net::input(
                    (0..b * 784).map(|i| (i as f32 * 0.23).sin()).collect(),
                    b,
                    spec.input,
                    &compute_device(),
                )
            };
            // A view that skips a block, where there are blocks: the features follow it.
            let view = match spec.num_blocks() {
                0 => View::full(),
                n => View::depth_prefix(n - 1, n),
            };
            let f = net.features(x(), &view);
            let dim = spec.feature_dim();
            assert_eq!(f.dims(), [b, dim], "{:?}", spec.arch);
            let f = values(f);
            let logits = values(net.forward(x(), &view));
            // The classifier's own weights (PyTorch layout [classes, dim]) applied by hand.
            let classifier = match spec.arch {
                Architecture::Cnn => "fc2".to_string(),
                Architecture::Mlp { ref hidden } => format!("layers.{}", hidden.len()),
                Architecture::Resnet { .. } => "fc".to_string(),
                Architecture::Vit { .. } => "head".to_string(),
            };
            let w = p.get(&format!("{classifier}.weight")).unwrap();
            let bias = p.get(&format!("{classifier}.bias")).unwrap();
            assert_eq!(w.shape, vec![spec.classes, dim]);
            for s in 0..b {
                for c in 0..spec.classes {
                    let z: f32 = bias.data[c]
                        + (0..dim)
                            .map(|j| w.data[c * dim + j] * f[s * dim + j])
                            .sum::<f32>();
                    let got = logits[s * spec.classes + c];
                    assert!(
                        (z - got).abs() < 1e-4 * (1.0 + got.abs()),
                        "{:?}: {z} vs {got}",
                        spec.arch
                    );
                }
            }
        }
    }

    #[test]
    fn resnet_prefix_ignores_deeper_blocks_and_full_prefix_is_full_model() {
        let spec = ModelSpec {
            arch: Architecture::Resnet {
                blocks_per_stage: 2,
            },
            input: [1, 28, 28],
            classes: 10,
            width: 0.5,
            ranks: Default::default(),
        };
        let p = Net::init_params(&spec, 0).unwrap();
        let x = || {
            Net::input(
                (0..2 * 784).map(|i| (i as f32 * 0.37).sin()).collect(),
                2,
                spec.input,
                &compute_device(),
            )
        };
        let out = |params: &ParamSet, view: &View| {
            Net::from_params(&spec, params, &compute_device())
                .unwrap()
                .forward(x(), view)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        let k = 3;
        let prefix = View::depth_prefix(k, 6);
        let mut scrambled = p.clone();
        for t in scrambled.iter_mut() {
            if let Some(idx) = t
                .name
                .strip_prefix("blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                && idx >= k
            {
                t.data.iter_mut().for_each(|v| *v = 42.0);
            }
        }
        assert_eq!(out(&p, &prefix), out(&scrambled, &prefix));
        assert_eq!(out(&p, &View::depth_prefix(6, 6)), out(&p, &View::full()));
        assert_ne!(out(&p, &View::full()), out(&p, &prefix));
    }

    #[test]
    fn shared_trunk_depths_equal_separate_prefix_forwards() {
        for spec in specs().into_iter().filter(|s| s.num_blocks() > 0) {
            let k_total = spec.num_blocks();
            let p = Net::init_params(&spec, 5).unwrap();
            let net = Net::from_params(&spec, &p, &compute_device()).unwrap();
            let x = || {
                Net::input(
                    (0..2 * 784).map(|i| (i as f32 * 0.11).cos()).collect(),
                    2,
                    spec.input,
                    &compute_device(),
                )
            };
            let depths: Vec<usize> = (0..=k_total).collect();
            let shared = net.forward_depths(x(), &depths).unwrap();
            assert_eq!(shared.len(), depths.len());
            for (d, y) in depths.iter().zip(shared) {
                let alone = net.forward(x(), &View::depth_prefix(*d, k_total));
                let (a, b) = (
                    y.into_data().try_to_vec::<f32>().unwrap(),
                    alone.into_data().try_to_vec::<f32>().unwrap(),
                );
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(u, v)| (u - v).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "{:?} depth {d}: {diff}", spec.arch);
            }
            assert!(net.forward_depths(x(), &[2, 1]).is_err());
            assert!(net.forward_depths(x(), &[k_total + 1]).is_err());
        }
        let cnn = Net::from_params(
            &ModelSpec::fedavg_cnn(),
            &Net::init_params(&ModelSpec::fedavg_cnn(), 0).unwrap(),
            &compute_device(),
        )
        .unwrap();
        let x = Net::input(vec![0.0; 784], 1, [1, 28, 28], &compute_device());
        assert!(cnn.forward_depths(x, &[0]).is_err());
    }

    #[test]
    fn prefix_views_report_their_depth_and_freeze_deeper_blocks() {
        let v = View::trainable_prefix(2, 5);
        assert_eq!(v.prefix_depth(5), Some(2));
        assert!(v.is_frozen("blocks.3.conv1.weight") && !v.is_frozen("blocks.1.conv1.weight"));
        assert!(!v.is_frozen("fc.weight"));
        assert_eq!(View::full().prefix_depth(5), Some(5));
        let holes = View {
            active_blocks: Some(vec![true, false, true]),
            frozen: vec![],
        };
        assert_eq!(holes.prefix_depth(3), None);
        assert_eq!(ModelSpec::block_of("blocks.12.norm1.weight"), Some(12));
        assert_eq!(ModelSpec::block_of("fc.bias"), None);
        assert!(ModelSpec::in_prefix("conv1.weight", 0) && ModelSpec::in_prefix("fc.bias", 0));
        assert!(ModelSpec::in_prefix("blocks.2.conv1.weight", 3));
        assert!(!ModelSpec::in_prefix("blocks.3.conv1.weight", 3));
    }
}
