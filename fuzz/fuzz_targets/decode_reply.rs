//! The server's decoder of client updates must refuse any byte string with an error, never
//! panic or allocate without bound. Run: `cargo fuzz run decode_reply` in `fuzz/`.
#![no_main]

use flotilla_core::wire::Mask;
use flotilla_engine::method::KnownMasks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Without masks, and with a mask the reply may refer to.
    let _ = flotilla_engine::Reply::decode(data, &KnownMasks::new());
    let mut masks = KnownMasks::new();
    let mask = Mask {
        name: "fc1.weight".into(),
        active: (0..64).map(|i| i % 3 == 0).collect(),
    };
    masks.insert(mask.name.clone(), mask);
    let _ = flotilla_engine::Reply::decode(data, &masks);
});
