//! What stands at an output path survives every writer (docs/errors.md, "Output paths"):
//! each command that writes a file (`convert`, `quantize`, `features --npy`, `dump`, `synth`,
//! `compare`) is pointed at a new path, an existing file, a symbolic link, a FIFO, private
//! copies of /dev/null and /dev/full, a directory, a socket and a dangling link, and the node
//! type, contents, permission bits and exit code are checked afterwards. Plus the usage errors
//! about output paths (exit 2) and the messages for input paths that are not regular files.
//!
//! Device nodes are made with `mknod` under a private temporary directory, never in /dev; where
//! that is not allowed (not root) those cases are skipped with a printed reason.

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use common::{run_ggpt, scratch, tiny_hf, tiny_model, Outcome};

/// What stands at a path (not following a final symbolic link).
#[derive(Debug, PartialEq)]
enum Node {
    Missing,
    /// Contents and permission bits.
    File(Vec<u8>, u32),
    Dir,
    Fifo,
    /// Device number (major, minor).
    Char(u64),
    Socket,
    Link(PathBuf),
}

fn node(p: &Path) -> Node {
    let Ok(m) = fs::symlink_metadata(p) else {
        return Node::Missing;
    };
    let ft = m.file_type();
    if ft.is_symlink() {
        Node::Link(fs::read_link(p).unwrap())
    } else if ft.is_file() {
        Node::File(fs::read(p).unwrap(), m.permissions().mode() & 0o7777)
    } else if ft.is_dir() {
        Node::Dir
    } else if ft.is_fifo() {
        Node::Fifo
    } else if ft.is_char_device() {
        Node::Char(m.rdev())
    } else if ft.is_socket() {
        Node::Socket
    } else {
        panic!("{}: unexpected node type", p.display())
    }
}

/// Short form of a node for messages (file contents can be megabytes).
fn show(n: &Node) -> String {
    match n {
        Node::File(b, m) => format!("File({} bytes, mode {m:o})", b.len()),
        other => format!("{other:?}"),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mkfifo(p: &Path) {
    let s = Command::new("mkfifo").arg(p).status().expect("run mkfifo");
    assert!(s.success(), "mkfifo {}", p.display());
}

/// Whether device nodes can be made here (root with CAP_MKNOD); prints why not, once.
fn can_mknod() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let dir = scratch("outputs-mknod-probe");
        let p = dir.join("probe");
        let out = Command::new("mknod")
            .args(["-m", "666"])
            .arg(&p)
            .args(["c", "1", "3"])
            .output();
        let ok = matches!(&out, Ok(o) if o.status.success());
        if !ok {
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            println!(
                "skipping the character-device cases (private copies of /dev/null and /dev/full): \
                 mknod failed ({why}); they need root"
            );
        }
        let _ = fs::remove_dir_all(&dir);
        ok
    })
}

/// A private character device `major,minor` at `p` (1,3 behaves as /dev/null, 1,7 as
/// /dev/full).
fn mknod_char(p: &Path, minor: u32) {
    let s = Command::new("mknod")
        .args(["-m", "666"])
        .arg(p)
        .args(["c", "1", &minor.to_string()])
        .status()
        .expect("run mknod");
    assert!(s.success(), "mknod {}", p.display());
}

/// Reads a FIFO to its end on a thread. `finish` returns what arrived, unblocking the reader
/// first if the writer never opened the FIFO.
struct FifoReader {
    path: PathBuf,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl FifoReader {
    fn start(path: &Path) -> FifoReader {
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut f = fs::File::open(&p).expect("open FIFO for reading");
            f.read_to_end(&mut buf).expect("read FIFO");
            let _ = tx.send(buf);
        });
        FifoReader {
            path: path.to_path_buf(),
            rx,
        }
    }

    fn finish(self) -> Vec<u8> {
        if let Ok(b) = self.rx.recv_timeout(Duration::from_secs(10)) {
            return b;
        }
        // The writer never opened it: the reader still waits in open(). A writer that opens
        // and closes at once lets it see end of file.
        drop(fs::OpenOptions::new().write(true).open(&self.path));
        self.rx
            .recv_timeout(Duration::from_secs(10))
            .expect("FIFO reader finished")
    }
}

fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

fn args(list: &[&dyn AsRefOs]) -> Vec<OsString> {
    list.iter().map(|a| a.os()).collect()
}

trait AsRefOs {
    fn os(&self) -> OsString;
}
impl AsRefOs for &str {
    fn os(&self) -> OsString {
        OsString::from(self)
    }
}
impl AsRefOs for PathBuf {
    fn os(&self) -> OsString {
        os(self)
    }
}

/// One command that writes a file, pointed at `dest` inside a case directory.
struct Writer {
    name: &'static str,
    /// The destination's file name inside the case directory.
    file: &'static str,
    /// Other files a successful run writes into the case directory.
    others: &'static [&'static str],
    /// The command line, given the case directory.
    cmd: fn(&Path) -> Vec<OsString>,
    /// Whether a directory at the destination is refused (`convert -o X.gguf` instead writes
    /// into a directory of that name, as documented).
    refuses_dir: bool,
}

fn writers() -> Vec<Writer> {
    vec![
        Writer {
            name: "convert -o DIR",
            file: "t-Q8_0.gguf",
            others: &[],
            cmd: |d| {
                let hf = tiny_hf();
                args(&[
                    &"convert",
                    &hf,
                    &"--type",
                    &"q8_0",
                    &"--name",
                    &"t",
                    &"-o",
                    &d.to_path_buf(),
                ])
            },
            refuses_dir: true,
        },
        Writer {
            name: "convert -o FILE.gguf",
            file: "x.gguf",
            others: &[],
            cmd: |d| {
                let hf = tiny_hf();
                args(&[
                    &"convert",
                    &hf,
                    &"--type",
                    &"q6_k",
                    &"-o",
                    &d.join("x.gguf"),
                ])
            },
            refuses_dir: false,
        },
        Writer {
            name: "quantize",
            file: "q.gguf",
            others: &[],
            cmd: |d| {
                let f16 = tiny_model("F16");
                args(&[&"quantize", &f16, &d.join("q.gguf"), &"--type", &"q4_k_m"])
            },
            refuses_dir: true,
        },
        Writer {
            name: "features --npy",
            file: "h.npy",
            others: &[],
            cmd: |d| {
                let m = tiny_model("Q8_0");
                args(&[
                    &"features",
                    &"-m",
                    &m,
                    &"Hello, world",
                    &"-t",
                    &"1",
                    &"--npy",
                    &d.join("h.npy"),
                ])
            },
            refuses_dir: true,
        },
        Writer {
            name: "dump",
            file: "output_norm.weight.npy",
            others: &[],
            cmd: |d| {
                let m = tiny_model("Q8_0");
                args(&[
                    &"dump",
                    &m,
                    &d.to_path_buf(),
                    &"--tensor",
                    &"output_norm.weight",
                ])
            },
            refuses_dir: true,
        },
        Writer {
            name: "synth",
            file: "config.json",
            others: &["merges.txt", "model.safetensors", "vocab.json"],
            cmd: |d| {
                let hf = tiny_hf();
                args(&[
                    &"synth",
                    &"--shape",
                    &"tiny",
                    &"--dtype",
                    &"bf16",
                    &"--seed",
                    &"7",
                    &"--vocab-from",
                    &hf,
                    &"-o",
                    &d.to_path_buf(),
                ])
            },
            refuses_dir: true,
        },
    ]
}

