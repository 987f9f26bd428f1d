//! TLS at the edge (rustls: docs/decisions/0005-rustls-at-the-edge.md): certificate/key pairs
//! read from PEM files and checked when the config is loaded (so `gateway -t` and a reload
//! refuse a bad pair, and the set in force stays), the choice of a certificate by SNI, and the
//! rustls server config of each TLS listener, rebuilt with every config and swapped with it.
//!
//! Which certificate a client gets: an exact name of a certificate's SANs, else a wildcard
//! (`*.example.com` covers `a.example.com`, not `a.b.example.com` nor `example.com`), else,
//! without SNI (an IP address, an old client), the listener's first certificate. An SNI no
//! certificate covers is refused (the handshake fails, `tls_unknown_server_name`): answering
//! with a certificate for another name only moves the failure to the client's check; a
//! listener with `strict_sni: false` answers it with the first certificate, as nginx does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora::listeners::tls::Acceptor;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
    StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{GatewayConfig, HostPort};

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MinVersion {
    #[default]
    Tls12,
    Tls13,
}

/// One certificate chain with its key, checked.
#[derive(Debug)]
pub struct Certificate {
    /// The certificate file, as configured.
    pub cert_path: PathBuf,
    /// Its DNS names (subjectAltName, else the subject's CN), lowercase.
    pub names: Vec<String>,
    /// Unix time it expires.
    pub not_after: i64,
    pub key: Arc<CertifiedKey>,
}

impl Certificate {
    /// The label of `gateway_tls_certificate_expiry_seconds{name}`: its first name.
    pub fn label(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }
}

/// The certificates of one listener, indexed by name.
#[derive(Debug, Default)]
pub struct CertSet {
    pub certs: Vec<Certificate>,
    exact: HashMap<String, usize>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    /// Index `certs` by their names; the first certificate listed wins a name two cover.
    pub fn new(certs: Vec<Certificate>) -> Self {
        let mut set = CertSet {
            certs,
            ..CertSet::default()
        };
        for (i, c) in set.certs.iter().enumerate() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(parent) => set.wildcard.entry(parent.to_string()).or_insert(i),
                    None => set.exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        set
    }

    /// Whether a certificate is for `*.<parent>`.
    pub fn has_wildcard(&self, parent: &str) -> bool {
        self.wildcard.contains_key(parent)
    }

    /// The certificate for an SNI name; `None` (no SNI): the first one.
    pub fn pick(&self, sni: Option<&str>) -> Option<&Certificate> {
        let Some(name) = sni else {
            return self.certs.first();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let i = self.exact.get(&name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent)
        })?;
        self.certs.get(*i)
    }
}

/// Read and check one pair: both files readable and PEM, the key matching the certificate,
/// the certificate valid at `now` (Unix seconds). The error names the file and the reason.
pub fn load_pair(cert_path: &Path, key_path: &Path, now: i64) -> Result<Certificate, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{}: no certificate in it", cert_path.display()));
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: no PEM private key in it: {e}", key_path.display()))?;
    let signer = any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", cert_path.display()))?;
    let validity = x509.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < not_before {
        return Err(format!(
            "{}: not valid yet (valid from {})",
            cert_path.display(),
            validity.not_before
        ));
    }
    if now > not_after {
        return Err(format!(
            "{}: expired on {}",
            cert_path.display(),
            validity.not_after
        ));
    }
    let mut names: Vec<String> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    if names.is_empty() {
        return Err(format!(
            "{}: names no host (no DNS subjectAltName, no CN)",
            cert_path.display()
        ));
    }
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|_| {
        format!(
            "{}: the key does not match the certificate in {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Certificate {
        cert_path: cert_path.to_path_buf(),
        names,
        not_after,
        key: Arc::new(certified),
    })
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Chooses a listener's certificate by SNI; `strict`: an SNI no certificate covers gets
/// none (the handshake fails), else the first certificate.
#[derive(Debug)]
struct BySni {
    certs: Arc<CertSet>,
    strict: bool,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = self.certs.pick(hello.server_name());
        let picked = if self.strict {
            picked
        } else {
            picked.or_else(|| self.certs.certs.first())
        };
        picked.map(|c| c.key.clone())
    }
}

