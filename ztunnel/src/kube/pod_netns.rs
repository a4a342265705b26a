//! Where each local pod's network namespace is, found from /proc.
//!
//! The kubelet puts every container of a pod in a cgroup whose path carries the pod's
//! UID, under either cgroup driver:
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<container id>`
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//!   underscores>.slice/cri-containerd-<container id>.scope`
//!
//! so reading `/proc/<pid>/cgroup` for every process maps pod UIDs to processes, and a
//! process's `/proc/<pid>/ns/net` is its pod's network namespace. The link's target
//! (`net:[<inode>]`) tells namespaces apart; pods that share the host's namespace
//! (`hostNetwork`, same inode as `/proc/1/ns/net`) are never enrolled.
//!
//! [`NetnsTracker::reconcile`] turns that into enrol / wait / release decisions for the
//! set of pods the caller wants: call it whenever that set changes and on a short timer
//! while some pod is still pending (its sandbox may not have started yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The default proc filesystem. The DaemonSet runs with the host's PID namespace, so
/// this shows every process on the node.
pub const PROC_ROOT: &str = "/proc";

/// Errors of the /proc scan; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot list processes in {}: {source}", path.display())]
    ListProcesses { path: PathBuf, source: io::Error },
    #[error("cannot read the host's network namespace link {}: {source}", path.display())]
    HostNetns { path: PathBuf, source: io::Error },
    #[error("{}: link target \"{target}\" is not of the form net:[<inode>]", path.display())]
    NetnsLink { path: PathBuf, target: String },
}

/// A pod's UID as the API server writes it (`metadata.uid`, lowercase, with dashes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Accepts a UID of the form 8-4-4-4-12 hexadecimal digits; upper case is folded.
    pub fn parse(uid: &str) -> Option<PodUid> {
        let groups: Vec<&str> = uid.split('-').collect();
        let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
        let hex_ok = groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        (lengths_ok && hex_ok).then(|| PodUid(uid.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pod UID in the contents of a `/proc/<pid>/cgroup` file, if the process belongs to
/// a pod. Lines of cgroup v2 (`0::/path`) and v1 (`<id>:<controllers>:/path`) are both
/// read; the first line naming a pod wins (they all name the same one).
pub fn pod_uid_from_cgroup(contents: &str) -> Option<PodUid> {
    contents.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        pod_uid_from_cgroup_path(path)
    })
}

/// The pod UID in one cgroup path: a `pod<uid>` segment (cgroupfs driver) or a
/// `...-pod<uid_with_underscores>.slice` segment (systemd driver), below a segment that
/// names `kubepods`.
fn pod_uid_from_cgroup_path(path: &str) -> Option<PodUid> {
    let mut under_kubepods = false;
    for segment in path.split('/') {
        if under_kubepods {
            if let Some(uid) = segment.strip_prefix("pod").and_then(PodUid::parse) {
                return Some(uid);
            }
            if let Some(slice) = segment.strip_suffix(".slice")
                && let Some((_, uid)) = slice.rsplit_once("-pod")
                && let Some(uid) = PodUid::parse(&uid.replace('_', "-"))
            {
                return Some(uid);
            }
        }
        under_kubepods |= segment.contains("kubepods");
    }
    None
}

/// A pod's network namespace as found in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    /// The process it was found through (the pod's lowest PID).
    pub pid: u32,
    /// `<proc root>/<pid>/ns/net`: open it to enter the namespace. Open it promptly: the
    /// path lives only as long as that process.
    pub path: PathBuf,
    /// The namespace's inode, from the link target `net:[<inode>]`.
    pub inode: u64,
}

/// What a scan of /proc saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Every pod with at least one process in a network namespace of its own.
    pub pods: HashMap<PodUid, PodNetns>,
    /// Processes that vanished or could not be read during the scan.
    pub unreadable: u64,
}

/// Reads /proc (or a tree laid out like it, for tests).
#[derive(Clone, Debug)]
pub struct ProcScanner {
    root: PathBuf,
    host_netns: PathBuf,
}

