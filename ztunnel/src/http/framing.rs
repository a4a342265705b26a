//! HTTP/1 request framing checked before hyper parses it: [`Framing`] reads the
//! client's bytes, follows its messages (head, then a `Content-Length` or chunked body)
//! and hands hyper each request head only once it is whole and acceptable. A head hyper
//! would take but the tunnel refuses (both `Content-Length` and `Transfer-Encoding`, a
//! header block over the limit, more than [`MAX_HEADERS`] fields) is cut short with a
//! NUL byte before its end: hyper then answers 400 and closes the connection, and no
//! byte of that request reaches the application.
//!
//! Everything else is hyper's to judge: a head hyper refuses anyway (bad request line,
//! obs-fold, bad `Content-Length`) and whatever follows an HTTP/2 preface, an `Upgrade`
//! or `CONNECT` request, or framing this reader does not follow are passed through as
//! they are.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most header fields in one request head (hyper's own limit).
pub const MAX_HEADERS: usize = 100;

/// How much is read from the client at a time.
const READ_SIZE: usize = 8 * 1024;

/// Longest chunk-size line (with extensions), as hyper allows extensions per body.
const MAX_CHUNK_LINE: usize = 16 * 1024 + 64;

/// What hyper gets instead of the rest of a refused head: a NUL byte, never valid in a
/// head, then the end of a head (hyper parses a partial head again only once it sees
/// one).
const POISON: &[u8] = b"\0\r\n\r\n";

/// The start of the HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Why a request head was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("request header block over {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("request with more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("request with both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Reading a head that starts at `head_start`.
    Head {
        /// Bytes in the current line, CR not counted.
        line: usize,
        /// A non-empty line was seen (empty lines before the request line are skipped).
        started: bool,
    },
    /// That many body bytes to go.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// That many chunk bytes to go, then CRLF.
    ChunkData(u64),
    /// The CRLF after a chunk: how many of its two bytes were seen.
    ChunkEnd(u8),
    /// The trailer section after the last chunk: bytes in the current line, and in all.
    Trailers { line: usize, total: usize },
    /// Not followed any further.
    PassThrough,
    /// A head was refused: hyper gets [`POISON`] (`sent` bytes of it so far), then the
    /// end of the stream.
    Refused { sent: usize },
}

/// The client's side of one connection, as hyper reads it (writes pass through).
pub struct Framing<T> {
    inner: T,
    limit: usize,
    state: State,
    /// Read from the client and not yet handed to hyper, or part of the head being read.
    buf: Vec<u8>,
    /// `buf[..delivered]` was handed to hyper.
    delivered: usize,
    /// `buf[..release]` may be handed to hyper.
    release: usize,
    /// `buf[..scanned]` has been followed.
    scanned: usize,
    /// Where the head being read starts in `buf`.
    head_start: usize,
    /// No request head has been completed yet.
    first: bool,
    eof: bool,
    /// Why a head was refused, for the log.
    refusal: Arc<OnceLock<Refusal>>,
    chunk_line: Vec<u8>,
}

impl<T> Framing<T> {
    /// Follows the requests on `inner`, refusing heads over `limit` bytes; the reason of
    /// a refusal is left in `refusal`.
    pub fn new(inner: T, limit: usize, refusal: Arc<OnceLock<Refusal>>) -> Self {
        Framing {
            inner,
            limit,
            state: State::Head {
                line: 0,
                started: false,
            },
            buf: Vec::new(),
            delivered: 0,
            release: 0,
            scanned: 0,
            head_start: 0,
            first: true,
            eof: false,
            refusal,
            chunk_line: Vec::new(),
        }
    }

    /// Drops what hyper has and no head being read still needs.
    fn compact(&mut self) {
        let done = match self.state {
            State::Head { .. } => self.delivered.min(self.head_start),
            _ => self.delivered,
        };
        if done == 0 {
            return;
        }
        self.buf.drain(..done);
        self.delivered -= done;
        self.release -= done;
        self.scanned -= done;
        self.head_start = self.head_start.saturating_sub(done);
    }

