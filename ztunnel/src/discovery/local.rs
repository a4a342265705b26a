//! The local config file as a discovery source: published at start, then watched. A
//! valid edit is published without a restart; an invalid one is logged with its file,
//! place and problem, counted, and the last good config stays in force.

use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{self, Config, Settings};
use crate::file_watch::{self, FileWatcher};
use crate::state::State;

/// Edits often arrive as several events (truncate, write, rename): wait this long for
/// the burst to end before reading the file.
const SETTLE: Duration = Duration::from_millis(100);
/// How many more times an invalid file is read while it is still changing.
const MAX_SETTLE_READS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot watch config file {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

#[derive(Clone, Default)]
struct Metrics {
    applied: Counter,
    rejected: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "ztunnel_config_reloads",
            "Edits of the local config file that were applied",
            m.applied.clone(),
        );
        registry.register(
            "ztunnel_config_rejected",
            "Edits of the local config file that were rejected (the last good config stays in force)",
            m.rejected.clone(),
        );
        m
    }
}

/// The watched config file. Dropping it stops the watch.
pub struct LocalSource {
    _watcher: FileWatcher,
    task: JoinHandle<()>,
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalSource {
    /// Publishes `config` (as loaded by [`config::load`]) and watches its file for
    /// changes. Registers `ztunnel_config_reloads_total` and `ztunnel_config_rejected_total`. Must be
    /// called inside a Tokio runtime.
    pub fn start(
        config: &Config,
        state: State,
        registry: &mut Registry,
    ) -> Result<LocalSource, Error> {
        let metrics = Metrics::register(registry);
        let path = config.path.clone();
        let (watcher, rx) = file_watch::watch(&path).map_err(|source| Error::Watch {
            path: path.clone(),
            source,
        })?;
        state.publish(config.resources.clone());
        let last = std::fs::read_to_string(&path).unwrap_or_default();
        let reloader = Reloader {
            path,
            state,
            metrics,
            settings: config.settings.clone(),
            last,
        };
        let task = tokio::spawn(reloader.run(rx));
        Ok(LocalSource {
            _watcher: watcher,
            task,
        })
    }
}

struct Reloader {
    path: PathBuf,
    state: State,
    metrics: Metrics,
    /// The settings the tunnel started with: changing them needs a restart.
    settings: Settings,
    /// The text last read, good or bad, so an unchanged file is not re-read as news.
    last: String,
}

impl Reloader {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<notify::Result<()>>) {
        while let Some(event) = events.recv().await {
            if let Err(e) = event {
                warn!(file = %self.path.display(), error = %e, "config file watch error");
            }
            tokio::time::sleep(SETTLE).await;
            while events.try_recv().is_ok() {}
            self.reload().await;
        }
    }

    fn read(&self) -> Result<String, config::Error> {
        std::fs::read_to_string(&self.path).map_err(|source| config::Error::Read {
            path: self.path.clone(),
            source,
        })
    }

    /// Parses the file; while it does not parse and is still changing (a write caught
    /// halfway), reads it again after a settle period.
    async fn parse_settled(&self, mut text: String) -> (String, Result<Config, config::Error>) {
        let mut parsed = config::parse(&self.path, &text);
        for _ in 0..MAX_SETTLE_READS {
            if parsed.is_ok() {
                break;
            }
            tokio::time::sleep(SETTLE).await;
            match self.read() {
                Ok(again) if again != text => text = again,
                _ => break,
            }
            parsed = config::parse(&self.path, &text);
        }
        (text, parsed)
    }

    async fn reload(&mut self) {
        let text = match self.read() {
            Ok(t) => t,
            Err(e) => {
                if !self.last.is_empty() {
                    self.reject(&e);
                    self.last.clear();
                }
                return;
            }
        };
        if text == self.last {
            return;
        }
        let (text, parsed) = self.parse_settled(text).await;
        self.last = text;
        match parsed {
            Ok(config)
                if config.settings.node != self.settings.node
                    || config.settings.trust_domain != self.settings.trust_domain =>
            {
                self.reject(&config::Error::Invalid {
                    path: self.path.clone(),
                    place: "node, trustDomain".to_string(),
                    problem: format!(
                        "cannot change while running (running as node {} in trust domain {}); restart the tunnel",
                        self.settings.node, self.settings.trust_domain
                    ),
                });
            }
            Ok(config) => {
                for field in restart_fields(&self.settings, &config.settings) {
                    warn!(file = %self.path.display(), field, "setting changed; it applies after a restart");
                }
                self.state.publish(config.resources);
                self.metrics.applied.inc();
                info!(file = %self.path.display(), "config file change applied");
            }
            Err(e) => self.reject(&e),
        }
    }

    fn reject(&self, e: &config::Error) {
        self.metrics.rejected.inc();
        warn!(error = %e, "config file change rejected; the last good config stays in force");
    }
}

/// The settings that differ and only apply at start.
fn restart_fields(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let fields = [
        ("ca", old.ca != new.ca),
        (
            "ca.trustBundleFile",
            old.trust_bundle_file != new.trust_bundle_file,
        ),
        ("adminAddress", old.admin_address != new.admin_address),
        (
            "readinessAddress",
            old.readiness_address != new.readiness_address,
        ),
        ("metricsAddress", old.metrics_address != new.metrics_address),
        ("socketMark", old.socket_mark != new.socket_mark),
        ("bpfPinRoot", old.bpf_pin_root != new.bpf_pin_root),
        ("logLevel", old.log_level != new.log_level),
        ("logFormat", old.log_format != new.log_format),
    ];
    fields
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

#[cfg(test)]
mod tests;
