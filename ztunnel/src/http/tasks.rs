//! The futures a client connection needs besides its own, run inside the connection's
//! task instead of spawned: hyper's HTTP/2 stream handlers and the upstream connections
//! to the application. A request then crosses no task boundary between the client's
//! connection and the application's socket, which saves a wakeup of another worker
//! thread at each crossing (BENCHMARKS.md, "HTTP requests decided by the server
//! tunnel", has what it moved).

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Hands futures to the connection's [`Tasks`]; hyper's executor for HTTP/2.
#[derive(Clone)]
pub(super) struct Spawner(mpsc::UnboundedSender<Task>);

impl Spawner {
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // Refused only once the connection's task has ended: nothing is left to serve.
        let _ = self.0.send(Box::pin(task));
    }
}

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn(future);
    }
}

/// The futures handed over by the [`Spawner`]s, dropped with it when the connection ends.
pub(super) struct Tasks {
    new: mpsc::UnboundedReceiver<Task>,
    running: FuturesUnordered<Task>,
}

impl Tasks {
    pub(super) fn new() -> (Spawner, Tasks) {
        let (sender, new) = mpsc::unbounded_channel();
        let tasks = Tasks {
            new,
            running: FuturesUnordered::new(),
        };
        (Spawner(sender), tasks)
    }

    /// Runs the tasks; pending for ever, to be polled beside the connection.
    pub(super) async fn run(&mut self) -> Infallible {
        poll_fn(|cx| {
            loop {
                while let Poll::Ready(Some(task)) = self.new.poll_recv(cx) {
                    self.running.push(task);
                }
                match self.running.poll_next_unpin(cx) {
                    // One ended: others may be ready, or new ones handed over meanwhile.
                    Poll::Ready(Some(())) => continue,
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}
