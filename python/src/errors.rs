//! Rust errors as Python exceptions, and the boundary that keeps panics out of Python.
//!
//! The mapping follows the command line's exit codes (docs/errors.md): a bad or unsupported
//! model file is `ggpt.GgufError` (a `ValueError`), a missing file `FileNotFoundError`, a bad
//! argument `ValueError`, an unwritable output `OSError`, anything else `RuntimeError`. The
//! message is the CLI's: the whole error chain, naming the file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ggpt::convert::hf::InputError;
use ggpt::convert::pipeline::OutputError;
use ggpt::model::{LoadError, NonFiniteWeights, RunError};
use ggpt::perplexity::MethodError;
use ggpt::sampler::ConfigError;
use ggpt::tokenizer::TokenizerError;
use ggpt_gguf::GgufError as RustGgufError;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _ggpt,
    GgufError,
    PyValueError,
    "A GGUF file that cannot be used: not GGUF, truncated, malformed, not GPT-2, a bad \
     tokenizer, or NaN/infinite weights. The message names the file."
);

/// A bad argument, as the CLI's `FlagError`: becomes `ValueError`.
#[derive(Debug)]
pub struct BadArg(pub String);

impl std::fmt::Display for BadArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadArg {}

/// `Err(BadArg(format!(...)))` as an `anyhow::Error`.
macro_rules! bad_arg {
    ($($t:tt)*) => {
        return Err(anyhow::Error::from($crate::errors::BadArg(format!($($t)*))))
    };
}
pub(crate) use bad_arg;

/// The Python exception for an error from the library.
pub fn to_py(e: anyhow::Error) -> PyErr {
    let e = match e.downcast::<PyErr>() {
        Ok(py) => return py,
        Err(e) => e,
    };
    let msg = format!("{e:#}");
    for cause in e.chain() {
        // `ggpt::Error` wraps the error of the layer that found the problem: sort by that.
        let cause = ggpt::Error::unwrap_ref(cause);
        let cause = ggpt::convert::ConvertError::unwrap_ref(cause);
        if let Some(RustGgufError::Io { error, .. }) = cause.downcast_ref::<RustGgufError>() {
            if error.kind() == std::io::ErrorKind::NotFound {
                return PyFileNotFoundError::new_err(msg);
            }
        }
        if cause.is::<RustGgufError>()
            || cause.is::<LoadError>()
            || cause.is::<TokenizerError>()
            || cause.is::<NonFiniteWeights>()
        {
            return GgufError::new_err(msg);
        }
        if let Some(i) = cause.downcast_ref::<InputError>() {
            if !i.path.exists() {
                return PyFileNotFoundError::new_err(msg);
            }
            return PyValueError::new_err(msg);
        }
        if cause.is::<OutputError>() {
            return PyOSError::new_err(msg);
        }
        if cause.is::<BadArg>()
            || cause.is::<RunError>()
            || cause.is::<MethodError>()
            || cause.is::<ConfigError>()
        {
            return PyValueError::new_err(msg);
        }
    }
    PyRuntimeError::new_err(msg)
}

/// `FileNotFoundError` for a path that does not exist (Python's own message format).
pub fn require_exists(path: &Path) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err((
            2,
            "No such file or directory",
            path.display().to_string(),
        )))
    }
}

/// A panic inside the library, as an error (`RuntimeError` in Python).
#[derive(Debug)]
pub struct Panic(pub String);

impl std::fmt::Display for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal error in ggpt (please report it): {}", self.0)
    }
}

impl std::error::Error for Panic {}

/// The call was cancelled (Ctrl-C, or a stream's reader went away). Code that cannot return
/// an error where it notices (a progress callback) unwinds with
/// `std::panic::resume_unwind(Box::new(Cancelled))`, which skips the panic hook; [`catch`]
/// turns that back into this error.
#[derive(Debug, Clone, Copy)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Run `f`, turning a panic into a [`Panic`] error (or [`Cancelled`], see there).
pub fn catch<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            if payload.is::<Cancelled>() {
                return Err(Cancelled.into());
            }
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Panic(what).into())
        }
    }
}

/// [`catch`], with the error as a Python exception: no panic reaches Python as
/// `pyo3_runtime.PanicException` (a `BaseException` that `except Exception` misses).
pub fn guard<T>(f: impl FnOnce() -> anyhow::Result<T>) -> PyResult<T> {
    catch(f).map_err(to_py)
}
