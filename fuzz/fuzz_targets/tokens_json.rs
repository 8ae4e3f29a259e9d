#![no_main]
//! See `ca_server::fuzzing::tokens_json`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::tokens_json(data));