/// The checks of one case, collected instead of panicking so one run reports every failure.
struct Report {
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }

    fn expect_code(&mut self, o: &Outcome, code: i32, case: &str) {
        if let Some(p) = o.problem_if_not_orderly() {
            self.failures.push(format!("{case}: {p}\n{}", o.describe()));
        } else if o.code() != Some(code) {
            self.failures.push(format!(
                "{case}: exit code {:?}, expected {code}\n{}",
                o.code(),
                o.describe()
            ));
        }
    }

    fn expect_error(&mut self, o: &Outcome, code: i32, dest: &Path, says: &str, case: &str) {
        self.expect_code(o, code, case);
        let d = dest.to_str().unwrap();
        if let Some(p) = o.problem_if_not_clean_error(d) {
            self.failures.push(format!("{case}: {p}\n{}", o.describe()));
        }
        self.check(o.error_line().contains(says), || {
            format!("{case}: the error does not say {says:?}\n{}", o.describe())
        });
    }
}

/// A fresh case directory `NAME/c` and a sibling `NAME/elsewhere` for link targets.
fn case_dirs(root: &Path, name: &str) -> (PathBuf, PathBuf) {
    let c = root.join(name).join("c");
    let e = root.join(name).join("elsewhere");
    let _ = fs::remove_dir_all(root.join(name));
    fs::create_dir_all(&c).unwrap();
    fs::create_dir_all(&e).unwrap();
    (c, e)
}

fn run_writer(w: &Writer, dir: &Path) -> Outcome {
    run_ggpt(&(w.cmd)(dir))
}

/// Makes a node at a path.
type MakeNode = Box<dyn Fn(&Path)>;

