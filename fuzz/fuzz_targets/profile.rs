//! cargo-fuzz target `profile`: see `sessiongate_fuzz::profile` for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sessiongate_fuzz::profile(data));
