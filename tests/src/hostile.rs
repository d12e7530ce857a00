//! Hostile proxies: TLS listeners on 127.0.0.1 that speak just enough of shroud's protocol to
//! take a client's tunnel, and then misbehave in one way each ([`Behaviour`]), for the
//! churn-budget tests (`tests/tests/tor_churn.rs`). Each notes every tunnel that arrives and,
//! through Tor, which exit relay's process it came from (read from `/proc` while the
//! connection is open), so a test can count the client's circuits from outside the client.
//!
//! A fixture in the tests crate rather than switches on the real proxy: nothing here belongs
//! in the shipped binary.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use shroud_mux::control::{self, BindOutcome, BindStatus, Message};
use shroud_mux::{MuxStream, Role, Session, SessionConfig};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::stack::Pki;
use crate::tornet::{connections_to, socket_owner};

/// How long one step of the handshake may take before the fixture drops the connection.
const STEP: Duration = Duration::from_secs(30);

/// What a hostile proxy does with each tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Binds the tunnel, then closes the connection this long after the bind.
    DropAfter(Duration),
    /// Binds the tunnel, then says go-away this long after the bind and closes the session
    /// soon after, every time.
    GoAwayAfter(Duration),
    /// Completes the TLS handshake, then never answers.
    StallAfterTls,
    /// Never accepts: its listen queue holds one connection, and the SYNs of every later one
    /// go unanswered, so the exit's connection hangs.
    Blackhole,
}

/// One tunnel connection that reached the fixture.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// When it arrived.
    pub at: Instant,
    /// Its far end (a Tor exit's socket).
    pub peer: SocketAddr,
    /// The process at its far end: through Tor, an exit relay's tor.
    pub owner: Option<u32>,
}

/// A hostile proxy; stops when dropped.
pub struct HostileProxy {
    /// The name its certificate is for.
    pub name: String,
    /// Its listener on 127.0.0.1.
    pub addr: SocketAddr,
    /// What it does.
    pub behaviour: Behaviour,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
}

impl Drop for HostileProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl HostileProxy {
    /// Starts one on a free port of 127.0.0.1, with a certificate for `name` from `pki`.
    ///
    /// # Errors
    /// If the listener cannot be bound.
    pub async fn start(pki: &Pki, name: &str, behaviour: Behaviour) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let addr = if behaviour == Behaviour::Blackhole {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let listener = socket.listen(0).context("listening")?;
            let addr = listener.local_addr()?;
            tokio::spawn(watch_connecting(
                listener,
                addr.port(),
                arrivals.clone(),
                stop.clone(),
            ));
            addr
        } else {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let tls = TlsAcceptor::from(pki.ca.issue(&[name]).server_config(&[shroud_mux::ALPN]));
            tokio::spawn(serve(
                listener,
                tls,
                behaviour,
                arrivals.clone(),
                stop.clone(),
            ));
            addr
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            behaviour,
            arrivals,
            stop,
        })
    }

    /// `NAME:PORT`, as `--proxy` takes it.
    pub fn proxy_arg(&self) -> String {
        format!("{}:{}", self.name, self.addr.port())
    }

    /// Every connection that reached it so far (for [`Behaviour::Blackhole`], every one seen
    /// queued or waiting on its SYN).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    behaviour: Behaviour,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let owner = stream
            .local_addr()
            .ok()
            .and_then(|local| socket_owner(peer, local));
        arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arrival {
                at: Instant::now(),
                peer,
                owner,
            });
        let (tls, stop) = (tls.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tunnel(stream, tls, behaviour) => {}
            }
        });
    }
}

/// One tunnel, misbehaving as told; an error only ends it.
async fn tunnel(stream: TcpStream, tls: TlsAcceptor, behaviour: Behaviour) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(STEP, tls.accept(stream)).await??;
    if behaviour == Behaviour::StallAfterTls {
        // Hold the connection open and say nothing, until the client gives up.
        let (mut reader, _writer) = tokio::io::split(tls);
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut reader, &mut sink).await;
        return Ok(());
    }
    let (session, mut incoming) = Session::spawn(tls, Role::Proxy, SessionConfig::default());
    let mut control = tokio::time::timeout(STEP, incoming.accept())
        .await?
        .context("no control stream")?;
    tokio::time::timeout(STEP, bind_all(&mut control)).await??;
    match behaviour {
        Behaviour::DropAfter(after) => {
            tokio::time::sleep(after).await;
        }
        Behaviour::GoAwayAfter(after) => {
            tokio::time::sleep(after).await;
            let go_away = Message::GoAway {
                reason: "hostile fixture".into(),
            };
            control::write_message(&mut control, &go_away).await?;
            // A draining proxy's session lasts until its streams end; there are none.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Behaviour::StallAfterTls | Behaviour::Blackhole => {}
    }
    session.close();
    Ok(())
}

/// Hello, challenge, bind, and every name bound: the proof is not checked, since binding is
/// not what these fixtures are about.
async fn bind_all(control: &mut MuxStream) -> anyhow::Result<()> {
    let hello = control::read_message(control).await?;
    anyhow::ensure!(matches!(hello, Message::Hello { .. }), "{hello:?}");
    let hello = Message::Hello {
        versions: vec![control::VERSION],
    };
    control::write_message(control, &hello).await?;
    let challenge = Message::Challenge { challenge: [7; 32] };
    control::write_message(control, &challenge).await?;
    let Message::Bind { hostnames, .. } = control::read_message(control).await? else {
        anyhow::bail!("expected a bind");
    };
    let results = hostnames
        .into_iter()
        .map(|name| BindOutcome {
            name: name.name,
            status: BindStatus::Bound,
            reason: String::new(),
        })
        .collect();
    control::write_message(control, &Message::BindResult { results }).await?;
    Ok(())
}

/// For a blackhole: notes each connection seen queued or waiting on its SYN, polled from
/// `/proc`, while keeping the listener (and its full queue) alive.
async fn watch_connecting(
    listener: TcpListener,
    port: u16,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
) {
    let mut seen = std::collections::HashSet::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let waiting = tokio::task::spawn_blocking(move || connections_to(port))
            .await
            .unwrap_or_default();
        for (peer, owner) in waiting {
            if seen.insert(peer) {
                arrivals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arrival {
                        at: Instant::now(),
                        peer,
                        owner,
                    });
            }
        }
    }
    drop(listener);
}
