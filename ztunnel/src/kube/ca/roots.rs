//! The cluster CA's roots, kept in a Kubernetes Secret, and their rotation in stages.
//!
//! The Secret's keys:
//! - `root-cert.pem`, `root-key.pem`: the root that signs now;
//! - `trust-bundle.pem`: every root peers must trust (the signer among them);
//! - `next-root-cert.pem`, `next-root-key.pem`: a root staged for activation, if any.
//!
//! A rotation takes three steps, each applied once every tunnel has picked up the one
//! before (the bundle reaches them within a certificate renewal):
//! 1. [`RootSecret::prepare`]: a new root is generated and trusted, not yet signing;
//! 2. [`RootSecret::activate`]: the new root signs; the old one stays trusted, so
//!    certificates it signed keep working until they are renewed;
//! 3. [`RootSecret::retire`]: only the signing root stays trusted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ::kube::api::{Api, PostParams};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rustls_pki_types::CertificateDer;

use crate::identity::{
    self, CaFiles, InProcessCa, ROOT_CERT_FILE, ROOT_KEY_FILE, RootPem, parse_pem_certificates,
};

pub const TRUST_BUNDLE_KEY: &str = "trust-bundle.pem";
pub const NEXT_ROOT_CERT_KEY: &str = "next-root-cert.pem";
pub const NEXT_ROOT_KEY_KEY: &str = "next-root-key.pem";
/// The key of the published bundle in its ConfigMap (what the tunnels mount).
pub const BUNDLE_CONFIG_MAP_KEY: &str = "root-cert.pem";

/// Errors of the CA's roots; each names the Secret (and key) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secret {secret}: key {key} is missing")]
    MissingKey { secret: String, key: &'static str },
    #[error("secret {secret}: key {key} is not UTF-8 text")]
    NotText { secret: String, key: &'static str },
    #[error("secret {secret}: {source}")]
    Invalid {
        secret: String,
        source: Box<identity::Error>,
    },
    #[error("secret {secret}: the signing root is not in {TRUST_BUNDLE_KEY}")]
    SignerNotTrusted { secret: String },
    #[error("secret {secret}: a root is already staged ({NEXT_ROOT_CERT_KEY}); activate it first")]
    AlreadyStaged { secret: String },
    #[error("secret {secret}: no root is staged ({NEXT_ROOT_CERT_KEY}); prepare one first")]
    NothingStaged { secret: String },
    #[error("cannot generate a root: {0}")]
    Generate(Box<identity::Error>),
    #[error("cannot {action} {kind} {name}: {}", super::super::ApiError(source))]
    Api {
        action: &'static str,
        kind: &'static str,
        name: String,
        source: ::kube::Error,
    },
}

/// The roots as the Secret holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct RootSecret {
    pub signer: RootPem,
    pub bundle: Vec<CertificateDer<'static>>,
    pub next: Option<RootPem>,
}

impl fmt::Debug for RootSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootSecret")
            .field("bundle_roots", &self.bundle.len())
            .field("staged", &self.next.is_some())
            .finish_non_exhaustive()
    }
}

