//! The eBPF programs' log records (aya-log) delivered as `tracing` events.

use std::os::fd::{AsFd, OwnedFd};

use aya::Ebpf;
use aya_log::EbpfLogger;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Error;

/// Reads the programs' log ring on a thread of its own until dropped.
pub(super) struct LogForwarder {
    /// Closing it wakes the thread up to stop.
    _stop: OwnedFd,
}

/// Starts a thread that reads the programs' log ring and emits each record as a
/// `tracing` event (target = the program's module path).
pub(super) fn forward(ebpf: &mut Ebpf) -> Result<LogForwarder, Error> {
    let mut logger = EbpfLogger::init_with_logger(ebpf, ToTracing)
        .map_err(|err| Error::Logs(err.to_string()))?;
    let (stopped, stop) = nix::unistd::pipe().map_err(|err| Error::Logs(err.to_string()))?;
    std::thread::Builder::new()
        .name("ebpf-logs".into())
        .spawn(move || {
            loop {
                let mut fds = [
                    PollFd::new(logger.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "eBPF log ring unreadable, no more eBPF logs");
                        return;
                    }
                }
                let stop = fds[1].any().unwrap_or(true);
                logger.flush();
                if stop {
                    return;
                }
            }
        })
        .map_err(|err| Error::Logs(err.to_string()))?;
    Ok(LogForwarder { _stop: stop })
}

/// A `log` sink that re-emits records as `tracing` events.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // Fails only when no tracing subscriber takes the event: nothing to do then.
        let _ = tracing_log::format_trace(record);
    }

    fn flush(&self) {}
}
