//! Pod network namespaces found in the real /proc: processes in real network namespaces
//! of their own, placed in real cgroups named as the kubelet names them (systemd driver
//! on cgroup v2, cgroupfs driver on cgroup v1). Needs root; fails, never skips, without.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ztunnel::kube::pod_netns::{Metrics, NetnsTracker, PodUid, ProcScanner};

/// The test runs in the host's network namespace; PID 1's link may not be readable
/// where the tests run inside a container.
const HOST_NETNS: &str = "/proc/self/ns/net";

fn scanner() -> ProcScanner {
    ProcScanner::new("/proc").with_host_netns(HOST_NETNS)
}

/// A process in a new network namespace, moved into a cgroup; killed and the cgroup
/// removed on drop, even when the test fails.
struct PodProcess {
    child: Child,
    cgroup_dirs: Vec<PathBuf>,
}

impl PodProcess {
    /// Starts `sleep` in a new network namespace and moves it into `cgroup` (created,
    /// with its parents below `root`).
    fn start(root: &Path, cgroup: &[String]) -> PodProcess {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run unshare (util-linux) to make a network namespace");
        let mut process = PodProcess {
            child,
            cgroup_dirs: Vec::new(),
        };
        let mut dir = root.to_path_buf();
        for part in cgroup {
            dir.push(part);
            std::fs::create_dir(&dir).unwrap_or_else(|e| {
                panic!(
                    "cannot create cgroup {} (root is required): {e}",
                    dir.display()
                )
            });
            process.cgroup_dirs.push(dir.clone());
        }
        std::fs::write(dir.join("cgroup.procs"), process.pid().to_string())
            .unwrap_or_else(|e| panic!("cannot move the process into {}: {e}", dir.display()));
        process.wait_for_own_netns();
        process
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `unshare` makes the namespace and then runs sleep in the same process: wait until
    /// the process's namespace is no longer the host's.
    fn wait_for_own_netns(&self) {
        let host = std::fs::metadata(HOST_NETNS).unwrap().ino();
        let link = format!("/proc/{}/ns/net", self.pid());
        for _ in 0..500 {
            if std::fs::metadata(&link)
                .map(|m| m.ino())
                .ok()
                .is_some_and(|i| i != host)
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!(
            "process {} never got a network namespace of its own",
            self.pid()
        );
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in self.cgroup_dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The cgroup v2 hierarchy: the root on a unified host, `unified/` on a hybrid one.
fn cgroup_v2_root() -> PathBuf {
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(root).join("cgroup.controllers").exists() {
            return PathBuf::from(root);
        }
    }
    panic!("no cgroup v2 hierarchy under /sys/fs/cgroup");
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[test]
fn real_processes_in_pod_cgroups_are_found_with_their_namespaces() {
    let tag: u32 = rand::random();
    // systemd driver on cgroup v2
    let systemd_uid = random_uid();
    let systemd = PodProcess::start(
        &cgroup_v2_root(),
        &[
            format!("kubepods-test{tag}.slice"),
            format!(
                "kubepods-test{tag}-besteffort-pod{}.slice",
                systemd_uid.replace('-', "_")
            ),
        ],
    );
    // cgroupfs driver on cgroup v1 (the pids controller), where the host has one
    let v1_pids = Path::new("/sys/fs/cgroup/pids");
    let cgroupfs_uid = random_uid();
    let cgroupfs = v1_pids.join("cgroup.procs").exists().then(|| {
        PodProcess::start(
            v1_pids,
            &[
                format!("kubepods-test{tag}"),
                "burstable".to_string(),
                format!("pod{cgroupfs_uid}"),
            ],
        )
    });

    let scan = scanner().scan().expect("the real /proc scans");
    let found = &scan.pods[&PodUid::parse(&systemd_uid).unwrap()];
    assert_eq!(found.pid, systemd.pid());
    assert_eq!(
        found.path,
        PathBuf::from(format!("/proc/{}/ns/net", systemd.pid()))
    );
    assert_eq!(found.inode, std::fs::metadata(&found.path).unwrap().ino());
    if let Some(cgroupfs) = &cgroupfs {
        let found = &scan.pods[&PodUid::parse(&cgroupfs_uid).unwrap()];
        assert_eq!(found.pid, cgroupfs.pid());
        assert_ne!(
            found.inode,
            scan.pods[&PodUid::parse(&systemd_uid).unwrap()].inode
        );
    }

    // The tracker enrols the pod, and releases it when its process is gone.
    let mut tracker = NetnsTracker::new(scanner(), Metrics::default());
    let wanted: BTreeSet<PodUid> = [PodUid::parse(&systemd_uid).unwrap()].into();
    let changes = tracker.reconcile(&wanted).unwrap();
    assert_eq!(changes.enrol.len(), 1);
    let inode = changes.enrol.values().next().unwrap().inode;
    drop(systemd);
    let changes = tracker.reconcile(&wanted).unwrap();
    assert_eq!(
        changes
            .release
            .values()
            .map(|n| n.inode)
            .collect::<Vec<_>>(),
        vec![inode]
    );
    assert_eq!(changes.pending, wanted);
}
