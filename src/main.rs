//! The `ggpt` command line: a thin layer over the library (`ggpt::cli::*`).

use clap::Parser;
use std::io::Write;

fn main() {
    ggpt::cli::install_signal_handler();
    let cli = ggpt::cli::Cli::parse();
    if let Err(err) = ggpt::cli::run(cli) {
        // Not eprintln!: it panics when stderr itself cannot be written (`2>/dev/full`); the
        // exit code still tells what happened.
        let _ = writeln!(std::io::stderr(), "error: {err:#}");
        std::process::exit(ggpt::cli::exit_code(&err));
    }
}
