//! The kernels against burn's own ops: values and gradients, per op and for whole models.

use super::conv::*;
use super::*;
use burn::tensor::Device;
use rand::{Rng, SeedableRng};

/// Relative tolerance: |a − b| ≤ TOL · max(1, max |b|) over a whole tensor.
const TOL: f32 = 1e-4;

fn rand_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], dev: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), dev)
}

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// Output, dX, dW and dB of one convolution with the loss Σ y·r.
fn conv_run(
    fast_on: bool,
    data: &(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
    g: &Geom,
    bias: bool,
    dx: bool,
) -> Vec<Vec<f32>> {
    let dev = Device::flex().autodiff();
    let mut x = tensor(data.0.clone(), [g.b, g.cin, g.h, g.w], &dev);
    if dx {
        x = x.require_grad();
    }
    let w = tensor(data.1.clone(), [g.cout, g.cin, g.k, g.k], &dev).require_grad();
    let b = bias.then(|| tensor(data.2.clone(), [g.cout], &dev).require_grad());
    let before = FAST_CALLS.load(Ordering::Relaxed);
    let y = with_flotilla_kernels(fast_on, || {
        conv2d(x.clone(), w.clone(), b.clone(), g.s, g.p)
    });
    if fast_on {
        assert!(
            FAST_CALLS.load(Ordering::Relaxed) > before,
            "fast conv not taken"
        );
    }
    assert_eq!(y.dims(), [g.b, g.cout, g.ho, g.wo]);
    let r = tensor(data.3.clone(), [g.b, g.cout, g.ho, g.wo], &dev);
    let grads = (y.clone() * r).sum().backward();
    let mut out = vec![vals(y)];
    if dx {
        out.push(vals(x.grad(&grads).expect("dx")));
    } else {
        assert!(x.grad(&grads).is_none());
    }
    out.push(vals(w.grad(&grads).expect("dw")));
    if let Some(b) = b {
        out.push(vals(b.grad(&grads).expect("db")));
    }
    out
}

#[test]
fn conv_matches_burn_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    // (batch, cin, h, w, cout, kernel, stride, padding)
    let cases = [
        (1, 1, 28, 28, 4, 5, 1, 2),
        (3, 2, 7, 9, 5, 3, 1, 1),
        (2, 3, 9, 6, 4, 3, 2, 1),
        (4, 4, 8, 8, 6, 1, 1, 0),
        (2, 4, 9, 7, 3, 1, 2, 0),
        (5, 3, 11, 10, 2, 5, 2, 2),
        (2, 6, 6, 5, 7, 3, 1, 0),
        (3, 2, 5, 5, 3, 5, 1, 0),
        (1, 5, 12, 12, 8, 4, 4, 0),
        (2, 1, 3, 4, 2, 3, 2, 2),
        (6, 8, 14, 14, 16, 5, 1, 2),
        // Input and output channels multiples of 16: on AVX-512 CPUs the direct kernel runs
        // the forward pass and dX.
        (2, 16, 7, 9, 32, 3, 1, 1),
        (3, 32, 6, 5, 16, 5, 1, 2),
        (2, 16, 5, 6, 48, 3, 1, 0),
    ];
    for (n, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
        let g = Geom::new([b, cin, h, w], [cout, cin, k, k], s, p).expect("valid");
        let data = (
            rand_vec(&mut rng, b * cin * h * w),
            rand_vec(&mut rng, cout * cin * k * k),
            rand_vec(&mut rng, cout),
            rand_vec(&mut rng, b * cout * g.ho * g.wo),
        );
        for (bias, dx) in [(true, true), (false, true), (true, false)] {
            let fast = conv_run(true, &data, &g, bias, dx);
            let want = conv_run(false, &data, &g, bias, dx);
            for (i, (f, r)) in fast.iter().zip(&want).enumerate() {
                assert_close(&format!("case {n} bias {bias} dx {dx} part {i}"), f, r);
            }
        }
    }
}

#[test]
fn conv_inference_matches_burn() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let dev = Device::flex();
    for &(b, cin, h, w, cout, k, s, p) in &[(3, 2, 9, 8, 4, 3, 1, 1), (2, 3, 10, 7, 5, 5, 2, 2)] {
        let x = tensor(rand_vec(&mut rng, b * cin * h * w), [b, cin, h, w], &dev);
        let wt = tensor(
            rand_vec(&mut rng, cout * cin * k * k),
            [cout, cin, k, k],
            &dev,
        );
        let bias = tensor(rand_vec(&mut rng, cout), [cout], &dev);
        let run = |on| {
            with_flotilla_kernels(on, || {
                vals(conv2d(x.clone(), wt.clone(), Some(bias.clone()), s, p))
            })
        };
        assert_close("inference conv", &run(true), &run(false));
    }
}

