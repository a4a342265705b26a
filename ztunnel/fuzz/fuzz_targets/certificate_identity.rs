//! A peer's leaf certificate (DER) and the SPIFFE identity in it, and SPIFFE ids as
//! text (an input that does not start as a DER SEQUENCE is read as an id).
//!
//! Invariants: an identity re-displays to a string that parses back to it; the identity
//! taken from a certificate is its one URI SAN, written exactly so; a certificate with
//! none, or more than one (SPIFFE allows exactly one), proves no identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use ztunnel::fuzzing::{CertificateInfo, identity_of};
use ztunnel::identity::Identity;

fn round_trips(id: &Identity) {
    let text = id.to_string();
    assert_eq!(text.parse::<Identity>().as_ref(), Ok(id), "{text}");
}

fuzz_target!(|data: &[u8]| {
    if data.first() != Some(&0x30) {
        if let Ok(text) = std::str::from_utf8(data) {
            if let Ok(id) = text.parse::<Identity>() {
                assert_eq!(id.to_string(), text);
                round_trips(&id);
            }
        }
        return;
    }
    let info = CertificateInfo::parse(data);
    match identity_of(&CertificateDer::from(data)) {
        Ok(id) => {
            round_trips(&id);
            let info = info.expect("an identity from a certificate that does not parse");
            assert_eq!(info.uris, [id.to_string()], "{id} is not the one URI SAN");
        }
        Err(_) => {
            if let Ok(info) = info {
                assert!(
                    info.uris.len() != 1 || info.uris[0].parse::<Identity>().is_err(),
                    "one SPIFFE URI SAN {:?}, refused",
                    info.uris
                );
            }
        }
    }
});
