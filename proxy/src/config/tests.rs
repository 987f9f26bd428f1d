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

#[test]
fn rate_limits_take_several_windows_and_a_scope() {
    let c = GatewayConfig::parse(&format!(
        "{MINIMAL}limits:\n  global: {{rates: [\"10000r/m\", \"100000r/h\"], burst: 50, scope: cluster}}\n  per_ip: {{rate: 5r/s}}\ncluster: {{redis: \"redis://127.0.0.1:6379/\"}}\n"
    ))
    .unwrap();
    let g = c.global_limit.as_ref().unwrap();
    assert_eq!(g.rates.len(), 2);
    assert_eq!(g.rates[1].window_secs, 3600);
    assert_eq!(g.scope, Scope::Cluster);
    assert_eq!(c.per_ip_limit.as_ref().unwrap().scope, Scope::Local);
    let cl = c.cluster.as_ref().unwrap();
    assert_eq!(cl.sync_interval, Duration::from_millis(100));
    assert_eq!(cl.timeout, Duration::from_millis(50));
    assert_eq!(cl.replicas, 2);
    assert_eq!(cl.prefix, "floodgate");
    // Shares divide every window and the burst.
    let share = g.share(2);
    assert_eq!(share.rates[0].per_second, 10000.0 / 120.0);
    assert_eq!(share.burst, 25);
    assert_eq!(share.scope, Scope::Local);
    // `cluster:` is restart-only.
    let other = GatewayConfig::parse(&format!(
        "{MINIMAL}limits:\n  global: {{rate: 1r/s, scope: cluster}}\ncluster: {{redis: \"redis://127.0.0.1:6380/\"}}\n"
    ))
    .unwrap();
    assert_eq!(c.restart_only_changes(&other), ["cluster"]);
}

#[test]
fn bad_rate_limits_and_cluster_sections_are_refused() {
    let cases = [
        ("limits:\n  per_ip: {rate: 1r/s, rates: [2r/s]}\n", "not both"),
        ("limits:\n  per_ip: {burst: 3}\n", "needs `rate`"),
        (
            "limits:\n  per_ip: {rates: [1r/s, 2r/s, 3r/s, 4r/s, 5r/s]}\n",
            "at most 4",
        ),
        ("limits:\n  per_ip: {rate: 1r/s, scope: galaxy}\n", "scope"),
        (
            "limits:\n  per_ip: {rate: 1r/s, scope: cluster}\n",
            "limits.per_ip: `scope: cluster` needs",
        ),
        (
            "limits:\n  routes:\n    - {prefix: /a, per_ip: {rate: 1r/s, scope: cluster}}\n",
            "limits.routes[0].per_ip",
        ),
        (
            "limits:\n  per_ip: {rate: 1r/s, scope: cluster, delay: true}\ncluster: {redis: \"redis://x:1/\"}\n",
            "delay",
        ),
        (
            "routes:\n  - {path: /a, pool: default, limit: {rate: 1r/s, scope: cluster}}\n",
            "routes[0].limit: `scope: cluster` needs",
        ),
        (
            "cluster: {redis: \"redis://x:1/\"}\n",
            "no limit has `scope: cluster`",
        ),
        (
            "limits:\n  global: {rate: 1r/s, scope: cluster}\ncluster: {redis: \"x:1\"}\n",
            "redis:// URL",
        ),
        (
            "limits:\n  global: {rate: 1r/s, scope: cluster}\ncluster: {redis: \"redis://x:1/\", replicas: 0}\n",
            "at least 1",
        ),
        (
            "limits:\n  global: {rate: 1r/s, scope: cluster}\ncluster: {redis: \"redis://x:1/\", sync_interval: 0s}\n",
            "greater than zero",
        ),
    ];
    for (body, says) in cases {
        let e = err(&format!("{MINIMAL}{body}"));
        assert!(e.contains(says), "{body}: {e}");
    }
}

