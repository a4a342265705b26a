//! Where the steering lives while the tunnel is away: the bpf filesystem.
//!
//! Layout under the pin root (one per node, `/sys/fs/bpf/ztunnel/<node>` by default):
//! ```text
//! maps-v<N>/<MAP>                    maps, shared by every generation of the programs
//! links/cgroup/<program>-<link id>   the cgroup programs' attachments
//! links/netns/<cookie>/<link id>     each enrolled namespace's sk_lookup attachment
//! ```
//! A link is replaced by pinning the new one first and removing the old pin after, so
//! steering never lapses, not even between two generations of the programs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use aya::programs::links::FdLink;
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use ztunnel_ebpf_common::MAP_LAYOUT_VERSION;

use super::Error;

/// Where the kernel's bpf filesystem is mounted by convention.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The pin paths of one node.
#[derive(Clone, Debug)]
pub(super) struct PinPaths {
    root: PathBuf,
}

impl PinPaths {
    /// Makes sure `root` is on a bpf filesystem, mounting one at /sys/fs/bpf when the
    /// root lies below it and nothing is mounted there (as a DaemonSet's hostPath would
    /// provide), and creates the directories.
    pub(super) fn prepare(root: &Path) -> Result<PinPaths, Error> {
        ensure_bpffs(root)?;
        let paths = PinPaths {
            root: root.to_path_buf(),
        };
        for dir in [paths.maps(), paths.cgroup_links(), paths.netns_links_root()] {
            fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
        }
        Ok(paths)
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn maps(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
    }

    pub(super) fn cgroup_links(&self) -> PathBuf {
        self.root.join("links").join("cgroup")
    }

    pub(super) fn netns_links_root(&self) -> PathBuf {
        self.root.join("links").join("netns")
    }

    pub(super) fn netns_links(&self, netns_cookie: u64) -> PathBuf {
        self.netns_links_root().join(netns_cookie.to_string())
    }

    /// The cookies of the namespaces that have pinned links.
    pub(super) fn pinned_netns(&self) -> Result<Vec<u64>, Error> {
        let dir = self.netns_links_root();
        let entries = fs::read_dir(&dir).map_err(|source| Error::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut cookies = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
            match entry.file_name().to_str().map(str::parse::<u64>) {
                Some(Ok(cookie)) => cookies.push(cookie),
                _ => tracing::warn!(
                    path = %entry.path().display(),
                    "unexpected entry among pinned namespace links"
                ),
            }
        }
        Ok(cookies)
    }
}

/// Pins `link` in `dir` as `<prefix><link id>`, then removes every other pin there with
/// that prefix: the previous attachment ends only once the new one is in place.
pub(super) fn replace_link(dir: &Path, prefix: &str, link: FdLink) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::PinDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let id = link
        .info()
        .map_err(|source| Error::LinkInfo {
            path: dir.to_path_buf(),
            source,
        })?
        .id();
    let name = format!("{prefix}{id}");
    let path = dir.join(&name);
    link.pin(&path)
        .map_err(|source| Error::Pin { path, source })?;
    remove_pins(dir, |other| other != name && other.starts_with(prefix))
}

/// Removes the pins in `dir` whose names `select` picks; each removal detaches a link
/// (or drops a map) unless something else still holds it.
pub(super) fn remove_pins(dir: &Path, select: impl Fn(&str) -> bool) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::PinDir {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| Error::PinDir {
            path: dir.to_path_buf(),
            source,
        })?;
        if entry.file_name().to_str().is_some_and(&select) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| Error::Unpin { path, source })?;
        }
    }
    Ok(())
}

/// Removes a directory of pins and everything in it.
pub(super) fn remove_dir(dir: &Path) -> Result<(), Error> {
    remove_pins(dir, |_| true)?;
    match fs::remove_dir(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(Error::Unpin {
            path: dir.to_path_buf(),
            source: err,
        }),
        _ => Ok(()),
    }
}

fn ensure_bpffs(root: &Path) -> Result<(), Error> {
    // Check and mount under one lock: two mounts would stack, and pins made on the lower
    // one would vanish from sight.
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _mounting = MOUNTING.lock().unwrap_or_else(PoisonError::into_inner);
    let existing = root
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT);
    if !root.starts_with(mount_point) {
        return Err(Error::NotBpffs {
            path: root.to_path_buf(),
        });
    }
    tracing::info!(
        mount_point = BPFFS_MOUNT,
        "no bpf filesystem mounted, mounting one"
    );
    fs::create_dir_all(mount_point).map_err(|source| Error::PinDir {
        path: mount_point.to_path_buf(),
        source,
    })?;
    match mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => Ok(()),
        Err(source) => Err(Error::MountBpffs {
            path: mount_point.to_path_buf(),
            source,
        }),
    }
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}
