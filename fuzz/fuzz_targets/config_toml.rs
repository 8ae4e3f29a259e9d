#![no_main]
//! See `ca_server::fuzzing::config_toml`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::config_toml(data));