/// rustls's handshake error when the resolver found no certificate (an SNI none covers), as
/// pingora's handshake error carries it; pinned by the gateway test
/// `tls::sni_picks_the_certificate_and_alpn_the_protocol` (counted as
/// `tls_unknown_server_name`).
pub const NO_CERTIFICATE_ERROR: &str = "no server certificate chain resolved";

/// What every listener's rustls config shares across reloads, so resumption survives one:
/// the session-ticket keys (rotated by rustls every 6 hours, the previous key still
/// accepted) and the TLS 1.2 session-id cache.
#[derive(Debug, Clone)]
pub struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

impl Resumption {
    pub fn new() -> Self {
        Resumption {
            ticketer: rustls::crypto::ring::Ticketer::new().expect("the system RNG works"),
            cache: ServerSessionMemoryCache::new(8192),
        }
    }
}

impl Default for Resumption {
    fn default() -> Self {
        Self::new()
    }
}

/// One listener's rustls config: ALPN `h2` (when `h2` is on) then `http/1.1`.
pub fn server_config(
    certs: Arc<CertSet>,
    strict_sni: bool,
    min: MinVersion,
    h2: bool,
    resumption: &Resumption,
) -> Arc<ServerConfig> {
    pingora::tls::install_default_crypto_provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_protocol_versions(versions)
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni {
            certs,
            strict: strict_sni,
        }));
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config.ticketer = resumption.ticketer.clone();
    config.session_storage = resumption.cache.clone();
    Arc::new(config)
}

/// One TLS listener of the config in force: its handshake settings.
pub struct EdgeListener {
    pub address: HostPort,
    pub acceptor: Acceptor,
}

/// Every TLS listener of the config in force, built with it and swapped with it.
#[derive(Default)]
pub struct Edge {
    pub listeners: Vec<EdgeListener>,
    resumption: Resumption,
}

impl Edge {
    /// The listeners' rustls configs; resumption keys carry over from `previous`.
    pub fn build(config: &GatewayConfig, previous: Option<&Edge>) -> Edge {
        let resumption = previous.map_or_else(Resumption::new, |p| p.resumption.clone());
        let listeners = config
            .tls
            .iter()
            .map(|l| EdgeListener {
                address: l.address.clone(),
                acceptor: Acceptor::from_server_config(server_config(
                    l.certs.clone(),
                    l.strict_sni,
                    l.min_version,
                    config.http2.enabled,
                    &resumption,
                )),
            })
            .collect();
        Edge {
            listeners,
            resumption,
        }
    }

    /// The TLS listener a connection accepted on `local` belongs to.
    pub fn for_local(&self, local: SocketAddr) -> Option<&EdgeListener> {
        crate::config::by_local(&self.listeners, |l| &l.address, local)
    }
}

/// A TLS pool's client side (`upstream.tls`, `upstreams.<name>.tls`): its rustls config,
/// built once per config load, and the name it asks for.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The `ca:` file's certificates for pingora's client (upgrades); none: the system's
    /// roots, which pingora's client loads itself.
    pub pingora_ca: Option<Arc<pingora::protocols::tls::CaType>>,
    /// `sni:`; none: the backend's host name when it is one, else its IP address (no SNI
    /// sent, the certificate checked for the IP).
    pub sni: Option<String>,
    pub verify: bool,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.sni == other.sni
            && self.verify == other.verify
            && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl UpstreamTls {
    /// The name the handshake asks for and checks: `sni`, else the backend's host name, else
    /// its IP address.
    pub fn server_name(
        &self,
        addr: SocketAddr,
        host: Option<&str>,
    ) -> rustls::pki_types::ServerName<'static> {
        use rustls::pki_types::ServerName;
        self.sni
            .as_deref()
            .or(host)
            .and_then(|n| ServerName::try_from(n.to_string()).ok())
            .unwrap_or(ServerName::IpAddress(addr.ip().into()))
    }

    /// The same name as text for pingora's client, which checks an IP address written as
    /// text for the IP (and sends no SNI), as rustls does.
    pub fn server_name_text(&self, addr: SocketAddr, host: Option<&str>) -> String {
        use rustls::pki_types::ServerName;
        match self.server_name(addr, host) {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            _ => addr.ip().to_string(),
        }
    }
}

