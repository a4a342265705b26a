//! The production handshakes of HBONE: mutual TLS with the certificates of the node's
//! workload identities, as `tls` configures it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;

use super::{Error, PoolKey, Result};
use tokio::sync::watch;

use crate::identity::{CertManager, CertState, Identity, TrustStore};
use crate::tls;

/// The client side of an HBONE connection.
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;
/// The server side of an HBONE connection.
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// A local identity's server configuration and the certificate it follows.
type CachedServer = (watch::Receiver<CertState>, Arc<rustls::ServerConfig>);

/// Mutual TLS for both sides of HBONE. Server configurations are built once per local
/// identity (they follow certificate renewals by themselves); client configurations
/// per pool key, as each expects its own peer identities.
pub struct Mtls {
    certificates: CertManager,
    trust: Arc<TrustStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    deadline: Duration,
    metrics: tls::Metrics,
    servers: Mutex<HashMap<Identity, CachedServer>>,
}

impl Mtls {
    /// `deadline` bounds each TLS handshake; failures are counted in `metrics`.
    pub fn new(
        certificates: CertManager,
        trust: Arc<TrustStore>,
        trust_domain: impl Into<String>,
        deadline: Duration,
        metrics: tls::Metrics,
    ) -> Self {
        Mtls {
            certificates,
            trust,
            trust_domain: trust_domain.into(),
            provider: tls::provider(),
            deadline,
            metrics,
            servers: Mutex::new(HashMap::new()),
        }
    }

    fn server_config(&self, local: &Identity) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut servers = self
            .servers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A configuration is reused while the manager still holds its certificate (a
        // released and re-held identity gets a new one).
        if let Some((certificate, config)) = servers.get(local)
            && certificate.has_changed().is_ok()
        {
            return Ok(config.clone());
        }
        let certificate = self
            .certificates
            .subscribe(local)
            .map_err(|e| e.to_string())?;
        let config = tls::server_config(
            certificate.clone(),
            self.trust.clone(),
            &self.trust_domain,
            self.provider.clone(),
        )
        .map_err(|e| e.to_string())?;
        servers.insert(local.clone(), (certificate, config.clone()));
        Ok(config)
    }
}

impl Mtls {
    /// Secures an outbound connection for `key`: presents the source identity's
    /// certificate and requires the server to prove one of the expected identities.
    pub async fn connect(&self, tcp: TcpStream, key: &PoolKey) -> Result<ClientTls> {
        let addr = key.destination;
        let tls_error = |reason: String| Error::Tls { addr, reason };
        // Waits for the first issuance when the identity has just appeared.
        self.certificates
            .fetch(&key.source_identity)
            .await
            .map_err(|e| tls_error(e.to_string()))?;
        let certificate = self
            .certificates
            .subscribe(&key.source_identity)
            .map_err(|e| tls_error(e.to_string()))?;
        let config = tls::client_config(
            certificate,
            self.trust.clone(),
            key.destination_identities.clone(),
            self.provider.clone(),
        )
        .map_err(|e| tls_error(e.to_string()))?;
        let (stream, _peer) = tls::connect(config, addr.ip(), tcp, self.deadline, &self.metrics)
            .await
            .map_err(|e| tls_error(e.to_string()))?;
        Ok(stream)
    }

    /// Secures an inbound connection with the certificate of `local` (the workload the
    /// connection arrived for), requiring a client certificate; returns the client's
    /// verified identity.
    pub async fn accept(&self, tcp: TcpStream, local: &Identity) -> Result<(ServerTls, Identity)> {
        let addr = tcp.peer_addr()?;
        let tls_error = |reason: String| Error::Tls { addr, reason };
        self.certificates
            .fetch(local)
            .await
            .map_err(|e| tls_error(e.to_string()))?;
        let config = self.server_config(local).map_err(tls_error)?;
        tls::accept(config, tcp, self.deadline, &self.metrics)
            .await
            .map_err(|e| tls_error(e.to_string()))
    }
}
