//! Bad configurations (case 10): `check` exits 1 and `run` exits non-zero, with messages naming the
//! file, the field and the fix.

use std::time::Duration;

use zone_ingress_tests::agent::{self, Exit};
use zone_ingress_tests::netns::Netns;
use zone_ingress_tests::run_test;

const GOOD_ROUTES: &str =
    "routes:\n  - sni: \"backend{mesh=default}\"\n    endpoints: [\"10.231.2.2:8443\"]\n";

fn zi(networking: &str) -> String {
    format!("type: ZoneIngress\nname: zi-test\nnetworking:\n{networking}")
}

fn good_zi() -> String {
    zi("  address: 10.231.1.2\n  port: 10001\n  admin:\n    port: 9901\n")
}

struct Case {
    what: &'static str,
    config: String,
    routes: &'static str,
    /// Which file the message must name (`zone-ingress.yaml` or `routes.yaml`).
    file: &'static str,
    /// Every one of these must appear in stderr.
    must: &'static [&'static str],
    /// At least one of these must appear in stderr (e.g. alternative spellings of a line number).
    any: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            what: "admin.port == port",
            config: zi("  address: 10.231.1.2\n  port: 10001\n  admin:\n    port: 10001\n"),
            routes: GOOD_ROUTES,
            file: "zone-ingress.yaml",
            must: &["networking.admin.port"],
            any: &["differ", "same", "conflict", "equal"],
        },
        Case {
            what: "advertisedAddress without advertisedPort",
            config: zi(
                "  address: 10.231.1.2\n  advertisedAddress: 10.231.1.2\n  port: 10001\n  admin:\n    port: 9901\n",
            ),
            routes: GOOD_ROUTES,
            file: "zone-ingress.yaml",
            must: &["advertisedPort"],
            any: &["advertisedAddress"],
        },
        Case {
            what: "wrong type",
            config: good_zi().replace("type: ZoneIngress", "type: Dataplane"),
            routes: GOOD_ROUTES,
            file: "zone-ingress.yaml",
            must: &["type", "ZoneIngress"],
            any: &["Dataplane"],
        },
        Case {
            what: "duplicate SNI",
            config: good_zi(),
            routes: "routes:\n  - sni: \"backend{mesh=default}\"\n    endpoints: [\"10.231.2.2:8443\"]\n  \
                     - sni: \"backend{mesh=default}\"\n    endpoints: [\"10.231.2.3:8443\"]\n",
            file: "routes.yaml",
            must: &["routes[1].sni"],
            any: &["duplicate", "Duplicate", "already"],
        },
        Case {
            what: "endpoint without port",
            config: good_zi(),
            routes: "routes:\n  - sni: \"backend{mesh=default}\"\n    endpoints: [\"10.231.2.2\"]\n",
            file: "routes.yaml",
            must: &["routes[0].endpoints[0]", "port"],
            any: &["10.231.2.2:"],
        },
        Case {
            what: "YAML syntax error (tab indentation on line 5)",
            config: zi("  address: 10.231.1.2\n\tport: 10001\n  admin:\n    port: 9901\n"),
            routes: GOOD_ROUTES,
            file: "zone-ingress.yaml",
            must: &[],
            any: &[":5:", "line 5"],
        },
        Case {
            what: "YAML syntax error in the routes (unclosed flow sequence from line 3)",
            config: good_zi(),
            routes: "routes:\n  - sni: \"a.example\"\n    endpoints: [\"10.231.2.2:8443\"\n",
            file: "routes.yaml",
            must: &[],
            any: &[":3:", ":4:", "line 3", "line 4"],
        },
    ]
}

fn assert_message(c: &Case, cmd: &str, exit: &Exit) {
    let e = &exit.stderr;
    let ctx = || {
        format!(
            "{cmd} / {}: stderr was:\n{e}\nconfig:\n{}\nroutes:\n{}",
            c.what, c.config, c.routes
        )
    };
    assert!(
        e.contains(c.file),
        "the message should name the file {}; {}",
        c.file,
        ctx()
    );
    for m in c.must {
        assert!(e.contains(m), "the message should contain {m:?}; {}", ctx());
    }
    if !c.any.is_empty() {
        assert!(
            c.any.iter().any(|a| e.contains(a)),
            "the message should contain one of {:?}; {}",
            c.any,
            ctx()
        );
    }
}

#[test]
fn check_accepts_a_good_config() {
    let (exit, _dir) = agent::check(&good_zi(), Some(GOOD_ROUTES));
    assert!(
        exit.status.success(),
        "check rejected a valid config ({}): {}",
        exit.status,
        exit.stderr
    );
}

#[test]
fn check_rejects_bad_configs() {
    for c in cases() {
        let (exit, _dir) = agent::check(&c.config, Some(c.routes));
        assert_eq!(
            exit.status.code(),
            Some(1),
            "check should exit 1 for {}; stderr:\n{}",
            c.what,
            exit.stderr
        );
        assert_message(&c, "check", &exit);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rejects_bad_configs() {
    run_test(Duration::from_secs(90), async {
        let ns = Netns::new(&format!("zi-{}-r", zone_ingress_tests::unique_suffix()));
        for c in cases() {
            let (exit, _dir) = agent::run_to_exit(&ns, &c.config, c.routes);
            assert!(
                !exit.status.success(),
                "run should exit non-zero for {}; it exited {}; stderr:\n{}",
                c.what,
                exit.status,
                exit.stderr
            );
            assert_message(&c, "run", &exit);
        }
    })
    .await
}
