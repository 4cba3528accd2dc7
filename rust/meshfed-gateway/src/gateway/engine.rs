//! The data plane's tokio runtime: its threads, and how it stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

use super::GatewayError;

/// How long a stopping runtime waits for its tasks to wind down.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// The data plane's tokio runtime. With one worker it is a current-thread
/// runtime driven by one dedicated thread: the multi-thread scheduler's
/// work-stealing bookkeeping buys nothing with a single worker and costs
/// every wake-up (measured in `bench/README.md`).
pub(super) enum Engine {
    Multi(Runtime),
    Single {
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    },
}

fn thread_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("meshfed-gw-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Engine {
    pub(super) fn start(workers: usize) -> Result<(Self, Handle), GatewayError> {
        if workers > 1 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name_fn(thread_name)
                .enable_all()
                .build()
                .map_err(GatewayError::Runtime)?;
            let handle = runtime.handle().clone();
            return Ok((Self::Multi(runtime), handle));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name_fn(thread_name)
            .enable_all()
            .build()
            .map_err(GatewayError::Runtime)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(thread_name())
            .spawn(move || {
                // Either a stop or the sender dropped ends the run.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })
            .map_err(GatewayError::Runtime)?;
        Ok((Self::Single { stop, thread }, handle))
    }

    pub(super) fn stop(self) {
        let inside = Handle::try_current().is_ok();
        match self {
            Self::Multi(runtime) if inside => runtime.shutdown_background(),
            Self::Multi(runtime) => runtime.shutdown_timeout(SHUTDOWN_TIMEOUT),
            Self::Single { stop, thread } => {
                let _ = stop.send(());
                // Blocking inside a runtime (or on the runtime's own thread)
                // would stall it: the thread winds down on its own.
                if !inside && thread.thread().id() != std::thread::current().id() {
                    let _ = thread.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Engine;

    /// Both kinds of runtime run spawned I/O from the caller's thread and
    /// stop when asked, from outside and from one of their own tasks.
    #[test]
    fn runs_io_and_stops_from_outside_and_inside() {
        for workers in [1, 2] {
            let (engine, handle) = Engine::start(workers).expect("runtime");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let address = listener.local_addr().expect("address");
            let listener = {
                let _guard = handle.enter();
                tokio::net::TcpListener::from_std(listener).expect("adopt")
            };
            let accepted = handle.spawn(async move { listener.accept().await.map(|_| ()) });
            let _client = std::net::TcpStream::connect(address).expect("connect");
            let (done, result) = std::sync::mpsc::channel();
            handle.spawn(async move {
                let _ = done.send(accepted.await.map(|r| r.is_ok()));
            });
            let accepted = result.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(
                accepted.ok().and_then(Result::ok),
                Some(true),
                "{workers} workers"
            );
            engine.stop();

            let (engine, handle) = Engine::start(workers).expect("runtime");
            let (done, stopped) = std::sync::mpsc::channel();
            handle.spawn(async move {
                engine.stop();
                let _ = done.send(());
            });
            // A stop from inside must not wait for itself.
            stopped
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{workers} workers: stop from inside returned"));
        }
    }
}
