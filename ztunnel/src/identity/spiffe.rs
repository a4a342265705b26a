//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";

/// The identity of a workload: its service account, in a namespace, in a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload SPIFFE identity; each variant names the bad part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("identity {0:?} does not start with {SCHEME:?}")]
    Scheme(String),
    #[error("identity {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("identity {id:?}: trust domain {trust_domain:?} has a character outside [a-z0-9.-_]")]
    TrustDomain { id: String, trust_domain: String },
    #[error(
        "identity {id:?}: path {path:?} is not of the form /ns/<namespace>/sa/<service-account>"
    )]
    Path { id: String, path: String },
    #[error("identity {id:?}: {part} {value:?} is not a valid Kubernetes name")]
    Name {
        id: String,
        part: &'static str,
        value: String,
    },
}

impl Identity {
    /// Builds an identity from its parts, checking each one.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, ParseError> {
        let id = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        id.validate()?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without its `spiffe://` scheme, as Istio's AuthorizationPolicy
    /// `principals` are written: `cluster.local/ns/prod/sa/orders`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    fn validate(&self) -> Result<(), ParseError> {
        let id = self.to_string();
        if self.trust_domain.is_empty() {
            return Err(ParseError::EmptyTrustDomain(id));
        }
        let td_ok = self.trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
        if !td_ok {
            return Err(ParseError::TrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
            });
        }
        for (part, value) in [
            ("namespace", &self.namespace),
            ("service account", &self.service_account),
        ] {
            if !is_kubernetes_name(value) {
                return Err(ParseError::Name {
                    id,
                    part,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A DNS-1123 subdomain as Kubernetes names namespaces and service accounts.
fn is_kubernetes_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for Identity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| ParseError::Scheme(s.to_string()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(ParseError::EmptyTrustDomain(s.to_string()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["", "ns", namespace, "sa", service_account] => {
                let id = Identity {
                    trust_domain: trust_domain.to_string(),
                    namespace: namespace.to_string(),
                    service_account: service_account.to_string(),
                };
                id.validate()?;
                Ok(id)
            }
            _ => Err(ParseError::Path {
                id: s.to_string(),
                path: path.to_string(),
            }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/prod/sa/orders";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "prod");
        assert_eq!(id.service_account(), "orders");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/prod/sa/orders");
        assert_eq!(
            Identity::new("cluster.local", "prod", "orders").unwrap(),
            id
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "does not start with"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                "trust domain \"Cluster.Local\"",
            ),
            ("spiffe://td/ns/a/b", "path \"/ns/a/b\""),
            ("spiffe://td/ns/a/sa/b/c", "path \"/ns/a/sa/b/c\""),
            ("spiffe://td", "path \"\""),
            ("spiffe://td/ns//sa/b", "namespace \"\""),
            ("spiffe://td/ns/a/sa/B_x", "service account \"B_x\""),
            ("spiffe://td/ns/-a/sa/b", "namespace \"-a\""),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{input}: error {err:?} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn serde_uses_the_uri_form() {
        let id: Identity = serde_yaml::from_str("spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(
            serde_yaml::to_string(&id).unwrap().trim(),
            "spiffe://td/ns/a/sa/b"
        );
        assert!(serde_yaml::from_str::<Identity>("spiffe://td/ns/a").is_err());
    }
}
