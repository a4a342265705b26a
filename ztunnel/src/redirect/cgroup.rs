//! Finds the node's cgroup v2 root, where the connect programs attach: `/sys/fs/cgroup`
//! on a unified layout, `/sys/fs/cgroup/unified` on a hybrid one. Read from the mount
//! table rather than assumed.

use std::path::PathBuf;

use super::Error;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mount point of the first cgroup v2 filesystem in this process's mount table.
pub(super) fn v2_root() -> Result<PathBuf, Error> {
    let table = std::fs::read_to_string(MOUNTINFO).map_err(|source| Error::Read {
        path: MOUNTINFO.into(),
        source,
    })?;
    cgroup2_mount_point(&table).ok_or(Error::NoCgroup2)
}

/// The mount point of the first `cgroup2` line of a mountinfo table (proc(5)):
/// `ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS`.
fn cgroup2_mount_point(table: &str) -> Option<PathBuf> {
    table.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        mount
            .split(' ')
            .nth(4)
            .map(|point| PathBuf::from(unescape(point)))
    })
}

/// Undoes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_layout_finds_the_unified_mount() {
        let table = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount_point(table),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn optional_fields_and_escapes_are_handled() {
        let table = "40 1 0:35 / /mnt/my\\040cgroup rw shared:1 master:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_point(table),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_no_mount_point() {
        let table = "35 33 0:30 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount_point(table), None);
        assert_eq!(cgroup2_mount_point("garbage without separator"), None);
    }

    #[test]
    fn this_machine_has_a_cgroup2_root() {
        let root = v2_root().expect("cgroup v2 mount");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
