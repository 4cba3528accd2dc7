//! The standalone `meshfed-gateway` binary: prints its bound addresses and
//! serves; refuses a bad config or an unbindable address with exit code 2
//! and one line on stderr.

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
