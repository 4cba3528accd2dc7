//! The standalone `meshfed-gateway` binary: prints its bound addresses and
//! serves; refuses a bad config or an unbindable address with exit code 2
//! and one line on stderr; logs health changes and accept failures to
//! stderr, naming what they are about.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

type TestResult = Result<(), Box<dyn Error>>;

const BIN: &str = env!("CARGO_BIN_EXE_meshfed-gateway");

/// Writes `contents` to a file of this test's own under cargo's temp dir.
fn config_file(name: &str, contents: &str) -> Result<PathBuf, Box<dyn Error>> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("binary-{}-{name}.json", std::process::id()));
    std::fs::write(&path, contents)?;
    Ok(path)
}

fn passthrough_config(address: &str) -> String {
    format!(
        r#"{{"listeners": [{{"name": "pt", "address": "{address}", "mode": "passthrough",
              "routes": [{{"sni": "backend.example", "cluster": "be"}}]}}],
            "clusters": [{{"name": "be", "endpoints": [{{"address": "127.0.0.1:9"}}]}}]}}"#
    )
}

/// Runs the binary to completion (for configs it must refuse).
fn run_to_exit(args: &[&str]) -> Result<(Option<i32>, String), Box<dyn Error>> {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output()?;
    Ok((out.status.code(), String::from_utf8(out.stderr)?))
}

#[test]
fn prints_addresses_and_serves() -> TestResult {
    let path = config_file("good", &passthrough_config("127.0.0.1:0"))?;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--print-addresses")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> TestResult {
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let (name, address) = line
            .trim()
            .split_once(' ')
            .ok_or("expected `name address`")?;
        assert_eq!(name, "pt");
        let address: std::net::SocketAddr = address.parse()?;
        assert!(address.ip().is_loopback() && address.port() != 0, "{line}");
        TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        assert!(child.try_wait()?.is_none(), "the gateway must keep running");
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}

#[test]
fn bad_config_exits_2_with_one_line() -> TestResult {
    let path = config_file("bad", r#"{"listeners": [], "bogus": 1}"#)?;
    let (code, stderr) = run_to_exit(&["--config", path.to_str().ok_or("path")?])?;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bogus"), "{stderr}");

    let (code, stderr) = run_to_exit(&["--config", "/nonexistent/meshfed.json"])?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read config"), "{stderr}");

    let (code, stderr) = run_to_exit(&["--frobnicate"])?;
    assert_eq!(code, Some(2), "{stderr}");
    Ok(())
}

#[test]
fn bind_failure_exits_2() -> TestResult {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let path = config_file(
        "taken",
        &passthrough_config(&taken.local_addr()?.to_string()),
    )?;
    let (code, stderr) = run_to_exit(&["--config", path.to_str().ok_or("path")?])?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot bind"), "{stderr}");
    Ok(())
}

#[test]
fn check_validates_without_binding() -> TestResult {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let path = config_file(
        "check",
        &passthrough_config(&taken.local_addr()?.to_string()),
    )?;
    let (code, stderr) = run_to_exit(&["--check", "--config", path.to_str().ok_or("path")?])?;
    assert_eq!(code, Some(0), "{stderr}");
    Ok(())
}

/// A port nothing listens on: bound, then closed.
fn closed_port() -> Result<u16, Box<dyn Error>> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn health_changes_are_logged_to_stderr_naming_the_cluster_and_endpoint() -> TestResult {
    let dead = format!("127.0.0.1:{}", closed_port()?);
    let config = format!(
        r#"{{"listeners": [{{"name": "pt", "address": "127.0.0.1:0", "mode": "passthrough",
              "routes": [{{"sni": "backend.example", "cluster": "be"}}]}}],
            "clusters": [{{"name": "be", "endpoints": [{{"address": "{dead}"}}],
              "health_check": {{"interval_ms": 20, "timeout_ms": 200, "unhealthy_threshold": 1}}}}]}}"#
    );
    let path = config_file("health", &config)?;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "error")
        .arg("--log-level=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> TestResult {
        let stderr = child.stderr.take().ok_or("no stderr")?;
        // Reads until the line arrives; the checks run every 20 ms, and a
        // gateway that never logs it fails by end of stream when killed below.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("unhealthy") && tx.send(line).is_err() {
                    return;
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(10))?;
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("cluster=be"), "{line}");
        assert!(line.contains(&format!("endpoint={dead}")), "{line}");
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}

#[test]
fn accept_failures_are_logged_naming_the_listener_and_what_to_check() -> TestResult {
    let path = config_file("emfile", &passthrough_config("127.0.0.1:0"))?;
    // A file descriptor limit the gateway reaches after a few connections.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 24 && exec "$0" --config "$1" --print-addresses"#)
        .arg(BIN)
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> TestResult {
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address: std::net::SocketAddr = line
            .trim()
            .split_once(' ')
            .ok_or("expected `name address`")?
            .1
            .parse()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("accept failed") && tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Idle connections (no ClientHello) each hold one of the gateway's fds.
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(TcpStream::connect_timeout(
                &address,
                Duration::from_secs(5),
            )?);
        }
        let line = rx.recv_timeout(Duration::from_secs(10))?;
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("listener=pt"), "{line}");
        assert!(line.contains("out of file descriptors"), "{line}");
        assert!(
            line.contains("max_connections"),
            "says what to lower: {line}"
        );
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}