impl ProcScanner {
    /// Scans `root`; the host's network namespace is that of PID 1 (`<root>/1/ns/net`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        ProcScanner {
            host_netns: root.join("1/ns/net"),
            root,
        }
    }

    /// Takes the host's network namespace from another link (where PID 1's cannot be
    /// read, e.g. inside a container that is not the host's init).
    pub fn with_host_netns(mut self, link: impl Into<PathBuf>) -> Self {
        self.host_netns = link.into();
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps every local pod to its network namespace, leaving out pods in the host's one.
    /// Processes that exit during the scan are skipped and counted in `unreadable`.
    pub fn scan(&self) -> Result<Scan, Error> {
        let host_link = &self.host_netns;
        let host = read_netns_inode(host_link).map_err(|e| match e {
            NetnsReadError::Io(source) => Error::HostNetns {
                path: host_link.clone(),
                source,
            },
            NetnsReadError::Target(target) => Error::NetnsLink {
                path: host_link.clone(),
                target,
            },
        })?;
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::ListProcesses {
            path: self.root.clone(),
            source,
        })?;
        // Lowest PID first, so the same process (usually the pod's sandbox) is chosen
        // from one scan to the next.
        let mut pids: Vec<u32> = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut scan = Scan::default();
        for pid in pids {
            let dir = self.root.join(pid.to_string());
            let cgroup = match std::fs::read_to_string(dir.join("cgroup")) {
                Ok(cgroup) => cgroup,
                Err(_) => {
                    scan.unreadable += 1;
                    continue;
                }
            };
            let Some(uid) = pod_uid_from_cgroup(&cgroup) else {
                continue;
            };
            if scan.pods.contains_key(&uid) {
                continue;
            }
            let path = dir.join("ns/net");
            match read_netns_inode(&path) {
                Ok(inode) if inode == host => {}
                Ok(inode) => {
                    scan.pods.insert(uid, PodNetns { pid, path, inode });
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "process skipped");
                    scan.unreadable += 1;
                }
            }
        }
        Ok(scan)
    }
}

#[derive(Debug, thiserror::Error)]
enum NetnsReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("link target \"{0}\" is not of the form net:[<inode>]")]
    Target(String),
}

/// The inode in a namespace link's target, as the kernel writes it: `net:[4026531840]`.
fn read_netns_inode(link: &Path) -> Result<u64, NetnsReadError> {
    let target = std::fs::read_link(link)?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    name.strip_prefix("net:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inode| inode.parse().ok())
        .ok_or_else(|| NetnsReadError::Target(target.display().to_string()))
}

/// What to do after a reconcile.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Wanted pods whose namespace was found (or changed, after a sandbox restart):
    /// enrol each.
    pub enrol: BTreeMap<PodUid, PodNetns>,
    /// Wanted pods with no process in a namespace of their own yet: reconcile again soon.
    pub pending: BTreeSet<PodUid>,
    /// Pods enrolled before that are no longer wanted, or whose namespace is gone or
    /// was replaced: release each (before enrolling its replacement, if any).
    pub release: BTreeMap<PodUid, PodNetns>,
}

/// Counters and gauges of the netns tracker.
#[derive(Clone, Default)]
pub struct Metrics {
    enrolled: Gauge,
    pending: Gauge,
    unreadable: Counter,
    scan_failures: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "ztunnel_pod_netns_enrolled",
            "Local pods whose network namespace is enrolled",
            metrics.enrolled.clone(),
        );
        registry.register(
            "ztunnel_pod_netns_pending",
            "Local pods wanted whose network namespace is not found yet",
            metrics.pending.clone(),
        );
        registry.register(
            "ztunnel_pod_netns_unreadable_processes",
            "Processes skipped in a /proc scan because they vanished or could not be read",
            metrics.unreadable.clone(),
        );
        registry.register(
            "ztunnel_pod_netns_scan_failures",
            "Scans of /proc that failed as a whole",
            metrics.scan_failures.clone(),
        );
        metrics
    }
}

