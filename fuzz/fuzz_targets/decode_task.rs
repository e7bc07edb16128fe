//! A client's decoder of tasks must refuse any byte string with an error, never panic.
//! Run: `cargo fuzz run decode_task` in `fuzz/`.
#![no_main]

use flotilla_engine::method::KnownMasks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flotilla_engine::Task::decode(data, &mut KnownMasks::new());
});
