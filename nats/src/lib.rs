//! The bench-race NATS layer, shared by the agent and central.
//!
//! Layout: [`connect`] turns a [`NatsConfig`] (URL, auth, TLS, NAT-friendly pings) into a client
//! that reconnects forever; [`streams`] holds the one definition of the `BENCH_EVENTS` stream and
//! the `bench_agents` bucket that both programs create idempotently; [`harness`] (feature
//! `harness`) starts a real `nats-server` with JetStream for tests; [`auth`] renders the
//! least-privilege accounts (per-agent nkey users) that `bench-auth` writes for a fleet;
//! [`settings`] holds the config error, environment and shutdown signal both programs share.

pub mod auth;
pub mod connect;
#[cfg(feature = "harness")]
pub mod harness;
pub mod settings;
pub mod streams;

pub use connect::{
    connect, connect_with_capacity, round_trip, wait_connected, ConnectError, NatsConfig,
    DEFAULT_NATS_URL,
};
