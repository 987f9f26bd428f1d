//! The config file's parsing and validation.

use super::*;

const MINIMAL: &str = "upstream:\n  backends: [\"127.0.0.1:9001\"]\n";

#[test]
fn minimal_file_gets_documented_defaults() {
    let c = GatewayConfig::parse(MINIMAL).unwrap();
    assert_eq!(c.workers, 2);
    assert_eq!(c.health.path, "/ready");
    assert_eq!(c.health.failures, 3);
    assert_eq!(c.backends[0].address.port, 9001);
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.client_write_bytes, 16 << 10);
    assert!(c.fast_path);
    assert!(!c.work_stealing);
    let stealing = GatewayConfig::parse(&format!("{MINIMAL}work_stealing: true\n")).unwrap();
    assert_eq!(c.restart_only_changes(&stealing), ["work_stealing"]);
    let slow = GatewayConfig::parse(&format!("{MINIMAL}fast_path: false\n")).unwrap();
    assert!(
        c.restart_only_changes(&slow).is_empty(),
        "fast_path reloads"
    );
}

#[test]
fn the_client_write_buffer_is_bounded_and_restart_only() {
    let set = |n: usize| format!("{MINIMAL}buffers: {{client_write_bytes: {n}}}\n");
    let unbuffered = GatewayConfig::parse(&set(0)).unwrap();
    assert_eq!(unbuffered.client_write_bytes, 0);
    let e = err(&set(MAX_CLIENT_WRITE_BYTES + 1));
    assert!(e.contains("buffers.client_write_bytes"), "{e}");
    let most = GatewayConfig::parse(&set(MAX_CLIENT_WRITE_BYTES)).unwrap();
    assert_eq!(
        unbuffered.restart_only_changes(&most),
        ["buffers.client_write_bytes"]
    );
    assert!(most.restart_only_changes(&most).is_empty());
}

#[test]
fn long_and_short_backend_forms() {
    let c = GatewayConfig::parse(
        "upstream:\n  backends:\n    - 127.0.0.1:1\n    - {address: \"backend-2.svc:80\", weight: 3}\n",
    )
    .unwrap();
    assert_eq!(c.backends.len(), 2);
    assert_eq!(c.backends[1].weight, 3);
    assert_eq!(c.backends[1].address.host, "backend-2.svc");
}

fn err(text: &str) -> String {
    GatewayConfig::parse(text).unwrap_err()
}

#[test]
fn errors_name_key_and_line() {
    let e = err("upstream:\n  backends: [\"127.0.0.1:1\"]\n  helth_check: {}\n");
    assert!(e.contains("helth_check") && e.contains("line 3"), "{e}");
    let e =
        err("upstream:\n  backends: [\"127.0.0.1:1\"]\n  health_check:\n    interval: 5 parsecs\n");
    assert!(
        e.contains("upstream.health_check.interval") && e.contains("line 4"),
        "{e}"
    );
    let e = err("upstream:\n  backends: []\n");
    assert!(
        e.contains("upstream.backends") && e.contains("at least one"),
        "{e}"
    );
    let e = err("listen: [\"0.0.0.0:http\"]\nupstream:\n  backends: [\"127.0.0.1:1\"]\n");
    assert!(e.contains("listen") && e.contains("port"), "{e}");
    let e = err("upstream:\n  backends: [\"127.0.0.1:1\"]\n  health_check:\n    interval: 0s\n");
    assert!(
        e.contains("interval") && e.contains("greater than zero"),
        "{e}"
    );
    let e = err("upstream:\n  backends: [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n");
    assert!(e.contains("twice"), "{e}");
    let e = err(&format!("{MINIMAL}client: {{proxy_protocol: true}}\n"));
    assert!(e.contains("client.trusted_proxies"), "{e}");
}
