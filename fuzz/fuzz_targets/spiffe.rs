#![no_main]
//! See `ca_server::fuzzing::spiffe`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::spiffe(data));