fn exercise(w: &Writer, root: &Path, r: &mut Report) {
    let tag = |case: &str| format!("{}: {case}", w.name);
    let slug = w.name.replace([' ', '-', '.'], "_");

    // Reference: a path that does not exist yet.
    let (c, _) = case_dirs(root, &format!("{slug}-new"));
    let o = run_writer(w, &c);
    r.expect_code(&o, 0, &tag("new file"));
    let reference = match node(&c.join(w.file)) {
        Node::File(bytes, _) => bytes,
        n => panic!(
            "{}: the new output is {}\n{}",
            w.name,
            show(&n),
            o.describe()
        ),
    };
    assert!(!reference.is_empty(), "{}: empty output", w.name);
    let mut written: Vec<String> = w.others.iter().map(|s| s.to_string()).collect();
    written.push(w.file.to_string());
    written.sort();
    r.check(entries(&c) == written, || {
        format!("{}: left {:?}", tag("new file"), entries(&c))
    });

    // An existing file keeps its permission bits and gets the new contents.
    for mode in [0o640, 0o604] {
        let case = tag(&format!("existing file, mode {mode:o}"));
        let (c, _) = case_dirs(root, &format!("{slug}-mode{mode:o}"));
        let dest = c.join(w.file);
        fs::write(&dest, b"old").unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).unwrap();
        let o = run_writer(w, &c);
        r.expect_code(&o, 0, &case);
        let n = node(&dest);
        r.check(n == Node::File(reference.clone(), mode), || {
            format!(
                "{case}: now {}, expected the reference output with mode {mode:o}",
                show(&n)
            )
        });
        r.check(entries(&c) == written, || {
            format!("{case}: left {:?}", entries(&c))
        });
    }

    // A symbolic link (relative, into another directory) stays a link; its target is replaced.
    {
        let case = tag("symbolic link to a regular file");
        let (c, e) = case_dirs(root, &format!("{slug}-link"));
        let dest = c.join(w.file);
        let real = e.join("real");
        fs::write(&real, b"old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        symlink("../elsewhere/real", &dest).unwrap();
        let o = run_writer(w, &c);
        r.expect_code(&o, 0, &case);
        let n = node(&dest);
        r.check(n == Node::Link("../elsewhere/real".into()), || {
            format!("{case}: the link is now {}", show(&n))
        });
        let t = node(&real);
        r.check(t == Node::File(reference.clone(), 0o600), || {
            format!("{case}: the target is now {}", show(&t))
        });
        // No temporary left beside the target or the link.
        r.check(entries(&e) == ["real"], || {
            format!("{case}: left {:?}", entries(&e))
        });
        r.check(entries(&c) == written, || {
            format!("{case}: left {:?}", entries(&c))
        });
    }

    // A FIFO is written in place and its reader gets exactly the bytes of a regular file.
    {
        let case = tag("FIFO with a reader");
        let (c, _) = case_dirs(root, &format!("{slug}-fifo"));
        let dest = c.join(w.file);
        mkfifo(&dest);
        let reader = FifoReader::start(&dest);
        let o = run_writer(w, &c);
        let got = reader.finish();
        r.expect_code(&o, 0, &case);
        r.check(got == reference, || {
            format!(
                "{case}: the reader got {} bytes, not the {} bytes of the reference output",
                got.len(),
                reference.len()
            )
        });
        r.check(node(&dest) == Node::Fifo, || {
            format!("{case}: the FIFO is now {}", show(&node(&dest)))
        });
        r.check(entries(&c) == written, || {
            format!("{case}: left {:?}", entries(&c))
        });
    }

    // Private /dev/null and /dev/full: written in place, never replaced.
    if can_mknod() {
        for (minor, code) in [(3, 0), (7, 4)] {
            let case = tag(&format!("character device 1,{minor}"));
            let (c, _) = case_dirs(root, &format!("{slug}-char{minor}"));
            let dest = c.join(w.file);
            mknod_char(&dest, minor);
            let before = node(&dest);
            let o = run_writer(w, &c);
            if code == 0 {
                r.expect_code(&o, 0, &case);
                r.check(entries(&c) == written, || {
                    format!("{case}: left {:?}", entries(&c))
                });
            } else {
                r.expect_error(&o, code, &dest, "No space left on device", &case);
                r.check(entries(&c) == [w.file], || {
                    format!("{case}: left {:?}", entries(&c))
                });
            }
            let after = node(&dest);
            r.check(after == before && matches!(after, Node::Char(_)), || {
                format!("{case}: was {}, now {}", show(&before), show(&after))
            });
        }
    }

    // Refused with exit 2, naming the path and what it is; nothing changed.
    let mut refusals: Vec<(&str, MakeNode, &str)> = vec![
        (
            "socket",
            Box::new(|dest| {
                std::os::unix::net::UnixListener::bind(dest).unwrap();
            }),
            "is a socket",
        ),
        (
            "dangling symbolic link",
            Box::new(|dest| symlink("../elsewhere/none", dest).unwrap()),
            "is a dangling symbolic link",
        ),
        (
            "symbolic link loop",
            Box::new(|dest| {
                let other = dest.with_file_name("loop");
                symlink(dest.file_name().unwrap(), &other).unwrap();
                symlink("loop", dest).unwrap();
            }),
            "is a symbolic link loop",
        ),
    ];
    if w.refuses_dir {
        refusals.push((
            "directory",
            Box::new(|dest| {
                fs::create_dir(dest).unwrap();
                fs::write(dest.join("keep"), b"k").unwrap();
            }),
            "is a directory",
        ));
    }
    for (what, make, says) in refusals {
        let case = tag(what);
        let (c, e) = case_dirs(root, &format!("{slug}-{}", what.replace(' ', "_")));
        let dest = c.join(w.file);
        make(&dest);
        let before_c = entries(&c);
        let before = node(&dest);
        let o = run_writer(w, &c);
        r.expect_error(&o, 2, &dest, says, &case);
        let after = node(&dest);
        r.check(after == before, || {
            format!("{case}: was {}, now {}", show(&before), show(&after))
        });
        r.check(entries(&c) == before_c, || {
            format!("{case}: left {:?}", entries(&c))
        });
        r.check(entries(&e).is_empty(), || {
            format!("{case}: created {:?} elsewhere", entries(&e))
        });
        if what == "directory" {
            r.check(entries(&dest) == ["keep"], || {
                format!("{case}: the directory now holds {:?}", entries(&dest))
            });
        }
    }
}

#[test]
fn every_writer_keeps_what_stands_at_its_output_path() {
    let root = scratch("outputs");
    let mut r = Report {
        failures: Vec::new(),
    };
    let ws = writers();
    for w in &ws {
        exercise(w, &root, &mut r);
    }
    assert!(
        r.failures.is_empty(),
        "{} output-path checks failed:\n\n{}",
        r.failures.len(),
        r.failures.join("\n\n")
    );
    let _ = fs::remove_dir_all(&root);
}

