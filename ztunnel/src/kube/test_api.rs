//! A fake API server for tests: a tower service behind a real `kube::Client`, answering
//! with JSON recorded from a real API server (TokenReviews, pods, Secrets, ConfigMaps).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Default)]
struct State {
    failing: bool,
    tokens: BTreeMap<String, Value>,
    /// (resource, namespace, name) -> object, for pods, secrets and configmaps.
    objects: BTreeMap<(String, String, String), Value>,
    next_version: u64,
    /// (method, path, query, body) of every request.
    requests: Vec<(Method, String, String, Value)>,
    /// Open watches: (resource, where their events go).
    watches: Vec<(String, mpsc::UnboundedSender<Bytes>)>,
    /// Requests for a resource that are answered 503 before it is served.
    unavailable: BTreeMap<String, usize>,
    /// API group versions (`group/version`) this server does not serve: 404.
    absent: Vec<String>,
}

/// What a request answers: a JSON document, or a watch's event stream.
enum Answer {
    Json(StatusCode, Value),
    Watch(mpsc::UnboundedReceiver<Bytes>),
}

impl From<(StatusCode, Value)> for Answer {
    fn from((code, value): (StatusCode, Value)) -> Self {
        Answer::Json(code, value)
    }
}

#[derive(Clone)]
pub(crate) struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// A pod as the API server returns it (trimmed to the fields the CA reads, plus a few).
pub(crate) fn pod_json(
    namespace: &str,
    name: &str,
    uid: &str,
    service_account: &str,
    node: &str,
    phase: &str,
) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "resourceVersion": "4411", "creationTimestamp": "2026-11-23T10:00:00Z",
                     "labels": {"app": service_account}},
        "spec": {"serviceAccountName": service_account, "serviceAccount": service_account,
                 "nodeName": node, "restartPolicy": "Always",
                 "containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": phase, "podIP": "10.244.1.7", "hostIP": "172.18.0.3",
                   "qosClass": "BestEffort"}
    })
}

fn token_review_status(username: &str, audiences: &[&str], extra: Value) -> Value {
    json!({
        "authenticated": true,
        "user": {
            "username": username,
            "uid": "8f0c2a5e-1111-4222-8333-444444444444",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:ztunnel-system",
                       "system:authenticated"],
            "extra": extra
        },
        "audiences": audiences
    })
}

const TUNNEL_USER: &str = "system:serviceaccount:ztunnel-system:ztunnel";
const TUNNEL_POD_UID: &str = "5b0c4f3e-0000-4000-8000-000000000001";

impl FakeApi {
    pub(crate) const TUNNEL_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.tunnel-on-worker-1";
    pub(crate) const NODE_BOUND_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.tunnel-on-worker-2";
    pub(crate) const WRONG_AUDIENCE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.wrong-audience";
    pub(crate) const APP_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.payments";
    pub(crate) const USER_TOKEN: &str = "alice-oidc-token";
    pub(crate) const UNBOUND_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.legacy-secret-token";
    pub(crate) const GONE_POD_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.gone";
    pub(crate) const REPLACED_POD_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.replaced";

