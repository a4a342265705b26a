//! Watching a file for edits, as the config file and the trust bundle are watched.
//!
//! The file's directory is watched, not the file: editors and Kubernetes ConfigMap
//! updates replace a file by a rename, which a watch on the old inode would miss. Reads
//! (a reload's own among them) are not changes. Each event is one message on the
//! returned channel; the consumer waits for a burst to end before reading the file.

use std::path::Path;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A running watch; dropping it stops the watch and closes its channel.
pub type FileWatcher = RecommendedWatcher;

/// Watches the directory of `path`; a message arrives for every change in it (or for an
/// error of the watch itself).
pub fn watch(
    path: &Path,
) -> Result<(FileWatcher, mpsc::UnboundedReceiver<notify::Result<()>>), notify::Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (tx, changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if !matches!(&event, Ok(e) if e.kind.is_access()) {
            let _ = tx.send(event.map(|_| ()));
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, changes))
}
