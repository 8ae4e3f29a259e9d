#![no_main]
//! See `ca_server::fuzzing::ledger_log`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ca_server::fuzzing::ledger_log(data));
