#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::cert_identity(data));
