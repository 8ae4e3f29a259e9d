#![no_main]
//! See `ca_server::fuzzing::istio_request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::istio_request(data));
