//! One tunnel to one proxy, held for as long as the client runs.
//!
//! Each proxy gets its own task running [`hold`]: connect through the transport, TLS with
//! ALPN `shroud/1` (the proxy's certificate checked for its name), yamux, then the control
//! handshake and bind. While bound, it answers every stream the proxy opens (see
//! [`crate::origin`]) and pings the proxy; a missing pong marks the tunnel dead. On failure it
//! retries with exponential backoff and jitter; a refusal that retrying cannot change (a
//! malformed or reserved name, a certificate that does not verify) ends the task.
//!
//! A refusal by the proxy's policy (NotAuthorized), at bind time or later in an `Unbound`
//! message, is different: the proxy's operator may change the policy while it runs, so the
//! task asks that proxy again, but only after `--refused-retry-secs` (2 minutes by default),
//! never in a loop against the refusal, or at once when the client is told to (SIGHUP, see
//! [`crate::client::RetryRefused`]).
//!
//! When the proxy says go-away (it is restarting), the task reconnects while the old session
//! drains on a task of its own: it keeps serving streams, late ones included, until the proxy
//! closes it or the client stops.
//!
//! With Tor, the task holds its proxy's circuit across reconnects ([`KeptCircuit`]); before
//! an attempt that must build a new one it charges the churn budget ([`CircuitBudget`]), and
//! while the budget refuses, it waits (with a warning naming the proxy and why) rather than
//! build more. Reconnects on the held circuit cost nothing there, and are paced by the
//! backoff as any others are.

use std::sync::Arc;
use std::time::Duration;

use shroud_mux::auth::{self, EXPORTER_LABEL, EXPORTER_LEN};
use shroud_mux::control::{self, BindName, BindOutcome, BindStatus, Message, ReadError, VERSIONS};
use shroud_mux::{Incoming, MuxStream, Role, Session, SessionConfig};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument as _};

use crate::backoff::Backoff;
use crate::circuits::CircuitBudget;
use crate::origin;
use crate::shared::{ClientConfig, ProxyAddr, StateReporter, StreamTasks, TunnelState};
use crate::transport::KeptCircuit;

/// Why an attempt to bring a tunnel up failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The transport could not reach the proxy.
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake failed for a reason other than the certificate.
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// The proxy's certificate did not verify for its name.
    #[error("the proxy's certificate was refused: {0}")]
    Certificate(#[source] std::io::Error),
    /// The proxy did not agree to speak shroud.
    #[error("the proxy did not negotiate ALPN shroud/1 (is it a shroud proxy?)")]
    NotShroud,
    /// A step took too long.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The multiplexer or control stream failed.
    #[error("{0}")]
    Protocol(String),
    /// The proxy refused every hostname.
    #[error("bind refused: {0}")]
    Refused(String),
    /// The proxy refused every hostname, and trying again cannot change it.
    #[error("bind refused: {0}")]
    RefusedForGood(String),
    /// The proxy's policy refused every hostname: only its operator can change that, so the
    /// proxy is asked again only after a long wait.
    #[error("bind refused: {0}")]
    NotAuthorized(String),
}

impl AttemptError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Certificate(_) | Self::NotShroud | Self::RefusedForGood(_)
        )
    }
}

impl From<ReadError> for AttemptError {
    fn from(err: ReadError) -> Self {
        Self::Protocol(err.to_string())
    }
}

impl From<std::io::Error> for AttemptError {
    fn from(err: std::io::Error) -> Self {
        Self::Protocol(format!("control stream: {err}"))
    }
}

/// A tunnel that is up and bound.
struct Bound {
    session: Session,
    incoming: Incoming,
    control: MuxStream,
}

/// How a bound tunnel ended.
enum End {
    /// The proxy is draining; the session drains on a task of its own until the proxy closes it.
    GoAway,
    /// The tunnel failed.
    Lost(String),
    /// The tunnel was told to stop: the client is shutting down, or the proxy left the list.
    Shutdown,
    /// The proxy took the hostname away (`Unbound`), as a bind would now be refused.
    Unbound {
        /// The status a bind would get.
        status: BindStatus,
        /// The proxy's reason.
        reason: String,
    },
}

