//! A client's tunnel, from its TLS handshake to its last stream.
//!
//! The proxy terminates the tunnel's TLS with its own certificate, runs yamux over it, and
//! expects the client to open the control stream: hello, challenge, bind, result. Bound names
//! enter the [`Registry`](crate::registry::Registry) until the tunnel ends. On shutdown the
//! proxy sends go-away, takes the names out of the registry so that no new visitor lands here,
//! and lets the streams in flight finish up to the drain deadline.
//!
//! A bound name stays bound while what granted it still does. After each reload of the
//! [`Authorization`] the tunnel checks every name against it at once, and a name granted by a
//! DNS TXT record is checked again when the record's answer expires. A name no longer granted
//! is unbound, and a client of protocol version 2 is told why (`Unbound`); a tunnel left with
//! no name is closed.

use std::sync::Arc;
use std::time::Duration;

use shroud_mux::auth::{self, PublicKey, EXPORTER_LABEL, EXPORTER_LEN};
use shroud_mux::control::{
    self, BindName, BindOutcome, BindStatus, ErrorCode, Message, ReadError, UNBOUND_SINCE, VERSIONS,
};
use shroud_mux::{hostname, words, MuxStream, Role, Session, SessionConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{AddressGuard, KeyGuard};
use crate::dns_auth::DnsVerdict;
use crate::metrics::Handshake;
use crate::registry::TunnelId;
use crate::shared::{Authorization, Shared};

/// Why a tunnel ended before it was bound, or while it was up.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// The client did not offer the shroud ALPN.
    #[error("client did not negotiate ALPN shroud/1")]
    NotShroud,
    /// A step of the handshake took too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The control stream failed or carried garbage.
    #[error(transparent)]
    Control(#[from] ReadError),
    /// Writing to the control stream failed.
    #[error("control stream write: {0}")]
    Write(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The session ended before the control stream arrived.
    #[error("session closed during the handshake")]
    Closed,
    /// The TLS exporter could not be computed.
    #[error("TLS keying material exporter failed: {0}")]
    Exporter(String),
    /// Every name the tunnel had bound lost its authorization (a reload, or DNS).
    #[error("every hostname's authorization was withdrawn")]
    Revoked,
}

/// Bytes read from a client's socket at once, below TLS.
const SOCKET_READ_BUFFER: usize = 32 * 1024;

/// Serves one tunnel connection whose first bytes may already have been read (they are in
/// `io`, replayed). Returns when the tunnel has ended. `address`, if given, counts the
/// connection against its address until it is bound; from then on the per-key limits hold it.
/// `peer` is where the connection came from, for the log: its address, or `onion` for one
/// that arrived on the onion service.
pub async fn serve<IO, P>(
    io: IO,
    peer: P,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    address: Option<AddressGuard>,
) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    P: std::fmt::Display + Send,
{
    // Set once the bind is answered; any end before that is a failed handshake.
    let mut answered = false;
    let result = serve_tunnel(io, peer, shared.clone(), shutdown, address, &mut answered).await;
    if !answered {
        shared.metrics.handshake(Handshake::Failed);
    }
    result
}

async fn serve_tunnel<IO, P>(
    io: IO,
    peer: P,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    mut address: Option<AddressGuard>,
    answered: &mut bool,
) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    P: std::fmt::Display + Send,
{
    let limits = &shared.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    // rustls reads a socket 4 KiB at a time, so a 16 KiB record took four syscalls; reads
    // from this buffer are copies instead.
    let io = tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, io);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tunnel_tls());
    let tls = tokio::time::timeout_at(deadline, acceptor.accept(io))
        .await
        .map_err(|_| TunnelError::Timeout("the TLS handshake"))?
        .map_err(TunnelError::Tls)?;
    let (_, connection) = tls.get_ref();
    if connection.alpn_protocol() != Some(shroud_mux::ALPN) {
        return Err(TunnelError::NotShroud);
    }
    let exporter: [u8; EXPORTER_LEN] = connection
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(|err| TunnelError::Exporter(err.to_string()))?;

    let session_config = SessionConfig {
        max_streams: limits.max_streams_per_tunnel,
        accept_backlog: 4,
        stream_buffer: limits.stream_buffer,
    };
    let (session, mut incoming) = Session::spawn(tls, Role::Proxy, session_config);
    let mut control = match tokio::time::timeout_at(deadline, incoming.accept()).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return Err(TunnelError::Closed),
        Err(_) => {
            session.close();
            return Err(TunnelError::Timeout("the control stream"));
        }
    };
    // Clients open no other streams; any they try are reset.
    drop(incoming);

    let tunnel = shared.registry.new_tunnel_id();
    let handshake = tokio::time::timeout_at(
        deadline,
        handshake(
            &mut control,
            &exporter,
            &shared,
            tunnel,
            &session,
            &mut address,
        ),
    );
    let granted = match handshake.await {
        Ok(Ok(granted)) => granted,
        Ok(Err(err)) => {
            shared.registry.unbind_tunnel(tunnel);
            session.close();
            return Err(err);
        }
        Err(_) => {
            shared.registry.unbind_tunnel(tunnel);
            let _ = send_error(&mut control, ErrorCode::Timeout, "handshake too slow").await;
            session.close();
            return Err(TunnelError::Timeout("the bind"));
        }
    };
    *answered = true;
    if granted.names.is_empty() {
        shared.metrics.handshake(Handshake::Refused);
        // Give the client a moment to read the result before the connection goes.
        let _ = timeout(Duration::from_secs(2), control.shutdown_and_wait()).await;
        session.close();
        return Ok(());
    }

    let names: Vec<&str> = granted.names.iter().map(|n| n.name.as_str()).collect();
    info!(tunnel, %peer, hostnames = ?names, version = granted.version, "tunnel bound");
    shared.metrics.handshake(Handshake::Bound);
    let _bound = shared.metrics.tunnel_bound();

    let authorization = granted.authorization;
    let mut bound = BoundNames {
        key: granted.key,
        names: granted
            .names
            .iter()
            .map(|name| Held {
                name: name.name.clone(),
                dns_due: granted
                    .dns
                    .iter()
                    .find(|(dns_name, _)| *dns_name == name.name)
                    .map(|(_, due)| *due),
            })
            .collect(),
        admitted: granted.admitted,
        version: granted.version,
    };
    let result = keep_alive(
        control,
        &session,
        tunnel,
        &shared,
        &shutdown,
        &mut bound,
        authorization,
    )
    .await;
    shared.registry.unbind_tunnel(tunnel);
    match &result {
        Ok(()) => info!(tunnel, "tunnel closed"),
        Err(err) => info!(tunnel, %err, "tunnel closed"),
    }
    session.close();
    result
}

