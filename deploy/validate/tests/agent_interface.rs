//! Every flag and variable the deployment files hand to the agent must be one the agent reads,
//! according to the real binary's `run --help` (clap's rendering of its own definitions).
//!
//! kuma-dp's control-plane flags (`KUMA_DP_INTERFACE`) may not be in the binary yet. Until the
//! marker flag `--cp-address` appears, the variables and flags of that table are reported as
//! pending instead of failing; once it appears, every entry must be there, bound to its variable.

use zone_ingress_deploy::clihelp::{RunHelp, flag_pairs};
use zone_ingress_deploy::dockerfile::Dockerfile;
use zone_ingress_deploy::k8s;
use zone_ingress_deploy::unit::{Unit, env_file_keys};
use zone_ingress_deploy::{
    CONTROL_PLANE_MARKER, KUMA_DP_INTERFACE, PLAIN_ENV, agent_binary, repo_root,
};

/// (where, name, literal value if any)
type EnvUse = (String, String, Option<String>);
/// (where, argv after the binary)
type ArgsUse = (String, Vec<String>);

fn daemonset_inputs() -> (Vec<EnvUse>, Vec<ArgsUse>) {
    let path = repo_root().join("deploy/kubernetes/daemonset.yaml");
    let report = k8s::validate_file(&path).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let mut envs = Vec::new();
    let mut args = Vec::new();
    for obj in report.objects.iter().filter(|o| o.kind == "DaemonSet") {
        for c in obj.value["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            let place = format!("daemonset.yaml container {}", c["name"]);
            assert!(
                c.get("command").is_none(),
                "{place}: the image's ENTRYPOINT is the agent; set args only"
            );
            for e in c["env"].as_array().into_iter().flatten() {
                envs.push((
                    place.clone(),
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().map(str::to_owned),
                ));
            }
            let argv = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            args.push((place, argv));
        }
    }
    (envs, args)
}

fn systemd_inputs() -> (Vec<EnvUse>, Vec<ArgsUse>) {
    let dir = repo_root().join("deploy/systemd");
    let unit = Unit::parse(&std::fs::read_to_string(dir.join("zone-ingress.service")).unwrap())
        .expect("unit parses");
    let exec = unit.get("Service", "ExecStart").expect("ExecStart");
    let mut words = exec.split_whitespace().map(str::to_owned);
    let bin = words.next().unwrap();
    assert!(bin.ends_with("/zone-ingress"), "ExecStart runs {bin}");
    let mut envs = Vec::new();
    for e in unit.values("Service", "Environment") {
        let (k, v) = e.split_once('=').expect("Environment=KEY=value");
        envs.push(("zone-ingress.service".into(), k.into(), Some(v.into())));
    }
    // The example EnvironmentFile, its commented-out options too: they are documentation a
    // person will uncomment.
    let text = std::fs::read_to_string(dir.join("zone-ingress.env")).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| {
            let t = l.trim_start_matches(['#', ' ']);
            if t.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            }) {
                t
            } else {
                ""
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (k, v) in env_file_keys(&uncommented) {
        envs.push(("zone-ingress.env".into(), k, Some(v)));
    }
    let reload = unit.get("Service", "ExecReload").expect("ExecReload");
    (
        envs,
        vec![
            ("zone-ingress.service ExecStart".into(), words.collect()),
            (
                "zone-ingress.service ExecReload".into(),
                reload
                    .split_whitespace()
                    .skip(1)
                    .map(str::to_owned)
                    .collect(),
            ),
        ],
    )
}

fn dockerfile_inputs() -> Vec<ArgsUse> {
    let df = Dockerfile::parse(&std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap())
        .unwrap();
    let runtime = df.stages.last().expect("a stage");
    runtime
        .with_keyword("CMD")
        .map(|c| {
            let argv: Vec<String> = serde_json::from_str(&c.args).expect("CMD in exec form");
            ("Dockerfile CMD".to_owned(), argv)
        })
        .collect()
}