    /// An API server that holds nothing yet.
    pub(crate) fn empty() -> Self {
        FakeApi {
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// A two-worker cluster: the tunnel on worker-1 and worker-2, payments and a
    /// finished batch job on worker-1, orders on worker-2.
    pub(crate) fn cluster() -> Self {
        let api = FakeApi::empty();
        let bound = |pod: &str, uid: &str| {
            json!({
                "authentication.kubernetes.io/credential-id": ["JTI=4d3c2b1a-aaaa-4bbb-8ccc-dddddddddddd"],
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uid]
            })
        };
        let ca = ["ztunnel-ca"];
        api.token(
            Self::TUNNEL_TOKEN,
            token_review_status(TUNNEL_USER, &ca, bound("ztunnel-abcde", TUNNEL_POD_UID)),
        );
        let mut with_node = bound("ztunnel-fghij", "5b0c4f3e-0000-4000-8000-000000000002");
        with_node["authentication.kubernetes.io/node-name"] = json!(["worker-2"]);
        with_node["authentication.kubernetes.io/node-uid"] =
            json!(["2c6d1e0f-0000-4000-8000-000000000022"]);
        api.token(
            Self::NODE_BOUND_TOKEN,
            token_review_status(TUNNEL_USER, &ca, with_node),
        );
        api.token(
            Self::WRONG_AUDIENCE_TOKEN,
            token_review_status(
                TUNNEL_USER,
                &["https://kubernetes.default.svc"],
                bound("ztunnel-abcde", TUNNEL_POD_UID),
            ),
        );
        api.token(
            Self::APP_TOKEN,
            token_review_status(
                "system:serviceaccount:finance:payments",
                &ca,
                bound("payments-7d9f8", "6c1d0000-0000-4000-8000-000000000003"),
            ),
        );
        api.token(
            Self::USER_TOKEN,
            token_review_status("alice", &ca, json!({})),
        );
        api.token(
            Self::UNBOUND_TOKEN,
            token_review_status(TUNNEL_USER, &ca, json!({})),
        );
        api.token(
            Self::GONE_POD_TOKEN,
            token_review_status(
                TUNNEL_USER,
                &ca,
                bound("ztunnel-gone", "5b0c4f3e-0000-4000-8000-000000000009"),
            ),
        );
        api.token(
            Self::REPLACED_POD_TOKEN,
            token_review_status(
                TUNNEL_USER,
                &ca,
                bound("ztunnel-abcde", "5b0c4f3e-0000-4000-8000-00000000dead"),
            ),
        );
        for pod in [
            pod_json(
                "ztunnel-system",
                "ztunnel-abcde",
                TUNNEL_POD_UID,
                "ztunnel",
                "worker-1",
                "Running",
            ),
            pod_json(
                "finance",
                "payments-7d9f8",
                "6c1d0000-0000-4000-8000-000000000003",
                "payments",
                "worker-1",
                "Running",
            ),
            pod_json(
                "finance",
                "ledger-5c4b3",
                "6c1d0000-0000-4000-8000-000000000005",
                "ledger",
                "worker-2",
                "Running",
            ),
            pod_json(
                "finance",
                "batch-x1",
                "6c1d0000-0000-4000-8000-000000000006",
                "batch",
                "worker-1",
                "Succeeded",
            ),
            pod_json(
                "shop",
                "orders-6b8c7",
                "6c1d0000-0000-4000-8000-000000000004",
                "orders",
                "worker-2",
                "Running",
            ),
        ] {
            api.put_object("pods", pod);
        }
        api
    }

    /// An API server that answers every request with 500.
    pub(crate) fn failing() -> Self {
        let api = FakeApi::cluster();
        api.state.lock().unwrap().failing = true;
        api
    }

    fn token(&self, token: &str, status: Value) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_string(), status);
    }

    pub(crate) fn put_object(&self, resource: &str, object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        self.state
            .lock()
            .unwrap()
            .objects
            .insert((resource.to_string(), ns, name), object);
    }

    pub(crate) fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Bodies of the requests made to `path`.
    pub(crate) fn requests_to(&self, path: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(_, p, _, _)| p == path)
            .map(|(_, _, _, body)| body.clone())
            .collect()
    }

    /// `METHOD path` of every request, in order.
    pub(crate) fn calls(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(m, p, _, _)| format!("{m} {p}"))
            .collect()
    }

    pub(crate) fn queries(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(_, _, q, _)| q.clone())
            .collect()
    }

    /// Adds or replaces an object and tells the open watches of its resource.
    pub(crate) fn apply(&self, resource: &str, object: Value) {
        self.put_object(resource, object.clone());
        self.emit(resource, "MODIFIED", object);
    }

    /// Deletes an object and tells the open watches of its resource.
    pub(crate) fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let removed = self.state.lock().unwrap().objects.remove(&(
            resource.into(),
            namespace.into(),
            name.into(),
        ));
        if let Some(object) = removed {
            self.emit(resource, "DELETED", object);
        }
    }

    fn emit(&self, resource: &str, kind: &str, object: Value) {
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        let mut state = self.state.lock().unwrap();
        state
            .watches
            .retain(|(r, tx)| r != resource || tx.send(Bytes::from(line.clone())).is_ok());
    }

    /// The next `count` requests for `resource` are answered 503.
    pub(crate) fn unavailable(&self, resource: &str, count: usize) {
        self.state
            .lock()
            .unwrap()
            .unavailable
            .insert(resource.to_string(), count);
    }

    /// The API group version `group/version` is not served (as `discovery.k8s.io/v1`
    /// on Kubernetes 1.20): its paths answer 404.
    pub(crate) fn without(&self, group_version: &str) {
        self.state
            .lock()
            .unwrap()
            .absent
            .push(group_version.to_string());
    }

    /// A real kube client whose transport is this fake.
    pub(crate) fn client(&self) -> ::kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<::kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let answer = api.answer(
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    body,
                );
                let (code, body) = match answer {
                    Answer::Json(code, value) => (
                        code,
                        Full::new(Bytes::from(value.to_string())).boxed_unsync(),
                    ),
                    Answer::Watch(events) => {
                        let frames = futures::stream::unfold(events, |mut events| async move {
                            let line = events.recv().await?;
                            Some((Ok::<_, Infallible>(Frame::data(line)), events))
                        });
                        (StatusCode::OK, StreamBody::new(frames).boxed_unsync())
                    }
                };
                let response: Response<UnsyncBoxBody<Bytes, Infallible>> = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        ::kube::Client::new(service, "default")
    }

    fn answer(&self, method: &Method, path: &str, query: &str, body: Value) -> Answer {
        let mut state = self.state.lock().unwrap();
        state
            .requests
            .push((method.clone(), path.into(), query.into(), body.clone()));
        if state.failing {
            return status(500, "InternalError", "etcdserver: request timed out").into();
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if let ["apis", group, version, ..] = segments.as_slice() {
            let group_version = format!("{group}/{version}");
            if state.absent.contains(&group_version) {
                return status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
                .into();
            }
            if segments.len() == 3 {
                return (StatusCode::OK, resource_list(group, &group_version)).into();
            }
        }
        let Some((resource, namespace, name)) = route(path) else {
            return status(404, "NotFound", &format!("no route for {method} {path}")).into();
        };
        if let Some(left) = state.unavailable.get_mut(&resource)
            && *left > 0
        {
            *left -= 1;
            return status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            )
            .into();
        }
        let ns = namespace.clone().unwrap_or_default();
        match (method, name) {
            (&Method::POST, None) if resource == "tokenreviews" => {
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                let review_status = state.tokens.get(token).cloned().unwrap_or_else(|| {
                    json!({"user": {}, "error": "[invalid bearer token, service account token has expired]"})
                });
                let mut review = body.clone();
                review["metadata"] = json!({"creationTimestamp": null});
                review["status"] = review_status;
                (StatusCode::CREATED, review).into()
            }
            (&Method::GET, None) if query.contains("watch=true") => {
                let (tx, rx) = mpsc::unbounded_channel();
                state.watches.push((resource, tx));
                Answer::Watch(rx)
            }
            (&Method::GET, None) => {
                let selector = field_selector(query);
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((r, n, _), _)| {
                        *r == resource && namespace.as_ref().is_none_or(|ns| ns == n)
                    })
                    .map(|(_, object)| object.clone())
                    .filter(|object| match &selector {
                        Some(node) => object["spec"]["nodeName"] == json!(node),
                        None => true,
                    })
                    .collect();
                let kind = format!("{}List", kind_of(&resource));
                (
                    StatusCode::OK,
                    json!({"kind": kind, "apiVersion": "v1",
                           "metadata": {"resourceVersion": "5000"}, "items": items}),
                )
                    .into()
            }
            (&Method::GET, Some(name)) => {
                match state.objects.get(&(resource.clone(), ns, name.clone())) {
                    Some(object) => (StatusCode::OK, object.clone()).into(),
                    None => {
                        status(404, "NotFound", &format!("{resource} \"{name}\" not found")).into()
                    }
                }
            }
            (&Method::POST, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let key = (resource.clone(), ns, name.clone());
                if state.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{resource} \"{name}\" already exists"),
                    )
                    .into();
                }
                state.next_version += 1;
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
                state.objects.insert(key, object.clone());
                (StatusCode::CREATED, object).into()
            }
            (&Method::PUT, Some(name)) => {
                let key = (resource.clone(), ns, name.clone());
                let Some(current) = state.objects.get(&key) else {
                    return status(404, "NotFound", &format!("{resource} \"{name}\" not found"))
                        .into();
                };
                let sent = &body["metadata"]["resourceVersion"];
                if !sent.is_null() && *sent != current["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified"
                        ),
                    )
                    .into();
                }
                state.next_version += 1;
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
                state.objects.insert(key, object.clone());
                (StatusCode::OK, object).into()
            }
            _ => status(404, "NotFound", &format!("no route for {method} {path}")).into(),
        }
    }
}

