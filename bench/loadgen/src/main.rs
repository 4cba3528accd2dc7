//! `loadgen`: the load generator and the TLS backend of meshfed's proxy
//! benchmark (see `bench/README.md`).
//!
//! Both ends speak one tiny request/response protocol over mTLS: the client
//! sends an 8-byte header (`request_len: u32 LE`, `response_len: u32 LE`)
//! followed by `request_len` bytes; the server discards them and answers with
//! `response_len` bytes. Any TCP proxy (passthrough or terminate +
//! re-encrypt) can carry it, so HAProxy, nginx and meshfed do the same job.
//!
//! ```text
//! loadgen server --listen ADDR --cert PEM --key PEM --client-ca PEM [--plain-listen ADDR]
//! loadgen client --connect ADDR --sni NAME --ca PEM --cert PEM --key PEM
//!                --mode keepalive|newconn|idle [--concurrency N] [--duration S]
//!                [--warmup S] [--request BYTES] [--response BYTES] [--rate R/s]
//!                [--connections N] [--cpu-pid PID]... [--plain]
//! ```
//!
//! `--plain` makes the client speak the protocol over plain TCP (to a proxy
//! that originates TLS itself, as a federation's egress gateway does).
//!
//! `--rate` makes `keepalive` and `newconn` open loop: requests (or new
//! connections) are sent on a fixed schedule spread over the workers.
//!
//! TLS everywhere is TLS 1.3, `TLS13_AES_128_GCM_SHA256`, X25519, no session
//! resumption (every new connection is a full mTLS handshake). The client
//! prints one JSON line of results; with `--cpu-pid` it also reports the
//! utime+stime clock ticks those processes used during the measured window.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

static ZEROS: [u8; 65536] = [0; 65536];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start runtime: {e}")),
    };
    let result = match args.first().map(String::as_str) {
        Some("server") => Opts::parse(&args[1..]).and_then(|o| runtime.block_on(server(o))),
        Some("client") => Opts::parse(&args[1..]).and_then(|o| runtime.block_on(client(o))),
        _ => Err("usage: loadgen server|client --help (see the doc comment in src/main.rs)".into()),
    };
    if let Err(e) = result {
        fail(&e.to_string());
    }
}

fn fail(message: &str) -> ! {
    eprintln!("loadgen: {message}");
    std::process::exit(2);
}

/// `--key value` options (repeatable) and bare `--flag`s.
struct Opts(HashMap<String, Vec<String>>);

impl Opts {
    fn parse(args: &[String]) -> Result<Self> {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            let key = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
                _ => String::new(),
            };
            map.entry(key.to_owned()).or_default().push(value);
        }
        Ok(Self(map))
    }
    fn str(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
            .ok_or_else(|| format!("--{key} is required").into())
    }
    fn opt(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.last()).map(String::as_str)
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key}: bad number {v:?}").into()),
        }
    }
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .get(key)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------- TLS

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    p.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    Arc::new(p)
}

fn load_chain(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{path}: no certificate").into());
    }
    Ok(chain)
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{path}: {e}").into())
}

fn load_roots(path: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn server_config(o: &Opts) -> Result<ServerConfig> {
    let roots = Arc::new(load_roots(o.str("client-ca")?)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_chain(o.str("cert")?)?, load_key(o.str("key")?)?)?;
    // Every new connection a proxy opens is a full handshake.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn client_config(o: &Opts) -> Result<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(o.str("ca")?)?)
        .with_client_auth_cert(load_chain(o.str("cert")?)?, load_key(o.str("key")?)?)?;
    config.resumption = Resumption::disabled();
    Ok(config)
}

// ---------------------------------------------------------------- server

async fn server(o: Opts) -> Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&o)?));
    let tls = TcpListener::bind(o.str("listen")?).await?;
    let mut out = io::stdout().lock();
    writeln!(out, "tls {}", tls.local_addr()?)?;
    if let Some(addr) = o.opt("plain-listen") {
        let plain = TcpListener::bind(addr).await?;
        writeln!(out, "plain {}", plain.local_addr()?)?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = plain.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_protocol(stream));
            }
        });
    }
    out.flush()?;
    drop(out);
    loop {
        let (stream, _) = match tls.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("loadgen server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(stream).await {
                serve_protocol(tls).await;
            }
        });
    }
}

/// Answers requests until the peer closes.
async fn serve_protocol<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut header = [0u8; 8];
    let mut sink = vec![0u8; 16384];
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            break;
        }
        let (req, resp) = split_header(header);
        let mut left = req as usize;
        while left > 0 {
            let n = left.min(sink.len());
            match stream.read(&mut sink[..n]).await {
                Ok(0) | Err(_) => return,
                Ok(got) => left -= got,
            }
        }
        if write_zeros(&mut stream, resp as usize).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
    let _ = stream.shutdown().await;
}

