//! The local config file (YAML: settings, workloads, services, Istio policies).
//!
//! Invariants: a rejected file's error names the file; an accepted file is accepted
//! again with the same settings (checking is deterministic).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ztunnel::fuzzing::parse_config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/ztunnel/fuzz.yaml");
    match parse_config(path, text) {
        Ok(config) => {
            let again = parse_config(path, text).expect("accepted once, accepted again");
            assert_eq!(again.settings, config.settings);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with("/etc/ztunnel/fuzz.yaml"),
                "error does not name the file: {message}"
            );
        }
    }
});