/// `compare` writes four report files into its output directory: a FIFO, a link, a private
/// /dev/null and a file with its own mode there all survive, and the FIFO's reader gets the
/// report that is also printed.
#[test]
fn compare_reports_keep_what_stands_at_their_paths() {
    let root = scratch("outputs-compare");
    let out = root.join("out");
    let elsewhere = root.join("elsewhere");
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    // Reuse the converted models: compare converts only what is missing.
    for t in ["F16", "Q8_0", "Q6_K", "Q4_K_M"] {
        fs::hard_link(tiny_model(t), out.join(format!("tiny-gpt2-{t}.gguf"))).unwrap();
    }
    let md = out.join("report.md");
    mkfifo(&md);
    let real_json = elsewhere.join("report.json");
    fs::write(&real_json, b"old").unwrap();
    fs::set_permissions(&real_json, fs::Permissions::from_mode(0o600)).unwrap();
    symlink(&real_json, out.join("report.json")).unwrap();
    let ppl = out.join("ppl_vs_size.svg");
    let devices = can_mknod();
    if devices {
        mknod_char(&ppl, 3);
    }
    let kld = out.join("kld_vs_size.svg");
    fs::write(&kld, b"old").unwrap();
    fs::set_permissions(&kld, fs::Permissions::from_mode(0o640)).unwrap();

    let cmd = |out: &Path| {
        args(&[
            &"compare",
            &tiny_hf(),
            &"-o",
            &out.to_path_buf(),
            &"--ctx",
            &"64",
            &"--chunks",
            &"2",
            &"--bench-prompt",
            &"8",
            &"--bench-gen",
            &"4",
            &"--no-rss",
            &"-t",
            &"1",
        ])
    };
    let reader = FifoReader::start(&md);
    let o = run_ggpt(&cmd(&out));
    let got = reader.finish();
    assert!(o.success(), "{}", o.describe());
    assert_eq!(node(&md), Node::Fifo);
    // stdout is the report plus a newline.
    assert_eq!(
        String::from_utf8(got).unwrap(),
        o.stdout.strip_suffix('\n').unwrap()
    );
    assert!(o.stdout.contains("| Q4_K_M |"), "{}", o.describe());
    assert_eq!(
        node(&out.join("report.json")),
        Node::Link(real_json.clone())
    );
    match node(&real_json) {
        Node::File(b, mode) => {
            assert_eq!(mode, 0o600);
            let v: serde_json::Value = serde_json::from_slice(&b).expect("report.json is JSON");
            assert!(v.is_object(), "{v}");
        }
        n => panic!("report.json's target is now {}", show(&n)),
    }
    if devices {
        assert!(matches!(node(&ppl), Node::Char(_)), "{}", show(&node(&ppl)));
    }
    match node(&kld) {
        Node::File(b, mode) => {
            assert_eq!(mode, 0o640);
            assert!(b.starts_with(b"<svg"), "{}", String::from_utf8_lossy(&b));
        }
        n => panic!("kld_vs_size.svg is now {}", show(&n)),
    }
    assert_eq!(entries(&elsewhere), ["report.json"]);

    // /dev/full under a report's name: exit 4 naming it, the node unchanged.
    if devices {
        fs::remove_file(&md).unwrap();
        mknod_char(&md, 7);
        let before = node(&md);
        let o = run_ggpt(&cmd(&out));
        assert_eq!(o.code(), Some(4), "{}", o.describe());
        // Progress notes come first; the error is the last line.
        let last = o.stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains(md.to_str().unwrap()),
            "{}",
            o.describe()
        );
        assert_eq!(node(&md), before);
    }

    // An output "directory" that is a regular file or a FIFO: exit 2 before any work.
    for (what, make) in [
        (
            "a regular file",
            Box::new(|p: &Path| fs::write(p, b"x").unwrap()) as Box<dyn Fn(&Path)>,
        ),
        ("a FIFO (named pipe)", Box::new(|p: &Path| mkfifo(p))),
    ] {
        let p = root.join("not-a-dir");
        let _ = fs::remove_file(&p);
        make(&p);
        let before = node(&p);
        let o = run_ggpt(&cmd(&p));
        assert_eq!(o.code(), Some(2), "{}", o.describe());
        assert!(
            o.error_line().contains(&format!(
                "{}: cannot create the output directory: is {what}; give a directory",
                p.display()
            )),
            "{}",
            o.describe()
        );
        assert_eq!(node(&p), before);
    }
    let _ = fs::remove_dir_all(&root);
}

