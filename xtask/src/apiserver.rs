//! A real Kubernetes API server for the test tier that runs against one: `kube-apiserver`
//! built once from Debian bookworm's `kubernetes` source package (1.20.2 with its vendor
//! tree) with Go 1.23 from bookworm-backports, and etcd from bookworm. The binary is
//! cached outside the work tree, keyed by version; nothing is rebuilt when it is there.
//! The build itself is `kube-apiserver-build.sh` (GOPATH mode, the generated OpenAPI
//! definitions the tarball lacks, Debian's reflect2 1.0.2 for a current Go).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::run as run_command;

/// The Debian source package and its exact version (the cache is keyed by it).
const SOURCE_PACKAGE: &str = "kubernetes";
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The Kubernetes release that source holds.
pub const KUBE_VERSION: &str = "1.20.2";
const CACHE_ROOT: &str = "/var/cache/ztunnel";
const GO_PACKAGE: &str = "golang-1.23-go";
const GO_ROOT: &str = "/usr/lib/go-1.23";
const BACKPORTS: &str = "bookworm-backports";
/// etcd for the API server, Debian's reflect2 1.0.2 for the build, dpkg-dev to unpack
/// the source package.
const PACKAGES: &[&str] = &[
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "dpkg-dev",
];
const REFLECT2_DIR: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
/// The apt sources this adds: bookworm's sources and bookworm-backports.
const SOURCES_FILE: &str = "/etc/apt/sources.list.d/ztunnel-kube-apiserver.sources";
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const BUILD_SCRIPT: &str = include_str!("kube-apiserver-build.sh");

/// Where the built `kube-apiserver` is kept.
pub fn binary() -> PathBuf {
    cache_dir().join("kube-apiserver")
}

fn cache_dir() -> PathBuf {
    Path::new(CACHE_ROOT).join(format!("kube-apiserver-{KUBE_VERSION}"))
}

/// Whether the tier's binaries are there: the cached `kube-apiserver` and etcd.
pub fn installed() -> bool {
    works(Command::new(binary()).arg("--version")) && works(Command::new("etcd").arg("--version"))
}

/// Builds `kube-apiserver` unless it is cached, and installs etcd. The build's output
/// goes to `build.log` in the cache directory (its tail is shown on failure); the
/// source tree and Go's caches live there too and are removed once the binary is built.
pub fn run() -> Result<()> {
    let started = Instant::now();
    let binary = binary();
    let have_binary = works(Command::new(&binary).arg("--version"));
    let have_etcd = works(Command::new("etcd").arg("--version"));
    if have_binary && have_etcd {
        return Ok(());
    }
    add_apt_sources()?;
    run_command(Command::new("apt-get").arg("update").stdout(Stdio::null()))?;
    let packages: &[&str] = if have_binary {
        &["etcd-server"]
    } else {
        PACKAGES
    };
    eprintln!("setup: installing Debian packages {}", packages.join(" "));
    apt_install(packages, None)?;
    if have_binary {
        return Ok(());
    }
    eprintln!("setup: installing {GO_PACKAGE} from {BACKPORTS}");
    apt_install(&[GO_PACKAGE], Some(BACKPORTS))?;

    let dir = cache_dir();
    let work = dir.join("build");
    let tmp = work.join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let upstream = SOURCE_VERSION
        .split_once('-')
        .map_or(SOURCE_VERSION, |(v, _)| v);
    let tree = work.join(format!("{SOURCE_PACKAGE}-{upstream}"));
    if !tree.join("cmd/kube-apiserver").is_dir() {
        eprintln!("setup: fetching the {SOURCE_PACKAGE} {SOURCE_VERSION} source package");
        run_command(
            Command::new("apt-get")
                .args(["source", &format!("{SOURCE_PACKAGE}={SOURCE_VERSION}")])
                .current_dir(&work)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
    }
    eprintln!(
        "setup: building kube-apiserver {KUBE_VERSION} (Go, GOPATH mode; about 6 minutes of CPU, \
         3 on a quiet 2-core machine), log in {}",
        dir.join("build.log").display()
    );
    let log_path = dir.join("build.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let status = Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("kube-apiserver-build.sh")
        .arg(&tree)
        .arg(&binary)
        .arg(GO_ROOT)
        .arg(REFLECT2_DIR)
        .env("GOTMPDIR", &tmp)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot run bash for the kube-apiserver build")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "the kube-apiserver build failed ({status}); the end of {}:\n{}",
            log_path.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    if !works(Command::new(&binary).arg("--version")) {
        bail!("{} was built but does not run", binary.display());
    }
    std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    eprintln!(
        "setup: kube-apiserver {KUBE_VERSION} built in {} s into {}",
        started.elapsed().as_secs(),
        binary.display()
    );
    Ok(())
}

fn works(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_install(packages: &[&str], release: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "--no-install-recommends"]);
    if let Some(release) = release {
        cmd.args(["-t", release]);
    }
    run_command(
        cmd.args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
}

/// Adds a `deb-src` entry for bookworm and a `deb` entry for bookworm-backports, from the
/// same mirror and keyring as the image's own Debian entry.
fn add_apt_sources() -> Result<()> {
    if Path::new(SOURCES_FILE).exists() {
        return Ok(());
    }
    let debian = std::fs::read_to_string(DEBIAN_SOURCES)
        .with_context(|| format!("cannot read {DEBIAN_SOURCES} to find the Debian mirror"))?;
    let (uri, keyring) = mirror(&debian).with_context(|| {
        format!("{DEBIAN_SOURCES}: no entry with URIs, Suites bookworm and Signed-By")
    })?;
    let entries = format!(
        "Types: deb-src\nURIs: {uri}\nSuites: bookworm\nComponents: main\nSigned-By: {keyring}\n\n\
         Types: deb\nURIs: {uri}\nSuites: {BACKPORTS}\nComponents: main\nSigned-By: {keyring}\n"
    );
    eprintln!("setup: adding bookworm sources and {BACKPORTS} in {SOURCES_FILE}");
    std::fs::write(SOURCES_FILE, entries).with_context(|| format!("cannot write {SOURCES_FILE}"))
}

/// The URI and keyring of the deb822 stanza that carries `bookworm`.
fn mirror(sources: &str) -> Option<(String, String)> {
    sources.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let suites = field("Suites")?;
        if !suites.split_whitespace().any(|s| s == "bookworm") {
            return None;
        }
        Some((field("URIs")?, field("Signed-By")?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_taken_from_the_bookworm_stanza() {
        let sources = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                       Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                       Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        assert_eq!(
            mirror(sources),
            Some((
                "http://mirror.example/debian".to_string(),
                "/usr/share/keyrings/debian-archive-keyring.gpg".to_string()
            ))
        );
        assert_eq!(mirror("Types: deb\nSuites: trixie\n"), None);
    }
}
