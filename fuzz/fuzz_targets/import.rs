//! cargo-fuzz target `import`: see `sessiongate_fuzz::import` for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sessiongate_fuzz::import(data));