/// Build a pool's client config from its `tls:` (`key` names it in errors): the CA file's
/// certificates, or the system's roots, as trust anchors; ALPN `http/1.1`.
pub fn upstream_tls(
    sni: Option<&str>,
    ca: Option<&Path>,
    verify: bool,
    key: &str,
) -> Result<UpstreamTls, String> {
    use rustls::pki_types::ServerName;
    if let Some(n) = sni {
        if !matches!(ServerName::try_from(n), Ok(ServerName::DnsName(_))) {
            return Err(format!("{key}.sni: {n:?} is not a DNS name"));
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut pingora_ca = None;
    match ca {
        Some(p) => {
            let pem = std::fs::read(p)
                .map_err(|e| format!("{key}.ca: cannot read {}: {e}", p.display()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{key}.ca: {}: not a PEM certificate: {e}", p.display()))?;
            if certs.is_empty() {
                return Err(format!("{key}.ca: {}: no certificate in it", p.display()));
            }
            let mut wrapped = Vec::with_capacity(certs.len());
            for c in certs {
                // pingora's wrapper parses with x509-parser and panics where it cannot.
                x509_parser::parse_x509_certificate(&c).map_err(|e| {
                    format!("{key}.ca: {}: not an X.509 certificate: {e}", p.display())
                })?;
                wrapped.push(pingora::utils::tls::WrappedX509::new(
                    c.to_vec(),
                    pingora::utils::tls::parse_x509,
                ));
                roots
                    .add(c)
                    .map_err(|e| format!("{key}.ca: {}: {e}", p.display()))?;
            }
            pingora_ca = Some(Arc::from(wrapped));
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() && verify {
                return Err(format!(
                    "{key}: no system CA certificates found; give `ca: <pem file>`"
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{key}: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !verify {
        log::warn!("{key}.verify: false: the backends' certificates are not checked");
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(NoVerify(provider)));
    }
    Ok(UpstreamTls {
        config: Arc::new(config),
        pingora_ca,
        sni: sni.map(str::to_string),
        verify,
    })
}

/// `verify: false`: any certificate is accepted (the handshake's signatures still checked).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let c = params.self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Certificate {
            cert_path: PathBuf::new(),
            names: names.iter().map(|s| s.to_string()).collect(),
            not_after: 0,
            key: Arc::new(CertifiedKey::new(
                vec![c.der().clone()],
                any_supported_type(&der).unwrap(),
            )),
        }
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default_without_sni() {
        let set = CertSet::new(vec![
            cert(&["default.test"]),
            cert(&["a.test", "b.test"]),
            cert(&["*.w.test"]),
            cert(&["x.w.test"]),
        ]);
        let pick = |n: Option<&str>| set.pick(n).map(|c| c.label().to_string());
        assert_eq!(pick(None).as_deref(), Some("default.test"));
        assert_eq!(pick(Some("A.TEST.")).as_deref(), Some("a.test"));
        assert_eq!(pick(Some("b.test")).as_deref(), Some("a.test"));
        assert_eq!(pick(Some("y.w.test")).as_deref(), Some("*.w.test"));
        // An exact name beats the wildcard covering it.
        assert_eq!(pick(Some("x.w.test")).as_deref(), Some("x.w.test"));
        // A wildcard covers one label only.
        assert_eq!(pick(Some("w.test")), None);
        assert_eq!(pick(Some("a.y.w.test")), None);
        assert_eq!(pick(Some("unknown.test")), None);
    }

    #[test]
    fn pairs_are_checked_with_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_p = write("a.pem", &c.pem());
        let key_p = write("a.key", &key.serialize_pem());
        let other_p = write("other.key", &other.serialize_pem());
        let now = unix_now();
        let ok = load_pair(&cert_p, &key_p, now).unwrap();
        assert_eq!(ok.names, vec!["a.test"]);
        let e = load_pair(&cert_p, &other_p, now).unwrap_err();
        assert!(
            e.contains("other.key") && e.contains("does not match"),
            "{e}"
        );
        let e = load_pair(&dir.path().join("missing.pem"), &key_p, now).unwrap_err();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let e = load_pair(&key_p, &key_p, now).unwrap_err();
        assert!(e.contains("a.key") && e.contains("no certificate"), "{e}");
        let e = load_pair(&cert_p, &key_p, ok.not_after + 1).unwrap_err();
        assert!(e.contains("a.pem") && e.contains("expired"), "{e}");
        let e = load_pair(&cert_p, &key_p, 0).unwrap_err();
        assert!(e.contains("a.pem") && e.contains("not valid yet"), "{e}");
    }
}