#[test]
fn max_pool_matches_burn_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let dev = Device::flex().autodiff();
    type Op = fn(Tensor<4>) -> Tensor<4>;
    let ops: [(&str, Op); 2] = [("pool", max_pool2), ("relu pool", relu_max_pool2)];
    for (&[b, c, h, w], (name, op)) in [
        [1, 1, 4, 4],
        [2, 3, 7, 9],
        [3, 2, 28, 28],
        [2, 4, 5, 2],
        [1, 2, 1, 6],
    ]
    .iter()
    .flat_map(|s| ops.iter().map(move |o| (s, *o)))
    {
        // Rounded values give ties and zeros (also all-negative windows for the fused
        // ReLU), which must resolve like burn's ops.
        let xv: Vec<f32> = rand_vec(&mut rng, b * c * h * w)
            .into_iter()
            .map(|v| (v * 4.0).round())
            .collect();
        let rv = rand_vec(&mut rng, b * c * (h / 2) * (w / 2));
        let run = |on| {
            let x = tensor(xv.clone(), [b, c, h, w], &dev).require_grad();
            let before = FAST_CALLS.load(Ordering::Relaxed);
            let y = with_flotilla_kernels(on, || op(x.clone()));
            if on {
                assert!(
                    FAST_CALLS.load(Ordering::Relaxed) > before,
                    "fast pool not taken"
                );
            }
            assert_eq!(y.dims(), [b, c, h / 2, w / 2]);
            let r = tensor(rv.clone(), [b, c, h / 2, w / 2], &dev);
            let grads = (y.clone() * r).sum().backward();
            (vals(y), vals(x.grad(&grads).expect("dx")))
        };
        let (fy, fdx) = run(true);
        let (ry, rdx) = run(false);
        assert_close(&format!("{name} out"), &fy, &ry);
        assert_close(&format!("{name} dx"), &fdx, &rdx);
        let plain = tensor(xv.clone(), [b, c, h, w], &Device::flex());
        let py = with_flotilla_kernels(true, || vals(op(plain)));
        assert_close(&format!("{name} inference"), &py, &ry);
    }
}

/// The fused convolution + ReLU + pool against burn's conv2d, relu and max_pool2d.
#[test]
fn conv_relu_pool_matches_burn_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    // (batch, cin, h, w, cout, kernel, stride, padding): W1's shapes, odd output sizes
    // (the last row and column are dropped), stride 2, no padding, 1×1.
    let cases = [
        (2, 1, 28, 28, 4, 5, 1, 2),
        (3, 4, 14, 14, 6, 5, 1, 2),
        (2, 3, 9, 7, 5, 3, 1, 1),
        (3, 2, 11, 10, 3, 3, 2, 1),
        (2, 3, 6, 6, 2, 1, 1, 0),
        (5, 2, 8, 9, 4, 3, 1, 0),
        // W1's two convolutions at full width (the direct kernel on AVX-512 CPUs).
        (2, 1, 28, 28, 32, 5, 1, 2),
        (3, 32, 14, 14, 64, 5, 1, 2),
    ];
    for (n, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
        let g = Geom::new([b, cin, h, w], [cout, cin, k, k], s, p).expect("valid");
        let (xv, wv, bv) = (
            rand_vec(&mut rng, b * cin * h * w),
            rand_vec(&mut rng, cout * cin * k * k),
            rand_vec(&mut rng, cout),
        );
        let rv = rand_vec(&mut rng, b * cout * (g.ho / 2) * (g.wo / 2));
        let dev = Device::flex().autodiff();
        for dx in [true, false] {
            let run = |on: bool| {
                let mut x = tensor(xv.clone(), [b, cin, h, w], &dev);
                if dx {
                    x = x.require_grad();
                }
                let wt = tensor(wv.clone(), [cout, cin, k, k], &dev).require_grad();
                let bt = tensor(bv.clone(), [cout], &dev).require_grad();
                let before = FAST_CALLS.load(Ordering::Relaxed);
                let y = with_flotilla_kernels(on, || {
                    conv_relu_pool2(x.clone(), wt.clone(), bt.clone(), s, p)
                });
                if on {
                    assert!(
                        FAST_CALLS.load(Ordering::Relaxed) > before,
                        "fused op not taken"
                    );
                }
                assert_eq!(y.dims(), [b, cout, g.ho / 2, g.wo / 2]);
                let r = tensor(rv.clone(), [b, cout, g.ho / 2, g.wo / 2], &dev);
                let grads = (y.clone() * r).sum().backward();
                let mut out = vec![vals(y)];
                if dx {
                    out.push(vals(x.grad(&grads).expect("dx")));
                }
                out.push(vals(wt.grad(&grads).expect("dw")));
                out.push(vals(bt.grad(&grads).expect("db")));
                out
            };
            let (fast, want) = (run(true), run(false));
            for (i, (f, r)) in fast.iter().zip(&want).enumerate() {
                assert_close(&format!("case {n} dx {dx} part {i}"), f, r);
            }
        }
        let plain = |on: bool| {
            let d = Device::flex();
            with_flotilla_kernels(on, || {
                vals(conv_relu_pool2(
                    tensor(xv.clone(), [b, cin, h, w], &d),
                    tensor(wv.clone(), [cout, cin, k, k], &d),
                    tensor(bv.clone(), [cout], &d),
                    s,
                    p,
                ))
            })
        };
        assert_close(&format!("case {n} inference"), &plain(true), &plain(false));
    }
}

