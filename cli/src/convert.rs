//! `ggpt convert <hf_dir> --type f16|q8_0|q6_k|q5_k_m|q5_k_s|q4_k_m|all [-o DIR_or_FILE]`: a Hugging Face
//! GPT-2 checkpoint to GGUF, several types in one pass (see docs/convert.md).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Result;
use ggpt_convert::pipeline::{convert_hf, ConvertOptions, FileSummary, Progress};
use ggpt_convert::policy::FileType;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Write as _;

use super::common::{bail_flag, print_stdout};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer files).
    pub hf_dir: PathBuf,
    /// Output type: f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, a comma-separated list, or all
    /// (f16, q8_0, q6_k and q4_k_m in one pass).
    #[arg(long = "type", short = 't', default_value = "f16", value_parser = parse_types)]
    pub types: Types,
    /// Output directory (files named <model>-<TYPE>.gguf) or, for one type, a .gguf file.
    /// Default: the model directory.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// general.name and file-name stem (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Check the inputs and print what would be written (each tensor's type and size, each
    /// file's exact size) without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

/// The output types of one `--type` value (`all` stands for the four).
#[derive(Clone, Debug)]
pub struct Types(pub Vec<FileType>);

fn parse_types(s: &str) -> Result<Types, String> {
    FileType::parse_list(s)
        .map(Types)
        .map_err(|e| e.to_string())
}

pub fn run(args: Args) -> Result<()> {
    if let Some(name) = &args.name {
        // The name becomes part of a file name in the output directory.
        if name.is_empty() || name.contains(['/', '\\', '\0']) || name == "." || name == ".." {
            bail_flag!("--name {name:?}: must be a non-empty file-name stem without '/' or '\\'");
        }
    }
    let opts = ConvertOptions {
        hf_dir: args.hf_dir,
        types: args.types.0,
        output: args.output,
        name: args.name,
    };
    if args.dry_run {
        let files = ggpt_convert::pipeline::dry_run(&opts)?;
        return print_stdout(&format_dry_run(&files));
    }
    let progress = Bars::new();
    let report = convert_hf(&opts, &progress)?;
    print_summary(&report.files, report.seconds)
}

/// The `--dry-run` report: every output file with its exact size, then one row per tensor with
/// its type and data size in each file.
pub fn format_dry_run(files: &[ggpt_convert::pipeline::DryRun]) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut o = String::new();
    let _ = writeln!(o, "dry run: nothing is written");
    for f in files {
        let _ = writeln!(
            o,
            "would write {} ({} bytes, {:.2} MiB, {} tensors)",
            f.path.display(),
            f.file_bytes,
            mib(f.file_bytes),
            f.tensors.len()
        );
    }
    let _ = write!(o, "\n{:<28} {:<36} {:<14}", "tensor", "source", "dims");
    for f in files {
        let _ = write!(o, " {:>19}", format!("{} bytes", f.ftype.label()));
    }
    let _ = writeln!(o);
    let Some(first) = files.first() else {
        return o;
    };
    for (i, t) in first.tensors.iter().enumerate() {
        let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
        let _ = write!(
            o,
            "{:<28} {:<36} {:<14}",
            t.gguf_name,
            t.source,
            format!("[{}]", dims.join(", "))
        );
        for f in files {
            let x = &f.tensors[i];
            let _ = write!(o, " {:>6} {:>12}", x.ty.to_string(), x.bytes);
        }
        let _ = writeln!(o);
    }
    for f in files {
        for (name, wrote, d) in &f.differs {
            let llama = d
                .llama_cpp
                .map_or("nothing (it refuses the tensor)".to_string(), |t| {
                    t.to_string()
                });
            let _ = writeln!(
                o,
                "note: {}: {name}: would write {wrote} where llama-quantize writes {llama}",
                f.path.display()
            );
        }
    }
    o
}

/// Print the per-file table and any place where the output differs from llama.cpp's.
/// Formatting into a String cannot fail; only writing it to standard output can.
pub fn print_summary(files: &[FileSummary], seconds: f64) -> Result<()> {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<40} {:>7} {:>10} {:>6} {:>8}  types",
        "file", "tensors", "MiB", "bpw", "seconds"
    );
    for f in files {
        let types: Vec<String> = f
            .type_counts
            .iter()
            .map(|(t, n)| format!("{t}×{n}"))
            .collect();
        let _ = writeln!(
            o,
            "{:<40} {:>7} {:>10.2} {:>6.2} {:>8.2}  {}",
            f.path.display(),
            f.n_tensors,
            f.file_bytes as f64 / (1024.0 * 1024.0),
            f.bpw(),
            f.seconds,
            types.join(" ")
        );
    }
    let _ = writeln!(o, "total: {seconds:.2} s");
    print_stdout(&o)?;
    for f in files {
        for (name, wrote, d) in &f.differs {
            let llama = d
                .llama_cpp
                .map_or("nothing (it refuses the tensor)".to_string(), |t| {
                    t.to_string()
                });
            super::common::note!(
                "warning: {}: {name}: rows are not a whole number of {} blocks; wrote {wrote} where llama-quantize writes {llama}",
                f.path.display(),
                d.wanted,
            );
        }
    }
    Ok(())
}

/// indicatif bars: one per output file (bytes written) plus one for tensors. Drawn only when
/// stderr is a terminal.
pub struct Bars {
    multi: MultiProgress,
    tensors: ProgressBar,
    files: Mutex<Vec<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Bars {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let tensors = multi.add(ProgressBar::new(0));
        if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
        {
            tensors.set_style(style.progress_chars("=> "));
        }
        tensors.set_prefix("tensors");
        Bars {
            multi,
            tensors,
            files: Mutex::new(Vec::new()),
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bars {
    fn begin(&self, files: &[(PathBuf, u64)]) {
        let mut bars = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for (path, total) in files {
            let b = self.multi.add(ProgressBar::new(*total));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            let label = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            b.set_prefix(label);
            bars.push(b);
        }
    }

    fn tensor(&self, index: usize, count: usize, name: &str) {
        self.tensors.set_length(count as u64);
        self.tensors.set_position(index as u64);
        self.tensors.set_message(name.to_string());
    }

    fn wrote(&self, file: usize, bytes: u64) {
        let bars = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = bars.get(file) {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        self.tensors.finish_and_clear();
        for b in self.files.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            b.finish_and_clear();
        }
    }
}
