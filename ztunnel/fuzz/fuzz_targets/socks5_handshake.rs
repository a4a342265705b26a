//! The SOCKS5 greeting and CONNECT request a local client sends, over an in-memory
//! stream that ends where the input ends.
//!
//! Invariants: a destination is accepted only from a version-5 greeting that offers
//! "no authentication", after which the listener chose that method, and from a
//! CONNECT request whose address bytes are that destination; nothing is written to
//! the client but the method choice.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::fuzzing::socks5_request;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// The destination the request in `data` names, read by the RFC rather than the code.
fn requested(data: &[u8]) -> Option<SocketAddr> {
    let methods = usize::from(*data.get(1)?);
    let request = data.get(2 + methods..)?;
    let ip = match request.get(3)? {
        1 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(request.get(4..8)?).ok()?,
        )),
        4 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(request.get(4..20)?).ok()?,
        )),
        _ => return None,
    };
    let at = if ip.is_ipv4() { 8 } else { 20 };
    let port = u16::from_be_bytes(request.get(at..at + 2)?.try_into().ok()?);
    Some(SocketAddr::new(ip, port))
}

fuzz_target!(|data: &[u8]| {
    let (result, answer) = RUNTIME.with(|rt| {
        rt.block_on(async {
            let (mut client, mut server) = tokio::io::duplex(64 * 1024);
            client
                .write_all(data)
                .await
                .expect("the input fits the pipe");
            client
                .shutdown()
                .await
                .expect("shutdown of an in-memory pipe");
            let result = socks5_request(&mut server).await;
            drop(server);
            let mut answer = Vec::new();
            client
                .read_to_end(&mut answer)
                .await
                .expect("read the answer");
            (result, answer)
        })
    });
    assert!(
        answer.is_empty() || answer == [5, 0] || answer == [5, 0xff],
        "unexpected bytes to the client: {answer:?}"
    );
    if let Ok(destination) = result {
        assert_eq!(data[0], 5);
        let methods = &data[2..2 + usize::from(data[1])];
        assert!(
            methods.contains(&0),
            "accepted without no-auth in {methods:?}"
        );
        assert_eq!(answer, [5, 0]);
        let request = &data[2 + methods.len()..];
        assert_eq!(&request[..2], &[5, 1], "not a version-5 CONNECT");
        assert_eq!(requested(data), Some(destination));
    }
});
