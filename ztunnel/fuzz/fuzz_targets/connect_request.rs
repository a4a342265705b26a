//! The CONNECT request an HBONE peer sends: method, `:authority`, and the `forwarded`,
//! `baggage` and `traceparent` headers, one per line of the input in that order.
//!
//! Invariants: a destination is read only from CONNECT, and it re-displays to an
//! authority that reads back as the same destination; the headers the tunnel reads are
//! what it reads again after writing them onto a stream of its own (baggage only
//! travels with both workload and namespace).
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use ztunnel::fuzzing::{ConnectHeaders, connect_destination};

const HEADERS: [&str; 3] = ["forwarded", "baggage", "traceparent"];

fn connect_uri(authority: &[u8]) -> Option<Uri> {
    let authority = http::uri::Authority::try_from(authority).ok()?;
    Uri::builder().authority(authority).build().ok()
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or_default();
    let authority = lines.next().unwrap_or_default();
    if let (Ok(method), Some(uri)) = (Method::from_bytes(method), connect_uri(authority)) {
        if let Ok(destination) = connect_destination(&method, &uri) {
            assert_eq!(method, Method::CONNECT);
            let again = connect_uri(destination.to_string().as_bytes())
                .unwrap_or_else(|| panic!("{destination} is not an authority"));
            assert_eq!(
                connect_destination(&Method::CONNECT, &again),
                Ok(destination)
            );
        }
    }

    let mut map = HeaderMap::new();
    for (name, value) in HEADERS.iter().zip(lines) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.insert(HeaderName::from_static(name), value);
        }
    }
    let read = ConnectHeaders::read(&map);
    let mut written = HeaderMap::new();
    read.write(&mut written);
    let mut expected = read.clone();
    if expected.source_workload.is_none() || expected.source_namespace.is_none() {
        expected.source_workload = None;
        expected.source_namespace = None;
    }
    assert_eq!(
        ConnectHeaders::read(&written),
        expected,
        "written as {written:?}"
    );
});
