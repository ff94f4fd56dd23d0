#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::signing_path(data));
