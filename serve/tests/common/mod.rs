//! Shared by the server tests: the bundled tiny model converted to every format once per test
//! binary, a server on an ephemeral port, and a small HTTP/1.1 client over a raw socket (so
//! tests can send bytes no well-behaved client would, and drop a connection mid-stream).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;
use ggpt_serve::{ServeConfig, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const FORMATS: [&str; 4] = ["F16", "Q8_0", "Q6_K", "Q4_K_M"];

/// models/tiny-gpt2 converted to every type, once per test binary.
pub fn models_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("serve")
            .join(format!("tiny-models-{}", env!("CARGO_CRATE_NAME")));
        std::fs::create_dir_all(&dir).expect("create model directory");
        let opts = ConvertOptions {
            hf_dir: repo.join("models/tiny-gpt2"),
            types: FileType::ALL.to_vec(),
            output: Some(dir.clone()),
            name: Some("tiny-gpt2".to_string()),
        };
        convert_hf(&opts, &NoProgress).expect("convert models/tiny-gpt2");
        dir
    })
}

/// The file of a format label ("F16") or a served name ("tiny-gpt2-F16").
pub fn model(label: &str) -> PathBuf {
    let stem = label.strip_prefix("tiny-gpt2-").unwrap_or(label);
    models_dir().join(format!("tiny-gpt2-{stem}.gguf"))
}

/// A config for `labels` on an ephemeral loopback port.
pub fn config(labels: &[&str]) -> ServeConfig {
    let mut c = ServeConfig::new(labels.iter().map(|l| model(l)).collect());
    c.port = 0;
    c.ctx = Some(256);
    c
}

/// Start a server and wait until its models are loaded.
pub async fn start(config: ServeConfig) -> Server {
    let s = ggpt_serve::start(config).await.expect("start server");
    tokio::time::timeout(Duration::from_secs(60), s.ready())
        .await
        .expect("models load within 60 s")
        .expect("models load");
    s
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
    /// The OpenAI error of a failed request: (status, param, message).
    pub fn error(&self) -> (u16, Option<String>, String) {
        let v = self.json();
        let e = &v["error"];
        assert!(e["type"].is_string(), "not an OpenAI error body: {v}");
        (
            self.status,
            e["param"].as_str().map(str::to_string),
            e["message"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// The request's raw bytes.
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    let mut b = r.into_bytes();
    b.extend_from_slice(body);
    b
}

/// Send one request and read the whole response (30 s bound).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&request_bytes(method, path, headers, body))
            .await
            .expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        parse_response(&raw)
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("response within 30 s")
}

pub async fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

pub fn parse_response(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
    out
}

/// A value of a metric line (`name{labels} value`) in a Prometheus text body.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
