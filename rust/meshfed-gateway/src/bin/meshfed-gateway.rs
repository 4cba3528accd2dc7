//! `meshfed-gateway`: the meshfed east-west gateway as a standalone process.
//!
//! The same data plane the Python controller drives through `meshfed._core`,
//! started from a JSON config file and no Python: for benchmarks (see
//! `bench/`) and for deployments that render the config themselves.
//!
//! ```text
//! meshfed-gateway --config FILE.json [--print-addresses] [--log-level LEVEL]
//! meshfed-gateway --check --config FILE.json
//! ```
//!
//! - `--config FILE` — the gateway config document (the JSON that
//!   `meshfed.gateway` renders; unknown fields are refused).
//! - `--print-addresses` — once every listener is bound, print one line per
//!   listener, `NAME ADDRESS` (e.g. `in 127.0.0.1:40123`), to stdout and
//!   flush it; scripts that configure `127.0.0.1:0` read their ports there.
//!   Without it a one-line summary goes to stderr.
//! - `--check` — compile the config and exit (0 if valid) without binding.
//! - `--log-level FILTER` — what the data plane logs to stderr, one line per
//!   event: `error`, `warn`, `info` (the default), `debug`, `trace`, or
//!   `tracing` directives such as `meshfed_gateway::gateway::health=debug`.
//!   Without the flag, `RUST_LOG` is read, then `info` applies. Accept
//!   errors, ejections and health changes log at info and warn.
//!
//! The data plane runs one worker thread per CPU the process may use (its
//! affinity mask, e.g. `taskset`, and cgroup quota);
//! `MESHFED_GATEWAY_WORKER_THREADS=N` sets another number.
//!
//! The process runs until SIGTERM or SIGINT (default disposition: the kernel
//! closes every socket). Exit codes: 0 on `--help`/`--version`/a good
//! `--check`; 2 on a usage error, an unreadable or invalid config, or a
//! listener that cannot bind — with one line on stderr saying what to fix.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use meshfed_gateway::{Gateway, VERSION, validate_config};
use tracing_subscriber::EnvFilter;

const USAGE: &str =
    "usage: meshfed-gateway --config FILE.json [--print-addresses] [--check] [--log-level FILTER]";
/// The log filter without `--log-level` or `RUST_LOG`.
const DEFAULT_LOG_LEVEL: &str = "info";

/// What the command line asked for.
#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    print_addresses: bool,
    check: bool,
    log_level: Option<String>,
}

enum Parsed {
    Run(Args),
    Exit(&'static str),
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut args = Args::default();
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Exit(USAGE)),
            "-V" | "--version" => return Ok(Parsed::Exit(VERSION)),
            "--print-addresses" => args.print_addresses = true,
            "--check" => args.check = true,
            "-c" | "--config" => {
                let value = argv
                    .next()
                    .ok_or_else(|| format!("{arg} needs a file name"))?;
                args.config = Some(PathBuf::from(value));
            }
            "--log-level" => {
                let value = argv
                    .next()
                    .ok_or_else(|| format!("{arg} needs a level, e.g. info"))?;
                args.log_level = Some(value);
            }
            other => {
                if let Some(value) = other.strip_prefix("--config=") {
                    args.config = Some(PathBuf::from(value));
                } else if let Some(value) = other.strip_prefix("--log-level=") {
                    args.log_level = Some(value.to_owned());
                } else {
                    return Err(format!("unknown argument {other:?}"));
                }
            }
        }
    }
    if args.config.is_none() {
        return Err("--config FILE.json is required".to_owned());
    }
    Ok(Parsed::Run(args))
}

/// The log filter: `--log-level`, else `RUST_LOG`, else [`DEFAULT_LOG_LEVEL`].
fn log_filter(flag: Option<&str>, env: Option<&str>) -> Result<EnvFilter, String> {
    let (directives, from) = match (flag, env) {
        (Some(flag), _) => (flag, "--log-level"),
        (None, Some(env)) if !env.trim().is_empty() => (env, "RUST_LOG"),
        _ => (DEFAULT_LOG_LEVEL, "the default"),
    };
    EnvFilter::try_new(directives).map_err(|e| {
        format!(
            "{from} {directives:?} is not a log filter ({e}); use error, warn, info, debug or trace"
        )
    })
}

/// Sends the data plane's events to stderr, one line each, under `filter`.
fn install_logging(filter: EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Exit(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("meshfed-gateway: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let env = std::env::var("RUST_LOG").ok();
    match log_filter(args.log_level.as_deref(), env.as_deref()) {
        Ok(filter) => install_logging(filter),
        Err(message) => {
            eprintln!("meshfed-gateway: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("meshfed-gateway: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let Some(path) = args.config.as_deref() else {
        return Err("--config FILE.json is required".to_owned());
    };
    let document =
        std::fs::read(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    if args.check {
        validate_config(&document).map_err(|e| format!("config {}: {e}", path.display()))?;
        println!("config {} is valid", path.display());
        return Ok(());
    }
    let gateway =
        Gateway::start(&document).map_err(|e| format!("config {}: {e}", path.display()))?;
    let addresses = gateway.addresses();
    if args.print_addresses {
        let mut out = std::io::stdout().lock();
        for (name, address) in &addresses {
            writeln!(out, "{name} {address}").map_err(|e| format!("stdout: {e}"))?;
        }
        out.flush().map_err(|e| format!("stdout: {e}"))?;
    } else {
        let list: Vec<String> = addresses
            .iter()
            .map(|(name, address)| format!("{name}={address}"))
            .collect();
        eprintln!(
            "meshfed-gateway {VERSION}: serving {} listener(s): {}",
            list.len(),
            list.join(" ")
        );
    }
    // The data plane runs on the gateway's own runtime; this thread only
    // keeps the process (and the Gateway) alive until a signal ends it.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_config_and_flags() {
        let Ok(Parsed::Run(args)) = parse(&["--config", "a.json", "--print-addresses"]) else {
            panic!("expected run");
        };
        assert_eq!(args.config, Some(PathBuf::from("a.json")));
        assert!(args.print_addresses);
        assert!(!args.check);
        let Ok(Parsed::Run(args)) = parse(&["--config=b.json", "--check"]) else {
            panic!("expected run");
        };
        assert_eq!(args.config, Some(PathBuf::from("b.json")));
        assert!(args.check);
    }

    #[test]
    fn log_level_flag_beats_rust_log_beats_the_default() {
        let shown = |flag, env| log_filter(flag, env).map(|f| f.to_string());
        assert_eq!(shown(Some("debug"), Some("warn")), Ok("debug".to_owned()));
        assert_eq!(shown(None, Some("warn")), Ok("warn".to_owned()));
        assert_eq!(shown(None, Some(" ")), Ok(DEFAULT_LOG_LEVEL.to_owned()));
        assert_eq!(shown(None, None), Ok(DEFAULT_LOG_LEVEL.to_owned()));
        let Err(message) = shown(Some("loud=="), None) else {
            panic!("a bad filter was accepted");
        };
        assert!(message.contains("--log-level"), "{message}");
        let Ok(Parsed::Run(args)) = parse(&["--config", "a.json", "--log-level=warn"]) else {
            panic!("expected run");
        };
        assert_eq!(args.log_level.as_deref(), Some("warn"));
    }

    #[test]
    fn refuses_bad_usage() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--config"]).is_err());
        assert!(parse(&["--config", "a.json", "--bogus"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Exit(_))));
    }
}
