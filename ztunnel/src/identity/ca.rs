//! Certificate authorities: the interface the certificate manager asks, and the
//! in-process CA that signs from a root certificate and key on disk.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use super::{Error, Identity};

/// File names `ztunnel ca init` writes and the in-process CA reads by default.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far back a leaf's validity starts, so peers with a slightly slow clock accept it.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A signed chain, leaf first.
pub type Chain = Vec<CertificateDer<'static>>;
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Chain, Error>> + Send + 'a>>;

/// Something that signs workload certificates: the in-process CA, or a client of the
/// cluster CA service. The key stays with the caller: only a CSR crosses this line.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Signs a leaf for `identity` over the public key in `csr`.
    fn sign(
        &self,
        identity: Identity,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'_>;
}

/// Where a CA's root certificate and key live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The files `ztunnel ca init --dir DIR` writes.
    pub fn in_dir(dir: &Path) -> Self {
        CaFiles {
            cert: dir.join(ROOT_CERT_FILE),
            key: dir.join(ROOT_KEY_FILE),
        }
    }
}

/// A new root certificate and key (ECDSA P-256, CA:true, keyCertSign), PEM encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct RootPem {
    pub cert: String,
    pub key: String,
}

/// Generates a new root for `trust_domain` in memory.
pub fn generate_root(trust_domain: &str) -> Result<RootPem, Error> {
    let key = KeyPair::generate().map_err(|e| Error::KeyGeneration(e.to_string()))?;
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // The creation time tells roots apart (in logs, and while two are trusted in a rotation).
    let created = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    dn.push(DnType::CommonName, format!("ztunnel root CA {created}"));
    params.distinguished_name = dn;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::KeyGeneration(format!("cannot self-sign the root: {e}")))?;
    Ok(RootPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes a new root certificate and key (see [`generate_root`]) into `dir`.
/// Existing files are never overwritten.
pub fn init(dir: &Path, trust_domain: &str) -> Result<CaFiles, Error> {
    let files = CaFiles::in_dir(dir);
    fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let root = generate_root(trust_domain)?;
    write_new(&files.key, root.key.as_bytes(), 0o600)?;
    write_new(&files.cert, root.cert.as_bytes(), 0o644)?;
    Ok(files)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all(contents).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// A CA inside the tunnel process, signing with a root key read from disk.
pub struct InProcessCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    lifetime: Duration,
    backdate: Duration,
}

impl InProcessCa {
    /// Loads the root certificate and key; fails naming the file and what is wrong with it.
    pub fn load(files: &CaFiles, lifetime: Duration) -> Result<Self, Error> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        InProcessCa::from_pem(files, &cert_pem, &key_pem, lifetime)
    }

    /// Builds the CA from a root certificate and key in PEM; `files` name where each
    /// came from in errors (files, or the keys of a Kubernetes Secret).
    pub fn from_pem(
        files: &CaFiles,
        cert_pem: &str,
        key_pem: &str,
        lifetime: Duration,
    ) -> Result<Self, Error> {
        let malformed = |path: &Path, problem: String| Error::Malformed {
            path: path.to_path_buf(),
            problem,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| malformed(&files.key, format!("not a PEM private key: {e}")))?;
        let root = super::bundle::parse_pem_certificates(&files.cert, cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| malformed(&files.cert, "holds no certificate".to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| malformed(&files.cert, format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(malformed(
                &files.cert,
                "is not a CA certificate (basicConstraints CA:false)".to_string(),
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(malformed(
                &files.key,
                format!(
                    "is not the key of the certificate in {}",
                    files.cert.display()
                ),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| malformed(&files.cert, format!("cannot sign with it: {e}")))?;
        Ok(InProcessCa {
            issuer,
            root,
            lifetime,
            backdate: BACKDATE,
        })
    }

    /// Sets how far back a leaf's validity starts (default five minutes).
    pub fn with_backdate(mut self, backdate: Duration) -> Self {
        self.backdate = backdate;
        self
    }

    /// The root certificate this CA signs under.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Signs a leaf for `identity` over `public_key`, valid from a few minutes ago
    /// (clock skew) for this CA's lifetime.
    pub fn issue(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
    ) -> Result<Chain, Error> {
        let uri = identity.to_string();
        let san = uri.as_str().try_into().map_err(|e| Error::Issue {
            identity: identity.clone(),
            problem: format!("URI SAN {uri}: {e}"),
        })?;
        let mut params = self.leaf_params();
        params.subject_alt_names = vec![SanType::URI(san)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| Error::Issue {
                identity: identity.clone(),
                problem: e.to_string(),
            })?;
        Ok(vec![cert.der().clone()])
    }

    /// Signs a TLS server leaf for `dns_names` (serverAuth only, no SPIFFE identity), for
    /// a service that clients reach by DNS name and verify against the trust bundle.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        public_key: &impl PublicKeyData,
    ) -> Result<Chain, Error> {
        let failed = |problem: String| Error::IssueServer {
            names: dns_names.to_vec(),
            problem,
        };
        let mut params = self.leaf_params();
        for name in dns_names {
            let name = name
                .as_str()
                .try_into()
                .map_err(|e| failed(format!("DNS name {name:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| failed(e.to_string()))?;
        Ok(vec![cert.der().clone()])
    }

    fn leaf_params(&self) -> CertificateParams {
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - self.backdate;
        params.not_after = now + self.lifetime;
        params.serial_number = Some(random_serial());
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params
    }
}

impl CertificateAuthority for InProcessCa {
    fn sign(
        &self,
        identity: Identity,
        csr: CertificateSigningRequestDer<'static>,
    ) -> SignFuture<'_> {
        Box::pin(async move {
            let request =
                CertificateSigningRequestParams::from_der(&csr).map_err(|e| Error::Issue {
                    identity: identity.clone(),
                    problem: format!("bad CSR: {e}"),
                })?;
            self.issue(&identity, &request.public_key)
        })
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_root_that_loads_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), "example.org").unwrap();
        let ca = InProcessCa::load(&files, Duration::from_secs(3600)).unwrap();
        let id = Identity::new("example.org", "prod", "orders").unwrap();
        let key = KeyPair::generate().unwrap();
        let chain = ca.issue(&id, &key).unwrap();
        let info = super::super::CertificateInfo::parse(&chain[0]).unwrap();
        assert_eq!(info.uris, vec![id.to_string()]);
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3600) + BACKDATE);
        let mode = fs::metadata(&files.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn init_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "td").unwrap();
        let err = init(dir.path(), "td").unwrap_err().to_string();
        assert!(
            err.contains(ROOT_KEY_FILE) && err.contains("exists"),
            "{err}"
        );
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), "td").unwrap();
        let other = init(&dir.path().join("other"), "td").unwrap();
        let lifetime = DEFAULT_CERT_LIFETIME;

        let missing = CaFiles {
            cert: dir.path().join("nope.pem"),
            key: files.key.clone(),
        };
        let err = InProcessCa::load(&missing, lifetime)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("nope.pem") && err.contains("No such file"),
            "{err}"
        );

        fs::write(dir.path().join("garbage.pem"), "not pem at all").unwrap();
        let garbage_key = CaFiles {
            cert: files.cert.clone(),
            key: dir.path().join("garbage.pem"),
        };
        let err = InProcessCa::load(&garbage_key, lifetime)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("garbage.pem") && err.contains("private key"),
            "{err}"
        );

        let garbage_cert = CaFiles {
            cert: dir.path().join("garbage.pem"),
            key: files.key.clone(),
        };
        let err = InProcessCa::load(&garbage_cert, lifetime)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("garbage.pem") && err.contains("no certificate"),
            "{err}"
        );

        let mismatched = CaFiles {
            cert: files.cert.clone(),
            key: other.key.clone(),
        };
        let err = InProcessCa::load(&mismatched, lifetime)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is not the key of the certificate"), "{err}");
    }
}
