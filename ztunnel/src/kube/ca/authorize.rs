//! Who is asking the CA, and may it have the identity it asks for.
//!
//! 1. The bearer token goes to the API server's TokenReview (with the CA's audience):
//!    it must be authenticated, and its user must be the tunnels' ServiceAccount
//!    (`system:serviceaccount:<namespace>:<name>`).
//! 2. The caller's node: the token's `authentication.kubernetes.io/node-name` extra when
//!    the API server adds it; otherwise the bound pod (`.../pod-name` and `.../pod-uid`
//!    extras) is read and its `spec.nodeName` taken, after checking its UID (a pod of the
//!    same name recreated elsewhere does not count).
//! 3. The identity: its trust domain must be the CA's, and a pod of its namespace with
//!    its ServiceAccount must be scheduled on the caller's node (pods listed by
//!    `spec.nodeName`; pods that have finished do not count).

use ::kube::api::{Api, ListParams, PostParams};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::identity::Identity;

const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Why a caller is refused; [`AuthError::status`] is the HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("token not authenticated: {0}")]
    TokenRejected(String),
    #[error("user {username} is not a ServiceAccount")]
    NotServiceAccount { username: String },
    #[error("ServiceAccount {namespace}/{name} is not the tunnels' ServiceAccount {allowed}")]
    WrongServiceAccount {
        namespace: String,
        name: String,
        allowed: String,
    },
    #[error(
        "token of {username} is not bound to a pod ({EXTRA_POD_NAME} missing), so its node is unknown"
    )]
    NotBound { username: String },
    #[error("the token's pod {namespace}/{pod} no longer exists")]
    BoundPodGone { namespace: String, pod: String },
    #[error("the token's pod {namespace}/{pod} has UID {actual}, the token names {bound}")]
    BoundPodReplaced {
        namespace: String,
        pod: String,
        bound: String,
        actual: String,
    },
    #[error("the token's pod {namespace}/{pod} is not scheduled on a node")]
    BoundPodUnscheduled { namespace: String, pod: String },
    #[error("identity {identity} is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error(
        "no pod of namespace {} with ServiceAccount {} runs on node {node}, so {identity} is not issued to it",
        identity.namespace(),
        identity.service_account()
    )]
    NoPodOnNode { identity: Identity, node: String },
    #[error("cannot {action}: {}", super::super::ApiError(source))]
    Api {
        action: String,
        source: ::kube::Error,
    },
}

impl AuthError {
    /// 401 when the caller is not authenticated, 403 when it is but may not have the
    /// identity, 503 when the API server could not answer.
    pub fn status(&self) -> http::StatusCode {
        use AuthError::*;
        match self {
            MissingToken | TokenRejected(_) => http::StatusCode::UNAUTHORIZED,
            Api { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::FORBIDDEN,
        }
    }

    /// A short label for the reason, as counted in the CA's metrics.
    pub fn reason(&self) -> &'static str {
        use AuthError::*;
        match self {
            MissingToken => "missing_token",
            TokenRejected(_) => "token_rejected",
            NotServiceAccount { .. } => "not_service_account",
            WrongServiceAccount { .. } => "wrong_service_account",
            NotBound { .. } => "token_not_bound",
            BoundPodGone { .. } | BoundPodReplaced { .. } | BoundPodUnscheduled { .. } => {
                "bound_pod_invalid"
            }
            ForeignTrustDomain { .. } => "foreign_trust_domain",
            NoPodOnNode { .. } => "no_pod_on_node",
            Api { .. } => "api_unavailable",
        }
    }
}

/// Whom the CA serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizerConfig {
    /// The only ServiceAccount allowed to ask: the tunnels' (`namespace`, `name`).
    pub tunnel_service_account: (String, String),
    /// The audience tokens must be minted for.
    pub audience: String,
    /// The trust domain the CA issues identities in.
    pub trust_domain: String,
}

/// An authenticated tunnel, and the node it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    pub node: String,
}

/// Authenticates and authorizes callers through the API server.
#[derive(Clone)]
pub struct Authorizer {
    client: ::kube::Client,
    config: AuthorizerConfig,
}

impl Authorizer {
    pub fn new(client: ::kube::Client, config: AuthorizerConfig) -> Self {
        Authorizer { client, config }
    }

    pub fn config(&self) -> &AuthorizerConfig {
        &self.config
    }

