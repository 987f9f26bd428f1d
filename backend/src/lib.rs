//! Floodgate's API backend: the service the gateway balances across.
//!
//! - [`config`]: flags and environment variables (`backend --help`).
//! - [`startup`]: builds the server (tests start it on port 0) and runs it until a signal.
//! - [`routes`]: the router; [`routes::items`] the items API, [`routes::probes`] health,
//!   readiness and metrics.
//! - [`admission`]: per-instance admission control: a concurrency limit that follows latency
//!   (or a fixed cap), a short bounded wait for a slot, 503 beyond.
//! - [`callers`]: API key -> user and tier, cached.
//! - [`ratelimit`]: per-user and per-endpoint limits, shared through Redis (one atomic Lua
//!   script) with an in-process fallback.
//! - [`readiness`]: what `/ready` reports, with dependencies checked in the background.
//! - [`vendor`]: the guarded vendor call behind `POST /llm`.
//! - [`db`]: PostgreSQL or embedded SQLite through sqlx, with migrations.
//! - [`writes`]: `POST /items` inserts, group-committed on PostgreSQL.
//! - [`error`]: the API's errors and their one JSON shape.
//! - [`metrics`]: every Prometheus metric.
//! - [`tls`]: TLS to the vendor, PostgreSQL and Redis (rustls).

pub mod admission;
pub mod callers;
pub mod config;
pub mod db;
pub mod error;
pub mod metrics;
pub mod ratelimit;
pub mod readiness;
pub mod routes;
pub mod startup;
pub mod tls;
pub mod vendor;
pub mod writes;
