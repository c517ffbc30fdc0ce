//! The `ggpt` command line: a thin layer over the library (`ggpt::cli::*`).

use clap::Parser;

fn main() {
    ggpt::cli::install_signal_handler();
    let cli = ggpt::cli::Cli::parse();
    if let Err(err) = ggpt::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(ggpt::cli::exit_code(&err));
    }
}