/// Remembers which pods are enrolled in which namespace and tells what changed.
pub struct NetnsTracker {
    scanner: ProcScanner,
    enrolled: HashMap<PodUid, PodNetns>,
    metrics: Metrics,
}

impl NetnsTracker {
    pub fn new(scanner: ProcScanner, metrics: Metrics) -> Self {
        NetnsTracker {
            scanner,
            enrolled: HashMap::new(),
            metrics,
        }
    }

    /// The pods enrolled now.
    pub fn enrolled(&self) -> &HashMap<PodUid, PodNetns> {
        &self.enrolled
    }

    /// Scans /proc once and compares with `wanted` (the meshed pods scheduled on this
    /// node). The returned changes are already applied to the tracker's view: the caller
    /// must carry them out. On error nothing changes.
    pub fn reconcile(&mut self, wanted: &BTreeSet<PodUid>) -> Result<Changes, Error> {
        let scan = self.scanner.scan().inspect_err(|e| {
            self.metrics.scan_failures.inc();
            tracing::warn!(error = %e, "cannot scan for pod network namespaces");
        })?;
        self.metrics.unreadable.inc_by(scan.unreadable);
        let mut changes = Changes::default();
        let enrolled_uids: Vec<PodUid> = self.enrolled.keys().cloned().collect();
        for uid in enrolled_uids {
            let current = scan.pods.get(&uid);
            let keep = wanted.contains(&uid)
                && current.map(|n| n.inode) == self.enrolled.get(&uid).map(|n| n.inode);
            if !keep && let Some(old) = self.enrolled.remove(&uid) {
                changes.release.insert(uid, old);
            }
        }
        for uid in wanted {
            if self.enrolled.contains_key(uid) {
                continue;
            }
            match scan.pods.get(uid) {
                Some(netns) => {
                    self.enrolled.insert(uid.clone(), netns.clone());
                    changes.enrol.insert(uid.clone(), netns.clone());
                }
                None => {
                    changes.pending.insert(uid.clone());
                }
            }
        }
        self.metrics.enrolled.set(self.enrolled.len() as i64);
        self.metrics.pending.set(changes.pending.len() as i64);
        for (uid, netns) in &changes.enrol {
            tracing::info!(pod_uid = %uid, pid = netns.pid, inode = netns.inode, "pod network namespace found");
        }
        for (uid, netns) in &changes.release {
            tracing::info!(pod_uid = %uid, inode = netns.inode, "pod network namespace released");
        }
        Ok(changes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const UID_A: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const UID_B: &str = "11111111-2222-4333-8444-555555555555";
    const UID_HOST: &str = "99999999-2222-4333-8444-555555555555";

    /// A fake /proc: `<pid>/cgroup` files and `<pid>/ns/net` links whose targets are
    /// named as the kernel names them (`net:[inode]`), pointing at real files.
    pub(crate) struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        pub(crate) fn new(host_inode: u64) -> Self {
            let fake = FakeProc {
                dir: tempfile::tempdir().unwrap(),
            };
            fake.process(1, "0::/init.scope\n", host_inode);
            fake
        }

        pub(crate) fn root(&self) -> &Path {
            self.dir.path()
        }

        pub(crate) fn process(&self, pid: u32, cgroup: &str, inode: u64) {
            let dir = self.root().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            let targets = self.root().join("namespaces");
            std::fs::create_dir_all(&targets).unwrap();
            let target = targets.join(format!("net:[{inode}]"));
            std::fs::write(&target, "").unwrap();
            symlink(&target, dir.join("ns/net")).unwrap();
        }

        pub(crate) fn exit(&self, pid: u32) {
            std::fs::remove_dir_all(self.root().join(pid.to_string())).unwrap();
        }
    }

    fn uid(s: &str) -> PodUid {
        PodUid::parse(s).unwrap()
    }

    fn systemd_v2(uid: &str, qos: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice/cri-containerd-4f2a.scope\n",
            uid.replace('-', "_")
        )
    }

