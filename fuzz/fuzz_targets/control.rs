//! cargo-fuzz target `control`: see `sessiongate_fuzz::control` for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sessiongate_fuzz::control(data));
