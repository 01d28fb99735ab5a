//! Arbitrary bytes as a plugin library, through the checks made before
//! `dlopen` (object format, architecture, segments, root symbol, header).
//! Run with `cargo +nightly fuzz run library_header` (seed the corpus with
//! built plugins, e.g. `cp ../target/debug/lib*.so corpus/library_header/`).
//!
//! Never a panic, never a read out of bounds (the fuzzer's sanitizer would
//! report it); only refusals or acceptance.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dynplug::fuzzing::inspect_library(data);
});
