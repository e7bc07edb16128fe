//! The server's decoding of client updates must refuse any byte string with an error, never
//! panic or allocate without bound: the protobuf message, then every tensor (dense, or masked
//! against a mask the server holds). This is the parsing inside `flotilla_engine::Reply::decode`
//! without the model code, so the target builds in seconds. Run in `fuzz/`:
//! `cargo fuzz run decode_reply`.
#![no_main]

use flotilla_core::wire::{Mask, ReplyMsg, decode_tensor};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = ReplyMsg::decode(data) else {
        return;
    };
    let mut masks = HashMap::new();
    let mask = Mask {
        name: "fc1.weight".into(),
        active: (0..64).map(|i| i % 3 == 0).collect(),
    };
    masks.insert(mask.name.clone(), mask);
    for t in &msg.tensors {
        if let Ok(t) = decode_tensor(t, &masks) {
            assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
        }
    }
});