#[test]
fn listen_entries_are_addresses_or_tls_listeners() {
    let c = GatewayConfig::parse(MINIMAL).unwrap();
    assert!(c.tls.is_empty());
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    assert!(c.http2.enabled && !c.http2.cleartext);
    assert_eq!(
        (c.http2.max_concurrent_streams, c.http2.max_resets),
        (100, 200)
    );
    let with = |listen: &str| format!("listen: {listen}\n{MINIMAL}");
    let e = err(&with(
        "[\"127.0.0.1:1\", {address: \"127.0.0.1:2\", tls: {certificates: [{cert: /nonexistent/a.pem, key: /nonexistent/a.key}]}}]",
    ));
    assert!(
        e.contains("listen[1].tls.certificates[0]") && e.contains("/nonexistent/a.pem"),
        "{e}"
    );
    let e = err(&with(
        "[{address: \"127.0.0.1:2\", tls: {certificates: []}}]",
    ));
    assert!(
        e.contains("listen[0].tls") && e.contains("at least one"),
        "{e}"
    );
    let e = err(&with("[{address: \"127.0.0.1:2\", tls: {certificates: [{cert: a, key: b}], min_version: \"1.1\"}}]"));
    assert!(e.contains("1.1") && e.contains("\"1.2\" or \"1.3\""), "{e}");
    let e = err(&with("[{address: \"127.0.0.1:2\", tsl: {}}]"));
    assert!(e.contains("tsl"), "{e}");
    let e = err(&with("[\"127.0.0.1:2\", \"127.0.0.1:2\"]"));
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn listeners_may_redirect_to_https_or_send_hsts() {
    let with = |listen: &str| format!("listen: {listen}\n{MINIMAL}");
    let c = GatewayConfig::parse(&with(
        "[\"127.0.0.1:1\", {address: \"0.0.0.0:2\", redirect_https: {}}, {address: \"127.0.0.1:3\", redirect_https: {port: 8443, status: 301}}]",
    ))
    .unwrap();
    let at = |a: &str| {
        c.listener_policy(Some(a.parse().unwrap()))
            .and_then(|p| p.redirect)
    };
    assert_eq!(at("127.0.0.1:1"), None);
    assert_eq!(
        at("10.0.0.7:2"),
        Some(Redirect {
            port: 443,
            status: 308
        })
    );
    assert_eq!(
        at("127.0.0.1:3"),
        Some(Redirect {
            port: 8443,
            status: 301
        })
    );
    assert!(GatewayConfig::parse(MINIMAL)
        .unwrap()
        .listener_policies
        .is_empty());
    let tls = "tls: {certificates: [{cert: /nonexistent/a.pem, key: /nonexistent/a.key}]";
    for (listen, says) in [
        (
            "[{address: \"127.0.0.1:2\", redirect_https: {status: 200}}]".to_string(),
            "not a redirect",
        ),
        (
            "[{address: \"127.0.0.1:2\", redirect_https: {port: 0}}]".to_string(),
            "1-65535",
        ),
        (
            format!("[{{address: \"127.0.0.1:2\", redirect_https: {{}}, {tls}}}}}]"),
            "TLS itself",
        ),
        (
            format!("[{{address: \"127.0.0.1:2\", {tls}, hsts: {{preload: true}}}}}}]"),
            "include_subdomains",
        ),
        (
            format!("[{{address: \"127.0.0.1:2\", {tls}, hsts: {{max_age: 1d, include_subdomains: true, preload: true}}}}}}]"),
            "a year",
        ),
        (
            format!("[{{address: \"127.0.0.1:2\", {tls}, hsts: {{max_age: soon}}}}}}]"),
            "soon",
        ),
    ] {
        let e = err(&with(&listen));
        assert!(e.contains(says), "{listen}: {e}");
    }
}

#[test]
fn pool_tls_is_per_pool_and_checked_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let text = format!(
        "upstream:\n  backends: [\"127.0.0.1:9001\"]\n  tls: {{ca: \"{}\", sni: api.test}}\nupstreams:\n  plain:\n    backends: [\"127.0.0.1:9002\"]\n  other:\n    backends: [\"127.0.0.1:9003\"]\n    tls: {{ca: \"{}\", verify: false}}\n",
        ca_path.display(),
        ca_path.display()
    );
    let c = GatewayConfig::parse(&text).unwrap();
    let tls = c.upstream().tls.as_ref().unwrap();
    assert_eq!(tls.sni.as_deref(), Some("api.test"));
    assert!(tls.verify);
    let pool = |n: &str| c.pools.iter().find(|p| p.name == n).unwrap();
    // Not inherited from `upstream:`.
    assert!(pool("plain").settings.tls.is_none());
    assert!(!pool("other").settings.tls.as_ref().unwrap().verify);
    // The default SNI: the backend's host name, else its IP address.
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let other = pool("other").settings.tls.clone().unwrap();
    assert_eq!(
        format!("{:?}", other.server_name(addr, Some("b.test"))),
        format!(
            "{:?}",
            rustls::pki_types::ServerName::try_from("b.test").unwrap()
        )
    );
    assert!(matches!(
        other.server_name(addr, None),
        rustls::pki_types::ServerName::IpAddress(_)
    ));

    let e = err(&text.replace("sni: api.test", "sni: \"not a name\""));
    assert!(e.contains("upstream.tls.sni"), "{e}");
    let e = err(
        "upstream:\n  backends: [\"127.0.0.1:9001\"]\nupstreams:\n  x:\n    backends: [\"127.0.0.1:9002\"]\n    tls: {ca: /nonexistent/ca.pem}\n",
    );
    assert!(
        e.contains("upstreams.x.tls.ca")
            && e.contains("/nonexistent/ca.pem")
            && e.contains("cannot read"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}  tls: {{cert: x}}\n"));
    assert!(e.contains("cert"), "{e}");
}

#[test]
fn relative_paths_are_the_config_files_directory() {
    let yaml = format!(
        "listen: [{{address: \"127.0.0.1:2\", tls: {{certificates: [{{cert: certs/a.pem, key: /abs/a.key}}]}}}}]\n{MINIMAL}"
    );
    let e = GatewayConfig::parse_in(&yaml, Some(std::path::Path::new("/etc/fg"))).unwrap_err();
    assert!(e.contains("/etc/fg/certs/a.pem"), "{e}");
    let e = GatewayConfig::parse(&yaml).unwrap_err();
    assert!(e.contains(" certs/a.pem"), "{e}");
    let hosts = format!("{MINIMAL}  hosts_file: hosts\n");
    let c = GatewayConfig::parse_in(&hosts, Some(std::path::Path::new("/etc/fg"))).unwrap();
    assert_eq!(
        c.hosts_file.as_deref(),
        Some(std::path::Path::new("/etc/fg/hosts"))
    );
}

#[test]
fn a_route_host_needs_a_certificate_on_each_strict_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["a.test".to_string(), "*.w.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.path().join("a.pem"), dir.path().join("a.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let yaml = |host: &str, strict: bool| {
        format!(
            "listen: [\"127.0.0.1:1\", {{address: \"127.0.0.1:2\", tls: {{certificates: [{{cert: \"{}\", key: \"{}\"}}], strict_sni: {strict}}}}}]\n\
             routes: [{{path: /, pool: default}}, {{host: \"{host}\", path: /, pool: default}}]\n{MINIMAL}",
            c.display(),
            k.display()
        )
    };
    for host in ["a.test", "A.test", "x.w.test", "*.w.test", "10.0.0.1"] {
        let r = GatewayConfig::parse(&yaml(host, true));
        assert!(r.is_ok(), "{host}: {:?}", r.err());
    }
    for host in ["b.test", "a.b.w.test", "*.other.test", "*.a.test"] {
        let e = err(&yaml(host, true));
        assert!(
            e.contains("routes[1].host") && e.contains("127.0.0.1:2") && e.contains("strict_sni"),
            "{host}: {e}"
        );
        assert!(GatewayConfig::parse(&yaml(host, false)).is_ok(), "{host}");
    }
}
