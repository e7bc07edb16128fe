//! Partitioners: coverage, determinism and the skew each one promises.

use flotilla_data::{DataError, PartitionSpec, partition, summarize};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 6000 samples, 600 per class, in shuffled order.
fn balanced_labels() -> Vec<u8> {
    let mut l: Vec<u8> = (0..6000).map(|i| (i % 10) as u8).collect();
    l.shuffle(&mut ChaCha8Rng::seed_from_u64(99));
    l
}

fn all_specs() -> Vec<PartitionSpec> {
    vec![
        PartitionSpec::Iid,
        PartitionSpec::Dirichlet {
            alpha: 0.5,
            min_size: 10,
        },
        PartitionSpec::Shards {
            classes_per_client: 2,
        },
        PartitionSpec::QuantitySkew { sigma: 1.0 },
    ]
}

/// Every index in `0..n` appears exactly once and each list is ascending.
fn assert_exact_cover(parts: &[Vec<usize>], n: usize) {
    let mut seen = vec![0u8; n];
    for p in parts {
        assert!(p.windows(2).all(|w| w[0] < w[1]), "not sorted: {p:?}");
        for &i in p {
            assert!(i < n, "index {i} out of range");
            seen[i] += 1;
        }
    }
    assert!(
        seen.iter().all(|&s| s == 1),
        "some sample not assigned exactly once"
    );
}

fn sizes(parts: &[Vec<usize>]) -> Vec<usize> {
    parts.iter().map(Vec::len).collect()
}

