//! A client's tunnel, from its TLS handshake to its last stream.
//!
//! The proxy terminates the tunnel's TLS with its own certificate, runs yamux over it, and
//! expects the client to open the control stream: hello, challenge, bind, result. Bound names
//! enter the [`Registry`](crate::registry::Registry) until the tunnel ends. On shutdown the
//! proxy sends go-away, takes the names out of the registry so that no new visitor lands here,
//! and lets the streams in flight finish up to the drain deadline.

use std::sync::Arc;
use std::time::Duration;

use shroud_mux::auth::{self, PublicKey, EXPORTER_LABEL, EXPORTER_LEN};
use shroud_mux::control::{
    self, BindName, BindOutcome, BindStatus, ErrorCode, Message, ReadError, VERSION,
};
use shroud_mux::{hostname, words, MuxStream, Role, Session, SessionConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{AddressGuard, KeyGuard};
use crate::dns_auth::DnsVerdict;
use crate::registry::TunnelId;
use crate::shared::Shared;

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
    /// Every name the tunnel had bound lost its DNS authorization.
    #[error("every hostname's DNS authorization was withdrawn")]
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
    mut address: Option<AddressGuard>,
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
    let tls = tokio::time::timeout_at(deadline, shared.tls_acceptor.accept(io))
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
    if granted.names.is_empty() {
        // Give the client a moment to read the result before the connection goes.
        let _ = timeout(Duration::from_secs(2), control.shutdown_and_wait()).await;
        session.close();
        return Ok(());
    }

    let names: Vec<&str> = granted.names.iter().map(|n| n.name.as_str()).collect();
    info!(tunnel, %peer, hostnames = ?names, "tunnel bound");

    let mut rechecks = DnsRechecks {
        key: granted.key,
        due: granted.dns,
        bound: granted.names.len(),
        admitted: granted.admitted,
    };
    let result = keep_alive(control, &session, tunnel, &shared, &shutdown, &mut rechecks).await;
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
    match control::read_message(control).await? {
        Message::Hello { versions } if versions.contains(&VERSION) => {}
        Message::Hello { versions } => {
            let detail =
                format!("this proxy speaks version {VERSION}; client offered {versions:?}");
            send_error(control, ErrorCode::UnsupportedVersion, &detail).await?;
            return Err(TunnelError::Protocol(detail));
        }
        other => return Err(unexpected(control, &other, "hello").await),
    }
    let challenge =
        auth::new_challenge().map_err(|err| TunnelError::Protocol(format!("random: {err}")))?;
    control::write_message(
        control,
        &Message::Hello {
            versions: vec![VERSION],
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
    let (verified, mut judged) =
        judge_bind(&key, &signature, &hostnames, &challenge, exporter, shared);
    let mut dns = Vec::new();
    if let (Some(key), Some(authorizer)) = (&verified, &shared.dns) {
        for (entry, outcome) in hostnames.iter().zip(judged.iter_mut()) {
            // A word name is its key's or no one's: DNS cannot grant it.
            let word_name = words::word_domain(&entry.name, &shared.word_domains).is_some();
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
    })
}

/// The proxy's verdict on each hostname of a bind, from the proof and the authorized file;
/// DNS is consulted afterwards for names the file does not grant. Returns the key when the
/// proof verified.
fn judge_bind(
    key: &[u8; 32],
    signature: &[u8; 64],
    hostnames: &[BindName],
    challenge: &[u8; 32],
    exporter: &[u8; EXPORTER_LEN],
    shared: &Shared,
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
            Ok(_) if words::allows(&h.name, &shared.word_domains, &key) => {
                outcome(h, BindStatus::Bound, "")
            }
            // Under a word-name domain, a key binds its own words and nothing else.
            Ok(_) => match words::word_domain(&h.name, &shared.word_domains) {
                Some(domain) => outcome(
                    h,
                    BindStatus::NotAuthorized,
                    &format!(
                        "names under {domain} are word names, each bound by the key whose words \
                         it is; this key's is {}",
                        words::word_name(&key, domain)
                    ),
                ),
                None if shared.policy.allows(&h.name, &key) => outcome(h, BindStatus::Bound, ""),
                None => outcome(
                    h,
                    BindStatus::NotAuthorized,
                    "this key is not authorized for this hostname on this proxy",
                ),
            },
        })
        .collect();
    (Some(key), judged)
}

