//! A disk log directory of arbitrary bytes, read by the subscribers' reader and recovered
//! (`embar_dataplane::fuzzing::disk_log_recovery`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    embar_dataplane::fuzzing::disk_log_recovery(data);
});