/// (resource, namespace, name) of an API path: `/api/v1/...` or `/apis/<group>/<version>/...`.
fn route(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match segments.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let owned = |s: &&str| s.to_string();
    match rest {
        [resource] => Some((resource.to_string(), None, None)),
        ["namespaces", name] => Some(("namespaces".into(), None, Some(owned(name)))),
        ["namespaces", ns, resource] => Some((owned(resource), Some(owned(ns)), None)),
        ["namespaces", ns, resource, name] => {
            Some((owned(resource), Some(owned(ns)), Some(owned(name))))
        }
        _ => None,
    }
}

/// The APIResourceList of a group version: the resources of that group this fake serves.
fn resource_list(group: &str, group_version: &str) -> Value {
    let names: &[&str] = match group {
        "discovery.k8s.io" => &["endpointslices"],
        "security.istio.io" => &["peerauthentications", "authorizationpolicies"],
        "authentication.k8s.io" => &["tokenreviews"],
        _ => &[],
    };
    let resources: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({"name": name, "singularName": "", "namespaced": *name != "tokenreviews",
                   "kind": kind_of(name), "verbs": ["get", "list", "watch"]})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
           "resources": resources})
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "pods" => "Pod",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "namespaces" => "Namespace",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "peerauthentications" => "PeerAuthentication",
        "authorizationpolicies" => "AuthorizationPolicy",
        "tokenreviews" => "TokenReview",
        _ => "Unknown",
    }
}

/// The node of a `fieldSelector=spec.nodeName%3D<node>` query.
fn field_selector(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("fieldSelector=")?;
        let decoded = value.replace("%3D", "=").replace("%3d", "=");
        decoded.strip_prefix("spec.nodeName=").map(str::to_string)
    })
}
