//! The HTTP API shared by the service and its callers: paths, the heartbeat message, and a
//! client's fetch of a signed list.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /v1/proxies?host=HOSTNAME[&onion=1]` | 200 with a signed list ([`crate::signed`]), proxies' onion endpoints included with `onion=1`; 400 bad host; 403 CNAME missing or elsewhere; 404 no healthy proxy; 503 DNS check impossible |
//! | `POST /v1/heartbeat` with `Authorization: Bearer SECRET` and a [`Heartbeat`] | 204, or 200 with a [`HeartbeatReply`] when the heartbeat named a peer address; 400 bad entry; 401 wrong secret; 403 heartbeats disabled; 413 body too large |
//! | `GET /healthz` | 200 |
//!
//! Any request may also get 429 when its address sends too many.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use shroud_mux::auth::PublicKey;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::fleet::Reach;
use crate::http::{self, HttpError};
use crate::signed::{self, ProxyEntry, ProxyList, VerifyError};

/// Path of the proxy list.
pub const PROXIES_PATH: &str = "/v1/proxies";
/// Path of heartbeats.
pub const HEARTBEAT_PATH: &str = "/v1/heartbeat";
/// Path of the health check.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Largest request body the service reads, in bytes: a heartbeat naming a few thousand bound
/// hostnames.
pub const MAX_REQUEST_BODY: usize = 256 * 1024;

/// What a proxy posts to [`HEARTBEAT_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The proxy's hostname.
    pub name: String,
    /// The proxy's tunnel port.
    pub port: u16,
    /// The proxy's region label.
    pub region: String,
    /// `true` when the proxy is going away and should be delisted at once.
    #[serde(default)]
    pub leaving: bool,
    /// The proxy's public addresses, for the service's DNS answers. Left out when empty, so
    /// a proxy without any still speaks to services that predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<IpAddr>,
    /// The hostnames bound on the proxy now, likewise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Where the proxy's peer link listens (`shroud-proxy --listen-peer`), when it links with
    /// the rest of the fleet: the service then answers with other members' addresses to join
    /// through ([`HeartbeatReply`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// The proxy's tunnel listener as an onion service, `ADDRESS.onion:PORT`
    /// (`shroud-proxy --onion-tunnel`), for lists to carry ([`ProxyEntry::onion`]). Left out
    /// when absent, like the fields above; a service that predates it refuses a heartbeat that
    /// carries it, so upgrade the service before turning the onion listener on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onion: Option<String>,
}

/// Most peer addresses a [`HeartbeatReply`] carries.
pub const MAX_PEERS_IN_REPLY: usize = 16;

/// The service's answer to a heartbeat that named a peer address: other live proxies' peer
/// addresses, for the proxy to join the fleet's gossip through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// At most [`MAX_PEERS_IN_REPLY`] peer addresses of other live proxies.
    pub peers: Vec<SocketAddr>,
}

impl Heartbeat {
    /// A heartbeat for `entry`.
    pub fn new(entry: &ProxyEntry, leaving: bool) -> Self {
        Self {
            name: entry.name.clone(),
            port: entry.port,
            region: entry.region.clone(),
            leaving,
            addrs: Vec::new(),
            names: Vec::new(),
            peer: None,
            onion: entry.onion.clone(),
        }
    }

    /// What the heartbeat says of where visitors reach the proxy.
    pub fn reach(&self) -> Reach {
        Reach {
            addrs: self.addrs.clone(),
            names: self.names.clone(),
            peer: self.peer,
        }
    }

    /// The entry this heartbeat describes.
    pub fn entry(&self) -> ProxyEntry {
        ProxyEntry {
            name: self.name.clone(),
            port: self.port,
            region: self.region.clone(),
            onion: self.onion.clone(),
        }
    }
}

/// The request target that asks for `host`'s list. `host` must already be a normalised
/// hostname, whose characters need no escaping.
pub fn proxies_target(host: &str) -> String {
    format!("{PROXIES_PATH}?host={host}")
}

/// The query parameter by which a client says it understands onion endpoints in lists
/// ([`ProxyEntry::onion`]): only then does the service include them. A service that predates
/// them ignores it.
pub const ONION_PARAM: &str = "onion=1";

/// Why fetching a list failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP exchange failed.
    #[error("asking the discovery service failed")]
    Http(#[from] HttpError),
    /// The service answered with something other than 200.
    #[error("the discovery service answered {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body, control characters removed.
        message: String,
    },
    /// The answer is not an acceptable list.
    #[error("the discovery service's answer was refused")]
    Verify(#[from] VerifyError),
}

/// Asks for `host`'s list over `stream` (already connected, usually TLS to the service) and
/// verifies it. `authority` is the `Host` header (the service's name, with `:port` if not
/// 443); `now` and `newest_seen` are as for [`signed::verify`]; `onion` asks for proxies'
/// onion endpoints too ([`ONION_PARAM`]). No timeout here: wrap the call.
pub async fn fetch_list<S>(
    stream: S,
    authority: &str,
    host: &str,
    pinned: &PublicKey,
    now: u64,
    newest_seen: Option<u64>,
    onion: bool,
) -> Result<ProxyList, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let host =
        shroud_mux::hostname::normalize(host).map_err(|_| HttpError::InvalidRequest("hostname"))?;
    let response = http::request(
        stream,
        "GET",
        authority,
        &if onion {
            format!("{}&{ONION_PARAM}", proxies_target(&host))
        } else {
            proxies_target(&host)
        },
        &[("Accept", "application/json")],
        None,
        signed::MAX_BODY_LEN,
    )
    .await?;
    if response.status != 200 {
        return Err(FetchError::Status {
            status: response.status,
            message: printable_prefix(&response.body),
        });
    }
    Ok(signed::verify(
        &response.body,
        pinned,
        &host,
        now,
        newest_seen,
    )?)
}

/// The first 200 characters of `body`, lossily decoded, without control characters: fit for a
/// log line or an error message.
pub(crate) fn printable_prefix(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_owned()
}
