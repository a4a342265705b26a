//! Running on Kubernetes: the API server as a discovery source, local pods' network
//! namespaces found from /proc, and the cluster CA service with its client.

pub mod ca;
pub mod discovery;
pub mod pod_netns;
#[cfg(test)]
mod test_api;
