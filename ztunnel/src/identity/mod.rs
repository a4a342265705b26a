//! Who a workload is and how it proves it: SPIFFE identities, the certificate
//! authority interface, per-identity certificates with renewal, and the trust bundle.

mod spiffe;

pub use spiffe::{Identity, ParseError};
