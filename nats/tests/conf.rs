//! Every server config in nats/conf/ is valid for the pinned nats-server (`nats-server -t`),
//! auth.conf with accounts generated the way `scripts/nats add-agent` generates them.

use bench_nats::auth::{render_accounts, Identity};
use bench_nats::harness::{server_binary, workspace_root};
use std::process::Command;

fn check(conf: &std::path::Path) {
    let out = Command::new(server_binary())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .output()
        .expect("nats-server runs");
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
    check(&conf.join("leaf.conf"));
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
