//! Running on Kubernetes: the API server as a discovery source, local pods' network
//! namespaces found from /proc, and the cluster CA service with its client.

pub mod ca;
pub mod discovery;
pub mod pod_netns;
#[cfg(test)]
mod test_api;

use std::fmt;

/// A client error as logs and messages show it: an API server's answer as
/// `HTTP <code> <reason>: <message>` (the client's own display appends its debug form).
pub struct ApiError<'a>(pub &'a ::kube::Error);

impl fmt::Display for ApiError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ::kube::Error::Api(status) => {
                write!(f, "HTTP {}", status.code)?;
                if !status.reason.is_empty() {
                    write!(f, " {}", status.reason)?;
                }
                if !status.message.is_empty() {
                    write!(f, ": {}", status.message)?;
                }
                Ok(())
            }
            other => write!(f, "{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_show_code_reason_and_message_without_debug_output() {
        let status = ::kube::core::Status::failure(
            "endpointslices.discovery.k8s.io is forbidden",
            "Forbidden",
        )
        .with_code(403);
        let error = ::kube::Error::Api(Box::new(status));
        let shown = ApiError(&error).to_string();
        assert_eq!(
            shown,
            "HTTP 403 Forbidden: endpointslices.discovery.k8s.io is forbidden"
        );
    }
}
