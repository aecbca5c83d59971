//! xDS resources (proto3 JSON/YAML, as in Kuma's golden files) to the route table, on arbitrary
//! text: no panic, and an accepted snapshot resolves to sorted, unique SNIs and endpoints that the
//! listener's table serves unchanged. The reload path (`table_from_xds`) must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zone_ingress::config::MAX_SNI_LEN;
use zone_ingress::reload::table_from_xds;
use zone_ingress::xds::{resources_from_str, route_table};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let routes = resources_from_str(text).and_then(|r| route_table(&r));
    let reloaded = table_from_xds(text, "fuzz");
    let routes = match routes {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(
                reloaded.is_err(),
                "reload accepted what route_table rejected"
            );
            return;
        }
    };
    let reloaded = reloaded.expect("reload rejected what route_table accepted");
    for pair in routes.routes.windows(2) {
        assert!(pair[0].sni < pair[1].sni, "routes not sorted by unique SNI");
    }
    for r in &routes.routes {
        assert!(
            !r.sni.is_empty() && r.sni.len() <= MAX_SNI_LEN,
            "sni {:?}",
            r.sni
        );
        for pair in r.endpoints.windows(2) {
            assert!(
                pair[0].address < pair[1].address,
                "endpoints of {} not sorted/unique",
                r.sni
            );
        }
    }
    let table = routes.to_route_table("fuzz");
    assert_eq!(table.len(), routes.routes.len());
    assert_eq!(reloaded.len(), routes.routes.len());
    assert_eq!(
        table.direct_response().map(|b| b.to_vec()),
        routes.direct_response
    );
    for r in &routes.routes {
        let want: Vec<_> = r.endpoints.iter().map(|e| e.address).collect();
        let got = table.lookup(r.sni.as_bytes()).expect("route in the table");
        assert_eq!(got.endpoints, want);
        assert_eq!(&*got.cluster, r.cluster.as_str());
        let got = reloaded
            .lookup(r.sni.as_bytes())
            .expect("route in the reloaded table");
        assert_eq!(got.endpoints, want);
    }
    // Serialising the admin view of the snapshot must not panic either.
    assert!(!routes.to_json().is_empty());
});
