//! The log filter, changeable at run time through `/logging`.

use std::io::IsTerminal;

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

/// A handle on the process's log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// A reloadable filter layer (the first layer on a [`Registry`]) and its handle.
    pub fn layer(filter: &str) -> Result<(reload::Layer<EnvFilter, Registry>, LogControl), Error> {
        let (layer, handle) = reload::Layer::new(parse(filter)?);
        Ok((layer, LogControl { handle }))
    }

    /// Installs the process-wide logger: `filter` (tracing `EnvFilter` syntax, e.g.
    /// `info,ztunnel::policy=debug`) in front of a formatter on stderr in `format`.
    pub fn init(filter: &str, format: LogFormat) -> Result<LogControl, Error> {
        let (layer, control) = LogControl::layer(filter)?;
        let (text, json) = match format {
            LogFormat::Text => (
                Some(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(std::io::stderr().is_terminal())
                        .with_writer(std::io::stderr),
                ),
                None,
            ),
            LogFormat::Json => (
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_writer(std::io::stderr),
                ),
            ),
        };
        tracing_subscriber::registry()
            .with(layer)
            .with(text)
            .with(json)
            .try_init()?;
        Ok(control)
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
