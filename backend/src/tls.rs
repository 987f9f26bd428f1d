//! TLS to the backend's peers: the vendor (`https://`), PostgreSQL (`sslmode=` in
//! `DATABASE_URL`) and Redis (`rediss://`). All three use rustls with the ring provider (no
//! system OpenSSL); each trusts the system's CA store (`/etc/ssl/certs`, Debian's
//! ca-certificates) unless given a CA file of its own. Plaintext URLs connect as before.
//!
//! | peer | TLS when | own CA | client certificate |
//! | --- | --- | --- | --- |
//! | vendor | `VENDOR_URL=https://...` | `VENDOR_CA_FILE` (instead of the system's) | - |
//! | PostgreSQL | `?sslmode=require`, `verify-ca`, `verify-full` | `&sslrootcert=FILE` (added to the system's) | `&sslcert=&sslkey=` |
//! | Redis | `REDIS_URL=rediss://...` | `REDIS_CA_FILE` (instead of the system's) | `REDIS_CLIENT_CERT_FILE`, `REDIS_CLIENT_KEY_FILE` |

use std::path::{Path, PathBuf};

/// Make ring the process's rustls provider, once. sqlx and reqwest name theirs, but rustls
/// code that takes the process default (the redis crate's client config, sqlx's
/// `verify-ca` verifier) would panic if another crate in the build also enabled aws-lc-rs.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider is installed already (by the embedding program): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A PEM file of certificates named by `var`: read and checked (at least one certificate,
/// each one parses), so a wrong path or file fails at start with the variable's name rather
/// than at the first connection.
pub fn read_certificates(var: &str, path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("{var}={}: {e}", path.display()))?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("{var}={}: not a PEM certificate: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "{var}={}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        ));
    }
    Ok(pem)
}

/// A PEM private key named by `var`, read and checked.
pub fn read_private_key(var: &str, path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let pem = std::fs::read(path).map_err(|e| format!("{var}={}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{var}={}: no PEM private key: {e}", path.display()))?;
    Ok(pem)
}

/// The Redis client's TLS files (`REDIS_CA_FILE`, `REDIS_CLIENT_CERT_FILE`,
/// `REDIS_CLIENT_KEY_FILE`).
#[derive(Debug, Clone, Default)]
pub struct RedisTlsFiles {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A Redis client for `url`: `redis://` in plaintext, `rediss://` over TLS, verified against
/// the system's CA store or `REDIS_CA_FILE` (`rediss://...#insecure` skips verification:
/// the redis crate's own switch, for tests only), with a client certificate when the server
/// asks for one (Redis's default `tls-auth-clients yes`).
pub fn redis_client(url: &str, files: &RedisTlsFiles) -> Result<redis::Client, String> {
    init();
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| e.to_string())?;
    let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
    let configured =
        files.ca.is_some() || files.client_cert.is_some() || files.client_key.is_some();
    if !configured {
        return redis::Client::open(info).map_err(|e| e.to_string());
    }
    if !tls {
        return Err(
            "REDIS_CA_FILE / REDIS_CLIENT_CERT_FILE / REDIS_CLIENT_KEY_FILE need a rediss:// URL"
                .into(),
        );
    }
    let root_cert = files
        .ca
        .as_deref()
        .map(|p| read_certificates("REDIS_CA_FILE", p))
        .transpose()?;
    let client_tls = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_certificates("REDIS_CLIENT_CERT_FILE", cert)?,
            client_key: read_private_key("REDIS_CLIENT_KEY_FILE", key)?,
        }),
        (None, None) => None,
        _ => return Err("REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE go together".into()),
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| e.to_string())
}

/// `err` and its sources, `: `-separated: reqwest's and hyper's own text stops at "error
/// sending request", the reason (a certificate the CA file does not vouch for, say) is in the
/// chain.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