    /// Who holds `token`, and which node it runs on.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            status: None,
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::Api {
                action: "review the token".to_string(),
                source,
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server did not authenticate it".to_string());
            return Err(AuthError::TokenRejected(why));
        }
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.config.audience)
        {
            return Err(AuthError::TokenRejected(format!(
                "audiences {} do not include {}",
                audiences.join(", "),
                self.config.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.clone().unwrap_or_default();
        let (namespace, name) = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|sa| sa.split_once(':'))
            .ok_or_else(|| AuthError::NotServiceAccount {
                username: username.clone(),
            })?;
        let (allowed_namespace, allowed_name) = &self.config.tunnel_service_account;
        if namespace != allowed_namespace || name != allowed_name {
            return Err(AuthError::WrongServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
                allowed: format!("{allowed_namespace}/{allowed_name}"),
            });
        }
        let node = self.node_of(namespace, &username, &user).await?;
        Ok(Caller { username, node })
    }

    async fn node_of(
        &self,
        namespace: &str,
        username: &str,
        user: &UserInfo,
    ) -> Result<String, AuthError> {
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|extra| extra.get(key))
                .and_then(|values| values.first())
                .filter(|value| !value.is_empty())
                .cloned()
        };
        if let Some(node) = extra(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        let pod_name = extra(EXTRA_POD_NAME).ok_or_else(|| AuthError::NotBound {
            username: username.to_string(),
        })?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|source| AuthError::Api {
                action: format!("get pod {namespace}/{pod_name}"),
                source,
            })?
            .ok_or_else(|| AuthError::BoundPodGone {
                namespace: namespace.to_string(),
                pod: pod_name.clone(),
            })?;
        if let Some(bound) = extra(EXTRA_POD_UID) {
            let actual = pod.metadata.uid.clone().unwrap_or_default();
            if actual != bound {
                return Err(AuthError::BoundPodReplaced {
                    namespace: namespace.to_string(),
                    pod: pod_name,
                    bound,
                    actual,
                });
            }
        }
        pod.spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| AuthError::BoundPodUnscheduled {
                namespace: namespace.to_string(),
                pod: pod_name,
            })
    }

    /// Allows `identity` to `caller` when a live pod of that identity is on its node.
    pub async fn authorize(&self, caller: &Caller, identity: &Identity) -> Result<(), AuthError> {
        if identity.trust_domain() != self.config.trust_domain {
            return Err(AuthError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.config.trust_domain.clone(),
            });
        }
        let namespace = identity.namespace();
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", caller.node)))
            .await
            .map_err(|source| AuthError::Api {
                action: format!("list pods of namespace {namespace} on node {}", caller.node),
                source,
            })?;
        let runs_here = pods.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(caller.node.as_str());
            let account = spec
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let finished = matches!(phase, Some("Succeeded" | "Failed"));
            on_node && account == identity.service_account() && !finished
        });
        if runs_here {
            Ok(())
        } else {
            Err(AuthError::NoPodOnNode {
                identity: identity.clone(),
                node: caller.node.clone(),
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kube::test_api::FakeApi;
    use serde_json::json;

    const NODE: &str = "worker-1";

    pub(crate) fn config() -> AuthorizerConfig {
        AuthorizerConfig {
            tunnel_service_account: ("ztunnel-system".into(), "ztunnel".into()),
            audience: "ztunnel-ca".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    #[tokio::test]
    async fn right_node_allowed_other_node_and_wrong_account_refused() {
        let api = FakeApi::cluster();
        let authorizer = Authorizer::new(api.client(), config());

        // Bound token without a node-name extra: the node comes from the bound pod.
        let caller = authorizer
            .authenticate(FakeApi::TUNNEL_TOKEN)
            .await
            .unwrap();
        assert_eq!(
            caller,
            Caller {
                username: "system:serviceaccount:ztunnel-system:ztunnel".into(),
                node: NODE.into()
            }
        );
        // The token review carried the CA's audience.
        let reviews = api.requests_to("/apis/authentication.k8s.io/v1/tokenreviews");
        assert_eq!(reviews.len(), 1);
        assert_eq!(reviews[0]["spec"]["audiences"], json!(["ztunnel-ca"]));
        assert_eq!(reviews[0]["spec"]["token"], json!(FakeApi::TUNNEL_TOKEN));

        // payments runs on worker-1.
        authorizer
            .authorize(&caller, &id("finance", "payments"))
            .await
            .unwrap();
        // orders runs only on worker-2.
        let err = authorizer
            .authorize(&caller, &id("shop", "orders"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert_eq!(
            err.to_string(),
            "no pod of namespace shop with ServiceAccount orders runs on node worker-1, so spiffe://cluster.local/ns/shop/sa/orders is not issued to it"
        );
        // The pod list was asked by node.
        assert!(
            api.queries()
                .iter()
                .any(|q| q.contains("fieldSelector=spec.nodeName%3Dworker-1")),
            "{:?}",
            api.queries()
        );
        // A finished pod of the identity on this node does not count.
        let err = authorizer
            .authorize(&caller, &id("finance", "batch"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "no_pod_on_node");
        // A pod of the namespace with another account does not count either.
        let err = authorizer
            .authorize(&caller, &id("finance", "ledger"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "no_pod_on_node");
        // Other trust domain.
        let foreign = Identity::new("other.domain", "finance", "payments").unwrap();
        let err = authorizer.authorize(&caller, &foreign).await.unwrap_err();
        assert_eq!(err.reason(), "foreign_trust_domain");
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);

        // A token carrying the node-name extra needs no pod lookup.
        let gets_before = api.requests_to("/api/v1/namespaces/ztunnel-system/pods/ztunnel-abcde");
        let caller = authorizer
            .authenticate(FakeApi::NODE_BOUND_TOKEN)
            .await
            .unwrap();
        assert_eq!(caller.node, "worker-2");
        let gets_after = api.requests_to("/api/v1/namespaces/ztunnel-system/pods/ztunnel-abcde");
        assert_eq!(gets_before.len(), gets_after.len());
        authorizer
            .authorize(&caller, &id("shop", "orders"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bad_tokens_and_callers_are_refused_with_the_reason() {
        let api = FakeApi::cluster();
        let authorizer = Authorizer::new(api.client(), config());
        let cases = [
            (
                "bad-token",
                http::StatusCode::UNAUTHORIZED,
                "token not authenticated: [invalid bearer token, service account token has expired]",
            ),
            (
                FakeApi::WRONG_AUDIENCE_TOKEN,
                http::StatusCode::UNAUTHORIZED,
                "token not authenticated: audiences https://kubernetes.default.svc do not include ztunnel-ca",
            ),
            (
                FakeApi::APP_TOKEN,
                http::StatusCode::FORBIDDEN,
                "ServiceAccount finance/payments is not the tunnels' ServiceAccount ztunnel-system/ztunnel",
            ),
            (
                FakeApi::USER_TOKEN,
                http::StatusCode::FORBIDDEN,
                "user alice is not a ServiceAccount",
            ),
            (
                FakeApi::UNBOUND_TOKEN,
                http::StatusCode::FORBIDDEN,
                "token of system:serviceaccount:ztunnel-system:ztunnel is not bound to a pod (authentication.kubernetes.io/pod-name missing), so its node is unknown",
            ),
            (
                FakeApi::GONE_POD_TOKEN,
                http::StatusCode::FORBIDDEN,
                "the token's pod ztunnel-system/ztunnel-gone no longer exists",
            ),
            (
                FakeApi::REPLACED_POD_TOKEN,
                http::StatusCode::FORBIDDEN,
                "the token's pod ztunnel-system/ztunnel-abcde has UID 5b0c4f3e-0000-4000-8000-000000000001, the token names 5b0c4f3e-0000-4000-8000-00000000dead",
            ),
        ];
        for (token, status, message) in cases {
            let err = authorizer.authenticate(token).await.unwrap_err();
            assert_eq!(err.status(), status, "{token}: {err}");
            assert_eq!(err.to_string(), message, "{token}");
        }
    }

    #[tokio::test]
    async fn api_failures_are_unavailable_not_denials() {
        let api = FakeApi::failing();
        let authorizer = Authorizer::new(api.client(), config());
        let err = authorizer
            .authenticate(FakeApi::TUNNEL_TOKEN)
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            err.to_string().starts_with("cannot review the token"),
            "{err}"
        );
        let caller = Caller {
            username: "u".into(),
            node: NODE.into(),
        };
        let err = authorizer
            .authorize(&caller, &id("finance", "payments"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            err.to_string()
                .starts_with("cannot list pods of namespace finance on node worker-1"),
            "{err}"
        );
    }
}
