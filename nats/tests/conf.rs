//! Every server config in nats/conf/ is valid for the pinned nats-server (`nats-server -t`),
//! auth.conf with accounts generated the way `scripts/nats add-agent` generates them, the leaf
//! configs with the environment variables they read (tests/nat/test_leaf.py runs them).

use bench_nats::auth::{render_accounts, Identity};
use bench_nats::harness::{server_binary, workspace_root};
use std::process::Command;

/// What leaf.conf and leaf-proxy.conf read from the environment.
const LEAF_ENV: [(&str, &str); 3] = [
    ("BENCH_SITE_NAME", "lab-1"),
    (
        "BENCH_HUB_LEAF_URL",
        "nats-leaf://site:secret@hub.example.org:7422",
    ),
    ("BENCH_LEAF_PROXY_URL", "http://proxy.example.org:3128"),
];

fn test_config(conf: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(server_binary());
    cmd.arg("-t").arg("-c").arg(conf);
    for (k, _) in LEAF_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("nats-server runs")
}

fn check(conf: &std::path::Path) {
    check_with(conf, &[]);
}

fn check_with(conf: &std::path::Path, env: &[(&str, &str)]) {
    let out = test_config(conf, env);
    assert!(
        out.status.success(),
        "{}: {}{}",
        conf.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn configs_are_valid() {
    let conf = workspace_root().join("nats/conf");
    check(&conf.join("dev.conf"));
    check_with(&conf.join("leaf.conf"), &LEAF_ENV);
    check_with(&conf.join("leaf-proxy.conf"), &LEAF_ENV);
    check(&conf.join("cluster.conf"));
    // auth.conf includes ../../var/auth/accounts.conf: lay out the same tree in a temp dir.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("nats/conf")).unwrap();
    std::fs::create_dir_all(tmp.path().join("var/auth")).unwrap();
    std::fs::copy(
        conf.join("auth.conf"),
        tmp.path().join("nats/conf/auth.conf"),
    )
    .unwrap();
    let agent = Identity::generate();
    let accounts = render_accounts(
        &[("box-1".into(), agent.public)],
        &Identity::generate().public,
        &Identity::generate().public,
    );
    std::fs::write(tmp.path().join("var/auth/accounts.conf"), accounts).unwrap();
    check(&tmp.path().join("nats/conf/auth.conf"));
}

#[test]
fn leaf_configs_refuse_to_start_without_their_environment() {
    let conf = workspace_root().join("nats/conf");
    for file in ["leaf.conf", "leaf-proxy.conf"] {
        for missing in LEAF_ENV.iter().map(|(k, _)| *k) {
            if file == "leaf.conf" && missing == "BENCH_LEAF_PROXY_URL" {
                continue;
            }
            let env: Vec<_> = LEAF_ENV
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let out = test_config(&conf.join(file), &env);
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{file} without {missing} accepted");
            assert!(said.contains(missing), "{file} without {missing}: {said}");
        }
    }
}
