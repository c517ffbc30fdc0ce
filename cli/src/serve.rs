//! `ggpt serve`: the OpenAI-compatible server of the `ggpt-serve` crate (docs/serving.md).
//! This file only parses the flags; the server is `ggpt_serve::args::serve_blocking`.

use anyhow::Result;

use super::common::{flag_error, init_threads};

pub use ggpt_serve::args::ServeArgs as Args;

pub fn run(args: Args) -> Result<()> {
    let config = args.config().map_err(flag_error)?;
    init_threads(args.threads)?;
    ggpt_serve::args::serve_blocking(config)?;
    Ok(())
}
