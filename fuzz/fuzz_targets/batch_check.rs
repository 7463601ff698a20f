//! A batch descriptor and the bytes of its batch, checked as a broker checks what a
//! publisher wrote (`embar_dataplane::fuzzing::batch_check`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embar_dataplane::fuzzing::batch_check(data);
});
