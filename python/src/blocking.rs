//! Long Rust calls without the GIL, interruptible by Ctrl-C.
//!
//! Python runs signal handlers only on its main thread, and only when that thread holds the
//! GIL. So the work runs on a helper thread (inside the model's thread pool, if it has one)
//! while the calling thread waits with the GIL released, waking every [`SIGNAL_CHECK`] to run
//! the handlers. On `KeyboardInterrupt` it sets the call's cancel flag, which the work checks
//! between tokens (generation) or windows (perplexity), waits for the work to stop, and
//! raises. Other Python threads run freely meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::{catch, to_py, Cancelled};

/// How often a waiting call looks for Ctrl-C.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// The cancel flag of one call.
#[derive(Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once the call has been cancelled.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }

    /// For callbacks that cannot return an error: unwind out of the library call
    /// (caught by [`run`], which has the `KeyboardInterrupt` to raise).
    pub fn unwind_if_set(&self) {
        if self.is_set() {
            std::panic::resume_unwind(Box::new(Cancelled));
        }
    }
}

/// Run `work` on a helper thread inside `pool` (rayon's global pool if `None`) and wait for
/// it with the GIL released; see the module docs.
pub fn run<T: Send>(
    py: Python<'_>,
    pool: Option<&rayon::ThreadPool>,
    work: impl FnOnce(&Cancel) -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    let cancel = Cancel::default();
    let (tx, rx) = channel();
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let cancel = &cancel;
        let spawned = std::thread::Builder::new()
            .name("ggpt-call".into())
            .spawn_scoped(scope, move || {
                let r = catch(|| match pool {
                    Some(p) => p.install(|| work(cancel)),
                    None => work(cancel),
                });
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            return Err(PyRuntimeError::new_err(format!(
                "cannot start a thread: {e}"
            )));
        }
        let mut interrupt: Option<PyErr> = None;
        loop {
            let got = py.detach(|| {
                rx.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv_timeout(SIGNAL_CHECK)
            });
            match got {
                Ok(r) => {
                    return match interrupt {
                        Some(e) => Err(e),
                        None => r.map_err(to_py),
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if interrupt.is_none() {
                        if let Err(e) = py.check_signals() {
                            cancel.0.store(true, Ordering::Relaxed);
                            interrupt = Some(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PyRuntimeError::new_err(
                        "internal error in ggpt: a worker thread ended without a result",
                    ))
                }
            }
        }
    })
}
