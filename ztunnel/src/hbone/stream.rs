//! One established CONNECT stream: the two directions of HTTP/2 DATA frames.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::client::StreamLoad;

/// An established HBONE stream. The byte copy sends with `send` (respecting flow
/// control) and receives with `recv` (releasing capacity as bytes are delivered).
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// The HBONE peer (the other end of the HTTP/2 connection).
    pub peer: SocketAddr,
    load: Option<StreamLoad>,
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        peer: SocketAddr,
        load: Option<StreamLoad>,
    ) -> Self {
        H2Stream {
            send,
            recv,
            peer,
            load,
        }
    }

    /// Splits the stream into its directions and the load guard that tells the pool
    /// how much this stream moves (dropped when the copy ends).
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Option<StreamLoad>) {
        (self.send, self.recv, self.load)
    }
}
