//! The data plane's `tracing` events in Python's `logging`, on the logger
//! [`LOGGER`], with their fields rendered into the message
//! (`endpoint ejected after 5 consecutive connect failures cluster=web
//! endpoint=10.0.0.5:8080 ejection_ms=30012`), so `meshfed up`'s log shows
//! accept errors, ejections and health changes as its own lines.
//!
//! Cheap where it matters:
//! - An event at a level the logger does not want costs what a disabled
//!   `tracing` event costs with any subscriber, one relaxed load and a
//!   compare: the logger's effective level is read from Python when the
//!   bridge is installed and each time [`install`] runs again (every
//!   gateway start), never per event, and is handed to `tracing` as its max
//!   level and callsite interest.
//! - An enabled event is rendered on the data-plane thread and queued to
//!   one thread that takes the GIL to log it: a thread moving bytes never
//!   waits for the GIL (Python may hold it for a long time). The queue is
//!   bounded; when Python falls behind, records are dropped and counted,
//!   and the count is logged with the next record that gets through.
//!
//! Installed once per process (the first [`install`]); if the embedding
//! process has its own global `tracing` subscriber already, that one keeps
//! the events and this bridge stays out of the way.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// The Python logger the data plane's events go to.
pub(crate) const LOGGER: &str = "meshfed.gateway.data_plane";
/// Records waiting for the GIL at most; beyond, they are dropped and counted.
const QUEUE_LEN: usize = 1024;

/// The most verbose level the logger wants, as a [`rank`] (0: nothing).
static MAX_RANK: AtomicU8 = AtomicU8::new(0);
/// Records dropped because the queue was full, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The queue to the logging thread; set by the first [`install`].
static QUEUE: OnceLock<SyncSender<Record>> = OnceLock::new();

/// One rendered event, for `logger.log(level, message)`.
struct Record {
    level: u8,
    message: String,
}

/// Installs the bridge (the first call in the process) and reads the
/// logger's effective level again (every call); call it after changing
/// Python's logging configuration for the change to reach the data plane.
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let logger = py.import("logging")?.call_method1("getLogger", (LOGGER,))?;
    let level: i64 = logger.call_method0("getEffectiveLevel")?.extract()?;
    let rank = rank_of_python(level);
    let changed = MAX_RANK.swap(rank, Ordering::Relaxed) != rank;
    let mut first = false;
    if QUEUE.get().is_none() {
        let (sender, receiver) = mpsc::sync_channel(QUEUE_LEN);
        let logger = logger.unbind();
        std::thread::Builder::new()
            .name("meshfed-log".to_owned())
            .spawn(move || forward(&receiver, &logger))
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "cannot start the thread that logs the data plane's events: {e}"
                ))
            })?;
        first = QUEUE.set(sender).is_ok();
    }
    if first {
        // Fails only if the process has a global subscriber already; then
        // the events go there, as its owner wants.
        let subscriber = tracing_subscriber::registry().with(PythonLogging);
        let _ = tracing::subscriber::set_global_default(subscriber);
    } else if changed {
        // Callsites cached their interest under the old level.
        tracing::callsite::rebuild_interest_cache();
    }
    Ok(())
}

/// The logging thread: logs each record under the GIL, until the process
/// ends (or the interpreter does: then records are dropped).
fn forward(receiver: &Receiver<Record>, logger: &Py<PyAny>) {
    while let Ok(record) = receiver.recv() {
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        // None once the interpreter is finalizing: nothing left to log to.
        let _ = Python::try_attach(|py| {
            let logger = logger.bind(py);
            if dropped > 0 {
                let note = format!(
                    "{dropped} data-plane log records dropped: Python's logging did not keep up \
                     (is a handler blocking?)"
                );
                // A failing handler is logging's own business (it reports
                // through Handler.handleError); there is no caller to raise to.
                let _ = logger.call_method1("log", (30, note));
            }
            let _ = logger.call_method1("log", (record.level, record.message));
        });
    }
}

/// The `tracing` layer: filters by [`MAX_RANK`], renders, queues.
struct PythonLogging;

impl<S: Subscriber> Layer<S> for PythonLogging {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if wanted(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        wanted(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match MAX_RANK.load(Ordering::Relaxed) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let Some(queue) = QUEUE.get() else {
            return;
        };
        let mut render = Render::default();
        event.record(&mut render);
        let record = Record {
            level: python_level(*event.metadata().level()),
            message: render.finish(),
        };
        if let Err(TrySendError::Full(_)) = queue.try_send(record) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether an event reaches Python at the current level. The libraries
/// under the data plane (hyper, h2, rustls) log every frame and record at
/// debug: theirs reach Python at info and above only.
fn wanted(metadata: &Metadata<'_>) -> bool {
    let max = MAX_RANK.load(Ordering::Relaxed);
    let max = if metadata.target().starts_with("meshfed") {
        max
    } else {
        max.min(rank(Level::INFO))
    };
    rank(*metadata.level()) <= max
}

/// 1 (error) to 5 (trace): the larger, the more verbose.
fn rank(level: Level) -> u8 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// The most verbose rank a Python logger at `level` lets through
/// (`logging.DEBUG` is 10, `INFO` 20, `WARNING` 30, `ERROR` 40; trace
/// events log at 5).
fn rank_of_python(level: i64) -> u8 {
    match level {
        ..=5 => 5,
        6..=10 => 4,
        11..=20 => 3,
        21..=30 => 2,
        31..=40 => 1,
        _ => 0,
    }
}

fn python_level(level: Level) -> u8 {
    match level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// An event as one line: its message, then ` name=value` per field, a
/// value quoted when it holds a space (an error message) or is empty.
#[derive(Default)]
struct Render {
    message: String,
    fields: String,
}

impl Render {
    fn field(&mut self, name: &str, value: &str) {
        if name == "message" {
            self.message.push_str(value);
        } else if value.is_empty() || value.contains(char::is_whitespace) || value.contains('"') {
            let _ = write!(self.fields, " {name}={value:?}");
        } else {
            let _ = write!(self.fields, " {name}={value}");
        }
    }

    fn finish(mut self) -> String {
        self.message.push_str(&self.fields);
        self.message
    }
}

impl Visit for Render {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields and the message arrive here, printing as Display.
        let value = format!("{value:?}");
        self.field(field.name(), &value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_levels_map_to_the_most_verbose_level_they_let_through() {
        assert_eq!(rank_of_python(0), rank(Level::TRACE));
        assert_eq!(rank_of_python(10), rank(Level::DEBUG));
        assert_eq!(rank_of_python(20), rank(Level::INFO));
        assert_eq!(rank_of_python(30), rank(Level::WARN));
        assert_eq!(rank_of_python(40), rank(Level::ERROR));
        assert_eq!(rank_of_python(50), 0);
        for level in [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG] {
            assert_eq!(rank_of_python(i64::from(python_level(level))), rank(level));
        }
    }

    #[test]
    fn fields_follow_the_message_and_spaces_are_quoted() {
        let mut render = Render::default();
        render.field("cluster", "web");
        render.field("message", "accept failed");
        render.field("error", "Too many open files (os error 24)");
        render.field("sni", "");
        assert_eq!(
            render.finish(),
            r#"accept failed cluster=web error="Too many open files (os error 24)" sni="""#
        );
    }
}
