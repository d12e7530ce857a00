//! A `shroud-proxy` that hosts its tunnel listener as an onion service (`--onion-tunnel`) on a
//! private Tor network, and what the tests that use it check.
//!
//! [`OnionProxy::start`] runs the real binary and reads, in the order it prints them, the onion
//! address (alone on a line of stdout), the HTTPS listener's address, and the moment its
//! service is reachable (descriptor published). [`wait_for_address`] reads the address any
//! binary prints alone on a line (`shroud --onion` too). [`private_violations`] lists what under a state
//! directory lets group or others in, and [`tcp_peers`] tells, through `/proc`, which process
//! holds the far end of each of a process's TCP connections.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::process::Process;
use crate::stack::{binary, log_addr};
use crate::tornet::{socket_owner, tcp_connections_of};

/// How long a proxy may take from start to a reachable onion service: Tor's bootstrap, three
/// introduction points, and the descriptor's upload.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(120);

/// A `shroud-proxy --onion-tunnel` process.
pub struct OnionProxy {
    /// The process.
    pub process: Process,
    /// Its public TLS listener (visitors; tunnels too, for clients that come that way).
    pub https: SocketAddr,
    /// Its onion address, as it printed it.
    pub address: String,
    /// Its arguments, to start it again.
    pub args: Vec<String>,
}

impl OnionProxy {
    /// The arguments of a proxy named `name` (`proxy_args`: certificate, key, policy), on a
    /// fresh loopback port, hosting its tunnel listener on the Tor network of
    /// `network_file`, with its state in `state_dir`.
    pub fn args(base: Vec<String>, state_dir: &Path, network_file: &Path) -> Vec<String> {
        let mut args = vec!["--listen-https".into(), "127.0.0.1:0".into()];
        args.extend(base);
        args.extend([
            "--onion-tunnel".into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--tor-network".into(),
            network_file.display().to_string(),
            "--drain-timeout-secs".into(),
            "2".into(),
        ]);
        args
    }

    /// Starts the proxy with `args` and waits until its onion service is reachable.
    pub async fn start(args: Vec<String>) -> anyhow::Result<Self> {
        let mut process = Process::spawn(&binary("shroud-proxy"), &args)?;
        // stdout (the address) and stderr (the logs) are read apart, so their lines may come
        // in either order: take each as it comes.
        let deadline = tokio::time::Instant::now() + REACHABLE_WITHIN;
        let (mut address, mut https, mut reachable) = (None, None, false);
        while address.is_none() || https.is_none() || !reachable {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = process.wait_for_line("", left).await.with_context(|| {
                format!(
                    "waiting for the proxy's onion address ({address:?}), HTTPS listener \
                     ({https:?}) and reachable service ({reachable})"
                )
            })?;
            if let Ok(onion) = shroud_mux::onion::normalize(line.trim()) {
                address = Some(onion);
            } else if line.contains("listener=\"https\"") {
                https = Some(log_addr(&line)?);
            } else if line.contains("onion service reachable") {
                reachable = true;
            }
        }
        let (Some(address), Some(https)) = (address, https) else {
            bail!("unreachable: the loop ends only with both");
        };
        Ok(Self {
            process,
            https,
            address,
            args,
        })
    }

    /// How a client names this proxy: `NAME@ADDRESS.onion:443`.
    pub fn client_proxy(&self, name: &str) -> String {
        format!("{name}@{}:443", self.address)
    }
}

/// Waits up to `limit` for `process` to print an onion address alone on a line (as
/// `shroud --onion` and `shroud-proxy --onion-tunnel` do on stdout; log lines that mention
/// one do not count), and returns it in normal form.
pub async fn wait_for_address(process: &mut Process, limit: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = process
            .wait_for_line(".onion", left)
            .await
            .context("waiting for an onion address alone on a line")?;
        if let Ok(address) = shroud_mux::onion::normalize(line.trim()) {
            return Ok(address);
        }
    }
}

/// Everything under `dir` (itself included) whose mode lets group or others in, with that
/// mode; symbolic links are skipped.
pub fn private_violations(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            found.push((path.clone(), mode));
        }
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
    }
    found
}

/// The files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        match fs::read_dir(&path) {
            Ok(entries) => pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path())),
            Err(_) => found.push(path),
        }
    }
    found
}

/// Process `pid`'s established TCP connections, each with the process holding its far end
/// (when one we may inspect does), as (local, remote, owner).
pub fn tcp_peers(pid: u32) -> Vec<(SocketAddr, SocketAddr, Option<u32>)> {
    tcp_connections_of(pid)
        .into_iter()
        .map(|(local, remote)| (local, remote, socket_owner(remote, local)))
        .collect()
}
