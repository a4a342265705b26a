//! Where the tunnel learns about workloads, services and policies.
//!
//! Every source speaks the same interface: it assembles the complete
//! [`crate::state::Resources`] it knows and hands them to
//! [`crate::state::State::publish`], once at start and again after each change. The
//! data path never sees a source, only the snapshots. Sources:
//! - [`local`]: the local config file, watched on disk;
//! - [`crate::kube::discovery`]: the Kubernetes API (Pods, Namespaces, Services,
//!   EndpointSlices and the two Istio policy resources), beside the other Kubernetes parts.

pub mod local;
