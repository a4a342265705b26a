//! Running on Kubernetes: finding local pods' network namespaces from /proc, and the
//! cluster CA service with its client.

pub mod ca;
pub mod pod_netns;