/// What a bind granted: the names, and which of them hold only as long as DNS says so.
struct Granted {
    names: Vec<BindName>,
    key: Option<PublicKey>,
    /// Names granted by a `_shroud` TXT record, and when to check it again.
    dns: Vec<(String, Instant)>,
    /// The tunnel and its names, counted against the key's limits while this lives.
    admitted: Option<KeyGuard>,
    /// The protocol version agreed in Hello.
    version: u8,
    /// The authorization the bind was judged by, and every reload after it.
    authorization: watch::Receiver<Arc<Authorization>>,
}

/// Hello, challenge, bind, result. Granted names enter the registry before the result is
/// sent, so a visitor who arrives the moment the client learns it is bound is routed; for the
/// same reason a bound connection stops counting against its `address` (the guard is dropped)
/// before the result is sent, not after. Returns what was bound; the caller unbinds `tunnel`
/// if this fails.
async fn handshake(
    control: &mut MuxStream,
    exporter: &[u8; EXPORTER_LEN],
    shared: &Shared,
    tunnel: TunnelId,
    session: &Session,
    address: &mut Option<AddressGuard>,
) -> Result<Granted, TunnelError> {
    let version = match control::read_message(control).await? {
        Message::Hello { versions } => match control::choose_version(&versions) {
            Some(version) => version,
            None => {
                let detail =
                    format!("this proxy speaks versions {VERSIONS:?}; client offered {versions:?}");
                send_error(control, ErrorCode::UnsupportedVersion, &detail).await?;
                return Err(TunnelError::Protocol(detail));
            }
        },
        other => return Err(unexpected(control, &other, "hello").await),
    };
    let challenge =
        auth::new_challenge().map_err(|err| TunnelError::Protocol(format!("random: {err}")))?;
    control::write_message(
        control,
        &Message::Hello {
            versions: vec![version],
        },
    )
    .await?;
    control::write_message(control, &Message::Challenge { challenge }).await?;

    let (key, signature, hostnames) = match control::read_message(control).await? {
        Message::Bind {
            key,
            signature,
            hostnames,
        } if !hostnames.is_empty() => (key, signature, hostnames),
        other => return Err(unexpected(control, &other, "bind").await),
    };
    // Judged by the authorization in force now. The receiver sees every reload from here on,
    // so one that lands while this bind completes is checked as soon as the tunnel is up.
    let mut authorization = shared.watch_authorization();
    let in_force = authorization.borrow_and_update().clone();
    let (verified, mut judged) = judge_bind(
        &key, &signature, &hostnames, &challenge, exporter, shared, &in_force,
    );
    let mut dns = Vec::new();
    if let (Some(key), Some(authorizer)) = (&verified, &shared.dns) {
        for (entry, outcome) in hostnames.iter().zip(judged.iter_mut()) {
            // A word name is its key's or no one's: DNS cannot grant it.
            let word_name = words::word_domain(&entry.name, &in_force.word_domains).is_some();
            if outcome.status != BindStatus::NotAuthorized || word_name {
                continue;
            }
            match authorizer.allows(&entry.name, key).await {
                DnsVerdict::Allowed { valid_for } => {
                    outcome.status = BindStatus::Bound;
                    outcome.reason.clear();
                    dns.push((entry.name.clone(), Instant::now() + valid_for));
                }
                DnsVerdict::NotListed => {
                    // The owner may publish a record at any time: the client should retry.
                    outcome.status = BindStatus::NotListed;
                    outcome.reason = format!(
                        "this key is not authorized for this hostname on this proxy, nor by a \
                         TXT record at _shroud.{}",
                        entry.name
                    );
                }
                DnsVerdict::Unavailable(why) => {
                    // A check that cannot be made refuses; it never grants.
                    outcome.status = BindStatus::Unavailable;
                    outcome.reason = format!("the DNS authorization could not be checked: {why}");
                }
            }
        }
    }
    // Last, so that only names the policy grants count against the key's limits.
    let admitted = verified
        .as_ref()
        .and_then(|key| shared.admission.admit_bind(key, &mut judged));
    let names: Vec<BindName> = hostnames
        .iter()
        .zip(&judged)
        .filter(|(_, outcome)| outcome.status == BindStatus::Bound)
        .map(|(name, _)| name.clone())
        .collect();
    for outcome in &judged {
        shared.metrics.bind_result(outcome.status);
    }
    for outcome in judged.iter().filter(|o| o.status != BindStatus::Bound) {
        info!(hostname = %outcome.name, status = ?outcome.status, "bind refused");
    }
    for name in &names {
        let name: &BindName = name;
        shared
            .registry
            .bind(&name.name, tunnel, session.clone(), name.http);
    }
    if !names.is_empty() {
        // From here the per-key limits hold this connection.
        address.take();
    }
    control::write_message(control, &Message::BindResult { results: judged }).await?;
    Ok(Granted {
        names,
        key: verified,
        dns,
        admitted,
        version,
        authorization,
    })
}

