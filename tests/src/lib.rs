//! Support for the end-to-end tests (root): a cluster of nodes and pods made of network
//! namespaces on this machine, so a new test is a few lines:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let cluster = ztunnel_tests::Cluster::builder().nodes(2).pods_per_node(2).build()?;
//! let out = cluster.pod(0, 1).exec("ip", &["addr"])?;
//! # drop(out); Ok(()) }
//! ```

mod apiserver;
pub mod capture;
mod cluster;
pub mod load;
mod mesh;

pub use apiserver::{
    ApiServer, PodObject, PodSandbox, SERVICE_ACCOUNT_ISSUER, command_in, kube_apiserver_binary,
};
pub use capture::{Capture, contains};
pub use cluster::{
    Cluster, ClusterBuilder, Node, Pod, pin_dir, remove_pin_root_if_empty, require_root,
};
pub use mesh::{Mesh, PodSpec, SEED_POLICIES, http_get, strip_colours, ztunnel_binary};
pub use ztunnel;
