//! cargo-fuzz target `dns`: see `sessiongate_fuzz::dns` for what it feeds and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sessiongate_fuzz::dns(data));
