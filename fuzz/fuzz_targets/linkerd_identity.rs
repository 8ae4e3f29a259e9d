#![no_main]
//! See `ca_server::fuzzing::linkerd_identity`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::linkerd_identity(data));
