#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| iscsi_fuzz::nbd(data));