/// What a tunnel task does after an attempt or a session ends.
enum Next {
    /// Try again after the backoff's next delay; `failed` says the attempt itself failed (it
    /// is worth a warning, with the delay).
    Backoff { reason: String, failed: bool },
    /// The proxy's policy refused: ask it again only after the long wait, or when told to.
    Refused { reason: String },
}

/// Holds a tunnel to `proxy` until `stop` is cancelled, or until the proxy refuses for good.
/// Returns the reason in the latter case. Visitor streams, and sessions the proxy is draining,
/// run on `tasks`. A change seen on `retry` cuts short the wait after a policy refusal. Each
/// new circuit (with Tor) is charged to `circuits` first.
pub async fn hold(
    proxy: ProxyAddr,
    config: Arc<ClientConfig>,
    state: StateReporter,
    stop: CancellationToken,
    tasks: StreamTasks,
    mut retry: watch::Receiver<u64>,
    circuits: Arc<CircuitBudget>,
) -> Option<String> {
    let timing = &config.timing;
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_cap, timing.stable_after);
    let mut circuit = config.transport.circuit();
    loop {
        if let Some(kept) = circuit.as_deref_mut() {
            if !kept.is_held() && !charge_circuit(&proxy, kept, &circuits, &state, &stop).await {
                break;
            }
        }
        state.send_replace(TunnelState::Connecting);
        let attempt = tokio::select! {
            () = stop.cancelled() => break,
            attempt = connect_and_bind(&proxy, &config, circuit.as_deref_mut()) => attempt,
        };
        config.metrics.attempt(attempt.as_ref().map(|_| ()));
        let next = match attempt {
            Ok(bound) => {
                info!("tunnel up");
                state.send_replace(TunnelState::Bound);
                backoff.record_connected(Instant::now());
                match serve(bound, &config, &stop, &tasks).await {
                    End::Shutdown => break,
                    End::GoAway => {
                        config.metrics.tunnel_ended(true);
                        // The proxy refuses new tunnels until it is back: the jittered delays
                        // from the base spread a fleet's attempts while it restarts.
                        backoff.record_go_away(Instant::now());
                        info!("proxy is draining; reconnecting");
                        Next::Backoff {
                            reason: "the proxy is draining".to_owned(),
                            failed: false,
                        }
                    }
                    End::Lost(reason) => {
                        config.metrics.tunnel_ended(false);
                        backoff.record_disconnected(Instant::now());
                        info!(%reason, "tunnel lost");
                        Next::Backoff {
                            reason,
                            failed: false,
                        }
                    }
                    End::Unbound { status, reason } => {
                        config.metrics.tunnel_ended(false);
                        backoff.record_disconnected(Instant::now());
                        let reason = format!("the proxy unbound {}: {reason}", config.hostname);
                        if status == BindStatus::NotAuthorized {
                            Next::Refused { reason }
                        } else {
                            Next::Backoff {
                                reason,
                                failed: true,
                            }
                        }
                    }
                }
            }
            Err(err) if err.is_permanent() => {
                error!(%err, "giving up on this proxy");
                let reason = err.to_string();
                state.send_replace(TunnelState::Failed {
                    reason: reason.clone(),
                });
                return Some(reason);
            }
            Err(err @ AttemptError::NotAuthorized(_)) => Next::Refused {
                reason: err.to_string(),
            },
            Err(err) => Next::Backoff {
                reason: err.to_string(),
                failed: true,
            },
        };
        match next {
            Next::Backoff { reason, failed } => {
                let delay = backoff.next_delay();
                if failed {
                    // Say when the next try is: a refusal that can change without the client
                    // (a TXT record not yet published, a limit) is waited out, not given up on.
                    warn!(err = %reason, retry_in_secs = delay.as_secs(), "tunnel attempt failed; trying again");
                } else {
                    debug!(?delay, "waiting before the next attempt");
                }
                state.send_replace(TunnelState::Waiting { reason });
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Next::Refused { reason } => {
                // Only the proxy's operator can change this; asking again in a loop would only
                // load the proxy with refusals.
                let wait = timing.refused_retry;
                info!(
                    retry_in_secs = wait.as_secs(),
                    "not authorized by this proxy; asking it again later, or at once on SIGHUP"
                );
                state.send_replace(TunnelState::Waiting { reason });
                retry.borrow_and_update();
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    Ok(()) = retry.changed() => info!("asking the proxy again, as told"),
                }
            }
        }
    }
    state.send_replace(TunnelState::Stopped);
    None
}

