//! The byte streams hyper serves: an HBONE stream seen as a socket, and a byte stream
//! that counts what passes through it for the connection's Istio TCP counters.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hbone::H2Stream;

/// Largest DATA frame one write sends.
const MAX_WRITE: usize = 64 * 1024;

/// An accepted HBONE stream as `AsyncRead + AsyncWrite`: reads take DATA frames (window
/// released once handed out), writes wait for send window.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What arrived and was not read yet.
    pending: Bytes,
    recv_done: bool,
}

impl StreamIo {
    pub fn new(stream: H2Stream) -> Self {
        let (send, recv, _load) = stream.into_parts();
        StreamIo {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HBONE stream"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    this.recv
                        .flow_control()
                        .release_capacity(data.len())
                        .map_err(h2_io)?;
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => this.recv_done = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        let send = &mut self.send;
        if send.capacity() == 0 {
            send.reserve_capacity(want);
            loop {
                match ready!(send.poll_capacity(cx)) {
                    Some(Ok(0)) => continue,
                    Some(Ok(_)) => break,
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed while sending",
                        )));
                    }
                }
            }
        }
        let n = send.capacity().min(want);
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Already ended (reset by the peer, or shut down before) is fine.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamIo {
    /// Ends the stream rather than resetting it: what hyper wrote last (an error
    /// answer before it closed the connection) still reaches the client.
    fn drop(&mut self) {
        // Already ended or reset: nothing to do.
        let _ = self.send.send_data(Bytes::new(), true);
    }
}

/// Bytes one connection moved: read from the client, written to it.
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

/// A byte stream that counts what is read and written, for the connection's record.
pub struct Metered<T> {
    inner: T,
    counts: Arc<ByteCounts>,
}

impl<T> Metered<T> {
    pub fn new(inner: T, counts: Arc<ByteCounts>) -> Self {
        Metered { inner, counts }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        self.counts.received.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
