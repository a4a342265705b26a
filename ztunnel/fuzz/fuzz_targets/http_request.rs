//! The bytes a client sends to an HTTP port, read by the tunnel's HTTP server (HTTP/1.1
//! with keep-alive and pipelining, or HTTP/2 cleartext), then each request's path as
//! authorization normalizes it and a DENY on `/admin*` decided against it.
//!
//! Invariants, for every request and every normalization mode: a normalized path begins
//! with `/`, normalizing it again changes nothing, and outside `NONE` it holds no `.` or
//! `..` segment (and no empty one where slashes are merged). Under the tunnel's default
//! (`DECODE_AND_MERGE_SLASHES`), a request whose path names `/admin*` once every escape
//! is decoded (the way an application may read it) is denied: no spelling of the path
//! goes around the rule.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ztunnel::fuzzing::{
    Connection, PathNormalization, Policy, Request, authorize, http_requests, parse_policy,
    path_and_host,
};
use ztunnel::identity::Identity;
use ztunnel::policy::AuthorizationPolicy;

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
  namespace: prod
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*"]
"#;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    static POLICY: AuthorizationPolicy = match parse_policy(DENY_ADMIN)
        .expect("the policy parses")
        .compile()
        .expect("the policy compiles")
    {
        Policy::Authz(policy) => policy,
        other => panic!("not an AuthorizationPolicy: {other:?}"),
    };
}

/// The path of `target` with every percent escape decoded once, `\` read as `/`, dot
/// segments resolved and slashes merged: the most an application could make of it.
fn fully_decoded(target: &str) -> String {
    let raw = &target[..target.find(['?', '#']).unwrap_or(target.len())];
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escape) {
            (b'%', Some(c)) => {
                decoded.push(c);
                i += 3;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn check(head: &http::request::Parts, policy: &AuthorizationPolicy) {
    for mode in MODES {
        let Ok((path, host)) = path_and_host(head, mode) else {
            continue;
        };
        assert!(path.starts_with('/'), "{mode}: {path:?}");
        let again = ztunnel::policy::normalize_path(&path, mode);
        if mode != PathNormalization::None {
            assert_eq!(again.as_deref(), Ok(path.as_str()), "{mode}: not idempotent");
            let segments: Vec<&str> = path[1..].split('/').collect();
            assert!(
                !segments.iter().any(|s| *s == "." || *s == ".."),
                "{mode}: {path:?} keeps a dot segment"
            );
            if mode != PathNormalization::Base {
                assert!(!path.contains("//"), "{mode}: {path:?} keeps //");
            }
        }
        if mode != PathNormalization::DecodeAndMergeSlashes {
            continue;
        }
        let request = Request {
            method: head.method.as_str(),
            path: &path,
            host,
            headers: &head.headers,
        };
        let identity: Identity = "spiffe://cluster.local/ns/prod/sa/orders"
            .parse()
            .expect("a valid identity");
        let conn = Connection {
            src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            identity: Some(&identity),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080),
            request: Some(&request),
        };
        let decision = authorize(std::slice::from_ref(policy), &conn);
        let target = head
            .uri
            .path_and_query()
            .map_or_else(|| head.uri.path(), |p| p.as_str());
        if fully_decoded(target).starts_with("/admin") {
            assert!(!decision.allowed, "{target:?} read as {path:?} was allowed");
        }
        assert_eq!(decision.allowed, !path.starts_with("/admin"), "{path:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let heads = RUNTIME.with(|rt| rt.block_on(http_requests(data)));
    POLICY.with(|policy| {
        for head in &heads {
            check(head, policy);
        }
    });
});