/// The proxy's verdict on each hostname of a bind, from the proof and `authorization` (the
/// authorized file and word names); DNS is consulted afterwards for names these do not grant.
/// Returns the key when the proof verified.
fn judge_bind(
    key: &[u8; 32],
    signature: &[u8; 64],
    hostnames: &[BindName],
    challenge: &[u8; 32],
    exporter: &[u8; EXPORTER_LEN],
    shared: &Shared,
    authorization: &Authorization,
) -> (Option<PublicKey>, Vec<BindOutcome>) {
    let outcome = |name: &BindName, status, reason: &str| BindOutcome {
        name: name.name.clone(),
        status,
        reason: reason.to_owned(),
    };
    let names: Vec<String> = hostnames.iter().map(|h| h.name.clone()).collect();
    let verified = PublicKey::from_bytes(key).ok().filter(|key| {
        let transcript = auth::bind_transcript(challenge, exporter, key, &names);
        key.verify(&transcript, signature)
    });
    let Some(key) = verified else {
        let refused = hostnames
            .iter()
            .map(|h| outcome(h, BindStatus::BadProof, "the bind signature did not verify"))
            .collect();
        return (None, refused);
    };
    let mut seen = std::collections::HashSet::new();
    let judged = hostnames
        .iter()
        .map(|h| match hostname::normalize(&h.name) {
            Ok(normal) if normal != h.name => outcome(
                h,
                BindStatus::InvalidHostname,
                "hostnames must be sent normalised (lower case, no trailing dot)",
            ),
            Err(err) => outcome(h, BindStatus::InvalidHostname, &err.to_string()),
            Ok(_) if h.name == shared.tunnel_name => outcome(
                h,
                BindStatus::InvalidHostname,
                "this is the proxy's own name",
            ),
            Ok(_) if !seen.insert(h.name.clone()) => {
                outcome(h, BindStatus::InvalidHostname, "hostname listed twice")
            }
            Ok(_) => match refusal(&h.name, &key, authorization) {
                None => outcome(h, BindStatus::Bound, ""),
                Some((status, reason)) => outcome(h, status, &reason),
            },
        })
        .collect();
    (Some(key), judged)
}

