#![no_main]
//! See `ca_server::fuzzing::state_flat`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::state_flat(data));
