//! `listen:` entries: `"host:port"` (plaintext, as before) or `{address, tls: {...}}` or
//! `{address, redirect_https: {...}}`, and `http2:`. The certificates are read and checked here, when the config is loaded: `gateway
//! -t` and a reload refuse an unreadable file, a key that does not match its certificate, an
//! expired or not-yet-valid certificate, and the set in force stays.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{de, Deserialize, Deserializer};

use super::values::*;
use crate::tls::{CertSet, MinVersion};

/// One `listen:` entry as written.
#[derive(Debug, Clone)]
pub struct FileListen {
    pub address: HostPort,
    pub tls: Option<FileTls>,
    pub redirect_https: Option<FileRedirect>,
}

/// The map form of a `listen:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListenMap {
    address: HostPort,
    tls: Option<FileTls>,
    redirect_https: Option<FileRedirect>,
}

impl From<HostPort> for FileListen {
    fn from(address: HostPort) -> Self {
        FileListen {
            address,
            tls: None,
            redirect_https: None,
        }
    }
}

impl<'de> Deserialize<'de> for FileListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> de::Visitor<'de> for Either {
            type Value = FileListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"host:port\" or {address: \"host:port\", tls: {...}}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FileListen, E> {
                s.parse::<HostPort>()
                    .map(FileListen::from)
                    .map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<FileListen, A::Error> {
                let m = FileListenMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FileListen {
                    address: m.address,
                    tls: m.tls,
                    redirect_https: m.redirect_https,
                })
            }
        }
        d.deserialize_any(Either)
    }
}

/// `listen[].tls:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// Certificate/key pairs (PEM files); the first one is served to clients without SNI.
    pub certificates: NonEmpty<FileCertificate>,
    /// `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: FileTlsVersion,
    /// Refuse the handshake of a client whose SNI no certificate covers (default, as
    /// HAProxy's `strict-sni`); `false` serves it the first certificate (nginx's default).
    #[serde(default = "yes")]
    pub strict_sni: bool,
    /// `Strict-Transport-Security` on every answer of this listener (off by default).
    pub hsts: Option<FileHsts>,
}

fn yes() -> bool {
    true
}

/// `listen[].tls.hsts:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHsts {
    /// How long a browser remembers to use HTTPS only ("0s" tells it to forget).
    pub max_age: HumanDuration,
    pub include_subdomains: bool,
    /// Ask to be preloaded into browsers (needs `include_subdomains` and a year or more).
    pub preload: bool,
}

impl Default for FileHsts {
    fn default() -> Self {
        FileHsts {
            max_age: HumanDuration(std::time::Duration::from_secs(ONE_YEAR)),
            include_subdomains: false,
            preload: false,
        }
    }
}

const ONE_YEAR: u64 = 31_536_000;

impl FileHsts {
    /// The header value, checked.
    fn value(&self) -> Result<String, String> {
        let secs = self.max_age.0.as_secs();
        if self.preload && !(self.include_subdomains && secs >= ONE_YEAR) {
            return Err("preload needs include_subdomains: true and a max_age of a year or more (hstspreload.org)".into());
        }
        let mut v = format!("max-age={secs}");
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        Ok(v)
    }
}

/// `listen[].redirect_https:` on a plaintext listener: every request is answered with a
/// redirect to the same host and target over `https://`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileRedirect {
    /// The HTTPS port the redirect names (left out of `Location` when 443).
    pub port: u16,
    /// 301, 302, 307 or 308 (default: 308, which keeps the method and body).
    pub status: u16,
}

impl Default for FileRedirect {
    fn default() -> Self {
        FileRedirect {
            port: 443,
            status: 308,
        }
    }
}

/// One `certificates:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `min_version:`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileTlsVersion(pub MinVersion);

impl<'de> Deserialize<'de> for FileTlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.trim() {
            "1.2" => Ok(FileTlsVersion(MinVersion::Tls12)),
            "1.3" => Ok(FileTlsVersion(MinVersion::Tls13)),
            other => Err(de::Error::custom(format!(
                "{other:?}: write \"1.2\" or \"1.3\""
            ))),
        }
    }
}

/// `http2:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHttp2 {
    /// Offer `h2` by ALPN on TLS listeners.
    pub enabled: bool,
    /// Streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: AtLeastOne,
    /// Streams a client may reset per connection within 10 s, taken or not, before the
    /// connection is closed (`http2_rapid_reset`).
    pub max_resets: AtLeastOne,
    /// Serve cleartext HTTP/2 with prior knowledge on plaintext listeners.
    pub cleartext: bool,
}