/// Why `authorization` does not let `key` bind `name` (valid and normalised), as a bind's
/// status and reason, or `None` when it does. Under a word-name domain a key binds its own
/// words and nothing else: any other name there is reserved for the key whose words it is,
/// which no change of policy can alter (InvalidHostname). Elsewhere the authorized file
/// decides (NotAuthorized, which its operator may change).
fn refusal(
    name: &str,
    key: &PublicKey,
    authorization: &Authorization,
) -> Option<(BindStatus, String)> {
    let domains = &authorization.word_domains;
    if words::allows(name, domains, key) {
        return None;
    }
    match words::word_domain(name, domains) {
        Some(domain) => Some((
            BindStatus::InvalidHostname,
            format!(
                "names under {domain} are word names, each bound by the key whose words it is; \
                 this key's is {}",
                words::word_name(key, domain)
            ),
        )),
        None if authorization.policy.allows(name, key) => None,
        None => Some((
            BindStatus::NotAuthorized,
            "this key is not authorized for this hostname on this proxy".to_owned(),
        )),
    }
}

/// Answers pings until the client goes quiet, the session ends, or the proxy shuts down; then
/// drains: go-away, and pings still answered while the streams in flight finish. Meanwhile it
/// unbinds the names whose authorization goes: at each reload of `authorization`, and when a
/// DNS grant is due to be checked again.
async fn keep_alive(
    control: MuxStream,
    session: &Session,
    tunnel: TunnelId,
    shared: &Shared,
    shutdown: &CancellationToken,
    bound: &mut BoundNames,
    mut authorization: watch::Receiver<Arc<Authorization>>,
) -> Result<(), TunnelError> {
    let idle = shared.limits.tunnel_idle_timeout;
    let (reader, mut writer) = tokio::io::split(control);
    let mut messages = spawn_reader(reader);
    loop {
        let next_check = bound.next_dns_check();
        let withdrawn = tokio::select! {
            () = sleep_until_or_never(next_check) => bound.recheck_dns(tunnel, shared).await,
            Ok(()) = authorization.changed() => {
                let in_force = authorization.borrow_and_update().clone();
                bound.recheck(&in_force, tunnel, shared).await
            }
            message = timeout(idle, messages.recv()) => match message {
                Err(_) => return Err(TunnelError::Timeout("a keepalive from the client")),
                Ok(None) => return Ok(()),
                Ok(Some(message)) => {
                    if !answer(&mut writer, message?).await? {
                        return Ok(());
                    }
                    Vec::new()
                }
            },
            () = session.closed() => return Ok(()),
            () = shutdown.cancelled() => break,
        };
        if withdrawn.is_empty() {
            continue;
        }
        bound.tell(&mut writer, &withdrawn).await?;
        if bound.names.is_empty() {
            // Let the client read why before the tunnel goes: close our side of the control
            // stream, and give it a moment to close its own.
            let _ = writer.shutdown().await;
            let _ = timeout(Duration::from_secs(2), async {
                while messages.recv().await.is_some() {}
            })
            .await;
            return Err(TunnelError::Revoked);
        }
    }
    // Draining: the listeners are closed, so the only visitors still to come are those
    // accepted before and not yet routed; they may still use this tunnel (as a last resort).
    // Tell the client, which connects anew elsewhere, and let the streams finish.
    shared.registry.mark_draining(tunnel);
    debug!("sending go-away");
    let go_away = Message::GoAway {
        reason: "proxy shutting down".into(),
    };
    if let Err(err) = control::write_message(&mut writer, &go_away).await {
        warn!(%err, "could not send go-away");
    }
    // Only the control stream and the visitor streams already in flight remain.
    let drain_until = Instant::now() + shared.limits.drain_timeout;
    let mut check = tokio::time::interval(Duration::from_millis(50));
    while (session.open_streams() > 1 || shared.visitors_routing()) && !session.is_closed() {
        tokio::select! {
            () = tokio::time::sleep_until(drain_until) => break,
            _ = check.tick() => {}
            Some(message) = messages.recv() => {
                // A client that still pings its draining tunnel gets its answers; one that
                // misbehaves now only ends the drain early.
                let Ok(message) = message else { break };
                if !answer(&mut writer, message).await.unwrap_or(false) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Answers one control message of a bound tunnel. Returns false when the client is done.
async fn answer<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: Message,
) -> Result<bool, TunnelError> {
    match message {
        Message::Ping { nonce } => {
            control::write_message(writer, &Message::Pong { nonce }).await?;
            Ok(true)
        }
        Message::Pong { .. } => Ok(true),
        other => Err(unexpected(writer, &other, "ping").await),
    }
}

/// Reads control messages on a task of their own: reading one is not cancel-safe, so it must
/// not sit in a `select!` that other branches may win mid-message. The task ends with the
/// stream, after the first error, or when the receiver is dropped.
fn spawn_reader(mut reader: ReadHalf<MuxStream>) -> mpsc::Receiver<Result<Message, ReadError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let message = match control::read_message(&mut reader).await {
                Err(ReadError::Closed) => return,
                message => message,
            };
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

async fn unexpected<W: AsyncWrite + Unpin>(
    control: &mut W,
    got: &Message,
    wanted: &str,
) -> TunnelError {
    let detail = format!("expected {wanted}, got {}", message_name(got));
    let _ = send_error(control, ErrorCode::UnexpectedMessage, &detail).await;
    TunnelError::Protocol(detail)
}

async fn send_error<W: AsyncWrite + Unpin>(
    control: &mut W,
    code: ErrorCode,
    message: &str,
) -> std::io::Result<()> {
    let message = Message::Error {
        code,
        message: message.to_owned(),
    };
    control::write_message(control, &message).await
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "hello",
        Message::Challenge { .. } => "challenge",
        Message::Bind { .. } => "bind",
        Message::BindResult { .. } => "bind result",
        Message::Ping { .. } => "ping",
        Message::Pong { .. } => "pong",
        Message::GoAway { .. } => "go-away",
        Message::Unbound { .. } => "unbound",
        Message::Error { .. } => "error",
    }
}

/// Closing a control stream cleanly: shut our side and wait for the client to close its own,
/// so the bind result is not lost to a reset.
trait ShutdownAndWait {
    async fn shutdown_and_wait(&mut self);
}

impl ShutdownAndWait for MuxStream {
    async fn shutdown_and_wait(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.shutdown().await.is_ok() {
            let mut sink = [0u8; 64];
            while matches!(self.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    }
}

/// The names a bound tunnel holds, and what each holds by.
struct BoundNames {
    key: Option<PublicKey>,
    names: Vec<Held>,
    /// The tunnel's count against its key's limits; a name unbound leaves it.
    admitted: Option<KeyGuard>,
    /// The protocol version agreed in Hello: whether the client can be sent `Unbound`.
    version: u8,
}

/// One bound name.
struct Held {
    name: String,
    /// When a name granted by a `_shroud` TXT record is to be checked again; `None` for a
    /// name the authorized file or the word names grant.
    dns_due: Option<Instant>,
}

/// A name taken from a tunnel, and why: what a bind of it would be told now.
struct Withdrawn {
    hostname: String,
    status: BindStatus,
    reason: String,
}

/// How long a name granted by DNS stays bound when DNS cannot be asked, past its TTL.
const DNS_FAILURE_GRACE: Duration = Duration::from_secs(300);
/// How soon to ask again after DNS could not be asked.
const DNS_RETRY: Duration = Duration::from_secs(30);

impl BoundNames {
    fn next_dns_check(&self) -> Option<Instant> {
        self.names.iter().filter_map(|held| held.dns_due).min()
    }

    /// Checks every name against `authorization`, just put in force by a reload, and unbinds
    /// those nothing grants any more. A name the authorized file (or the word names) no longer
    /// grants may still hold by DNS, when the proxy consults it; a name DNS granted already
    /// is left to its own next check.
    async fn recheck(
        &mut self,
        authorization: &Authorization,
        tunnel: TunnelId,
        shared: &Shared,
    ) -> Vec<Withdrawn> {
        let Some(key) = self.key else {
            return Vec::new();
        };
        let mut withdrawn = Vec::new();
        let mut kept = Vec::with_capacity(self.names.len());
        for mut held in std::mem::take(&mut self.names) {
            let Some((status, reason)) = refusal(&held.name, &key, authorization) else {
                held.dns_due = None;
                kept.push(held);
                continue;
            };
            let word_name = words::word_domain(&held.name, &authorization.word_domains).is_some();
            let verdict = match &shared.dns {
                Some(_) if held.dns_due.is_some() && !word_name => {
                    kept.push(held);
                    continue;
                }
                Some(authorizer) if !word_name => authorizer.allows(&held.name, &key).await,
                _ => {
                    let reason = format!("no longer granted: {reason}");
                    withdrawn.push(self.unbind(held.name, status, reason));
                    continue;
                }
            };
            match verdict {
                DnsVerdict::Allowed { valid_for } => {
                    held.dns_due = Some(Instant::now() + valid_for);
                    kept.push(held);
                }
                DnsVerdict::NotListed => {
                    let reason = format!(
                        "this key is no longer authorized for this hostname on this proxy, nor \
                         by a TXT record at _shroud.{}",
                        held.name
                    );
                    withdrawn.push(self.unbind(held.name, BindStatus::NotListed, reason));
                }
                DnsVerdict::Unavailable(why) => {
                    // A check that cannot be made refuses; it never grants.
                    let reason = format!(
                        "the authorized file no longer grants this hostname, and its DNS \
                         authorization could not be checked: {why}"
                    );
                    withdrawn.push(self.unbind(held.name, BindStatus::Unavailable, reason));
                }
            }
        }
        self.names.extend(kept);
        for gone in &withdrawn {
            shared.registry.unbind_name(tunnel, &gone.hostname);
            info!(tunnel, hostname = %gone.hostname, status = ?gone.status, reason = %gone.reason,
                  "no longer authorized; unbinding");
        }
        withdrawn
    }

    /// Checks every name granted by DNS that is due; unbinds those whose record no longer
    /// lists the key (or that could not be checked for too long). A name the authorized file
    /// grants by now needs no record.
    async fn recheck_dns(&mut self, tunnel: TunnelId, shared: &Shared) -> Vec<Withdrawn> {
        let (Some(key), Some(authorizer)) = (self.key, &shared.dns) else {
            for held in &mut self.names {
                held.dns_due = None;
            }
            return Vec::new();
        };
        let authorization = shared.authorization();
        let now = Instant::now();
        let mut withdrawn = Vec::new();
        let mut kept = Vec::with_capacity(self.names.len());
        for mut held in std::mem::take(&mut self.names) {
            let Some(at) = held.dns_due.filter(|at| *at <= now) else {
                kept.push(held);
                continue;
            };
            if refusal(&held.name, &key, &authorization).is_none() {
                held.dns_due = None;
                kept.push(held);
                continue;
            }
            match authorizer.allows(&held.name, &key).await {
                DnsVerdict::Allowed { valid_for } => {
                    held.dns_due = Some(Instant::now() + valid_for);
                    kept.push(held);
                }
                DnsVerdict::NotListed => {
                    info!(hostname = %held.name, "DNS no longer authorizes this key; unbinding");
                    let reason = format!(
                        "the TXT record at _shroud.{} no longer lists this key",
                        held.name
                    );
                    withdrawn.push(self.unbind(held.name, BindStatus::NotListed, reason));
                }
                DnsVerdict::Unavailable(why) if now.duration_since(at) < DNS_FAILURE_GRACE => {
                    warn!(hostname = %held.name, %why, "cannot recheck DNS authorization; will retry");
                    held.dns_due = Some(now + DNS_RETRY);
                    kept.push(held);
                }
                DnsVerdict::Unavailable(why) => {
                    warn!(hostname = %held.name, %why, "DNS authorization unverifiable for too long; unbinding");
                    let reason = format!(
                        "the DNS authorization could not be checked for {} minutes: {why}",
                        DNS_FAILURE_GRACE.as_secs() / 60
                    );
                    withdrawn.push(self.unbind(held.name, BindStatus::Unavailable, reason));
                }
            }
        }
        self.names.extend(kept);
        for gone in &withdrawn {
            shared.registry.unbind_name(tunnel, &gone.hostname);
        }
        withdrawn
    }

    /// Stops counting `hostname` against the tunnel's key; the caller takes it out of the
    /// registry.
    fn unbind(&mut self, hostname: String, status: BindStatus, reason: String) -> Withdrawn {
        release_name(&mut self.admitted, &hostname);
        Withdrawn {
            hostname,
            status,
            reason,
        }
    }

    /// Tells the client which names were taken and why, if its protocol version can hear it;
    /// a version 1 client learns why at its next bind.
    async fn tell<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        withdrawn: &[Withdrawn],
    ) -> Result<(), TunnelError> {
        if self.version < UNBOUND_SINCE {
            return Ok(());
        }
        for gone in withdrawn {
            let unbound = Message::Unbound {
                hostname: gone.hostname.clone(),
                status: gone.status,
                reason: gone.reason.clone(),
            };
            control::write_message(writer, &unbound).await?;
        }
        Ok(())
    }
}

/// Stops counting `name` against the tunnel's key.
fn release_name(admitted: &mut Option<KeyGuard>, name: &str) {
    if let Some(admitted) = admitted {
        admitted.release_name(name);
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