    fn refuse(&mut self, why: Refusal) {
        let _ = self.refusal.set(why);
        self.state = State::Refused { sent: 0 };
    }

    fn pass_through(&mut self) {
        self.state = State::PassThrough;
        self.release = self.buf.len();
        self.scanned = self.buf.len();
    }

    fn next_head(&mut self) {
        self.head_start = self.scanned;
        self.state = State::Head {
            line: 0,
            started: false,
        };
    }

    /// Follows and releases up to `left` body bytes; how many there were.
    fn take_body(&mut self, left: u64) -> u64 {
        let take = left.min((self.buf.len() - self.scanned) as u64);
        // At most what `buf` holds: fits in usize.
        self.scanned += take as usize;
        self.release = self.scanned;
        take
    }

    /// Follows what was read and not yet followed.
    fn scan(&mut self) {
        while self.scanned < self.buf.len() {
            match self.state {
                State::Head { .. } => {
                    if !self.scan_head() {
                        return;
                    }
                }
                State::Fixed(left) => {
                    let take = self.take_body(left);
                    if take == left {
                        self.next_head();
                    } else {
                        self.state = State::Fixed(left - take);
                    }
                }
                State::ChunkData(left) => {
                    let take = self.take_body(left);
                    self.state = if take == left {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::ChunkEnd(seen) => {
                    let b = self.buf[self.scanned];
                    self.scanned += 1;
                    self.release = self.scanned;
                    self.state = match (seen, b) {
                        (0, b'\r') => State::ChunkEnd(1),
                        (1, b'\n') => State::ChunkSize,
                        _ => return self.pass_through(),
                    };
                }
                State::ChunkSize => {
                    let b = self.buf[self.scanned];
                    self.scanned += 1;
                    self.release = self.scanned;
                    self.chunk_line.push(b);
                    if self.chunk_line.len() > MAX_CHUNK_LINE {
                        return self.pass_through();
                    }
                    if b == b'\n' {
                        let size = httparse::parse_chunk_size(&self.chunk_line);
                        self.chunk_line.clear();
                        self.state = match size {
                            Ok(httparse::Status::Complete((_, 0))) => {
                                State::Trailers { line: 0, total: 0 }
                            }
                            Ok(httparse::Status::Complete((_, size))) => State::ChunkData(size),
                            _ => return self.pass_through(),
                        };
                    }
                }
                State::Trailers { line, total } => {
                    let b = self.buf[self.scanned];
                    self.scanned += 1;
                    self.release = self.scanned;
                    if total + 1 > self.limit {
                        return self.pass_through();
                    }
                    self.state = match b {
                        b'\n' if line == 0 => {
                            self.next_head();
                            continue;
                        }
                        b'\n' => State::Trailers {
                            line: 0,
                            total: total + 1,
                        },
                        b'\r' => State::Trailers {
                            line,
                            total: total + 1,
                        },
                        _ => State::Trailers {
                            line: line + 1,
                            total: total + 1,
                        },
                    };
                }
                State::PassThrough | State::Refused { .. } => return,
            }
        }
    }

    /// Follows a head; whether it was completed (and the next state is set).
    fn scan_head(&mut self) -> bool {
        if self.first && self.buf.len() - self.head_start >= H2_PREFACE.len() {
            let start = &self.buf[self.head_start..self.head_start + H2_PREFACE.len()];
            if start == H2_PREFACE {
                self.pass_through();
                return false;
            }
        }
        let State::Head {
            mut line,
            mut started,
        } = self.state
        else {
            return false;
        };
        let mut end = None;
        for (i, &b) in self.buf[self.scanned..].iter().enumerate() {
            match b {
                b'\n' if line == 0 && started => {
                    end = Some(self.scanned + i + 1);
                    break;
                }
                b'\n' => {
                    started |= line > 0;
                    line = 0;
                }
                b'\r' => {}
                _ => line += 1,
            }
        }
        let Some(end) = end else {
            self.scanned = self.buf.len();
            self.state = State::Head { line, started };
            if self.scanned - self.head_start > self.limit {
                self.refuse(Refusal::HeadTooLarge { limit: self.limit });
                return false;
            }
            // Hyper may have all but the trailing line ends: without them the head is
            // not complete, and a refusal can still cut it short.
            let mut safe = self.scanned;
            while safe > self.head_start && matches!(self.buf[safe - 1], b'\r' | b'\n') {
                safe -= 1;
            }
            self.release = self.release.max(safe);
            return false;
        };
        self.scanned = end;
        if end - self.head_start > self.limit {
            self.refuse(Refusal::HeadTooLarge { limit: self.limit });
            return false;
        }
        self.first = false;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let framing = match request.parse(&self.buf[self.head_start..end]) {
            Ok(httparse::Status::Complete(_)) => body_framing(&request),
            Err(httparse::Error::TooManyHeaders) => {
                self.refuse(Refusal::TooManyHeaders);
                return false;
            }
            // Hyper refuses it too, with its own answer.
            Ok(httparse::Status::Partial) | Err(_) => None,
        };
        let body = match framing {
            Some(Ok(body)) => body,
            Some(Err(why)) => {
                self.refuse(why);
                return false;
            }
            None => {
                self.pass_through();
                return false;
            }
        };
        self.release = end;
        match body {
            Body::Fixed(0) => self.next_head(),
            Body::Fixed(n) => self.state = State::Fixed(n),
            Body::Chunked => self.state = State::ChunkSize,
        }
        true
    }
}

enum Body {
    Fixed(u64),
    Chunked,
}

/// How the body of a parsed request is framed; `None` when this reader does not follow
/// what comes after it (an upgrade, `CONNECT`, or framing hyper refuses).
fn body_framing(request: &httparse::Request<'_, '_>) -> Option<Result<Body, Refusal>> {
    let named = |name: &'static str| {
        request
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };
    let chunked = named("transfer-encoding").count() > 0;
    let lengths: Vec<&[u8]> = named("content-length").map(|h| h.value).collect();
    if chunked && !lengths.is_empty() {
        return Some(Err(Refusal::LengthAndChunked));
    }
    let http11 = request.version == Some(1);
    if request.method == Some("CONNECT") || (http11 && named("upgrade").count() > 0) {
        return None;
    }
    if chunked {
        let last = named("transfer-encoding").next_back()?.value;
        let last = std::str::from_utf8(last).ok()?.rsplit(',').next()?.trim();
        return (http11 && last.eq_ignore_ascii_case("chunked")).then_some(Ok(Body::Chunked));
    }
    let Some(first) = lengths.first() else {
        return Some(Ok(Body::Fixed(0)));
    };
    if lengths.iter().any(|l| l != first) || first.is_empty() {
        return None;
    }
    let length = std::str::from_utf8(first).ok()?;
    if !length.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    length.parse().ok().map(|n| Ok(Body::Fixed(n)))
}

impl<T: AsyncRead + Unpin> AsyncRead for Framing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.delivered < this.release {
                let n = (this.release - this.delivered).min(out.remaining());
                out.put_slice(&this.buf[this.delivered..this.delivered + n]);
                this.delivered += n;
                this.compact();
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::Refused { sent } => {
                    let n = (POISON.len() - sent).min(out.remaining());
                    out.put_slice(&POISON[sent..sent + n]);
                    this.state = State::Refused { sent: sent + n };
                    return Poll::Ready(Ok(()));
                }
                State::PassThrough if this.delivered == this.buf.len() => {
                    this.buf = Vec::new();
                    (this.delivered, this.release, this.scanned) = (0, 0, 0);
                    return Pin::new(&mut this.inner).poll_read(cx, out);
                }
                _ => {}
            }
            if this.eof {
                // What is left is hyper's to judge (an incomplete head).
                this.release = this.buf.len();
                if this.delivered == this.release {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let old = this.buf.len();
            this.buf.resize(old + READ_SIZE, 0);
            let mut read = ReadBuf::new(&mut this.buf[old..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            this.buf.truncate(old + n);
            ready!(polled)?;
            if n == 0 {
                this.eof = true;
            }
            this.scan();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Framing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// What hyper would read from `input` sent in pieces of `piece` bytes, and the
    /// refusal if there was one.
    async fn through(input: &[u8], piece: usize, limit: usize) -> (Vec<u8>, Option<Refusal>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let refusal = Arc::new(OnceLock::new());
        let mut framing = Framing::new(server, limit, refusal.clone());
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = client;
            for part in input.chunks(piece) {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut out = Vec::new();
        framing.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        (out, refusal.get().cloned())
    }

    const PIPELINED: &[u8] = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\ntrailer: t\r\n\r\nGET /c HTTP/1.1\r\n\r\n";

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged_in_any_pieces() {
        for piece in [1, 2, 3, 7, 64, 4096] {
            let (out, refusal) = through(PIPELINED, piece, 1024).await;
            assert_eq!(out, PIPELINED, "pieces of {piece}");
            assert_eq!(refusal, None);
        }
    }

    #[tokio::test]
    async fn both_lengths_are_refused_before_the_head_ends() {
        for (input, cut) in [
            (
                &b"POST /a HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"[..],
                "transfer-encoding: chunked",
            ),
            (
                b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\nabcd",
                "Content-Length: 4",
            ),
        ] {
            for piece in [1, 5, 4096] {
                let (out, refusal) = through(input, piece, 1024).await;
                // Hyper gets at most the head without its last line end, then NUL.
                let head_end = String::from_utf8_lossy(input).find(cut).unwrap() + cut.len();
                let given = out.strip_suffix(POISON).expect("poisoned");
                assert!(given.len() <= head_end && input.starts_with(given), "{out:?}");
                assert_eq!(refusal, Some(Refusal::LengthAndChunked));
            }
        }
    }

    #[tokio::test]
    async fn a_later_pipelined_request_is_refused_after_the_earlier_pass() {
        let mut input = PIPELINED.to_vec();
        input.extend_from_slice(b"GET /d HTTP/1.1\r\nx: ");
        input.extend(std::iter::repeat_n(b'a', 2000));
        input.extend_from_slice(b"\r\n\r\n");
        for piece in [1, 100, 4096] {
            let (out, refusal) = through(&input, piece, 1024).await;
            assert!(out.starts_with(PIPELINED), "pieces of {piece}");
            assert!(out.ends_with(POISON));
            assert!(
                out.len() <= PIPELINED.len() + 1024 + POISON.len(),
                "{}",
                out.len()
            );
            assert_eq!(refusal, Some(Refusal::HeadTooLarge { limit: 1024 }));
        }
    }

    #[tokio::test]
    async fn too_many_header_fields_are_refused() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            input.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        let (out, refusal) = through(&input, 4096, 60 * 1024).await;
        assert!(out.ends_with(POISON));
        assert_eq!(refusal, Some(Refusal::TooManyHeaders));
    }

    #[tokio::test]
    async fn what_is_not_followed_passes_through() {
        let cases: [&[u8]; 4] = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
            b"GET /ws HTTP/1.1\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nraw\r\n\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\nhost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
        ];
        for input in cases {
            for piece in [1, 4096] {
                let (out, refusal) = through(input, piece, 1024).await;
                assert_eq!(out, input, "{:?}", String::from_utf8_lossy(input));
                assert_eq!(refusal, None);
            }
        }
    }
}
