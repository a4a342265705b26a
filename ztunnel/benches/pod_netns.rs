//! The cost of one /proc scan for pod network namespaces: a fake /proc of a busy node
//! (2,000 processes, 110 pods) and this machine's real /proc. The scan runs when the set
//! of local pods changes and every 0.5 s while a pod's sandbox is not up yet.
//! Run: `cargo bench -p ztunnel --bench pod_netns`.

use std::os::unix::fs::symlink;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use ztunnel::kube::pod_netns::ProcScanner;

const PROCESSES: u32 = 2000;
const PODS: u32 = 110;

/// A /proc tree: PID 1 on the host namespace, then processes spread over `PODS` pods
/// (systemd driver, cgroup v2) and system services.
fn fake_proc(root: &Path) {
    let targets = root.join("namespaces");
    std::fs::create_dir_all(&targets).unwrap();
    for pid in 1..=PROCESSES {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        let (cgroup, inode) = if pid % 3 == 0 {
            let pod = pid % PODS;
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod:08x}_0000_4000_8000_000000000000.slice/cri-containerd-{pid:064x}.scope\n"
                ),
                4026532000 + u64::from(pod),
            )
        } else {
            (
                "0::/system.slice/containerd.service\n".to_string(),
                4026531840,
            )
        };
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
        let target = targets.join(format!("net:[{inode}]"));
        if !target.exists() {
            std::fs::write(&target, "").unwrap();
        }
        symlink(&target, dir.join("ns/net")).unwrap();
    }
}

fn scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path());
    let fake = ProcScanner::new(dir.path());
    let found = fake.scan().unwrap();
    assert_eq!(found.pods.len(), PODS as usize);
    c.bench_function("scan fake /proc (2000 processes, 110 pods)", |b| {
        b.iter(|| fake.scan().unwrap())
    });
    // PID 1's link may be unreadable inside a container: compare with our own.
    let real = ProcScanner::new("/proc").with_host_netns("/proc/self/ns/net");
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    c.bench_function(
        &format!("scan this machine's /proc ({processes} processes)"),
        |b| b.iter(|| real.scan().unwrap()),
    );
}

criterion_group!(benches, scan);
criterion_main!(benches);