/// Charges a new circuit for `proxy`'s tunnel to the budget, waiting while the budget refuses.
/// Returns false if `stop` came first.
async fn charge_circuit(
    proxy: &ProxyAddr,
    kept: &dyn KeptCircuit,
    circuits: &CircuitBudget,
    state: &StateReporter,
    stop: &CancellationToken,
) -> bool {
    loop {
        let exhausted = match circuits.charge(proxy) {
            Ok(()) => return true,
            Err(exhausted) => exhausted,
        };
        let wait = exhausted
            .until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let last = kept.given_up().unwrap_or("none given up yet");
        warn!(
            proxy = %proxy,
            reason = %exhausted,
            last_circuit_given_up_because = last,
            retry_in_secs = wait.as_secs(),
            "this proxy's tunnel waits for the circuit budget rather than build another Tor \
             circuit; the other tunnels carry visitors"
        );
        state.send_replace(TunnelState::Waiting {
            reason: format!("circuit budget: {exhausted}"),
        });
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Connects, handshakes and binds once: on `circuit` when the transport keeps one.
async fn connect_and_bind(
    proxy: &ProxyAddr,
    config: &ClientConfig,
    circuit: Option<&mut (dyn KeptCircuit + '_)>,
) -> Result<Bound, AttemptError> {
    let timing = &config.timing;
    let connect = match circuit {
        Some(circuit) => circuit.connect(proxy.dial_host(), proxy.port),
        None => config.transport.connect(proxy.dial_host(), proxy.port),
    };
    let io = timeout(timing.connect_timeout, connect)
        .await
        .map_err(|_| AttemptError::Timeout("the connection to the proxy"))?
        .map_err(AttemptError::Connect)?;

    let deadline = Instant::now() + timing.handshake_timeout;
    let server_name = crate::tls::server_name(&proxy.name)
        .map_err(|err| AttemptError::Protocol(err.to_string()))?;
    let connector = TlsConnector::from(config.tls.clone());
    let tls = tokio::time::timeout_at(deadline, connector.connect(server_name, io))
        .await
        .map_err(|_| AttemptError::Timeout("the TLS handshake"))?
        .map_err(classify_tls_error)?;
    let (_, connection) = tls.get_ref();
    if connection.alpn_protocol() != Some(shroud_mux::ALPN) {
        return Err(AttemptError::NotShroud);
    }
    let exporter: [u8; EXPORTER_LEN] = connection
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(|err| AttemptError::Protocol(format!("TLS exporter: {err}")))?;

    let session_config = SessionConfig {
        max_streams: timing.max_streams,
        accept_backlog: timing.max_streams,
        stream_buffer: timing.stream_buffer,
    };
    let (session, incoming) = Session::spawn(tls, Role::Client, session_config);
    let bind = async {
        let mut control = session
            .open()
            .await
            .map_err(|err| AttemptError::Protocol(err.to_string()))?;
        bind(&mut control, &exporter, config).await?;
        Ok::<_, AttemptError>(control)
    };
    match tokio::time::timeout_at(deadline, bind).await {
        Ok(Ok(control)) => Ok(Bound {
            session,
            incoming,
            control,
        }),
        Ok(Err(err)) => {
            session.close();
            Err(err)
        }
        Err(_) => {
            session.close();
            Err(AttemptError::Timeout("the bind"))
        }
    }
}

fn classify_tls_error(err: std::io::Error) -> AttemptError {
    let certificate = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if certificate {
        AttemptError::Certificate(err)
    } else {
        AttemptError::Tls(err)
    }
}

/// Hello, challenge, bind, result, on the control stream.
async fn bind(
    control: &mut MuxStream,
    exporter: &[u8; EXPORTER_LEN],
    config: &ClientConfig,
) -> Result<(), AttemptError> {
    control::write_message(
        control,
        &Message::Hello {
            versions: VERSIONS.to_vec(),
        },
    )
    .await?;
    match control::read_message(control).await? {
        // Version 1 proxies never send Unbound; nothing else differs.
        Message::Hello { versions } if versions.len() == 1 && VERSIONS.contains(&versions[0]) => {}
        Message::Error { message, .. } => return Err(AttemptError::RefusedForGood(message)),
        other => return Err(unexpected(&other, "hello")),
    }
    let challenge = match control::read_message(control).await? {
        Message::Challenge { challenge } => challenge,
        other => return Err(unexpected(&other, "challenge")),
    };
    let names = vec![config.hostname.clone()];
    let key = config.key.public();
    let transcript = auth::bind_transcript(&challenge, exporter, &key, &names);
    let bind = Message::Bind {
        key: key.to_bytes(),
        signature: config.key.sign(&transcript),
        hostnames: names
            .iter()
            .map(|name| BindName {
                name: name.clone(),
                http: config.http_target.is_some(),
            })
            .collect(),
    };
    control::write_message(control, &bind).await?;
    let results = match control::read_message(control).await? {
        Message::BindResult { results } => results,
        Message::Error { message, .. } => return Err(AttemptError::Protocol(message)),
        other => return Err(unexpected(&other, "bind result")),
    };
    for result in results.iter().filter(|r| r.status != BindStatus::Bound) {
        config.metrics.bind_refused(result.status);
    }
    check_results(&results, &names)
}

/// Accepts the bind result if the hostname was bound; otherwise says why not, and whether
/// trying again soon, later, or never can change it.
fn check_results(results: &[BindOutcome], names: &[String]) -> Result<(), AttemptError> {
    let mut bound = 0;
    let mut refusals = Vec::new();
    // Every refusal is one that no retry can change.
    let mut for_good = true;
    // Every refusal is for good, or the policy's, which only its operator can change.
    let mut not_soon = true;
    for name in names {
        match results.iter().find(|r| &r.name == name) {
            Some(r) if r.status == BindStatus::Bound => bound += 1,
            Some(r) => {
                for_good &= r.status.is_permanent() && r.status != BindStatus::NotAuthorized;
                not_soon &= r.status.is_permanent();
                refusals.push(format!("{}: {}", r.name, r.reason));
            }
            None => {
                (for_good, not_soon) = (false, false);
                refusals.push(format!("{name}: no answer from the proxy"));
            }
        }
    }
    for refusal in &refusals {
        warn!(%refusal, "hostname not bound");
    }
    match (bound, for_good, not_soon) {
        (0, true, _) => Err(AttemptError::RefusedForGood(refusals.join("; "))),
        (0, false, true) => Err(AttemptError::NotAuthorized(refusals.join("; "))),
        (0, false, false) => Err(AttemptError::Refused(refusals.join("; "))),
        _ => Ok(()),
    }
}

fn unexpected(got: &Message, wanted: &str) -> AttemptError {
    AttemptError::Protocol(format!("expected {wanted} from the proxy, got {got:?}"))
}

/// Serves a bound tunnel: streams from the proxy, and keepalive on the control stream. After a
/// go-away the session is left to drain on `tasks`.
async fn serve(
    bound: Bound,
    config: &Arc<ClientConfig>,
    stop: &CancellationToken,
    tasks: &StreamTasks,
) -> End {
    let Bound {
        session,
        mut incoming,
        control,
    } = bound;
    let (reader, mut writer) = tokio::io::split(control);
    let mut messages = spawn_reader(reader);
    let interval = config.timing.keepalive_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    let mut outstanding: Option<(u64, Instant)> = None;
    let mut nonce = 0u64;

    let end = loop {
        tokio::select! {
            () = stop.cancelled() => break End::Shutdown,
            stream = incoming.accept() => match stream {
                Some(stream) => {
                    tasks.tracker.spawn(origin::serve_stream(stream, config.clone()));
                }
                None => break End::Lost("the proxy closed the tunnel".into()),
            },
            message = messages.recv() => match message {
                Some(Ok(Message::Pong { nonce: n })) => {
                    if outstanding.is_some_and(|(sent, _)| sent == n) {
                        outstanding = None;
                    }
                }
                Some(Ok(Message::Ping { nonce: n })) => {
                    if let Err(err) = send(&mut writer, &Message::Pong { nonce: n }, interval).await {
                        break End::Lost(err);
                    }
                }
                Some(Ok(Message::GoAway { reason })) => {
                    info!(%reason, "go-away from the proxy");
                    break End::GoAway;
                }
                Some(Ok(Message::Unbound { hostname, status, reason })) => {
                    if hostname == config.hostname {
                        warn!(%hostname, ?status, %reason, "the proxy unbound this hostname");
                        break End::Unbound { status, reason };
                    }
                    debug!(%hostname, "the proxy unbound a name this tunnel never bound; ignored");
                }
                Some(Ok(Message::Error { message, .. })) => {
                    break End::Lost(format!("the proxy reported an error: {message}"));
                }
                Some(Ok(other)) => {
                    break End::Lost(format!("unexpected message from the proxy: {other:?}"));
                }
                Some(Err(err)) => break End::Lost(err.to_string()),
                None => break End::Lost("control stream ended".into()),
            },
            _ = ticker.tick() => {
                if let Some((_, sent)) = outstanding {
                    if sent.elapsed() >= interval * 2 {
                        break End::Lost(format!("no keepalive answer in {:?}", interval * 2));
                    }
                    continue;
                }
                nonce += 1;
                if let Err(err) = send(&mut writer, &Message::Ping { nonce }, interval).await {
                    break End::Lost(err);
                }
                outstanding = Some((nonce, Instant::now()));
            }
        }
    };
    match end {
        End::GoAway => {
            let draining = Draining {
                session,
                incoming,
                messages,
                writer,
            };
            let drain = draining.run(config.clone(), tasks.clone());
            tasks.tracker.spawn(drain.in_current_span());
        }
        End::Lost(_) | End::Shutdown | End::Unbound { .. } => session.close(),
    }
    end
}

/// A session the proxy is draining. It opens no new streams after its go-away, but one it had
/// begun to open (for a visitor routed just before) may still arrive, and streams in flight run
/// until they finish; the proxy closes the session when they are done or its drain deadline
/// passes.
struct Draining {
    session: Session,
    incoming: Incoming,
    messages: mpsc::Receiver<Result<Message, ReadError>>,
    writer: WriteHalf<MuxStream>,
}

impl Draining {
    /// Serves streams as a bound tunnel does, and keeps the keepalive going both ways, until
    /// the session closes, the proxy stops answering, or the client stops. When the session
    /// ends is the proxy's to decide, within its drain deadline; the pings only catch a proxy
    /// (or path) that died silently meanwhile, which would otherwise hold the session forever.
    async fn run(mut self, config: Arc<ClientConfig>, tasks: StreamTasks) {
        let interval = config.timing.keepalive_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut outstanding: Option<(u64, Instant)> = None;
        let mut nonce = 0u64;
        let mut control_open = true;
        loop {
            tokio::select! {
                () = tasks.shutdown.cancelled() => {
                    self.session.close();
                    break;
                }
                _ = ticker.tick(), if control_open => {
                    if let Some((_, sent)) = outstanding {
                        if sent.elapsed() >= interval * 2 {
                            debug!("the draining proxy stopped answering; closing");
                            self.session.close();
                            break;
                        }
                        continue;
                    }
                    nonce += 1;
                    let ping = Message::Ping { nonce };
                    if let Err(err) = send(&mut self.writer, &ping, interval).await {
                        debug!(%err, "cannot ping the draining tunnel");
                        control_open = false;
                    }
                    outstanding = Some((nonce, Instant::now()));
                }
                stream = self.incoming.accept() => match stream {
                    Some(stream) => {
                        debug!("stream opened on a draining tunnel");
                        tasks.tracker.spawn(origin::serve_stream(stream, config.clone()));
                    }
                    None => break,
                },
                message = self.messages.recv(), if control_open => match message {
                    Some(Ok(Message::Ping { nonce })) => {
                        let pong = Message::Pong { nonce };
                        if let Err(err) = send(&mut self.writer, &pong, interval).await {
                            debug!(%err, "cannot answer pings on the draining tunnel");
                            control_open = false;
                        }
                    }
                    Some(Ok(Message::Pong { nonce: n })) => {
                        if outstanding.is_some_and(|(sent, _)| sent == n) {
                            outstanding = None;
                        }
                    }
                    // The go-away again, or names taken from a tunnel already leaving.
                    Some(Ok(Message::GoAway { .. } | Message::Unbound { .. })) => {}
                    Some(Ok(other)) => {
                        debug!(message = ?other, "the proxy broke off its drain; closing");
                        self.session.close();
                        break;
                    }
                    // The streams in flight may well outlive the control stream.
                    Some(Err(_)) | None => control_open = false,
                },
            }
        }
        debug!("drained tunnel closed");
    }
}

async fn send(
    writer: &mut WriteHalf<MuxStream>,
    message: &Message,
    limit: Duration,
) -> Result<(), String> {
    match timeout(limit, control::write_message(writer, message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("control stream: {err}")),
        Err(_) => Err("control stream write timed out".into()),
    }
}

/// Reads control messages on a task of their own: reading is not cancel-safe, so it must not
/// sit in a `select!` that other branches win.
fn spawn_reader(mut reader: ReadHalf<MuxStream>) -> mpsc::Receiver<Result<Message, ReadError>> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let message = control::read_message(&mut reader).await;
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod bind_result_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn refused(status: BindStatus, reason: &str) -> Vec<BindOutcome> {
        vec![BindOutcome {
            name: "example.test".into(),
            status,
            reason: reason.into(),
        }]
    }

    #[test]
    fn a_limit_refusal_is_retried_and_says_which_limit() {
        let names = ["example.test".to_owned()];
        let reason = "this key already holds 2 tunnels on this proxy (--max-tunnels-per-key)";
        let err = check_results(&refused(BindStatus::LimitReached, reason), &names).unwrap_err();
        assert!(!err.is_permanent());
        assert!(err.to_string().contains("--max-tunnels-per-key"), "{err}");
        // So is a status from a newer proxy that this client does not know.
        let err = check_results(&refused(BindStatus::Other(9), "new"), &names).unwrap_err();
        assert!(!err.is_permanent());
    }

    #[test]
    fn a_policy_refusal_is_asked_again_only_slowly() {
        let names = ["example.test".to_owned()];
        let reason = "this key is not authorized for this hostname on this proxy";
        let err = check_results(&refused(BindStatus::NotAuthorized, reason), &names).unwrap_err();
        assert!(matches!(err, AttemptError::NotAuthorized(_)), "{err:?}");
        assert!(!err.is_permanent());
        assert!(err.to_string().contains(reason), "{err}");
        // NotListed waits for a DNS record, which may appear any moment: the usual backoff.
        let err = check_results(&refused(BindStatus::NotListed, "no record"), &names).unwrap_err();
        assert!(matches!(err, AttemptError::Refused(_)), "{err:?}");
    }

    #[test]
    fn a_bind_that_alone_exceeds_a_limit_is_not_retried() {
        let names = ["example.test".to_owned()];
        let reason = "this bind asks for more hostnames than this proxy lets one key hold";
        let err = check_results(&refused(BindStatus::ExceedsLimit, reason), &names).unwrap_err();
        assert!(err.is_permanent());
        assert!(err.to_string().contains(reason), "{err}");
    }
}

#[cfg(test)]
mod tests;
