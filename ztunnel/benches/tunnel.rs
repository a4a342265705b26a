//! Loopback throughput, round-trip latency and connection setup through two tunnels
//! (SOCKS5 capture -> HBONE over mTLS -> application), against the same application
//! reached directly. Run: `cargo bench -p ztunnel --bench tunnel`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use ztunnel::proxy::Config;

use support::Pair;

const BULK: usize = 64 * 1024 * 1024;
const CHUNK: usize = 256 * 1024;

/// Reads `BULK` bytes, acknowledges with one byte, forever.
async fn sink(mut tcp: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut left = BULK;
        while left > 0 {
            match tcp.read(&mut buf[..left.min(CHUNK)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
        }
        if tcp.write_all(&[1]).await.is_err() {
            return;
        }
    }
}

async fn send_bulk(tcp: &mut TcpStream, buf: &[u8]) {
    let mut left = BULK;
    while left > 0 {
        let n = left.min(buf.len());
        tcp.write_all(&buf[..n]).await.expect("bulk write");
        left -= n;
    }
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack).await.expect("bulk ack");
}

async fn rtt(tcp: &mut TcpStream) {
    let mut byte = [7u8; 1];
    tcp.write_all(&byte).await.expect("write");
    tcp.read_exact(&mut byte).await.expect("read");
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let pair = rt.block_on(Pair::new(200, Config::default()));
    let sink_addr = rt.block_on(pair.app(sink));
    let echo = pair.echo;
    let pair = &pair;
    type Connect<'a> =
        Box<dyn Fn(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = TcpStream> + 'a>> + 'a>;
    let paths: Vec<(&str, Connect<'_>)> = vec![
        (
            "tunnel",
            Box::new(|to| Box::pin(async move { pair.connect(to).await.expect("tunnel connect") })),
        ),
        (
            "direct",
            Box::new(|to| {
                Box::pin(async move { TcpStream::connect(to).await.expect("direct connect") })
            }),
        ),
    ];

    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let buf = vec![0x5au8; CHUNK];
    for (name, connect) in &paths {
        let mut tcp = rt.block_on(connect(sink_addr));
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        send_bulk(&mut tcp, &buf).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("round_trip_1B");
    for (name, connect) in &paths {
        let mut tcp = rt.block_on(connect(echo));
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        rtt(&mut tcp).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("connect_and_round_trip");
    // Few samples: every iteration leaves sockets in TIME_WAIT.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    for (name, connect) in &paths {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let mut tcp = connect(echo).await;
                        rtt(&mut tcp).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(tunnel, benches);
criterion_main!(tunnel);
