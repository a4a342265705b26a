//! The trust bundle: every root a peer's chain may end in. Several roots at once let a CA
//! be rotated in stages (old and new trusted together, then the old one removed). The
//! bundle is swapped atomically when its file changes: handshakes after the swap use the
//! new roots, and connections already established are not touched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use arc_swap::ArcSwap;

use crate::file_watch::{self, FileWatcher};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{self, PemObject, SectionKind};

use super::Error;

/// Parses every certificate of a PEM document; `path` names it in errors. Sections other
/// than certificates are an error, and so is a document that holds no certificate.
pub fn parse_pem_certificates(
    path: &Path,
    contents: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let malformed = |problem: String| Error::Malformed {
        path: path.to_path_buf(),
        problem,
    };
    let mut certs = Vec::new();
    for (index, section) in
        <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(contents.as_bytes()).enumerate()
    {
        match section {
            Ok((SectionKind::Certificate, der)) => certs.push(CertificateDer::from(der)),
            Ok((kind, _)) => {
                return Err(malformed(format!(
                    "PEM section {} is a {kind:?}, not a certificate",
                    index + 1
                )));
            }
            Err(pem::Error::NoItemsFound) => break,
            Err(e) => {
                return Err(malformed(format!(
                    "PEM section {} is malformed: {e}",
                    index + 1
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(malformed(
            "holds no certificate (no PEM CERTIFICATE section)".to_string(),
        ));
    }
    Ok(certs)
}

/// A set of trusted roots.
#[derive(Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    store: RootCertStore,
}

impl TrustBundle {
    /// A bundle of the given roots; each must be a usable trust anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| format!("root {} is not a usable trust anchor: {e}", index + 1))?;
        }
        Ok(TrustBundle { roots, store })
    }

    /// Reads a bundle from a PEM file of one or more root certificates.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let contents = read(path)?;
        Self::from_pem(path, &contents)
    }

    /// A bundle from the PEM text of file `path`.
    fn from_pem(path: &Path, contents: &str) -> Result<Self, Error> {
        let roots = parse_pem_certificates(path, contents)?;
        TrustBundle::new(roots).map_err(|problem| Error::Malformed {
            path: path.to_path_buf(),
            problem,
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn store(&self) -> &RootCertStore {
        &self.store
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The line (outside the PEM blocks) that marks a bundle file as the retire step of a
/// rotation: the edit is applied even when it drops the root of certificates in use.
pub const ROTATION_RETIRE_MARK: &str = "# rotation: retire";

/// What a file edit must pass before its bundle replaces the one in force: the problem
/// with the new bundle, if any.
type EditCheck = Box<dyn Fn(&TrustBundle) -> Result<(), String> + Send + Sync>;

/// The bundle in force, readable without locks, replaced when its file changes.
pub struct TrustStore {
    current: ArcSwap<TrustBundle>,
    path: Option<PathBuf>,
    edit_check: Mutex<Option<EditCheck>>,
}

impl TrustStore {
    /// A fixed bundle that no file backs.
    pub fn fixed(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(TrustStore {
            current: ArcSwap::from_pointee(bundle),
            path: None,
            edit_check: Mutex::new(None),
        })
    }

    /// Loads the bundle from `path`; [`TrustStore::watch`] keeps it current.
    pub fn from_file(path: &Path) -> Result<Arc<Self>, Error> {
        let bundle = TrustBundle::from_file(path)?;
        Ok(Arc::new(TrustStore {
            current: ArcSwap::from_pointee(bundle),
            path: Some(path.to_path_buf()),
            edit_check: Mutex::new(None),
        }))
    }

    /// The bundle in force now.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// Replaces the bundle in force.
    pub fn replace(&self, bundle: TrustBundle) {
        self.current.store(Arc::new(bundle));
    }

    /// From now on, a file edit whose bundle fails `check` is refused (the tunnel sets
    /// one that keeps the roots of the certificates it holds), unless the file carries
    /// [`ROTATION_RETIRE_MARK`].
    pub fn check_edits(
        &self,
        check: impl Fn(&TrustBundle) -> Result<(), String> + Send + Sync + 'static,
    ) {
        *self
            .edit_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(check));
    }

    /// Reads the file again. On error the bundle in force stays and the error is returned.
    pub fn reload(&self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let contents = read(path)?;
        let bundle = TrustBundle::from_pem(path, &contents)?;
        let retiring = contents.lines().any(|l| l.trim() == ROTATION_RETIRE_MARK);
        if !retiring
            && let Some(check) = &*self
                .edit_check
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        {
            check(&bundle).map_err(|problem| Error::BundleRefused {
                path: path.clone(),
                problem: format!(
                    "{problem}; the bundle in force stays (a line `{ROTATION_RETIRE_MARK}` in the file applies it anyway, as the retire step of a rotation)"
                ),
            })?;
        }
        self.replace(bundle);
        Ok(())
    }

    /// Watches the bundle's file ([`file_watch`]) and reloads it when its contents change;
    /// `on_error` hears of every reload that failed (the bundle in force then stays).
    /// Changes are read once the directory has been quiet for [`WATCH_DEBOUNCE`], so a
    /// file caught half-written is not read. Watching stops when the returned watcher is
    /// dropped. Needs a tokio runtime.
    pub fn watch(
        self: &Arc<Self>,
        on_error: impl Fn(&Error) + Send + 'static,
    ) -> Result<Option<FileWatcher>, Error> {
        let Some(path) = self.path.clone() else {
            return Ok(None);
        };
        let (watcher, mut changes) = file_watch::watch(&path).map_err(|e| Error::Read {
            path: path.clone(),
            source: std::io::Error::other(format!("cannot watch: {e}")),
        })?;
        let store = Arc::downgrade(self);
        let mut last = std::fs::read(&path).ok();
        // Ends when the watcher, and with it the channel, is dropped.
        tokio::spawn(async move {
            while changes.recv().await.is_some() {
                tokio::time::sleep(WATCH_DEBOUNCE).await;
                while changes.try_recv().is_ok() {}
                let Some(store) = store.upgrade() else { return };
                let now = std::fs::read(&path).ok();
                if now == last {
                    continue;
                }
                last = now;
                match store.reload() {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), roots = store.current().roots().len(), "trust bundle reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "trust bundle not reloaded, the previous one stays in force");
                        on_error(&e);
                    }
                }
            }
        });
        Ok(Some(watcher))
    }
}

/// How long a watched directory must be quiet before a changed file is read again.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bundle_files_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = TrustBundle::from_file(&dir.path().join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent.pem") && err.contains("No such file"),
            "{err}"
        );

        let cases = [
            ("empty.pem", "", "holds no certificate"),
            ("text.pem", "hello", "holds no certificate"),
            (
                "truncated.pem",
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                "malformed",
            ),
            (
                "key.pem",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "not a certificate",
            ),
            (
                "junk.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not a usable trust anchor",
            ),
        ];
        for (name, contents, want) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            let err = TrustBundle::from_file(&path).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains(want),
                "{name}: {err:?} lacks {want:?}"
            );
        }
    }
}
