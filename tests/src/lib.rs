//! The sessiongate lab: end-to-end tests in network namespaces.
//!
//! This crate owns the test harness: [`Lab`] builds client, router, gateway
//! and host namespaces linked by veth pairs (never to the host's own
//! namespace), runs wireguard-go and dnsmasq on the gateway, services on the
//! "internet" host, a leak meter on the router, and sessiond in the client;
//! dropping it removes everything again. The `labhost` binary
//! (src/bin/labhost.rs) provides the services and probes. Tests live in
//! tests/tests/*.rs and need root.

pub mod call;
pub mod call_compare;
pub mod callflow;
pub mod container;
pub mod daemon;
pub mod dns;
pub mod gateway;
pub mod lab;
pub mod meter;
pub mod observer;
pub mod portal_helper;
pub mod relay;
pub mod sysfuzz;
pub mod util;

pub use daemon::{Daemon, ProfileFiles, DAEMON_TUN_IF};
pub use gateway::{GatewayProgram, PlainClient};
pub use lab::{addr, DnsReply, Lab, LabChild, Ns};
pub use meter::TunnelFlow;
pub use util::{wait_for, wait_until};

/// How long a test waits for the tamper guard to put our tables back. The
/// goal is well under a second (the tests print what they measured: tens of
/// milliseconds on an idle machine); the deadline is generous so that a
/// loaded two-core CI machine does not fail a correct restore, while a
/// restore that never comes still fails. Timing goals live in benchmarks.
pub const RESTORE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
