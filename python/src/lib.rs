//! `ggpt._ggpt`: the Rust half of the `ggpt` Python package (the pure-Python half in
//! python/ggpt adds `pipeline` and re-exports everything). Every call goes through the `ggpt`
//! library crate, the same code the command line runs.

mod blocking;
mod errors;
mod model;
mod seed;
mod tools;

use pyo3::prelude::*;

/// Seed the generator that `Model.generate`/`stream` calls without `seed=` draw from.
#[pyfunction]
fn set_seed(seed: u64) {
    seed::set_seed(seed);
}

#[pymodule]
fn _ggpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::Model>()?;
    m.add_class::<model::TextStream>()?;
    m.add_function(wrap_pyfunction!(set_seed, m)?)?;
    m.add_function(wrap_pyfunction!(tools::convert, m)?)?;
    m.add_function(wrap_pyfunction!(tools::quantize, m)?)?;
    m.add_function(wrap_pyfunction!(tools::compare, m)?)?;
    m.add("GgufError", m.py().get_type::<errors::GgufError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