#[test]
fn linear_matches_burn_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    // (rows, inputs, outputs): odd sizes, a single row, and one above the threading
    // threshold.
    for &(n, i, o) in &[
        (1, 1, 1),
        (3, 7, 5),
        (1, 33, 17),
        (13, 9, 1),
        (64, 200, 180),
        (16, 3136, 512),
        (65, 40, 70),
    ] {
        let xv = rand_vec(&mut rng, n * i);
        let wv = rand_vec(&mut rng, i * o);
        let bv = rand_vec(&mut rng, o);
        let rv = rand_vec(&mut rng, n * o);
        let dev = Device::flex().autodiff();
        let run = |on: bool| {
            let x = tensor(xv.clone(), [n, i], &dev).require_grad();
            let w = tensor(wv.clone(), [i, o], &dev).require_grad();
            let b = tensor(bv.clone(), [o], &dev).require_grad();
            let before = FAST_CALLS.load(Ordering::Relaxed);
            let y = with_flotilla_kernels(on, || linear(x.clone(), w.clone(), b.clone()));
            if on {
                assert!(
                    FAST_CALLS.load(Ordering::Relaxed) > before,
                    "fast linear not taken"
                );
            }
            assert_eq!(y.dims(), [n, o]);
            let grads = (y.clone() * tensor(rv.clone(), [n, o], &dev))
                .sum()
                .backward();
            let g = |t: &Tensor<2>| vals(t.grad(&grads).expect("grad"));
            vec![
                vals(y.clone()),
                g(&x),
                g(&w),
                vals(b.grad(&grads).expect("db")),
            ]
        };
        // On the pool's threads (GEMM), and on one thread as a micro-batch runs (the
        // few-row kernels where the CPU has AVX-512).
        let want = run(false);
        for (how, fast) in [("pool", run(true)), ("serial", serial(|| run(true)))] {
            for (k, (f, r)) in fast.iter().zip(&want).enumerate() {
                assert_close(&format!("linear {n}x{i}x{o} {how} part {k}"), f, r);
            }
        }
        let plain = |on: bool| {
            let d = Device::flex();
            with_flotilla_kernels(on, || {
                vals(linear(
                    tensor(xv.clone(), [n, i], &d),
                    tensor(wv.clone(), [i, o], &d),
                    tensor(bv.clone(), [o], &d),
                ))
            })
        };
        assert_close("linear inference", &plain(true), &plain(false));
    }
}

/// Loss and every parameter gradient of whole models, fast kernels against burn's ops.
#[test]
fn models_match_with_switch_on_and_off() {
    use crate::{Architecture, ModelSpec, Net, View, training_device};
    use burn::optim::GradientsParams;
    let resnet = ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 1,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 0.25,
        ranks: Default::default(),
    };
    let vit = ModelSpec {
        arch: Architecture::Vit {
            patch: 7,
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    for spec in [ModelSpec::fedavg_cnn(), ModelSpec::mlp_2nn(), resnet, vit] {
        let params = Net::init_params(&spec, 3).expect("params");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let batch = 4;
        let pixels = rand_vec(&mut rng, batch * 784);
        let weights = rand_vec(&mut rng, batch * spec.classes);
        let run = |on: bool| {
            with_flotilla_kernels(on, || {
                let dev = training_device();
                let net = Net::from_params(&spec, &params, &dev).expect("net");
                let x = Net::input(pixels.clone(), batch, spec.input, &dev);
                let r = tensor(weights.clone(), [batch, spec.classes], &dev);
                let loss = (net.forward(x, &View::full()) * r).sum();
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                let mut out = vec![vals(loss)];
                for (name, id, rank) in net.param_ids() {
                    let g = match rank {
                        1 => grads.get::<1>(id).map(vals),
                        2 => grads.get::<2>(id).map(vals),
                        3 => grads.get::<3>(id).map(vals),
                        _ => grads.get::<4>(id).map(vals),
                    };
                    out.push(g.unwrap_or_else(|| panic!("no gradient for {name}")));
                }
                out
            })
        };
        let before = FAST_CALLS.load(Ordering::Relaxed);
        let fast = run(true);
        assert!(
            FAST_CALLS.load(Ordering::Relaxed) > before + 1,
            "fast kernels not taken"
        );
        let reference = run(false);
        for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
            assert_close(&format!("{:?} tensor {i}", spec.arch), f, r);
        }
    }
}
