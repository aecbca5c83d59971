//! The ZoneIngress resource parser on arbitrary text: no panic, and an accepted resource round
//! trips through its JSON form (what the bootstrap request sends) to the same resource.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zone_ingress::config::{ConfigError, ZoneIngress};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let zi = match ZoneIngress::from_yaml_str(text, "fuzz") {
        Ok(z) => z,
        Err(e) => {
            if let ConfigError::Invalid { .. } = e {
                assert!(!e.problems().is_empty(), "Invalid without a problem");
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_ne!(zi.networking.port, zi.networking.admin.port);
    let json = zi.to_json().to_string();
    let back = ZoneIngress::from_yaml_str(&json, "round trip")
        .unwrap_or_else(|e| panic!("to_json of an accepted resource is rejected: {e}\n{json}"));
    assert_eq!(back, zi);
});
