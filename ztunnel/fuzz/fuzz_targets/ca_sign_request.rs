//! The JSON body of a CA service signing request, as it is after the caller was
//! authenticated and authorized: `{"identity": "spiffe://...", "csr": "<PEM>"}`.
//!
//! Invariants: the certificate signed for an accepted request carries exactly the
//! identity asked for, and that identity re-displays to a string that parses back to it.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ztunnel::fuzzing::{CaFiles, generate_root, identity_of, sign_request};
use ztunnel::identity::InProcessCa;

static CA: LazyLock<InProcessCa> = LazyLock::new(|| {
    let root = generate_root("cluster.local").expect("a root");
    let files = CaFiles {
        cert: PathBuf::from("fuzz-root-cert.pem"),
        key: PathBuf::from("fuzz-root-key.pem"),
    };
    InProcessCa::from_pem(&files, &root.cert, &root.key, Duration::from_secs(3600))
        .expect("a CA from a fresh root")
});

fuzz_target!(|data: &[u8]| {
    let Ok((identity, chain)) = sign_request(&CA, data) else {
        return;
    };
    let text = identity.to_string();
    assert_eq!(text.parse().as_ref(), Ok(&identity), "{text}");
    let leaf = chain.first().expect("a chain holds its leaf");
    assert_eq!(identity_of(leaf).as_ref(), Ok(&identity));
});
