//! The server's reading of a join: the device profile (JSON) and the client's name must be
//! refused with an error when unusable, never panic, and an accepted profile must hold only
//! usable figures and a printable tier. This is `DeviceProfile::from_join`, which the server's
//! `Join` handler calls. Run in `fuzz/`: `cargo fuzz run join_profile`.
#![no_main]

use flotilla_core::device::DeviceProfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the name, the rest the profile JSON.
    let text = String::from_utf8_lossy(data);
    let (name, json) = text.split_once('\n').unwrap_or(("", &text));
    if let Ok(p) = DeviceProfile::from_join(json, name) {
        assert!(p.validate().is_ok());
        assert!(!p.tier.chars().any(char::is_control) && !name.chars().any(char::is_control));
        assert!(p.memory_bytes > 0 && p.flops_per_s > 0.0 && p.flops_per_s.is_finite());
    }
});
