//! One Istio PeerAuthentication or AuthorizationPolicy document (YAML, as in the config
//! file; JSON, as from the API server, is YAML too), compiled and evaluated.
//!
//! Invariants: a compiled policy is named by the document's kind, namespace and name;
//! evaluated alone against a few connections, AUDIT and dry-run policies never deny,
//! and a decision names no policy but this one.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ztunnel::fuzzing::{Connection, Policy, authorize, parse_policy};
use ztunnel::identity::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(document) = parse_policy(text) else {
        return;
    };
    let Ok(policy) = document.compile() else {
        return;
    };
    let reference = policy.reference();
    assert_eq!(reference.name, document.metadata.name);
    assert_eq!(
        Some(&reference.namespace),
        document.metadata.namespace.as_ref()
    );
    assert_eq!(format!("{:?}", reference.kind), document.kind);
    let Policy::Authz(authz) = policy else {
        return;
    };
    let identity: Identity = "spiffe://cluster.local/ns/prod/sa/orders"
        .parse()
        .expect("a valid identity");
    let connections = [
        Connection {
            src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            identity: Some(&identity),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 9090),
            request: None,
        },
        Connection {
            src_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
            identity: None,
            dst: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 80),
            request: None,
        },
    ];
    for conn in &connections {
        let decision = authorize(std::slice::from_ref(&authz), conn);
        if authz.dry_run || authz.action == ztunnel::policy::Action::Audit {
            assert!(
                decision.allowed,
                "{} enforced: {decision:?}",
                authz.reference
            );
        }
        if let Some(decided) = &decision.policy {
            assert_eq!(decided, &authz.reference);
        }
    }
});
