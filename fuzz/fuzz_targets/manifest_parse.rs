//! Arbitrary bytes as a `plugin.json`. Run with
//! `cargo +nightly fuzz run manifest_parse -- -dict=manifest.dict`.
//!
//! Never a panic; an error reads as one bounded, printable line (field at
//! most 256 characters, message at most 1,024); an accepted manifest
//! written back as JSON parses to the same manifest (`config` aside, see below).
#![no_main]

use std::path::Path;

use dynplug::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("p/plugin.json");
    match Manifest::parse(data, path, "p") {
        Err(error) => {
            let text = error.to_string();
            assert!(
                text.chars().count() <= 1024 + 256 + 32,
                "{} chars",
                text.len()
            );
            assert!(!text.contains(char::is_control), "{text:?}");
        }
        Ok(manifest) => {
            let json = serde_json::to_vec(&manifest).unwrap();
            let mut again =
                Manifest::parse(&json, path, "p").expect("a manifest written back parses");
            // serde_json's default float parsing is not correctly rounded
            // (its `float_roundtrip` feature is), so a float in `config` may
            // come back one ulp off (found by this target): only its
            // presence is compared.
            let mut manifest = manifest;
            assert_eq!(
                again.config.take().is_some(),
                manifest.config.take().is_some()
            );
            assert_eq!(again, manifest);
        }
    }
});