impl RootSecret {
    /// A new root that signs and is the only one trusted.
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let signer =
            identity::generate_root(trust_domain).map_err(|e| Error::Generate(Box::new(e)))?;
        let bundle = vec![pem_to_der(&signer.cert)?];
        Ok(RootSecret {
            signer,
            bundle,
            next: None,
        })
    }

    /// Reads the roots from a Secret's data; `secret` names it in errors.
    pub fn from_data(secret: &str, data: &BTreeMap<String, ByteString>) -> Result<Self, Error> {
        let text = |key: &'static str| -> Result<Option<String>, Error> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone()).map_err(|_| Error::NotText {
                        secret: secret.to_string(),
                        key,
                    })
                })
                .transpose()
        };
        let required = |key: &'static str| {
            text(key)?.ok_or_else(|| Error::MissingKey {
                secret: secret.to_string(),
                key,
            })
        };
        let signer = RootPem {
            cert: required(ROOT_CERT_FILE)?,
            key: required(ROOT_KEY_FILE)?,
        };
        let bundle_pem = required(TRUST_BUNDLE_KEY)?;
        let bundle = parse_pem_certificates(&source(secret, TRUST_BUNDLE_KEY), &bundle_pem)
            .map_err(|source| Error::Invalid {
                secret: secret.to_string(),
                source: Box::new(source),
            })?;
        let next = match (text(NEXT_ROOT_CERT_KEY)?, text(NEXT_ROOT_KEY_KEY)?) {
            (Some(cert), Some(key)) => Some(RootPem { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::MissingKey {
                    secret: secret.to_string(),
                    key: NEXT_ROOT_KEY_KEY,
                });
            }
            (None, Some(_)) => {
                return Err(Error::MissingKey {
                    secret: secret.to_string(),
                    key: NEXT_ROOT_CERT_KEY,
                });
            }
        };
        Ok(RootSecret {
            signer,
            bundle,
            next,
        })
    }

    /// The Secret's data for these roots.
    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, value: &str| {
            data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
        };
        put(ROOT_CERT_FILE, &self.signer.cert);
        put(ROOT_KEY_FILE, &self.signer.key);
        put(TRUST_BUNDLE_KEY, &self.bundle_pem());
        if let Some(next) = &self.next {
            put(NEXT_ROOT_CERT_KEY, &next.cert);
            put(NEXT_ROOT_KEY_KEY, &next.key);
        }
        data
    }

    /// Every trusted root, PEM encoded, as the CA hands it to tunnels.
    pub fn bundle_pem(&self) -> String {
        super::certificates_pem(&self.bundle)
    }

    /// The CA that signs with the current root, after checking that the Secret is
    /// consistent (the key fits the root, the root is trusted).
    pub fn signing_ca(&self, secret: &str, lifetime: Duration) -> Result<InProcessCa, Error> {
        let invalid = |source| Error::Invalid {
            secret: secret.to_string(),
            source: Box::new(source),
        };
        let files = CaFiles {
            cert: source(secret, ROOT_CERT_FILE),
            key: source(secret, ROOT_KEY_FILE),
        };
        let ca = InProcessCa::from_pem(&files, &self.signer.cert, &self.signer.key, lifetime)
            .map_err(invalid)?;
        if !self.bundle.contains(ca.root()) {
            return Err(Error::SignerNotTrusted {
                secret: secret.to_string(),
            });
        }
        if let Some(next) = &self.next {
            let files = CaFiles {
                cert: source(secret, NEXT_ROOT_CERT_KEY),
                key: source(secret, NEXT_ROOT_KEY_KEY),
            };
            InProcessCa::from_pem(&files, &next.cert, &next.key, lifetime).map_err(invalid)?;
        }
        Ok(ca)
    }

    /// Rotation step 1: stages a new root and trusts it beside the current one.
    pub fn prepare(&mut self, secret: &str, trust_domain: &str) -> Result<(), Error> {
        if self.next.is_some() {
            return Err(Error::AlreadyStaged {
                secret: secret.to_string(),
            });
        }
        let next =
            identity::generate_root(trust_domain).map_err(|e| Error::Generate(Box::new(e)))?;
        self.bundle.push(pem_to_der(&next.cert)?);
        self.next = Some(next);
        Ok(())
    }

    /// Rotation step 2: the staged root signs from now on; the old one stays trusted.
    pub fn activate(&mut self, secret: &str) -> Result<(), Error> {
        let next = self.next.take().ok_or_else(|| Error::NothingStaged {
            secret: secret.to_string(),
        })?;
        let next_der = pem_to_der(&next.cert)?;
        if !self.bundle.contains(&next_der) {
            self.bundle.push(next_der);
        }
        self.signer = next;
        Ok(())
    }

    /// Rotation step 3: only the signing root (and a staged one) stays trusted.
    pub fn retire(&mut self) -> Result<(), Error> {
        let mut keep = vec![pem_to_der(&self.signer.cert)?];
        if let Some(next) = &self.next {
            keep.push(pem_to_der(&next.cert)?);
        }
        self.bundle.retain(|root| keep.contains(root));
        Ok(())
    }
}

/// How a Secret key is named in errors: `secret <namespace>/<name>` + `/<key>`.
fn source(secret: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("{secret}/{key}"))
}

fn pem_to_der(cert_pem: &str) -> Result<CertificateDer<'static>, Error> {
    let generated = PathBuf::from("generated root");
    parse_pem_certificates(&generated, cert_pem)
        .map_err(|e| Error::Generate(Box::new(e)))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            Error::Generate(Box::new(identity::Error::Malformed {
                path: generated,
                problem: "holds no certificate".to_string(),
            }))
        })
}

