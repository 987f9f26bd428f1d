//! The gateway's logger: env_logger's format and output, with two changes.
//!
//! - The level in force is `log::max_level()`: the config's `log_level`, which a reload can
//!   raise as well as lower (env_logger alone fixes its filter at start, so a reload could only
//!   lower it). When `RUST_LOG` is set, its per-module directives govern and reloads leave the
//!   level alone.
//! - pingora logs a client that failed before its request head was complete (a slowloris
//!   connection cut at `header_timeout`, a client that hung up mid-head) as an ERROR, with no
//!   hook to say otherwise. Those are the client's doing, counted in
//!   `gateway_rejections_total`; here they are logged at debug, so an attack cannot flood the
//!   error log. Failures after the head have pingora's `suppress_error_log` hook (proxy.rs).
//!
//! The `h2` crate (pingora's HTTP/2 server) reports through `tracing`, whose spans and events
//! went to `log` when no `tracing` subscriber is installed: several per HTTP/2 frame, each
//! building a record for a level that is off (about 3% of an HTTP/2 request's CPU). Its
//! spans and events are debug and trace only, so when the level at start is info or above
//! (and `RUST_LOG` is not set) a no-op subscriber takes them instead; a reload that raises the
//! level to debug then shows the gateway's and pingora's debug lines but not h2's (start with
//! `log_level: debug` or `RUST_LOG` for those).

use std::fmt::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// `RUST_LOG` was set at start: reloads do not change the level.
static FROM_ENV: AtomicBool = AtomicBool::new(false);

/// Install the logger with the config's level (or `RUST_LOG`'s directives).
pub fn init(level: LevelFilter) {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let mut builder = env_logger::Builder::new();
    if from_env {
        builder.parse_env("RUST_LOG");
    } else {
        builder.filter_level(LevelFilter::Trace);
    }
    let inner = builder.build();
    let max = if from_env { inner.filter() } else { level };
    FROM_ENV.store(from_env, Ordering::Relaxed);
    if log::set_boxed_logger(Box::new(GatewayLogger { inner })).is_ok() {
        log::set_max_level(max);
    }
    if !from_env && max < LevelFilter::Debug {
        let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::none());
    }
}

/// The level after a reload (unless `RUST_LOG` governs).
pub fn set_level(level: LevelFilter) {
    if !FROM_ENV.load(Ordering::Relaxed) {
        log::set_max_level(level);
    }
}

struct GatewayLogger {
    inner: env_logger::Logger,
}

impl Log for GatewayLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level() && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !client_failed_before_its_head(record) {
            if self.enabled(record.metadata()) {
                self.inner.log(record);
            }
            return;
        }
        let demoted = Record::builder()
            .args(*record.args())
            .level(Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.enabled(demoted.metadata()) {
            self.inner.log(&demoted);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// pingora-proxy's `Fail to proxy: Downstream ...` ERROR, which it writes when reading a
/// request head fails on the client's side (`handle_new_request`).
fn client_failed_before_its_head(record: &Record) -> bool {
    const PREFIX: &str = "Fail to proxy: Downstream ";
    record.level() == Level::Error
        && record.target() == "pingora_proxy"
        && starts_with(record.args(), PREFIX)
}

/// Whether formatted `args` start with `prefix`, formatting no more than its length.
fn starts_with(args: &fmt::Arguments<'_>, prefix: &str) -> bool {
    struct Head<'a> {
        prefix: &'a str,
        matched: usize,
    }
    impl Write for Head<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let rest = &self.prefix[self.matched..];
            let n = rest.len().min(s.len());
            if rest.as_bytes()[..n] != s.as_bytes()[..n] {
                return Err(fmt::Error);
            }
            self.matched += n;
            if self.matched == self.prefix.len() {
                // Seen enough: stop formatting.
                return Err(fmt::Error);
            }
            Ok(())
        }
    }
    let mut head = Head { prefix, matched: 0 };
    let _ = fmt::write(&mut head, *args);
    head.matched == prefix.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pingoras_client_side_head_failures_are_demoted() {
        let head = "Downstream ReadError context: while reading request headers";
        for (target, level, error, demoted) in [
            ("pingora_proxy", Level::Error, head, true),
            (
                "pingora_proxy",
                Level::Error,
                "Upstream ConnectTimedout",
                false,
            ),
            ("pingora_proxy", Level::Warn, head, false),
            ("floodgate_proxy", Level::Error, head, false),
        ] {
            // pingora's own format: the prefix arrives in two pieces.
            let record = |args| {
                Record::builder()
                    .args(args)
                    .level(level)
                    .target(target)
                    .build()
            };
            assert_eq!(
                client_failed_before_its_head(&record(format_args!("Fail to proxy: {error}, x"))),
                demoted,
                "{target} {level} {error}"
            );
        }
        assert!(!starts_with(
            &format_args!("Fail to"),
            "Fail to proxy: Downstream "
        ));
    }
}
