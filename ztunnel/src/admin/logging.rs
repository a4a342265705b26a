//! The log filter, changeable at run time through `/logging`.

use std::io::{BufWriter, IsTerminal};
use std::sync::Arc;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log filter {filter:?} is invalid: {source}")]
    BadFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot change the log filter: {0}")]
    Reload(#[from] reload::Error),
    #[error("cannot install the logger: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

fn parse(filter: &str) -> Result<EnvFilter, Error> {
    EnvFilter::try_new(filter).map_err(|source| Error::BadFilter {
        filter: filter.to_string(),
        source,
    })
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level (access-log events carry Istio's field names).
    Json,
}

/// Lines waiting for the writer thread at most; a logging task waits beyond it, so no
/// line (an access-log event above all) is ever dropped.
const QUEUED_LINES: usize = 16 * 1024;

/// Bytes gathered into one write while lines keep arriving.
const WRITE_BUFFER: usize = 64 * 1024;

/// A handle on the process's log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The writer thread of [`LogControl::init`]: dropping the last handle writes what
    /// is queued and stops it.
    _writer: Option<Arc<WorkerGuard>>,
}

/// Stderr written by a thread of its own: a task that logs (one access-log event per
/// HTTP request) formats its line and queues it, and never waits on a write system call.
/// Lines arriving together leave in one write; a line alone is written at once.
fn stderr_writer() -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("ztunnel-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()))
}

impl LogControl {
    /// A reloadable filter layer (the first layer on a [`Registry`]) and its handle.
    pub fn layer(filter: &str) -> Result<(reload::Layer<EnvFilter, Registry>, LogControl), Error> {
        let (layer, handle) = reload::Layer::new(parse(filter)?);
        Ok((
            layer,
            LogControl {
                handle,
                _writer: None,
            },
        ))
    }

    /// Installs the process-wide logger: `filter` (tracing `EnvFilter` syntax, e.g.
    /// `info,ztunnel::policy=debug`) in front of a formatter on stderr in `format`. Keep
    /// the returned handle (or a clone) until the process ends: the last one dropped
    /// writes the lines still queued.
    pub fn init(filter: &str, format: LogFormat) -> Result<LogControl, Error> {
        let (layer, handle) = reload::Layer::new(parse(filter)?);
        let (writer, guard) = stderr_writer();
        let (text, json) = match format {
            LogFormat::Text => (
                Some(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(std::io::stderr().is_terminal())
                        .with_writer(writer),
                ),
                None,
            ),
            LogFormat::Json => (
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_writer(writer),
                ),
            ),
        };
        tracing_subscriber::registry()
            .with(layer)
            .with(text)
            .with(json)
            .try_init()?;
        Ok(LogControl {
            handle,
            _writer: Some(Arc::new(guard)),
        })
    }

    /// The filter in force.
    pub fn current(&self) -> Result<String, Error> {
        Ok(self.handle.with_current(ToString::to_string)?)
    }

    /// Replaces the filter.
    pub fn set(&self, filter: &str) -> Result<(), Error> {
        let new = parse(filter)?;
        self.handle.reload(new)?;
        Ok(())
    }
}