/// The CA's Secret (and the ConfigMap it publishes the bundle in) in the API server.
#[derive(Clone)]
pub struct RootStore {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
    secret: String,
}

impl RootStore {
    pub fn new(client: ::kube::Client, namespace: &str, secret: &str) -> Self {
        RootStore {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            secret: secret.to_string(),
        }
    }

    /// `<namespace>/<name>` of the Secret, as errors name it.
    pub fn secret_name(&self) -> String {
        format!("{}/{}", self.namespace, self.secret)
    }

    /// Reads the roots; `None` when the Secret does not exist.
    pub async fn load(&self) -> Result<Option<(RootSecret, Option<String>)>, Error> {
        let found = self
            .secrets
            .get_opt(&self.secret)
            .await
            .map_err(|source| self.api_error("get", source))?;
        let Some(secret) = found else {
            return Ok(None);
        };
        let data = secret.data.unwrap_or_default();
        let roots = RootSecret::from_data(&self.secret_name(), &data)?;
        Ok(Some((roots, secret.metadata.resource_version)))
    }

    /// Reads the roots, creating the Secret with a new root when it does not exist. Two
    /// replicas starting together agree: the one whose create loses reads the winner's.
    pub async fn load_or_create(&self, trust_domain: &str) -> Result<RootSecret, Error> {
        if let Some((roots, _)) = self.load().await? {
            return Ok(roots);
        }
        let roots = RootSecret::generate(trust_domain)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            data: Some(roots.to_data()),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %self.secret_name(), "created a new CA root");
                Ok(roots)
            }
            Err(::kube::Error::Api(status)) if status.code == 409 => {
                let (roots, _) = self
                    .load()
                    .await?
                    .ok_or_else(|| self.api_error("get", ::kube::Error::Api(status)))?;
                Ok(roots)
            }
            Err(source) => Err(self.api_error("create", source)),
        }
    }

    /// Writes the roots back, failing if the Secret changed since `resource_version`
    /// was read (so two rotations never overwrite each other).
    pub async fn replace(
        &self,
        roots: &RootSecret,
        resource_version: Option<String>,
    ) -> Result<(), Error> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version,
                ..ObjectMeta::default()
            },
            data: Some(roots.to_data()),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        self.secrets
            .replace(&self.secret, &PostParams::default(), &secret)
            .await
            .map_err(|source| self.api_error("replace", source))?;
        Ok(())
    }

    /// Makes the ConfigMap `config_map` (in the Secret's namespace) hold `bundle_pem`
    /// (every trusted root, no key): the tunnels mount it to trust the CA service and
    /// each other before their first certificate.
    pub async fn publish_bundle(&self, config_map: &str, bundle_pem: &str) -> Result<(), Error> {
        let name = format!("{}/{}", self.namespace, config_map);
        let api_error = |action, source| Error::Api {
            action,
            kind: "configmap",
            name: name.clone(),
            source,
        };
        let existing = self
            .config_maps
            .get_opt(config_map)
            .await
            .map_err(|source| api_error("get", source))?;
        let data = BTreeMap::from([(BUNDLE_CONFIG_MAP_KEY.to_string(), bundle_pem.to_string())]);
        match existing {
            Some(current) if current.data.as_ref() == Some(&data) => Ok(()),
            Some(current) => {
                let updated = ConfigMap {
                    metadata: current.metadata,
                    data: Some(data),
                    ..ConfigMap::default()
                };
                self.config_maps
                    .replace(config_map, &PostParams::default(), &updated)
                    .await
                    .map_err(|source| api_error("replace", source))?;
                tracing::info!(config_map = %name, "trust bundle published");
                Ok(())
            }
            None => {
                let created = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(config_map.to_string()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                self.config_maps
                    .create(&PostParams::default(), &created)
                    .await
                    .map_err(|source| api_error("create", source))?;
                tracing::info!(config_map = %name, "trust bundle published");
                Ok(())
            }
        }
    }

    fn api_error(&self, action: &'static str, source: ::kube::Error) -> Error {
        Error::Api {
            action,
            kind: "secret",
            name: self.secret_name(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, TrustBundle};
    use crate::kube::ca::client::verify_leaf;

    const SECRET: &str = "ztunnel-system/ztunnel-ca";

    fn signs_and_is_trusted(roots: &RootSecret) -> CertificateDer<'static> {
        let ca = roots.signing_ca(SECRET, Duration::from_secs(3600)).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let id = Identity::new("td", "ns", "sa").unwrap();
        let leaf = ca.issue(&id, &key).unwrap().remove(0);
        assert!(verifies_with(&leaf, &roots.bundle));
        leaf
    }

    fn verifies_with(leaf: &CertificateDer<'_>, bundle: &[CertificateDer<'static>]) -> bool {
        let bundle = TrustBundle::new(bundle.to_vec()).unwrap();
        verify_leaf(leaf, &[], &bundle, &crate::tls::provider()).is_ok()
    }

    #[test]
    fn staged_rotation_keeps_old_leaves_valid_until_retire() {
        let mut roots = RootSecret::generate("td").unwrap();
        let data = roots.to_data();
        assert_eq!(RootSecret::from_data(SECRET, &data).unwrap(), roots);
        let old_leaf = signs_and_is_trusted(&roots);

        let err = roots.activate(SECRET).unwrap_err().to_string();
        assert!(err.contains("no root is staged"), "{err}");

        roots.prepare(SECRET, "td").unwrap();
        assert_eq!(roots.bundle.len(), 2);
        let err = roots.prepare(SECRET, "td").unwrap_err().to_string();
        assert!(err.contains("already staged"), "{err}");
        // Still signing with the old root; the staged one survives a round trip.
        let leaf = signs_and_is_trusted(&roots);
        assert!(verifies_with(&leaf, &roots.bundle[..1]));
        let reread = RootSecret::from_data(SECRET, &roots.to_data()).unwrap();
        assert_eq!(reread, roots);

        roots.activate(SECRET).unwrap();
        assert_eq!(roots.bundle.len(), 2);
        let new_leaf = signs_and_is_trusted(&roots);
        assert!(!verifies_with(&new_leaf, &roots.bundle[..1]));
        assert!(verifies_with(&old_leaf, &roots.bundle));

        roots.retire().unwrap();
        assert_eq!(roots.bundle.len(), 1);
        assert!(verifies_with(&new_leaf, &roots.bundle));
        assert!(!verifies_with(&old_leaf, &roots.bundle));
        assert!(roots.to_data().keys().all(|k| !k.starts_with("next-")));
    }

    #[test]
    fn broken_secrets_name_the_key_and_problem() {
        let roots = RootSecret::generate("td").unwrap();
        let other = RootSecret::generate("td").unwrap();

        let mut data = roots.to_data();
        data.remove(TRUST_BUNDLE_KEY);
        let err = RootSecret::from_data(SECRET, &data)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "secret ztunnel-system/ztunnel-ca: key trust-bundle.pem is missing"
        );

        let mut data = roots.to_data();
        data.insert(ROOT_KEY_FILE.into(), ByteString(vec![0xff, 0xfe]));
        let err = RootSecret::from_data(SECRET, &data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("root-key.pem is not UTF-8"), "{err}");

        let mut data = roots.to_data();
        data.insert(TRUST_BUNDLE_KEY.into(), ByteString(b"garbage".to_vec()));
        let err = RootSecret::from_data(SECRET, &data)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trust-bundle.pem") && err.contains("no certificate"),
            "{err}"
        );

        let mut data = roots.to_data();
        data.insert(
            NEXT_ROOT_CERT_KEY.into(),
            ByteString(other.signer.cert.clone().into_bytes()),
        );
        let err = RootSecret::from_data(SECRET, &data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("next-root-key.pem is missing"), "{err}");

        // The key of another root.
        let mut mismatched = roots.clone();
        mismatched.signer.key = other.signer.key.clone();
        let err = mismatched
            .signing_ca(SECRET, Duration::from_secs(60))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ztunnel-ca/root-key.pem") && err.contains("is not the key"),
            "{err}"
        );

        // A signer the bundle does not trust.
        let mut untrusted = roots.clone();
        untrusted.bundle = other.bundle.clone();
        let err = untrusted
            .signing_ca(SECRET, Duration::from_secs(60))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("signing root is not in trust-bundle.pem"),
            "{err}"
        );
    }
}
