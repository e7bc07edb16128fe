//! A client's decoding of tasks must refuse any byte string with an error, never panic: the
//! protobuf message, the masks it carries, then every tensor against them. Run in `fuzz/`:
//! `cargo fuzz run decode_task`.
#![no_main]

use flotilla_core::wire::{Mask, TaskMsg, decode_tensor};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = TaskMsg::decode(data) else {
        return;
    };
    let mut masks = HashMap::new();
    for m in &msg.masks {
        if let Ok(mask) = Mask::decode(m) {
            masks.insert(mask.name.clone(), mask);
        }
    }
    for t in &msg.tensors {
        if let Ok(t) = decode_tensor(t, &masks) {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
        }
    }
});