/// Output-path usage errors exit with 2 and say what the path is.
#[test]
fn output_path_usage_errors() {
    let root = scratch("outputs-usage");
    let hf = tiny_hf();
    let f16 = tiny_model("F16");
    let mut r = Report {
        failures: Vec::new(),
    };

    // One .gguf file for several types.
    let x = root.join("x.gguf");
    let o = run_ggpt(&args(&[&"convert", &hf, &"--type", &"all", &"-o", &x]));
    r.expect_error(
        &o,
        2,
        &x,
        "a single output file was given for 4 types",
        "convert --type all -o x.gguf",
    );
    r.check(node(&x) == Node::Missing, || "x.gguf was created".into());

    // -o naming something that is neither a directory nor a .gguf name.
    let existing = root.join("existing");
    fs::write(&existing, b"keep").unwrap();
    let fifo = root.join("fifo");
    mkfifo(&fifo);
    for (p, says) in [
        (
            &existing,
            "is a regular file: neither a directory nor a name ending in .gguf",
        ),
        (
            &fifo,
            "is a FIFO (named pipe): neither a directory nor a name ending in .gguf",
        ),
    ] {
        let before = node(p);
        let o = run_ggpt(&args(&[&"convert", &hf, &"--type", &"q8_0", &"-o", p]));
        r.expect_error(&o, 2, p, says, "convert -o NON_GGUF");
        r.check(node(p) == before, || format!("{} changed", p.display()));
    }
    // A missing directory stays an output error (4).
    let missing = root.join("no-such-dir");
    let o = run_ggpt(&args(&[
        &"convert", &hf, &"--type", &"q8_0", &"-o", &missing,
    ]));
    r.expect_error(&o, 4, &missing, "does not exist", "convert -o MISSING_DIR");

    // quantize onto its own input: the same path, a hard link, a symbolic link.
    let input = root.join("in.gguf");
    fs::copy(&f16, &input).unwrap();
    let original = fs::read(&input).unwrap();
    let hard = root.join("hard.gguf");
    fs::hard_link(&input, &hard).unwrap();
    let soft = root.join("soft.gguf");
    symlink("in.gguf", &soft).unwrap();
    for (inp, outp) in [
        (&input, &input),
        (&input, &hard),
        (&soft, &input),
        (&input, &soft),
    ] {
        let o = run_ggpt(&args(&[&"quantize", inp, outp, &"--type", &"q8_0"]));
        r.expect_error(
            &o,
            2,
            outp,
            "the output would overwrite the input",
            &format!("quantize {} {}", inp.display(), outp.display()),
        );
    }
    r.check(fs::read(&input).unwrap() == original, || {
        "the input changed".into()
    });
    r.check(node(&soft) == Node::Link("in.gguf".into()), || {
        "the link changed".into()
    });

    // convert onto one of its own inputs, through a link named like a GGUF file.
    let hf_copy = root.join("hf");
    fs::create_dir(&hf_copy).unwrap();
    for e in fs::read_dir(&hf).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), hf_copy.join(e.file_name())).unwrap();
        }
    }
    let weights = hf_copy.join("model-00002-of-00002.safetensors");
    let weights_before = fs::read(&weights).unwrap();
    for (link, target) in [
        ("w.gguf", "model-00002-of-00002.safetensors"),
        ("c.gguf", "config.json"),
    ] {
        let out = hf_copy.join(link);
        symlink(target, &out).unwrap();
        let o = run_ggpt(&args(&[
            &"convert", &hf_copy, &"--type", &"q8_0", &"-o", &out,
        ]));
        r.expect_error(
            &o,
            2,
            &out,
            "the output would overwrite the checkpoint",
            &format!("convert -o {link} -> {target}"),
        );
    }
    r.check(fs::read(&weights).unwrap() == weights_before, || {
        "the checkpoint's weights changed".into()
    });

    // Output directories that are not directories.
    for (cmd, p) in [
        ("dump", &existing),
        ("dump", &fifo),
        ("synth", &existing),
        ("synth", &fifo),
    ] {
        let before = node(p);
        let a = if cmd == "dump" {
            args(&[
                &"dump",
                &tiny_model("Q8_0"),
                p,
                &"--tensor",
                &"output_norm.weight",
            ])
        } else {
            args(&[
                &"synth",
                &"--shape",
                &"tiny",
                &"--vocab-from",
                &hf,
                &"-o",
                p,
            ])
        };
        let o = run_ggpt(&a);
        r.expect_error(&o, 2, p, "give a directory", cmd);
        r.check(node(p) == before, || {
            format!("{cmd}: {} changed", p.display())
        });
    }

    // A file name ending in '/'.
    let slash = format!("{}/", root.join("h.npy").display());
    let o = run_ggpt(&args(&[
        &"features",
        &"-m",
        &tiny_model("Q8_0"),
        &"Hi",
        &"--npy",
        &slash.as_str(),
    ]));
    r.expect_error(
        &o,
        2,
        Path::new(&slash),
        "ends with '/'",
        "features --npy DIR/",
    );

    assert!(
        r.failures.is_empty(),
        "{} usage checks failed:\n\n{}",
        r.failures.len(),
        r.failures.join("\n\n")
    );
    let _ = fs::remove_dir_all(&root);
}

