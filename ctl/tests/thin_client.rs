//! sessionctl is a thin client: it links the shared crate
//! (daemon/common), never the daemon. This test fails when a crate that
//! belongs to the daemon (an async runtime, WireGuard, nftables, netlink,
//! the TUN device, DNS) shows up in sessionctl's normal dependency tree.

use std::process::Command;

/// Crates only sessiond may link.
const DAEMON_ONLY: &[&str] = &[
    "tokio",
    "boringtun",
    "nftables",
    "rtnetlink",
    "tun-rs",
    "hickory-proto",
];

/// The crate names in sessionctl's normal (non-dev, non-build) dependency
/// tree, as `cargo tree` resolves it from the lock file.
fn normal_dependencies(extra: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--manifest-path", manifest])
        .args([
            "-p",
            "sessionctl",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(extra)
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn sessionctl_links_nothing_of_the_daemon() {
    let deps = normal_dependencies(&["--no-default-features"]);
    assert!(deps.iter().any(|d| d == "sessiongate-common"), "{deps:?}");
    let found: Vec<&str> = DAEMON_ONLY
        .iter()
        .copied()
        .filter(|c| deps.iter().any(|d| d == c))
        .collect();
    assert!(found.is_empty(), "sessionctl depends on daemon crates: {found:?}");
    assert!(
        !deps.iter().any(|d| d == "sessiond"),
        "sessionctl depends on the daemon crate"
    );
}

/// With the notifier (default features) only tokio may join, for zbus in
/// sessionctl-notify; the daemon's own crates still stay out.
#[test]
fn the_notifier_adds_no_daemon_crate_but_tokio() {
    let deps = normal_dependencies(&[]);
    let found: Vec<&str> = DAEMON_ONLY
        .iter()
        .copied()
        .filter(|c| *c != "tokio" && deps.iter().any(|d| d == c))
        .collect();
    assert!(
        found.is_empty(),
        "sessionctl-notify depends on daemon crates: {found:?}"
    );
    assert!(
        !deps.iter().any(|d| d == "sessiond"),
        "sessionctl depends on the daemon crate"
    );
}
