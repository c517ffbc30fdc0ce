//! Small pieces shared by the subcommands: thread-pool set-up, reading text input, bounds on
//! user-supplied sizes.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// Upper bound for `-t`: far above any real machine, far below what would exhaust the OS.
pub const MAX_THREADS: usize = 1024;

/// Size rayon's global pool (once per process). `None` = one thread per core.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            bail!("--threads {t} is more than the maximum of {MAX_THREADS}")
        }
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // A second call (e.g. from tests) keeps the first pool; that is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(rayon::current_num_threads())
}

/// Read a text argument: `-` means standard input, otherwise the text itself.
pub fn text_arg(text: &str) -> Result<String> {
    if text == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        String::from_utf8(buf).context("standard input is not valid UTF-8")
    } else {
        Ok(text.to_string())
    }
}

/// Read a whole text file as UTF-8, naming the file in every error.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}