/// config.json and a listed shard that are a directory, a FIFO, a link loop or a dangling link
/// are named for what they are (exit 3), not reported "missing".
#[test]
fn checkpoint_files_that_are_not_regular_files_are_named() {
    let root = scratch("outputs-inputs");
    let src = tiny_hf();
    let shard = "model-00002-of-00002.safetensors";
    let mut r = Report {
        failures: Vec::new(),
    };
    for victim in ["config.json", shard] {
        for (what, says) in [
            ("dir", "is a directory, not a regular file"),
            ("fifo", "is a FIFO (named pipe), not a regular file"),
            ("loop", "is a symbolic link loop"),
            ("dangling", "is a dangling symbolic link (to gone)"),
            ("missing", "missing"),
        ] {
            let hf = root.join(format!("{}-{what}", victim.replace('.', "_")));
            let _ = fs::remove_dir_all(&hf);
            fs::create_dir_all(&hf).unwrap();
            for e in fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                symlink(e.path(), hf.join(e.file_name())).unwrap();
            }
            let p = hf.join(victim);
            fs::remove_file(&p).unwrap();
            match what {
                "dir" => fs::create_dir(&p).unwrap(),
                "fifo" => mkfifo(&p),
                "loop" => {
                    symlink("loop2", &p).unwrap();
                    symlink(victim, hf.join("loop2")).unwrap();
                }
                "dangling" => symlink("gone", &p).unwrap(),
                _ => {}
            }
            let out = root.join("out");
            fs::create_dir_all(&out).unwrap();
            let o = run_ggpt(&args(&[&"convert", &hf, &"--type", &"q8_0", &"-o", &out]));
            let case = format!("{victim} {what}");
            r.expect_error(&o, 3, &p, says, &case);
            r.check(entries(&out).is_empty(), || {
                format!("{case}: wrote {:?}", entries(&out))
            });
        }
    }
    assert!(
        r.failures.is_empty(),
        "{} input-path checks failed:\n\n{}",
        r.failures.len(),
        r.failures.join("\n\n")
    );
    let _ = fs::remove_dir_all(&root);
}
