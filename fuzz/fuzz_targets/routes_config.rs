//! The standalone routes file parser on arbitrary text: no panic, and a file it accepts obeys
//! every documented rule (config/routes.yaml) and becomes a table that routes each SNI to
//! exactly its endpoints.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use zone_ingress::config::{ConfigError, MAX_SNI_LEN, RoutesFile};
use zone_ingress::reload::table_from_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = match RoutesFile::from_yaml_str(text, "fuzz") {
        Ok(f) => f,
        Err(e) => {
            if let ConfigError::Invalid { .. } = e {
                assert!(!e.problems().is_empty(), "Invalid without a problem");
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut snis = HashSet::new();
    for r in &file.routes {
        assert!(
            !r.sni.is_empty() && r.sni.len() <= MAX_SNI_LEN,
            "sni {:?}",
            r.sni
        );
        assert!(snis.insert(r.sni.as_str()), "duplicate sni {:?}", r.sni);
        assert!(
            !r.endpoints.is_empty(),
            "route {:?} without endpoints",
            r.sni
        );
        let mut eps = HashSet::new();
        for e in &r.endpoints {
            assert_ne!(e.port(), 0);
            assert!(eps.insert(e), "duplicate endpoint {e}");
        }
    }
    let table = table_from_file(&file, "fuzz");
    assert_eq!(table.len(), file.routes.len());
    for r in &file.routes {
        let got = table
            .lookup(r.sni.as_bytes())
            .expect("every route is in the table");
        assert_eq!(got.endpoints, r.endpoints);
    }
});