fn split_header(h: [u8; 8]) -> (u32, u32) {
    (
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    )
}

async fn write_zeros<S: AsyncWrite + Unpin>(stream: &mut S, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let chunk = n.min(ZEROS.len());
        stream.write_all(&ZEROS[..chunk]).await?;
        n -= chunk;
    }
    Ok(())
}

// ---------------------------------------------------------------- client

#[derive(Clone)]
struct Target {
    address: SocketAddr,
    name: ServerName<'static>,
    /// `None`: plain TCP.
    connector: Option<TlsConnector>,
    request: Arc<Vec<u8>>,
    response_len: usize,
}

/// A client connection: mTLS, or plain TCP with `--plain`.
enum Conn {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Target {
    async fn connect(&self) -> Result<Conn> {
        let tcp = TcpStream::connect(self.address).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.connector {
            Some(connector) => Conn::Tls(Box::new(connector.connect(self.name.clone(), tcp).await?)),
            None => Conn::Plain(tcp),
        })
    }

    /// One request/response exchange on an open connection.
    async fn exchange(&self, stream: &mut Conn, buf: &mut [u8]) -> Result<()> {
        stream.write_all(&self.request).await?;
        stream.flush().await?;
        let mut left = self.response_len;
        while left > 0 {
            let n = left.min(buf.len());
            match stream.read(&mut buf[..n]).await? {
                0 => return Err("server closed mid-response".into()),
                got => left -= got,
            }
        }
        Ok(())
    }
}

/// Shared counters of one client run.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    connections: AtomicU64,
    errors: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits; values above are clamped.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| fail("histogram bounds"))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 60_000_000);
    let _ = h.record(us);
}

async fn client(o: Opts) -> Result<()> {
    let address: SocketAddr = o.str("connect")?.parse()?;
    let request_len: u32 = o.num("request", 1024)?;
    let response_len: u32 = o.num("response", 1024)?;
    let mut request = Vec::with_capacity(8 + request_len as usize);
    request.extend_from_slice(&request_len.to_le_bytes());
    request.extend_from_slice(&response_len.to_le_bytes());
    request.resize(8 + request_len as usize, 0);
    let target = Target {
        address,
        name: ServerName::try_from(o.str("sni")?.to_owned())?,
        connector: match o.opt("plain") {
            Some(_) => None,
            None => Some(TlsConnector::from(Arc::new(client_config(&o)?))),
        },
        request: Arc::new(request),
        response_len: response_len as usize,
    };
    let pids: Vec<u32> = o
        .all("cpu-pid")
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let mode = o.str("mode")?.to_owned();
    if mode == "idle" {
        return idle(&target, o.num("connections", 2000)?).await;
    }
    let concurrency: usize = o.num("concurrency", 16)?;
    let warmup = Duration::from_secs_f64(o.num("warmup", 0.5)?);
    let duration = Duration::from_secs_f64(o.num("duration", 3.0)?);
    let rate: f64 = o.num("rate", 0.0)?;
    let counters = Arc::new(Counters::default());

    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (t, c) = (target.clone(), counters.clone());
        let schedule = (rate > 0.0).then(|| {
            let interval = Duration::from_secs_f64(concurrency as f64 / rate);
            (interval, interval.mul_f64(i as f64 / concurrency as f64))
        });
        let task = match mode.as_str() {
            "keepalive" => tokio::spawn(keepalive(t, c, schedule)),
            "newconn" => tokio::spawn(newconn(t, c, schedule)),
            other => return Err(format!("--mode {other:?}: keepalive|newconn|idle").into()),
        };
        tasks.push(task);
    }

    tokio::time::sleep(warmup).await;
    let start_requests = counters.requests.load(Ordering::Relaxed);
    let start_connections = counters.connections.load(Ordering::Relaxed);
    let start_errors = counters.errors.load(Ordering::Relaxed);
    let cpu_start = cpu_ticks(&pids);
    let started = Instant::now();
    counters.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration).await;
    counters.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_end = cpu_ticks(&pids);
    let requests = counters.requests.load(Ordering::Relaxed) - start_requests;
    let connections = counters.connections.load(Ordering::Relaxed) - start_connections;
    let errors = counters.errors.load(Ordering::Relaxed) - start_errors;
    counters.stop.store(true, Ordering::Relaxed);

    let mut hist = new_histogram();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(h)) => hist.add(h).map_err(|e| format!("histogram: {e}"))?,
            _ => eprintln!("loadgen: a worker did not finish in time"),
        }
    }
    let bytes = requests * (target.request.len() as u64 + target.response_len as u64);
    let cpu: Vec<String> = pids
        .iter()
        .map(|pid| {
            let used =
                cpu_end.get(pid).copied().unwrap_or(0) - cpu_start.get(pid).copied().unwrap_or(0);
            format!("\"{pid}\":{used}")
        })
        .collect();
    println!(
        "{{\"mode\":\"{mode}\",\"concurrency\":{concurrency},\"rate\":{rate},\"elapsed_s\":{elapsed:.4},\
\"requests\":{requests},\"connections\":{connections},\"errors\":{errors},\"bytes\":{bytes},\
\"lat_us\":{{\"count\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"cpu_ticks\":{{{}}}}}",
        hist.len(),
        hist.value_at_quantile(0.50),
        hist.value_at_quantile(0.90),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        cpu.join(",")
    );
    Ok(())
}