#[test]
fn deployment_flags_and_variables_are_the_agents() {
    let help = RunHelp::from_binary(&agent_binary()).expect("zone-ingress run --help");
    let landed = help.options.contains_key(CONTROL_PLANE_MARKER);
    let mut errors = Vec::new();
    let mut pending = Vec::new();

    // kuma-dp's interface: each flag bound to kuma-dp's variable.
    for (flag, env) in KUMA_DP_INTERFACE {
        match help.options.get(*flag) {
            Some(opt) => {
                if opt.env.as_deref() != *env {
                    errors.push(format!("{flag} reads {:?}; kuma-dp's is {env:?}", opt.env));
                }
            }
            None if landed => errors.push(format!(
                "{CONTROL_PLANE_MARKER} is there but {flag} (kuma-dp's, {env:?}) is not"
            )),
            None => pending.push(format!("{flag} ({})", env.unwrap_or("no variable"))),
        }
    }

    let (mut envs, mut args) = daemonset_inputs();
    let (e2, a2) = systemd_inputs();
    envs.extend(e2);
    args.extend(a2);
    args.extend(dockerfile_inputs());
    assert!(envs.len() >= 6 && args.len() >= 3, "inputs not found");

    let pending_flag = |flag: &str| !landed && KUMA_DP_INTERFACE.iter().any(|(f, _)| *f == flag);
    for (place, name, value) in &envs {
        if PLAIN_ENV.contains(&name.as_str()) {
            continue;
        }
        match help.flag_for_env(name) {
            Some(flag) => {
                let opt = &help.options[flag];
                if let Some(v) = value
                    && !opt.possible_values.is_empty()
                    && !opt.possible_values.contains(v)
                {
                    errors.push(format!(
                        "{place}: {name}={v}, but {flag} takes {:?}",
                        opt.possible_values
                    ));
                }
            }
            None => match KUMA_DP_INTERFACE.iter().find(|(_, e)| *e == Some(name)) {
                Some((flag, _)) if pending_flag(flag) => {
                    pending.push(format!("{place}: {name} (for {flag})"))
                }
                _ => errors.push(format!("{place}: {name} is read by no option of `run`")),
            },
        }
    }
    for (place, argv) in &args {
        if argv.first().map(String::as_str) != Some("run") {
            errors.push(format!("{place}: {argv:?} does not start with `run`"));
            continue;
        }
        for (flag, value) in flag_pairs(&help, &argv[1..]) {
            let Some(flag) = flag else {
                errors.push(format!("{place}: stray argument {value:?}"));
                continue;
            };
            match help.options.get(&flag) {
                Some(opt) => {
                    if let Some(v) = &value
                        && !opt.possible_values.is_empty()
                        && !opt.possible_values.contains(v)
                    {
                        errors.push(format!(
                            "{place}: {flag} {v}, but it takes {:?}",
                            opt.possible_values
                        ));
                    }
                    if opt.takes_value && value.is_none() {
                        errors.push(format!("{place}: {flag} without its value"));
                    }
                }
                None if pending_flag(&flag) => pending.push(format!("{place}: {flag}")),
                None => errors.push(format!("{place}: `run` has no option {flag}")),
            }
        }
    }
    if !pending.is_empty() {
        eprintln!(
            "pending until the control-plane flags land ({CONTROL_PLANE_MARKER} absent from \
             `run --help`):\n  {}",
            pending.join("\n  ")
        );
    }
    assert!(
        errors.is_empty(),
        "deployment files and `zone-ingress run` disagree:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn an_unknown_flag_or_variable_is_caught() {
    // The same parsing the real check uses, fed a help text and inputs it must reject.
    let help = RunHelp::parse(
        "Options:\n      --datapath <DATAPATH>\n          x\n\n          [env: ZONE_INGRESS_DATAPATH=]\n          [possible values: auto, sockmap, userspace]\n",
    );
    assert_eq!(
        help.flag_for_env("ZONE_INGRESS_DATAPATH"),
        Some("--datapath")
    );
    assert_eq!(help.flag_for_env("ZONE_INGRESS_DATAPTH"), None);
    let pairs = flag_pairs(&help, &["--datapth=auto".to_owned()]);
    assert!(!help.options.contains_key(pairs[0].0.as_deref().unwrap()));
    let opt = &help.options["--datapath"];
    assert!(!opt.possible_values.contains(&"kernel".to_owned()));
}
