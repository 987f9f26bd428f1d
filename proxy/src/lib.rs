//! Floodgate's edge gateway: a reverse proxy on pingora that replaces nginx in front of
//! several backend instances.
//!
//! **One request policy, two engines.** Every decision about a request lives in
//! [`policy`], plain functions over plain data; the engines only move bytes:
//!
//! - [`downstream`]: every accepted connection: PROXY protocol, connection caps, the head
//!   deadline ([`downstream::ClientStream`]), then the engine;
//! - [`h1`]: the gateway's own HTTP/1.1 engine (plain requests, most of the traffic);
//! - [`pingora_h1`]: pingora's HTTP/1 engine (everything else: HTTP/1.0, chunked bodies,
//!   `Expect`, upgrades), with [`pingora_compat`] holding what depends on pingora internals;
//! - [`forward`]: the exchange with a backend both engines use (retries, relay, cut);
//! - [`upstream`]: the pool, balancing, health, backend connections;
//! - [`limits`]: the rate limiter mechanisms; [`answers`]: the one JSON error answer;
//! - [`config`], [`reload`], [`metrics`], [`logging`], [`server`], [`state`].

pub mod answers;
pub mod config;
pub mod downstream;
pub mod forward;
pub mod h1;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pingora_compat;
pub mod pingora_h1;
pub mod policy;
pub mod reload;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;

pub use server::{build_server, run, RunOptions};

/// A boxed error for the edges (start-up), where the message is all that matters.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}
