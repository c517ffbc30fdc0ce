//! `ggpt-serve`'s exit codes (docs/errors.md): a model file that cannot be loaded exits 3, a
//! setting that cannot be used 2, a port that cannot be bound 1; each with one `error:` line
//! naming the file or the setting.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `ggpt-serve ARGS` on an ephemeral port; it must exit by itself within 60 s.
fn serve(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ggpt-serve"))
        .args(["--port", "0", "-t", "1"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ggpt-serve");
    let t = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("ggpt-serve {args:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

fn check(out: &Output, code: i32, names: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no 'error:' line in: {err}"));
    assert!(line.contains(names), "'{line}' does not name {names}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_model_files_exit_3_bad_settings_2_a_taken_port_1() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-exit-codes");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "not a model\n").unwrap();
    let truncated = dir.join("truncated.gguf");
    let good = common::model("Q8_0");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let missing = dir.join("missing.gguf");
    let _ = std::fs::remove_file(&missing);

    for bad in [&text, &truncated, &missing] {
        let p = bad.to_str().unwrap();
        check(&serve(&["-m", p]), 3, p);
        // Also when it is the second of two files.
        check(&serve(&["-m", good.to_str().unwrap(), "-m", p]), 3, p);
    }
    // Loads, but the context asked for exceeds the model's.
    check(
        &serve(&["-m", good.to_str().unwrap(), "--ctx", "5000"]),
        2,
        "--ctx 5000",
    );
    // A flag value refused before loading.
    check(
        &serve(&["-m", good.to_str().unwrap(), "--timeout", "0"]),
        2,
        "--timeout",
    );
    // The port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ggpt-serve"))
        .args(["-m", good.to_str().unwrap(), "--port", &port, "-t", "1"])
        .output()
        .unwrap();
    check(&out, 1, &port);
}

/// The Docker HEALTHCHECK's `ggpt-serve --probe URL`: 0 on a 200, 1 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_0_on_a_healthy_server_and_1_otherwise() {
    let probe = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_ggpt-serve"))
                .args(["--probe", &url])
                .output()
                .unwrap()
                .status
                .code()
        })
        .await
        .unwrap()
    };
    let s = common::start(common::config(&["Q8_0"])).await;
    let a = s.addr;
    assert_eq!(probe(format!("http://{a}/health")).await, Some(0));
    assert_eq!(probe(format!("http://{a}/no-such-endpoint")).await, Some(1));
    s.shutdown();
    s.join().await.unwrap();
    // Nothing listens there any more.
    assert_eq!(probe(format!("http://{a}/health")).await, Some(1));
}
