//! Reloading the config in place: SIGHUP, or a change of the file or of a file it names
//! (a renewed certificate, say) when `watch: true` (their directories are watched, so a
//! Kubernetes ConfigMap's or Secret's `..data` symlink swap is seen), and DNS
//! re-resolution of backends, all through one path:
//!
//! read -> parse and validate (the code of `gateway -t`) -> resolve backends -> apply.
//!
//! A bad file changes nothing: the error is logged with its key and line and counted, and
//! the gateway keeps serving on the config in force. Applying swaps the backend set and the
//! config snapshot atomically each; requests read them without locks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Mutex};

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::state::Snapshot;
use crate::upstream::Pools;

/// Applies config changes, one at a time.
pub struct Reloader {
    path: PathBuf,
    /// The config the process started with: settings only a restart can change are compared
    /// against it.
    started: GatewayConfig,
    snapshot: Arc<ArcSwap<Snapshot>>,
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    /// Serializes reloads and DNS refreshes; holds the hash of the file in force and the
    /// fingerprint of the files it names.
    in_force: Mutex<(u64, u64)>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        started: GatewayConfig,
        started_hash: u64,
        snapshot: Arc<ArcSwap<Snapshot>>,
        pools: Arc<Pools>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        metrics.config_applied(&format!("{started_hash:016x}"));
        let files = started.files_fingerprint();
        Arc::new(Reloader {
            path,
            started,
            snapshot,
            pools,
            metrics,
            in_force: Mutex::new((started_hash, files)),
        })
    }

    /// Reload the file. `only_if_changed`: skip when its content is the one in force (file
    /// watching sees several events per change). Returns whether a new config was applied.
    pub async fn reload(&self, trigger: &str, only_if_changed: bool) -> Result<bool, String> {
        let mut in_force = self.in_force.lock().await;
        let result = self.try_reload(&mut in_force, only_if_changed).await;
        match &result {
            Ok(true) => {
                self.metrics.reloads_ok.inc();
                log::info!(
                    "config reloaded ({trigger}): {} hash {:016x}",
                    self.path.display(),
                    in_force.0
                );
            }
            Ok(false) => {}
            Err(e) => {
                self.metrics.reloads_error.inc();
                log::error!("config reload ({trigger}) failed, keeping the config in force: {e}");
            }
        }
        result
    }

    async fn try_reload(
        &self,
        in_force: &mut (u64, u64),
        only_if_changed: bool,
    ) -> Result<bool, String> {
        // The named files as they were before the load and after it: a certificate replaced
        // while it was being read may have been read old, so the config in force then is
        // recorded as of before, and the next look at the files reloads it again.
        let previous = self.snapshot.load_full();
        let before = previous.config.files_fingerprint();
        let (next, hash) = GatewayConfig::load(&self.path).map_err(|e| e.to_string())?;
        let after = next.files_fingerprint();
        if only_if_changed && (hash, after) == *in_force {
            return Ok(false);
        }
        let files = if next.files == previous.config.files {
            before
        } else {
            after
        };
        let restart_only = self.started.restart_only_changes(&next);
        if !restart_only.is_empty() {
            log::warn!(
                "config reload: {} changed but cannot change in place; they keep their values \
                 until a restart or the --upgrade hand-over (see README)",
                restart_only.join(", ")
            );
        }
        // Backends first: a name that cannot be resolved refuses the whole reload.
        let default = &self.pools.default;
        default
            .set_backends(
                &next.backends,
                &next.upstream().queue,
                next.hosts_file.as_deref(),
            )
            .await?;
        default.set_health(&next.health);
        default.set_tls(next.upstream().tls.as_ref());
        self.pools.apply(&next).await?;
        crate::logging::set_level(next.log_level.filter());
        let applied = Arc::new(Snapshot::new(next, Some(&previous)));
        self.snapshot.store(applied.clone());
        self.metrics.tls_certificates(&applied.config);
        self.pools.retain(&applied.config);
        *in_force = (hash, files);
        self.metrics.config_applied(&format!("{hash:016x}"));
        Ok(true)
    }

    /// Re-resolve backend names with the config in force (the `resolve` intervals).
    pub async fn refresh_dns(&self) {
        let _in_force = self.in_force.lock().await;
        let snap = self.snapshot.load_full();
        let c = &snap.config;
        let refreshed = match self
            .pools
            .default
            .set_backends(&c.backends, &c.upstream().queue, c.hosts_file.as_deref())
            .await
        {
            Ok(()) => self.pools.apply(c).await,
            Err(e) => Err(e),
        };
        if let Err(e) = refreshed {
            log::warn!("backend re-resolution failed, keeping the pool: {e}");
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs reload triggers: SIGHUP, file watching, DNS intervals.
pub struct ReloadService {
    pub reloader: Arc<Reloader>,
    pub watch: bool,
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        let (tx, mut changes) = mpsc::channel::<()>(16);
        let mut watch = if self.watch { Watch::new(tx) } else { None };
        let cover = |watch: &mut Option<Watch>| {
            if let Some(w) = watch {
                let config = self.reloader.snapshot.load();
                w.cover(self.reloader.path(), &config.config.files);
            }
        };
        cover(&mut watch);
        let dns = self.reloader.clone();
        let dns_task = tokio::spawn(async move {
            loop {
                let every = dns.snapshot.load().config.resolve_interval();
                tokio::time::sleep(every.unwrap_or(Duration::from_secs(5))).await;
                if every.is_some() {
                    dns.refresh_dns().await;
                }
            }
        });
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    if let Ok(true) = self.reloader.reload("SIGHUP", false).await {
                        cover(&mut watch);
                    }
                }
                Some(()) = changes.recv() => {
                    // Debounce: an editor or a ConfigMap update is a burst of events.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                    if let Ok(true) = self.reloader.reload("file change", true).await {
                        // Files a new config names may live in other directories.
                        cover(&mut watch);
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        dns_task.abort();
    }
}

/// The directories of the config file and of the files it names, watched: every event in
/// one is a hint to check them (a reload that finds nothing changed does nothing).
struct Watch {
    watcher: notify::RecommendedWatcher,
    dirs: std::collections::BTreeSet<PathBuf>,
}

impl Watch {
    fn new(tx: mpsc::Sender<()>) -> Option<Watch> {
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        });
        match watcher {
            Ok(watcher) => Some(Watch {
                watcher,
                dirs: Default::default(),
            }),
            Err(e) => {
                log::error!("cannot watch for config changes: {e}; SIGHUP still reloads");
                None
            }
        }
    }

    /// Watch the directories of `config` and `files` not watched yet.
    fn cover(&mut self, config: &Path, files: &[PathBuf]) {
        use notify::Watcher;
        for path in std::iter::once(config).chain(files.iter().map(PathBuf::as_path)) {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            if self.dirs.contains(&dir) {
                continue;
            }
            match self
                .watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => log::info!("watching {} for config changes", dir.display()),
                Err(e) => log::error!("cannot watch {}: {e}; SIGHUP still reloads", dir.display()),
            }
            self.dirs.insert(dir);
        }
    }
}
