//! `listen:` entries: `"host:port"` (plaintext, as before) or `{address, tls: {...}}`, and
//! `http2:`. The certificates are read and checked here, when the config is loaded: `gateway
//! -t` and a reload refuse an unreadable file, a key that does not match its certificate, an
//! expired or not-yet-valid certificate, and the set in force stays.

use std::fmt;
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
}

/// The map form of a `listen:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListenMap {
    address: HostPort,
    tls: Option<FileTls>,
}

impl From<HostPort> for FileListen {
    fn from(address: HostPort) -> Self {
        FileListen { address, tls: None }
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

/// Split `listen:` into the addresses and the TLS listeners, reading every certificate.
pub fn listeners(
    entries: Vec<FileListen>,
    now: i64,
) -> Result<(Vec<HostPort>, Vec<TlsListener>), String> {
    let mut addresses = Vec::with_capacity(entries.len());
    let mut tls = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        if addresses.contains(&e.address) {
            return Err(format!("listen[{i}]: {} is listed twice", e.address));
        }
        addresses.push(e.address.clone());
        let Some(t) = e.tls else { continue };
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
        });
    }
    Ok((addresses, tls))
}