fn coefficient_of_variation(xs: &[usize]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<usize>() as f64 / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

fn spec_strategy() -> impl Strategy<Value = PartitionSpec> {
    prop_oneof![
        Just(PartitionSpec::Iid),
        (0.3f64..5.0, 0usize..4)
            .prop_map(|(alpha, min_size)| PartitionSpec::Dirichlet { alpha, min_size }),
        (1usize..=4).prop_map(|k| PartitionSpec::Shards {
            classes_per_client: k
        }),
        (0.0f64..2.5).prop_map(|sigma| PartitionSpec::QuantitySkew { sigma }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn every_sample_assigned_exactly_once(
        seed in any::<u64>(),
        clients in 1usize..200,
        n in 40usize..400,
        label_seed in any::<u64>(),
        spec in spec_strategy(),
    ) {
        // The per-class Dirichlet split needs a few samples per client to
        // reach min_size; the other partitioners work down to one each.
        let num_clients = match spec {
            PartitionSpec::Dirichlet { .. } => clients.min(n / 20),
            _ => clients.min(n),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(label_seed);
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10u8)).collect();
        let present = {
            let mut h = [false; 10];
            for &l in &labels { h[l as usize] = true; }
            h.iter().filter(|&&b| b).count()
        };
        let result = partition(&labels, 10, num_clients, &spec, seed);
        if let PartitionSpec::Shards { classes_per_client } = spec {
            let shards = num_clients * classes_per_client;
            if shards < present || shards > n {
                prop_assert!(matches!(result, Err(DataError::InvalidPartition(_))));
                return Ok(());
            }
        }
        let parts = result.unwrap();
        prop_assert_eq!(parts.len(), num_clients);
        assert_exact_cover(&parts, n);
        let min = match spec {
            PartitionSpec::Dirichlet { min_size, .. } => min_size,
            // Every other partitioner gives each client at least one sample.
            _ => 1,
        };
        prop_assert!(parts.iter().all(|p| p.len() >= min));
    }
}

#[test]
fn deterministic_from_seed() {
    let labels = balanced_labels();
    for spec in all_specs() {
        let a = partition(&labels, 10, 50, &spec, 1).unwrap();
        let b = partition(&labels, 10, 50, &spec, 1).unwrap();
        let c = partition(&labels, 10, 50, &spec, 2).unwrap();
        assert_eq!(a, b, "{spec}");
        assert_ne!(a, c, "{spec}");
        assert_exact_cover(&a, labels.len());
    }
}

#[test]
fn iid_is_balanced() {
    let labels = balanced_labels();
    let parts = partition(&labels, 10, 7, &PartitionSpec::Iid, 3).unwrap();
    let s = sizes(&parts);
    assert_eq!(s.iter().sum::<usize>(), 6000);
    assert!(s.iter().all(|&x| x == 857 || x == 858), "{s:?}");
    let summary = summarize(&parts, &labels, 10);
    assert!(summary.mean_label_tv_distance < 0.05, "{summary}");
}

#[test]
fn dirichlet_skew_grows_as_alpha_falls() {
    let labels = balanced_labels();
    let tv: Vec<f64> = [100.0, 1.0, 0.1]
        .iter()
        .map(|&alpha| {
            let spec = PartitionSpec::Dirichlet {
                alpha,
                min_size: 10,
            };
            let parts = partition(&labels, 10, 50, &spec, 11).unwrap();
            assert_exact_cover(&parts, labels.len());
            summarize(&parts, &labels, 10).mean_label_tv_distance
        })
        .collect();
    assert!(tv[0] < tv[1] && tv[1] < tv[2], "{tv:?}");
    // alpha = 100 is close to IID, alpha = 0.1 is heavily skewed.
    assert!(tv[0] < 0.2 && tv[2] > 0.5, "{tv:?}");
}

#[test]
fn dirichlet_respects_min_size() {
    let labels = balanced_labels();
    for seed in 0..5 {
        let spec = PartitionSpec::Dirichlet {
            alpha: 0.3,
            min_size: 40,
        };
        let parts = partition(&labels, 10, 50, &spec, seed).unwrap();
        assert!(parts.iter().all(|p| p.len() >= 40), "{:?}", sizes(&parts));
    }
}

#[test]
fn dirichlet_gives_up_with_advice() {
    let labels = balanced_labels();
    let spec = PartitionSpec::Dirichlet {
        alpha: 0.001,
        min_size: 100,
    };
    let err = partition(&labels, 10, 50, &spec, 0).unwrap_err();
    assert!(matches!(err, DataError::DirichletGaveUp { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        "alpha = 0.001",
        "min_size = 100",
        "50 clients",
        "raise alpha",
    ] {
        assert!(msg.contains(needle), "missing `{needle}` in {msg}");
    }
}

#[test]
fn shards_limit_classes_per_client() {
    let labels = balanced_labels();
    for k in [1, 2, 3] {
        let spec = PartitionSpec::Shards {
            classes_per_client: k,
        };
        let parts = partition(&labels, 10, 100, &spec, 5).unwrap();
        assert_exact_cover(&parts, labels.len());
        let summary = summarize(&parts, &labels, 10);
        assert!(
            summary.clients.iter().all(|c| c.classes_present <= k),
            "{summary}"
        );
        // 600-sample classes cut into equal shards: sizes differ by at most k.
        assert!(summary.max_size - summary.min_size <= k, "{summary}");
    }
    // With one class each, most clients see exactly one class.
    let parts = partition(
        &labels,
        10,
        100,
        &PartitionSpec::Shards {
            classes_per_client: 1,
        },
        5,
    )
    .unwrap();
    assert!((summarize(&parts, &labels, 10).mean_label_tv_distance - 0.9).abs() < 1e-9);
}

#[test]
fn shards_handle_unbalanced_classes() {
    // Class 0 has 1000 samples, classes 1..9 have 20 each.
    let mut labels = vec![0u8; 1000];
    labels.extend((1..10u8).flat_map(|c| std::iter::repeat_n(c, 20)));
    let spec = PartitionSpec::Shards {
        classes_per_client: 2,
    };
    let parts = partition(&labels, 10, 30, &spec, 8).unwrap();
    assert_exact_cover(&parts, labels.len());
    let summary = summarize(&parts, &labels, 10);
    assert!(summary.clients.iter().all(|c| c.classes_present <= 2));
    assert!(summary.min_size > 0);
}

#[test]
fn quantity_skew_varies_sizes_not_labels() {
    let labels = balanced_labels();
    let cv = |sigma: f64| {
        let spec = PartitionSpec::QuantitySkew { sigma };
        let parts = partition(&labels, 10, 50, &spec, 21).unwrap();
        assert_exact_cover(&parts, labels.len());
        (
            coefficient_of_variation(&sizes(&parts)),
            summarize(&parts, &labels, 10),
        )
    };
    let (cv0, _) = cv(0.0);
    let (cv_small, _) = cv(0.3);
    let (cv_large, s_large) = cv(1.5);
    assert!(cv0 < 0.01, "{cv0}");
    assert!(
        cv0 < cv_small && cv_small < cv_large,
        "{cv0} {cv_small} {cv_large}"
    );
    let (_, s_mid) = cv(0.5);
    let iid = summarize(
        &partition(&labels, 10, 50, &PartitionSpec::Iid, 21).unwrap(),
        &labels,
        10,
    );
    // Labels stay IID: skew comparable to a plain IID split, far below label skew.
    assert!(
        s_mid.mean_label_tv_distance < 1.5 * iid.mean_label_tv_distance + 0.02,
        "{s_mid}"
    );
    assert!(s_large.mean_label_tv_distance < 0.3, "{s_large}");
}

#[test]
fn invalid_specs_are_rejected_with_clear_messages() {
    let labels = balanced_labels();
    let check = |clients: usize, spec: PartitionSpec, needles: &[&str]| {
        let err = partition(&labels, 10, clients, &spec, 0).unwrap_err();
        assert!(matches!(err, DataError::InvalidPartition(_)), "{err:?}");
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "missing `{n}` in {msg}");
        }
    };
    check(0, PartitionSpec::Iid, &["num_clients = 0"]);
    check(6001, PartitionSpec::Iid, &["num_clients = 6001", "6000"]);
    for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        check(
            5,
            PartitionSpec::Dirichlet { alpha, min_size: 1 },
            &["alpha", "> 0"],
        );
    }
    check(
        50,
        PartitionSpec::Dirichlet {
            alpha: 1.0,
            min_size: 200,
        },
        &["min_size = 200", "10000", "6000"],
    );
    check(
        5,
        PartitionSpec::Shards {
            classes_per_client: 0,
        },
        &["classes_per_client = 0", "between 1 and"],
    );
    check(
        5,
        PartitionSpec::Shards {
            classes_per_client: 11,
        },
        &["classes_per_client = 11"],
    );
    check(
        3,
        PartitionSpec::Shards {
            classes_per_client: 2,
        },
        &["6 shards", "10 classes"],
    );
    check(
        5,
        PartitionSpec::QuantitySkew { sigma: -0.5 },
        &["sigma = -0.5", ">= 0"],
    );
    let err = partition(&[0, 1, 12], 10, 1, &PartitionSpec::Iid, 0).unwrap_err();
    assert!(err.to_string().contains("label 12 at index 2"), "{err}");
}

#[test]
fn single_client_gets_everything() {
    let labels = balanced_labels();
    for spec in all_specs() {
        if matches!(spec, PartitionSpec::Shards { .. }) {
            continue;
        }
        let parts = partition(&labels, 10, 1, &spec, 4).unwrap();
        assert_eq!(parts, vec![(0..6000).collect::<Vec<_>>()], "{spec}");
    }
}

#[test]
fn summary_statistics() {
    let labels = [0u8, 0, 1, 1, 2, 2, 0, 1];
    let parts = vec![vec![0, 1], vec![2, 3, 4], vec![5, 6, 7], vec![]];
    let s = summarize(&parts, &labels, 3);
    assert_eq!(s.num_clients, 4);
    assert_eq!(s.total_samples, 8);
    assert_eq!((s.min_size, s.max_size), (0, 3));
    assert_eq!(s.median_size, 2.5);
    assert_eq!(s.mean_size, 2.0);
    assert_eq!(s.clients[1].histogram, vec![0, 2, 1]);
    assert_eq!(s.clients[2].classes_present, 3);
    // Global distribution (3/8, 3/8, 2/8).
    // Client 0 (1, 0, 0): TV = 5/8. Client 1 (0, 2/3, 1/3): TV = 3/8.
    // Client 2 (1/3, 1/3, 1/3): TV = 1/12. Client 3 is empty and left out.
    let tv = s
        .clients
        .iter()
        .map(|c| c.label_tv_distance)
        .collect::<Vec<_>>();
    assert!((tv[0].unwrap() - 0.625).abs() < 1e-12);
    assert!((tv[1].unwrap() - 0.375).abs() < 1e-12);
    assert!((tv[2].unwrap() - 1.0 / 12.0).abs() < 1e-12);
    assert_eq!(tv[3], None);
    assert!((s.mean_label_tv_distance - (0.625 + 0.375 + 1.0 / 12.0) / 3.0).abs() < 1e-12);
    assert!((s.mean_classes_per_client - (1.0 + 2.0 + 3.0 + 0.0) / 4.0).abs() < 1e-12);
}

#[test]
fn summary_display_elides_long_lists() {
    let labels = balanced_labels();
    let parts = partition(&labels, 10, 8, &PartitionSpec::Iid, 0).unwrap();
    let text = summarize(&parts, &labels, 10).to_string();
    assert_eq!(text.lines().count(), 3 + 8, "{text}");
    assert!(
        text.contains("8 clients, 6000 samples, 10 classes"),
        "{text}"
    );

    let parts = partition(&labels, 10, 60, &PartitionSpec::Iid, 0).unwrap();
    let text = summarize(&parts, &labels, 10).to_string();
    assert_eq!(text.lines().count(), 3 + 20 + 1 + 5, "{text}");
    assert!(text.contains("35 clients omitted"), "{text}");
    let last = text.lines().last().unwrap();
    assert!(last.trim_start().starts_with("59 "), "{last}");
}

#[test]
fn serde_forms() {
    let spec: PartitionSpec = serde_json::from_str(r#"{"kind":"dirichlet","alpha":0.5}"#).unwrap();
    assert_eq!(
        spec,
        PartitionSpec::Dirichlet {
            alpha: 0.5,
            min_size: 10
        }
    );
    let spec: PartitionSpec =
        serde_json::from_str(r#"{"kind":"quantity-skew","sigma":1.0}"#).unwrap();
    assert_eq!(spec, PartitionSpec::QuantitySkew { sigma: 1.0 });
    let spec: PartitionSpec =
        serde_json::from_str(r#"{"kind":"shards","classes_per_client":2}"#).unwrap();
    assert_eq!(
        spec,
        PartitionSpec::Shards {
            classes_per_client: 2
        }
    );
    assert_eq!(
        serde_json::from_str::<PartitionSpec>(r#"{"kind":"iid"}"#).unwrap(),
        PartitionSpec::Iid
    );
    assert!(
        serde_json::from_str::<PartitionSpec>(r#"{"kind":"dirichlet","alpha":1,"beta":2}"#)
            .is_err()
    );

    use flotilla_data::DatasetKind;
    assert_eq!(
        serde_json::to_string(&DatasetKind::FashionMnist).unwrap(),
        r#""fashion-mnist""#
    );
    assert_eq!(
        serde_json::from_str::<DatasetKind>(r#""cifar10""#).unwrap(),
        DatasetKind::Cifar10
    );
    assert_eq!(
        serde_json::from_str::<DatasetKind>(r#""mnist""#).unwrap(),
        DatasetKind::Mnist
    );

    let labels = [0u8, 1];
    let s = summarize(&[vec![0], vec![1]], &labels, 2);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["mean_label_tv_distance"], 0.5);
    assert_eq!(json["clients"][1]["histogram"], serde_json::json!([0, 1]));
}
