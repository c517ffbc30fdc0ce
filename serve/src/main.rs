//! `ggpt-serve`: the same server as `ggpt serve`, as its own binary.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "ggpt-serve", version, about)]
struct Cli {
    #[command(flatten)]
    args: ggpt_serve::args::ServeArgs,
}

fn main() {
    let cli = Cli::parse();
    let config = match cli.args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(t) = cli.args.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(2);
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    if let Err(e) = ggpt_serve::args::serve_blocking(config) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
