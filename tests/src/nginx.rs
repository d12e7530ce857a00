//! Debian's nginx on 127.0.0.1, for tests: a real origin that expects a PROXY protocol header
//! (`listen ... proxy_protocol`) and logs the address it names.
//!
//! [`Nginx::start`] writes a configuration into a directory of its own (pid file, error and
//! access logs, temporary files, the files it serves), starts `nginx -p DIR -c FILE -e stderr`
//! as a [`Process`] and returns once its listeners are bound. nginx runs as a single
//! process (`master_process off`), so dropping the handle stops all of it by its PID; and it
//! needs nothing outside its directory, so it runs as root (CI) or as an ordinary user alike.
//!
//! Each request is one line of the access log (see [`AccessLine`]): the PROXY header's source
//! and destination port, the port nginx accepted on, the request URI and the status.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::ports::free_ports;
use crate::process::Process;

/// How long nginx may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The access log's format: what [`AccessLine::parse`] reads back.
const LOG_FORMAT: &str = "$proxy_protocol_addr $proxy_protocol_port \
     $proxy_protocol_server_port $server_port $status $body_bytes_sent $request_uri";

/// What the test's nginx serves.
pub struct NginxSpec<'a> {
    /// The `server_name` (and the TLS certificate's name).
    pub server_name: &'a str,
    /// Certificate chain and key (PEM files) for a TLS listener; `None` for plain HTTP only.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Files served from the document root, by name (`/NAME`).
    pub files: &'a [(&'a str, &'a [u8])],
}

/// A running nginx, killed by PID on drop.
pub struct Nginx {
    process: Process,
    dir: tempfile::TempDir,
    /// The plain-HTTP listener (PROXY protocol first).
    pub http: SocketAddr,
    /// The TLS listener (PROXY protocol first), when the spec gave a certificate.
    pub https: Option<SocketAddr>,
}

impl Nginx {
    /// Writes the configuration for `spec` on free ports and starts nginx; returns once it
    /// listens. Fails with a clear error when nginx is not installed.
    pub async fn start(spec: &NginxSpec<'_>) -> anyhow::Result<Self> {
        let program = find().context(
            "nginx is not installed (Debian: apt-get install nginx-light); the PROXY protocol \
             tests need it",
        )?;
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let www = root.join("www");
        std::fs::create_dir(&www)?;
        for (name, bytes) in spec.files {
            std::fs::write(www.join(name), bytes)?;
        }
        let [http_port, https_port] = free_ports::<2>()?;
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
        let https = spec
            .tls
            .map(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, https_port)));
        let config_path = root.join("nginx.conf");
        std::fs::write(&config_path, config(root, spec, http, https))?;

        let args = [
            "-p".to_owned(),
            format!("{}/", root.display()),
            "-c".to_owned(),
            config_path.display().to_string(),
            "-e".to_owned(),
            "stderr".to_owned(),
        ];
        let process = Process::spawn(&program, &args)?;
        let mut nginx = Self {
            process,
            dir,
            http,
            https,
        };
        nginx.wait_listening().await?;
        Ok(nginx)
    }

    /// Waits until nginx has written its pid file, which it does once its listeners are bound
    /// (a probe connection would do, but it leaves a broken PROXY header in the error log).
    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.dir.path().join("nginx.pid");
        let pid = self.process.pid().to_string();
        loop {
            let written = std::fs::read_to_string(&pid_file).unwrap_or_default();
            if written.trim() == pid {
                return Ok(());
            }
            if let Some(status) = self.process.try_status()? {
                anyhow::bail!(
                    "nginx exited ({status}) before listening: {}\n{}",
                    self.process.output_text(),
                    self.error_log()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nginx did not start within {START_TIMEOUT:?}: {}",
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The access log's lines so far.
    pub fn access_log(&self) -> anyhow::Result<Vec<AccessLine>> {
        let path = self.dir.path().join("access.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        text.lines().map(AccessLine::parse).collect()
    }

    /// Waits up to `limit` for the access log to hold `n` lines (nginx writes a line once the
    /// response is sent, which may be just after the visitor has read it) and returns them.
    pub async fn wait_access_lines(
        &self,
        n: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<AccessLine>> {
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.access_log()?;
            if lines.len() >= n || Instant::now() >= deadline {
                return Ok(lines);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The access log as nginx wrote it (a request without a PROXY source logs `-` for it,
    /// which [`AccessLine`] does not read).
    pub fn access_log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// nginx's error log (what it says about broken PROXY headers, at `info`).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// One request as nginx logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    /// The source the PROXY header named (`$proxy_protocol_addr`, `$proxy_protocol_port`).
    pub source: SocketAddr,
    /// The destination port it named (`$proxy_protocol_server_port`).
    pub destination_port: u16,
    /// The port nginx accepted the connection on (`$server_port`).
    pub server_port: u16,
    /// The response status.
    pub status: u16,
    /// Bytes of body sent.
    pub body_bytes: u64,
    /// The request URI, query included.
    pub uri: String,
}

impl AccessLine {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [addr, port, destination_port, server_port, status, body_bytes, uri] = fields[..]
        else {
            anyhow::bail!("unexpected access log line {line:?}");
        };
        let parsed = || -> anyhow::Result<Self> {
            Ok(Self {
                source: SocketAddr::new(addr.parse()?, port.parse()?),
                destination_port: destination_port.parse()?,
                server_port: server_port.parse()?,
                status: status.parse()?,
                body_bytes: body_bytes.parse()?,
                uri: uri.to_owned(),
            })
        };
        parsed().with_context(|| format!("access log line {line:?}"))
    }
}

/// The nginx program: `nginx` on the PATH, or Debian's /usr/sbin/nginx (not on an ordinary
/// user's PATH).
fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// The configuration: one process, everything under `root`, both listeners expecting a PROXY
/// protocol header.
fn config(
    root: &Path,
    spec: &NginxSpec<'_>,
    http: SocketAddr,
    https: Option<SocketAddr>,
) -> String {
    let root = root.display();
    let tls = match (spec.tls, https) {
        (Some((cert, key)), Some(https)) => format!(
            "        listen {https} ssl proxy_protocol;\n        ssl_certificate {};\n        \
             ssl_certificate_key {};\n",
            cert.display(),
            key.display()
        ),
        _ => String::new(),
    };
    format!(
        "# Written by shroud's test harness (tests/src/nginx.rs).
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    default_type application/octet-stream;
    log_format visitors '{LOG_FORMAT}';
    access_log {root}/access.log visitors;

    server {{
        listen {http} proxy_protocol;
{tls}        server_name {name};
        root {root}/www;
    }}
}}
",
        name = spec.server_name,
    )
}