/// Answers pings until the client goes quiet, the session ends, or the proxy shuts down; then
/// drains: go-away, and pings still answered while the streams in flight finish.
async fn keep_alive(
    control: MuxStream,
    session: &Session,
    tunnel: TunnelId,
    shared: &Shared,
    shutdown: &CancellationToken,
    rechecks: &mut DnsRechecks,
) -> Result<(), TunnelError> {
    let idle = shared.limits.tunnel_idle_timeout;
    let (reader, mut writer) = tokio::io::split(control);
    let mut messages = spawn_reader(reader);
    loop {
        let next_check = rechecks.next_due();
        tokio::select! {
            () = sleep_until_or_never(next_check) => {
                if rechecks.run(tunnel, shared).await == 0 {
                    return Err(TunnelError::Revoked);
                }
            }
            message = timeout(idle, messages.recv()) => match message {
                Err(_) => return Err(TunnelError::Timeout("a keepalive from the client")),
                Ok(None) => return Ok(()),
                Ok(Some(message)) => {
                    if !answer(&mut writer, message?).await? {
                        return Ok(());
                    }
                }
            },
            () = session.closed() => return Ok(()),
            () = shutdown.cancelled() => break,
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

/// The names of a tunnel that hold only while their `_shroud` TXT record lists the key.
struct DnsRechecks {
    key: Option<PublicKey>,
    due: Vec<(String, Instant)>,
    /// How many names the tunnel still has bound.
    bound: usize,
    /// The tunnel's count against its key's limits; a name DNS unbinds leaves it.
    admitted: Option<KeyGuard>,
}

/// How long a name granted by DNS stays bound when DNS cannot be asked, past its TTL.
const DNS_FAILURE_GRACE: Duration = Duration::from_secs(300);
/// How soon to ask again after DNS could not be asked.
const DNS_RETRY: Duration = Duration::from_secs(30);

impl DnsRechecks {
    fn next_due(&self) -> Option<Instant> {
        self.due.iter().map(|(_, at)| *at).min()
    }

    /// Checks every name that is due; unbinds those whose record no longer lists the key.
    /// Returns how many names the tunnel still has bound.
    async fn run(&mut self, tunnel: TunnelId, shared: &Shared) -> usize {
        let (Some(key), Some(authorizer)) = (&self.key, &shared.dns) else {
            self.due.clear();
            return self.bound;
        };
        let now = Instant::now();
        let mut kept = Vec::new();
        for (name, at) in std::mem::take(&mut self.due) {
            if at > now {
                kept.push((name, at));
                continue;
            }
            match authorizer.allows(&name, key).await {
                DnsVerdict::Allowed { valid_for } => kept.push((name, Instant::now() + valid_for)),
                DnsVerdict::NotListed => {
                    info!(hostname = %name, "DNS no longer authorizes this key; unbinding");
                    shared.registry.unbind_name(tunnel, &name);
                    release_name(&mut self.admitted, &name);
                    self.bound -= 1;
                }
                DnsVerdict::Unavailable(why) if now.duration_since(at) < DNS_FAILURE_GRACE => {
                    warn!(hostname = %name, %why, "cannot recheck DNS authorization; will retry");
                    kept.push((name, now + DNS_RETRY));
                }
                DnsVerdict::Unavailable(why) => {
                    warn!(hostname = %name, %why, "DNS authorization unverifiable for too long; unbinding");
                    shared.registry.unbind_name(tunnel, &name);
                    release_name(&mut self.admitted, &name);
                    self.bound -= 1;
                }
            }
        }
        self.due = kept;
        self.bound
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