    #[test]
    fn cgroup_paths_of_both_drivers_and_versions() {
        let u = UID_A.replace('-', "_");
        let cases: Vec<(String, Option<&str>)> = vec![
            // cgroupfs driver, v1 (several controllers; the first pod line wins)
            (
                format!(
                    "12:memory:/kubepods/burstable/pod{UID_A}/4f2a\n11:cpu,cpuacct:/kubepods/burstable/pod{UID_A}/4f2a\n"
                ),
                Some(UID_A),
            ),
            // cgroupfs driver, v2, guaranteed QoS (no QoS level in the path)
            (format!("0::/kubepods/pod{UID_A}/4f2a\n"), Some(UID_A)),
            // systemd driver, v2
            (systemd_v2(UID_A, "besteffort"), Some(UID_A)),
            // systemd driver, guaranteed, v1 with the v2 line of a hybrid layout first
            (
                format!(
                    "0::/\n1:name=systemd:/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-4f2a.scope\n"
                ),
                Some(UID_A),
            ),
            // kind nodes nest the kubelet's hierarchy under its own slice
            (
                format!(
                    "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-4f2a.scope\n"
                ),
                Some(UID_A),
            ),
            // upper-case UIDs are folded
            (
                format!("0::/kubepods/pod{}/x\n", UID_A.to_uppercase()),
                Some(UID_A),
            ),
            ("0::/system.slice/containerd.service\n".into(), None),
            ("0::/user.slice/user-0.slice/session-1.scope\n".into(), None),
            // a pod-looking segment that is not under kubepods
            (format!("0::/machine/pod{UID_A}/x\n"), None),
            // not a UID
            ("0::/kubepods/burstable/podnot-a-uid/x\n".into(), None),
            (
                "0::/kubepods/burstable/pod0a1b2c3d-4e5f-4a6b-8c7d/x\n".into(),
                None,
            ),
            ("garbage without colons\n".into(), None),
            (String::new(), None),
        ];
        for (cgroup, want) in cases {
            assert_eq!(
                pod_uid_from_cgroup(&cgroup),
                want.map(uid),
                "cgroup file {cgroup:?}"
            );
        }
    }

    #[test]
    fn scan_maps_pods_to_their_namespaces_and_skips_the_host_one() {
        let proc = FakeProc::new(4026531840);
        proc.process(10, "0::/system.slice/containerd.service\n", 4026531840);
        // pod A: sandbox and an application container, cgroupfs driver
        proc.process(
            120,
            &format!("0::/kubepods/burstable/pod{UID_A}/sandbox\n"),
            4026532001,
        );
        proc.process(
            121,
            &format!("0::/kubepods/burstable/pod{UID_A}/app\n"),
            4026532001,
        );
        // pod B: systemd driver
        proc.process(130, &systemd_v2(UID_B, "besteffort"), 4026532002);
        // a hostNetwork pod shares the host's namespace
        proc.process(140, &systemd_v2(UID_HOST, "burstable"), 4026531840);

        let scan = ProcScanner::new(proc.root()).scan().unwrap();
        assert_eq!(scan.unreadable, 0);
        assert_eq!(scan.pods.len(), 2, "{:?}", scan.pods);
        let a = &scan.pods[&uid(UID_A)];
        assert_eq!(a.pid, 120);
        assert_eq!(a.inode, 4026532001);
        assert_eq!(a.path, proc.root().join("120/ns/net"));
        assert!(std::fs::File::open(&a.path).is_ok(), "path opens");
        assert_eq!(scan.pods[&uid(UID_B)].inode, 4026532002);
        assert!(!scan.pods.contains_key(&uid(UID_HOST)));
    }

