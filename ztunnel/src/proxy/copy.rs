//! The byte copy: both directions of a proxied connection, between a TCP socket and an
//! HBONE stream or between two TCP sockets. This is the hot path.
//!
//! - Half-close is kept: EOF on one side becomes FIN (or END_STREAM) on the other, and
//!   the opposite direction goes on until it ends too.
//! - Reads grow with the flow: a read starts at 16 KiB and doubles each time it fills
//!   the buffer, up to 256 KiB, so chatty connections stay small and bulk flows make
//!   few, large system calls and large DATA frames. No buffer is held while a socket
//!   waits to become readable.
//! - Backpressure everywhere, nothing buffered without bound: toward HTTP/2 we send only
//!   what the stream's flow-control window allows (`reserve_capacity`/`poll_capacity`);
//!   from HTTP/2 we release window only after the bytes were written to the socket.
//!   So at most one read buffer plus the peer's stream window is in flight per direction.
//! - Frames that have already arrived are written with one vectored write.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use crate::hbone::H2Stream;

const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Received DATA gathered into one vectored write at most.
const MAX_BATCH: usize = 512 * 1024;
const MAX_SLICES: usize = 64;

/// Why a copy stopped before both directions ended cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("HBONE stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("HBONE stream closed while sending")]
    StreamClosed,
    #[error("HBONE stream reset by the peer: {0}")]
    Reset(h2::Reason),
}

/// The bytes of one direction of one connection: its own total (for the access log)
/// and the Istio counter it adds to.
pub struct Meter {
    bytes: AtomicU64,
    metric: Counter,
}

impl Meter {
    pub fn new(metric: Counter) -> Self {
        Meter {
            bytes: AtomicU64::new(0),
            metric,
        }
    }

    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }
}

