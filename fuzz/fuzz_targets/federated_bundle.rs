#![no_main]
//! See `ca_server::fuzzing::federated_bundle`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::federated_bundle(data));