/// Paces one worker: closed loop (`None`), or open loop on a fixed schedule.
struct Pacer {
    schedule: Option<(tokio::time::Instant, Duration)>,
}

impl Pacer {
    fn new(schedule: Option<(Duration, Duration)>) -> Self {
        let begin = tokio::time::Instant::now();
        Self {
            schedule: schedule.map(|(interval, offset)| (begin + offset, interval)),
        }
    }

    /// Waits for the next send slot; returns the instant latency counts from.
    /// Behind schedule, that is the scheduled time (the wait counts: no
    /// coordinated omission). Ahead of it, tokio's timer wakes on a 1 ms
    /// tick, so it is the actual send time, not the tick's lateness.
    async fn next(&mut self) -> Instant {
        let Some((at, interval)) = self.schedule else {
            return Instant::now();
        };
        self.schedule = Some((at + interval, interval));
        if tokio::time::Instant::now() >= at {
            at.into_std()
        } else {
            tokio::time::sleep_until(at).await;
            Instant::now()
        }
    }
}

/// Keep-alive requests on one connection, paced by `schedule`.
async fn keepalive(
    target: Target,
    counters: Arc<Counters>,
    schedule: Option<(Duration, Duration)>,
) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut buf = vec![0u8; 65536];
    let mut pacer = Pacer::new(schedule);
    'outer: while !counters.stop.load(Ordering::Relaxed) {
        let mut stream = match target.connect().await {
            Ok(s) => s,
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("loadgen: connect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        while !counters.stop.load(Ordering::Relaxed) {
            let t0 = pacer.next().await;
            if let Err(e) = target.exchange(&mut stream, &mut buf).await {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("loadgen: request: {e}");
                continue 'outer;
            }
            counters.requests.fetch_add(1, Ordering::Relaxed);
            if counters.measuring.load(Ordering::Relaxed) {
                record(&mut hist, t0.elapsed());
            }
        }
        let _ = stream.shutdown().await;
    }
    hist
}

/// One new mTLS connection per request: connect, handshake, one exchange,
/// close. Latency is the whole connection.
async fn newconn(
    target: Target,
    counters: Arc<Counters>,
    schedule: Option<(Duration, Duration)>,
) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut buf = vec![0u8; 65536];
    let mut pacer = Pacer::new(schedule);
    while !counters.stop.load(Ordering::Relaxed) {
        let t0 = pacer.next().await;
        let result = async {
            let mut stream = target.connect().await?;
            target.exchange(&mut stream, &mut buf).await?;
            stream.shutdown().await?;
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                counters.connections.fetch_add(1, Ordering::Relaxed);
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if counters.measuring.load(Ordering::Relaxed) {
                    record(&mut hist, t0.elapsed());
                }
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("loadgen: new connection: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    hist
}

/// Opens `n` connections (one exchange each, so every hop is established
/// and has carried data), prints `READY <ok> <errors>`, holds them until
/// stdin closes or gets a line, then closes them.
async fn idle(target: &Target, n: usize) -> Result<()> {
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (t, gate) = (target.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut stream = t.connect().await?;
            let mut buf = vec![0u8; t.response_len.max(1)];
            t.exchange(&mut stream, &mut buf).await?;
            Ok::<_, Error>(stream)
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut errors = 0;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => {
                if errors == 0 {
                    eprintln!("loadgen: idle connection: {e}");
                }
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    println!("READY {} {errors}", held.len());
    io::stdout().flush()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.await;
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------- CPU

/// utime + stime (clock ticks) of each pid, from /proc/<pid>/stat; the
/// process totals include all of its threads.
fn cpu_ticks(pids: &[u32]) -> HashMap<u32, u64> {
    pids.iter()
        .filter_map(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After "(comm)": field 3 (state) is index 0; utime=14, stime=15.
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((pid, utime + stime))
        })
        .collect()
}
