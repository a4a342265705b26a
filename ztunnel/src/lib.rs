//! The node tunnel: eBPF steers enrolled pods' TCP into it, it carries each connection
//! as an HBONE (HTTP/2 CONNECT over mutual TLS) stream, and it enforces Istio's
//! PeerAuthentication and L4 AuthorizationPolicy.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod check;
pub mod config;
pub mod discovery;
pub mod file_watch;
#[doc(hidden)]
pub mod fuzzing;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod kube;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod tls;