    #[test]
    fn scan_counts_broken_processes_and_names_a_broken_proc() {
        let proc = FakeProc::new(1);
        proc.process(200, &format!("0::/kubepods/pod{UID_A}/x\n"), 4026532001);
        // a process whose ns link is not a network namespace link
        std::fs::create_dir_all(proc.root().join("201/ns")).unwrap();
        std::fs::write(
            proc.root().join("201/cgroup"),
            format!("0::/kubepods/pod{UID_B}/x\n"),
        )
        .unwrap();
        symlink("mnt:[5]", proc.root().join("201/ns/net")).unwrap();
        // a process without a cgroup file (exited mid-scan)
        std::fs::create_dir_all(proc.root().join("202")).unwrap();
        std::fs::create_dir_all(proc.root().join("self")).unwrap();

        let scan = ProcScanner::new(proc.root()).scan().unwrap();
        assert_eq!(scan.unreadable, 2);
        assert_eq!(scan.pods.keys().collect::<Vec<_>>(), vec![&uid(UID_A)]);

        let missing = ProcScanner::new(proc.root().join("absent")).scan();
        let err = missing.unwrap_err().to_string();
        assert!(err.contains("absent/1/ns/net"), "{err}");

        std::fs::remove_file(proc.root().join("1/ns/net")).unwrap();
        symlink("pid:[7]", proc.root().join("1/ns/net")).unwrap();
        let err = ProcScanner::new(proc.root())
            .scan()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pid:[7]") && err.contains("net:[<inode>]"),
            "{err}"
        );
    }

    #[test]
    fn reconcile_enrols_when_found_retries_and_releases() {
        let proc = FakeProc::new(1);
        let metrics = Metrics::default();
        let mut tracker = NetnsTracker::new(ProcScanner::new(proc.root()), metrics.clone());
        let wanted: BTreeSet<PodUid> = [uid(UID_A), uid(UID_B)].into();

        // A is running, B's sandbox has not started yet.
        proc.process(300, &systemd_v2(UID_A, "burstable"), 4026532001);
        let changes = tracker.reconcile(&wanted).unwrap();
        assert_eq!(changes.enrol.keys().collect::<Vec<_>>(), vec![&uid(UID_A)]);
        assert_eq!(changes.pending, [uid(UID_B)].into());
        assert!(changes.release.is_empty());
        assert_eq!(metrics.pending.get(), 1);

        // Nothing new: nothing to do but keep waiting for B.
        let changes = tracker.reconcile(&wanted).unwrap();
        assert!(changes.enrol.is_empty() && changes.release.is_empty());
        assert_eq!(changes.pending, [uid(UID_B)].into());

        // B starts: it is enrolled, A stays.
        proc.process(310, &format!("0::/kubepods/pod{UID_B}/s\n"), 4026532002);
        let changes = tracker.reconcile(&wanted).unwrap();
        assert_eq!(changes.enrol.keys().collect::<Vec<_>>(), vec![&uid(UID_B)]);
        assert!(changes.pending.is_empty() && changes.release.is_empty());
        assert_eq!(tracker.enrolled().len(), 2);
        assert_eq!(metrics.enrolled.get(), 2);

        // A's sandbox is recreated with a new namespace: release the old, enrol the new.
        proc.exit(300);
        proc.process(301, &systemd_v2(UID_A, "burstable"), 4026532003);
        let changes = tracker.reconcile(&wanted).unwrap();
        assert_eq!(changes.release[&uid(UID_A)].inode, 4026532001);
        assert_eq!(changes.enrol[&uid(UID_A)].inode, 4026532003);

        // B is deleted from the API (no longer wanted) while its processes linger:
        // released at once. A's processes are gone while it is still wanted: released,
        // and pending again until it reappears.
        proc.exit(301);
        let changes = tracker.reconcile(&[uid(UID_A)].into()).unwrap();
        assert_eq!(
            changes.release.keys().collect::<Vec<_>>(),
            vec![&uid(UID_A), &uid(UID_B)]
        );
        assert_eq!(changes.pending, [uid(UID_A)].into());
        assert!(tracker.enrolled().is_empty());
        assert_eq!(metrics.enrolled.get(), 0);

        // A failed scan changes nothing and is counted.
        let mut broken = NetnsTracker::new(
            ProcScanner::new(proc.root().join("absent")),
            metrics.clone(),
        );
        assert!(broken.reconcile(&wanted).is_err());
        assert_eq!(metrics.scan_failures.get(), 1);
    }
}