/// Copies between `tcp` and an HBONE stream until both directions ended, or the stream
/// is reset or its connection is gone.
/// `to_stream` counts bytes read from the socket, `from_stream` bytes written to it.
pub async fn tcp_h2(
    tcp: &TcpStream,
    stream: H2Stream,
    to_stream: &Meter,
    from_stream: &Meter,
) -> Result<(), CopyError> {
    let (mut send, mut recv, load) = stream.into_parts();
    let record = |n: usize| {
        if let Some(load) = &load {
            load.record(n as u64);
        }
    };
    let up = async {
        let mut size = MIN_READ;
        loop {
            // The stream is watched while the socket is idle: a reset, or the HTTP/2
            // connection going away, ends the copy at once.
            let read = tokio::select! {
                biased;
                read = read(tcp, &mut size) => read?,
                reset = poll_fn(|cx| send.poll_reset(cx)) => match reset {
                    // A server that has ended its answer tells the client to stop
                    // sending (RFC 9113, 8.1): the answer still reaches the socket.
                    Ok(h2::Reason::NO_ERROR) => return Ok(()),
                    Ok(reason) => return Err(CopyError::Reset(reason)),
                    Err(e) => return Err(e.into()),
                }
            };
            let Some(mut data) = read else {
                send.send_data(Bytes::new(), true)?;
                return Ok(());
            };
            to_stream.add(data.len());
            record(data.len());
            while !data.is_empty() {
                let capacity = capacity(&mut send, data.len()).await?;
                send.send_data(data.split_to(capacity.min(data.len())), false)?;
            }
        }
    };
    let down = async {
        let mut batch = Vec::new();
        loop {
            let (bytes, ended) = gather(&mut recv, &mut batch).await?;
            write_all(tcp, &mut batch).await?;
            recv.flow_control().release_capacity(bytes)?;
            from_stream.add(bytes);
            record(bytes);
            if ended {
                shutdown_write(tcp);
                return Ok::<(), CopyError>(());
            }
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// Copies between two TCP sockets until both directions ended.
pub async fn tcp_tcp(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &Meter,
    b_to_a: &Meter,
) -> Result<(), CopyError> {
    tokio::try_join!(one_way(a, b, a_to_b), one_way(b, a, b_to_a)).map(|_| ())
}

async fn one_way(from: &TcpStream, to: &TcpStream, meter: &Meter) -> Result<(), CopyError> {
    let mut size = MIN_READ;
    let mut batch = Vec::with_capacity(1);
    while let Some(data) = read(from, &mut size).await? {
        meter.add(data.len());
        batch.push(data);
        write_all(to, &mut batch).await?;
    }
    shutdown_write(to);
    Ok(())
}

/// Reads what the socket has, up to `size` bytes (doubled when a read fills it).
/// `None` on EOF. The buffer is allocated only once the socket is readable.
async fn read(tcp: &TcpStream, size: &mut usize) -> io::Result<Option<Bytes>> {
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(*size);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                if n >= *size && *size < MAX_READ {
                    *size *= 2;
                }
                return Ok(Some(buf.freeze()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the stream may send at least one byte of `wanted`; returns how many.
async fn capacity(send: &mut SendStream<Bytes>, wanted: usize) -> Result<usize, CopyError> {
    send.reserve_capacity(wanted);
    loop {
        let available = send.capacity();
        if available > 0 {
            return Ok(available);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(CopyError::StreamClosed),
        }
    }
}

/// Waits for DATA, then takes whatever else has already arrived (up to `MAX_BATCH`).
/// Returns the byte count and whether the stream ended.
async fn gather(recv: &mut RecvStream, batch: &mut Vec<Bytes>) -> Result<(usize, bool), CopyError> {
    let mut bytes = 0;
    match recv.data().await {
        None => return Ok((0, true)),
        Some(chunk) => {
            let chunk = chunk?;
            bytes += chunk.len();
            batch.push(chunk);
        }
    }
    while bytes < MAX_BATCH && batch.len() < MAX_SLICES {
        match recv.data().now_or_never() {
            Some(Some(chunk)) => {
                let chunk = chunk?;
                bytes += chunk.len();
                batch.push(chunk);
            }
            Some(None) => return Ok((bytes, true)),
            None => break,
        }
    }
    Ok((bytes, false))
}

/// Writes every buffer of `batch` (vectored), leaving it empty.
async fn write_all(tcp: &TcpStream, batch: &mut Vec<Bytes>) -> io::Result<()> {
    batch.retain(|b| !b.is_empty());
    while !batch.is_empty() {
        tcp.writable().await?;
        let slices: Vec<IoSlice<'_>> = batch
            .iter()
            .take(MAX_SLICES)
            .map(|b| IoSlice::new(b))
            .collect();
        match tcp.try_write_vectored(&slices) {
            Ok(mut written) => {
                let done = batch
                    .iter()
                    .take_while(|b| {
                        let whole = b.len() <= written;
                        if whole {
                            written -= b.len();
                        }
                        whole
                    })
                    .count();
                batch.drain(..done);
                if let Some(first) = batch.first_mut() {
                    first.advance(written);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends FIN: the peer sees the end of this direction; the other keeps flowing.
fn shutdown_write(tcp: &TcpStream) {
    // The peer may already be gone; then there is nobody left to tell.
    let _ = socket2::SockRef::from(tcp).shutdown(Shutdown::Write);
}

/// Makes dropping `tcp` send RST instead of FIN, so the application sees a failed
/// connection rather than a clean end of data. The proxy arms this before copying, so
/// any way a connection ends early (an error, a drain past its grace period) resets it,
/// and disarms it with `close_gracefully` once both directions ended cleanly.
pub fn reset_on_close(tcp: &TcpStream) {
    // Fails only on a dead socket, which has nothing left to close.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Undoes `reset_on_close`: dropping `tcp` closes it normally.
pub fn close_gracefully(tcp: &TcpStream) {
    // Fails only on a dead socket, which has nothing left to close.
    let _ = socket2::SockRef::from(tcp).set_linger(None);
}
