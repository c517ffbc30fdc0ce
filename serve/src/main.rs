//! `ggpt-serve`: the same server as `ggpt serve`, as its own binary.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "ggpt-serve", version, about)]
struct Cli {
    #[command(flatten)]
    args: ggpt_serve::args::ServeArgs,
}

/// `ggpt-serve --probe http://127.0.0.1:8080/health`: exit 0 if the URL answers 200 within
/// 3 s, 1 otherwise (a container health check without curl).
fn probe(url: &str) -> i32 {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("--probe takes an http:// URL");
        return 2;
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let t = Duration::from_secs(3);
    let ok = (|| -> std::io::Result<bool> {
        let addr = host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    })();
    match ok {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("probe {url}: {e}");
            1
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 3 && argv[1] == "--probe" {
        std::process::exit(probe(&argv[2]));
    }
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
        std::process::exit(e.exit_code());
    }
}