impl Default for FileHttp2 {
    fn default() -> Self {
        FileHttp2 {
            enabled: true,
            max_concurrent_streams: AtLeastOne(100),
            max_resets: AtLeastOne(200),
            cleartext: false,
        }
    }
}

/// A validated TLS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub address: HostPort,
    pub certs: Arc<CertSet>,
    pub min_version: MinVersion,
    pub strict_sni: bool,
}

/// What a listener does to every request it accepts, besides the policy every listener
/// applies: kept only for listeners that do something.
#[derive(Debug, Clone)]
pub struct ListenerPolicy {
    pub address: HostPort,
    /// Plaintext listeners: answer with a redirect to HTTPS.
    pub redirect: Option<Redirect>,
    /// TLS listeners: the `Strict-Transport-Security` value every answer carries.
    pub hsts: Option<Arc<[u8]>>,
}

/// A validated `redirect_https:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub port: u16,
    pub status: u16,
}

/// The entry of `items` a connection accepted on `local` belongs to: its address's port,
/// and its IP when that is not a wildcard (a name or `0.0.0.0` matches any address of the
/// port, after an exact IP).
pub fn by_local<T>(
    items: &[T],
    address: impl Fn(&T) -> &HostPort,
    local: SocketAddr,
) -> Option<&T> {
    let ours = |t: &&T| address(t).port == local.port();
    let ip = |t: &T| {
        address(t)
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    items
        .iter()
        .filter(ours)
        .find(|t| ip(t) == Some(local.ip()))
        .or_else(|| {
            items
                .iter()
                .filter(ours)
                .find(|t| ip(t).is_none_or(|ip| ip.is_unspecified()))
        })
}

/// Validated `http2:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    pub enabled: bool,
    pub max_concurrent_streams: u32,
    pub max_resets: u32,
    pub cleartext: bool,
}

impl From<&FileHttp2> for Http2Settings {
    fn from(f: &FileHttp2) -> Self {
        Http2Settings {
            enabled: f.enabled,
            max_concurrent_streams: f.max_concurrent_streams.0.min(u32::MAX as usize) as u32,
            max_resets: f.max_resets.0.min(u32::MAX as usize) as u32,
            cleartext: f.cleartext,
        }
    }
}

/// `listen:` validated: the addresses, the TLS listeners (every certificate read) and the
/// listeners with a policy of their own.
pub struct Listeners {
    pub addresses: Vec<HostPort>,
    pub tls: Vec<TlsListener>,
    pub policies: Vec<ListenerPolicy>,
}

/// Split `listen:` into the addresses, the TLS listeners and the listener policies.
pub fn listeners(entries: Vec<FileListen>, now: i64) -> Result<Listeners, String> {
    let mut addresses = Vec::with_capacity(entries.len());
    let mut tls = Vec::new();
    let mut policies = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        if addresses.contains(&e.address) {
            return Err(format!("listen[{i}]: {} is listed twice", e.address));
        }
        addresses.push(e.address.clone());
        if let Some(r) = e.redirect_https {
            if e.tls.is_some() {
                return Err(format!(
                    "listen[{i}].redirect_https: the listener is TLS itself; redirect from a plaintext one"
                ));
            }
            if ![301, 302, 307, 308].contains(&r.status) {
                return Err(format!(
                    "listen[{i}].redirect_https.status: {} is not a redirect: write 301, 302, 307 or 308",
                    r.status
                ));
            }
            if r.port == 0 {
                return Err(format!("listen[{i}].redirect_https.port: must be 1-65535"));
            }
            policies.push(ListenerPolicy {
                address: e.address.clone(),
                redirect: Some(Redirect {
                    port: r.port,
                    status: r.status,
                }),
                hsts: None,
            });
        }
        let Some(t) = e.tls else { continue };
        if let Some(h) = &t.hsts {
            let value = h
                .value()
                .map_err(|m| format!("listen[{i}].tls.hsts: {m}"))?;
            policies.push(ListenerPolicy {
                address: e.address.clone(),
                redirect: None,
                hsts: Some(value.into_bytes().into()),
            });
        }
        let mut certs = Vec::with_capacity(t.certificates.0.len());
        for (j, c) in t.certificates.0.iter().enumerate() {
            let loaded = crate::tls::load_pair(&c.cert, &c.key, now)
                .map_err(|m| format!("listen[{i}].tls.certificates[{j}]: {m}"))?;
            certs.push(loaded);
        }
        tls.push(TlsListener {
            address: e.address,
            certs: Arc::new(CertSet::new(certs)),
            min_version: t.min_version.0,
            strict_sni: t.strict_sni,
        });
    }
    Ok(Listeners {
        addresses,
        tls,
        policies,
    })
}
