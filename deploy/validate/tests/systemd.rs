//! deploy/systemd/zone-ingress.service: the settings it must carry, and `systemd-analyze verify`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use zone_ingress_deploy::unit::{Unit, env_file_keys};
use zone_ingress_deploy::{BPF_CAPABILITIES, agent_binary, repo_root};

const INSTALLED_BIN: &str = "/usr/local/bin/zone-ingress";

fn unit_text() -> String {
    std::fs::read_to_string(repo_root().join("deploy/systemd/zone-ingress.service")).unwrap()
}

#[test]
fn unit_runs_with_the_bpf_capabilities_only_and_restarts() {
    let text = unit_text();
    let unit = Unit::parse(&text).expect("unit parses");
    let s = "Service";
    assert_eq!(unit.get(s, "Restart"), Some("on-failure"));
    let exec = unit.get(s, "ExecStart").unwrap();
    assert!(exec.starts_with(&format!("{INSTALLED_BIN} run ")), "{exec}");
    // uid 0 (the pin dir on bpffs is root's): no User= (or root), but a bounding set of exactly
    // the BPF capabilities takes every other privilege of root away.
    assert!(matches!(unit.get(s, "User"), None | Some("root")));
    let caps: Vec<&str> = unit
        .values(s, "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    let want: Vec<String> = BPF_CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    assert_eq!(caps, want);
    assert_eq!(unit.get(s, "NoNewPrivileges"), Some("yes"));
    // The drain fits in the stop timeout.
    let env_path = unit
        .get(s, "EnvironmentFile")
        .unwrap()
        .trim_start_matches('-');
    assert_eq!(env_path, "/etc/zone-ingress/zone-ingress.env");
    let env = env_file_keys(
        &std::fs::read_to_string(repo_root().join("deploy/systemd/zone-ingress.env")).unwrap(),
    );
    let drain = env
        .iter()
        .find(|(k, _)| k == "KUMA_DATAPLANE_DRAIN_TIME")
        .map(|(_, v)| humantime::parse_duration(v).unwrap())
        .unwrap_or(Duration::from_secs(30));
    let stop = humantime::parse_duration(unit.get(s, "TimeoutStopSec").unwrap()).unwrap();
    assert!(
        stop > drain + Duration::from_secs(1),
        "TimeoutStopSec {stop:?} vs drain {drain:?}"
    );
    // Every path the unit and its env file use is documented in the unit's header.
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths: Vec<&str> = exec
        .split_whitespace()
        .chain([env_path])
        .chain(env.iter().map(|(_, v)| v.as_str()))
        .filter(|w| w.starts_with('/'))
        .collect();
    paths.dedup();
    assert!(paths.len() >= 5, "{paths:?}");
    for p in paths {
        assert!(
            header.contains(p),
            "{p} is not documented in the unit's header"
        );
    }
}

/// `systemctl reload` is the hot restart: the same command line plus `--upgrade --detach`, a
/// notify-type unit that accepts the new agent's MAINPID=, and a runtime directory for the
/// handoff socket.
#[test]
fn unit_reload_is_a_hot_restart() {
    let unit = Unit::parse(&unit_text()).expect("unit parses");
    let s = "Service";
    let start = unit.get(s, "ExecStart").unwrap();
    assert_eq!(
        unit.get(s, "ExecReload"),
        Some(format!("{start} --upgrade --detach").as_str()),
        "ExecReload must be ExecStart plus `--upgrade --detach`"
    );
    assert_eq!(unit.get(s, "Type"), Some("notify"));
    assert_eq!(unit.get(s, "NotifyAccess"), Some("all"));
    assert_eq!(unit.get(s, "RuntimeDirectory"), Some("zone-ingress"));
    // The default handoff socket lives in that runtime directory.
    assert!(!start.contains("--handoff-socket"), "{start}");
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.is_file(),
        "systemd-analyze is missing: `apt-get install systemd` (this test does not skip)"
    );
    // verify checks that ExecStart's binary exists: point it at the built agent, nothing else
    // in the unit changes.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("zone-ingress.service");
    let bin = agent_binary();
    let text = unit_text();
    assert!(text.contains(&format!("ExecStart={INSTALLED_BIN} ")));
    std::fs::write(
        &unit,
        text.replace(
            &format!("ExecStart={INSTALLED_BIN} "),
            &format!("ExecStart={} ", bin.display()),
        )
        .replace(
            &format!("ExecReload={INSTALLED_BIN} "),
            &format!("ExecReload={} ", bin.display()),
        ),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // And it does catch a broken unit (a misspelt key), so the pass above means something.
    std::fs::write(
        &unit,
        std::fs::read_to_string(&unit)
            .unwrap()
            .replace("Restart=on-failure", "Restrat=on-failure"),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key 'Restrat'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
