//! The decoders of the wire messages take bytes from the network: any byte string, random or
//! a valid message with bytes flipped, cut or appended, must give a value or an error, never
//! a panic. (The same property, coverage-guided and unbounded, is the fuzz target
//! `fuzz/fuzz_targets/decode_reply.rs`.)

use flotilla_core::wire::Mask;
use flotilla_core::{ParamSet, Tensor};
use flotilla_engine::method::KnownMasks;
use flotilla_engine::{Reply, Task};
use proptest::prelude::*;

fn valid_reply() -> (Vec<u8>, KnownMasks) {
    let params = ParamSet::from_tensors(vec![
        Tensor::new(
            "fc1.weight",
            vec![4, 4],
            (0..16).map(|i| i as f32 * 0.5).collect(),
        )
        .unwrap(),
        Tensor::new("fc1.bias", vec![4], vec![0.1, 0.2, 0.3, 0.4]).unwrap(),
    ])
    .unwrap();
    let mut masks = KnownMasks::new();
    masks.insert(
        "fc1.weight".into(),
        Mask {
            name: "fc1.weight".into(),
            active: (0..16).map(|i| i % 3 != 0).collect(),
        },
    );
    let reply = Reply {
        round: 3,
        phase: 0,
        client: 7,
        num_examples: 60,
        params,
        metrics: [("train_loss".to_string(), 0.5)].into(),
        resources: Default::default(),
    };
    (reply.encode(&masks).unwrap(), masks)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Reply::decode(&bytes, &KnownMasks::new());
        let _ = Task::decode(&bytes, &mut KnownMasks::new());
    }

    #[test]
    fn mutated_replies_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let (mut bytes, masks) = valid_reply();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= v;
        }
        let mut cut_bytes = bytes[..cut.index(bytes.len() + 1)].to_vec();
        cut_bytes.extend(tail);
        for b in [&bytes, &cut_bytes] {
            if let Ok(r) = Reply::decode(b, &masks) {
                // Whatever decodes is finite and has consistent shapes.
                prop_assert!(r.params.check_finite().is_ok());
                for t in r.params.iter() {
                    prop_assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
                }
            }
        }
    }
}

#[test]
fn the_valid_reply_decodes() {
    let (bytes, masks) = valid_reply();
    let r = Reply::decode(&bytes, &masks).unwrap();
    assert_eq!(r.client, 7);
    // Masked positions decode as zero.
    assert_eq!(r.params.get("fc1.weight").unwrap().data[0], 0.0);
    assert_eq!(r.params.get("fc1.weight").unwrap().data[1], 0.5);
}
