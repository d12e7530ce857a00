//! The service's DNS: authoritative for one zone, it answers `HOSTNAME.ZONE` with the public
//! addresses of the proxies holding `HOSTNAME`'s tunnels.
//!
//! A customer points `app.example.com` at `app.example.com.proxy.example.net` (a CNAME), and
//! the parent zone delegates `proxy.example.net` to every discovery instance (NS records).
//! Each instance answers from its own view of the fleet, which heartbeats keep current: a
//! proxy announces itself, its public addresses and the names bound on it to every instance,
//! so two instances answer alike within a heartbeat interval, and losing one loses no name.
//!
//! What it answers, per RFC 1034 and 2308:
//! - `A`/`AAAA` for `HOST.ZONE`: the holders' addresses of that family
//!   ([`Fleet::addresses`]), with the configured TTL; NODATA (NOERROR, no answer, the SOA in
//!   the authority section) when there are none of that family; `ANY` gets both families.
//!   Every hostname has proxies (a name held nowhere gets the ones its clients would be sent
//!   to), so no `HOST.ZONE` is NXDOMAIN; other types are NODATA.
//! - `SOA` and `NS` at the apex; NODATA for other types there.
//! - REFUSED for names below the zone whose labels before it are not a hostname (`*.ZONE`):
//!   no hostname can be published there, and the question is not one this server answers.
//! - REFUSED for names outside the zone and classes other than IN; FORMERR for a message that
//!   is not one question; NOTIMP for opcodes other than QUERY.
//!
//! Answers are bounded by [`MAX_RECORDS`] per type, well within a 512-byte UDP message.

use std::future::Future;
use std::io;
use std::iter;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::fleet::Fleet;

/// Most records of one type in an answer: eight A records and a SOA fit in 512 bytes with room.
pub const MAX_RECORDS: usize = 8;
/// How long a TCP client may stay idle between questions.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;

/// What the zone is and how it answers.
#[derive(Debug, Clone)]
pub struct DnsZone {
    /// The zone's apex, e.g. `proxy.example.net.`.
    pub apex: Name,
    /// The name servers the NS records at the apex name: every discovery instance. Each must
    /// lie outside the zone, since names inside it are hostnames' aliases.
    pub name_servers: Vec<Name>,
    /// TTL of answers, and the SOA's negative-caching TTL.
    pub ttl: u32,
    /// Most proxies whose addresses one answer holds.
    pub max_proxies: usize,
}

/// Why a zone cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The zone is not a domain name, or is the root.
    #[error("{0:?} is not a zone this service can serve")]
    BadApex(String),
    /// A name server is not a domain name.
    #[error("name server {0:?} is not a domain name")]
    BadNameServer(String),
    /// A name server lies inside the zone, where every name is a hostname's alias.
    #[error("name server {0} lies inside the zone {1}; name one outside it")]
    NameServerInZone(String, String),
    /// No name server was given.
    #[error("the zone needs at least one name server (--dns-ns)")]
    NoNameServer,
}

impl DnsZone {
    /// A zone at `apex` served by `name_servers`, answering with `ttl` and at most
    /// `max_proxies` proxies' addresses.
    pub fn new(
        apex: &str,
        name_servers: &[String],
        ttl: u32,
        max_proxies: usize,
    ) -> Result<Self, ZoneError> {
        let apex = absolute(apex).ok_or_else(|| ZoneError::BadApex(apex.to_owned()))?;
        if apex.is_root() {
            return Err(ZoneError::BadApex(".".to_owned()));
        }
        if name_servers.is_empty() {
            return Err(ZoneError::NoNameServer);
        }
        let name_servers = name_servers
            .iter()
            .map(|ns| {
                let name = absolute(ns).ok_or_else(|| ZoneError::BadNameServer(ns.clone()))?;
                if apex.zone_of(&name) {
                    return Err(ZoneError::NameServerInZone(
                        name.to_ascii(),
                        apex.to_ascii(),
                    ));
                }
                Ok(name)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            apex,
            name_servers,
            ttl,
            max_proxies: max_proxies.min(MAX_RECORDS),
        })
    }

    fn soa(&self) -> Record {
        let mname = self.name_servers.first().cloned().unwrap_or_default();
        let rname = self
            .apex
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| self.apex.clone());
        // The serial never changes: there are no zone transfers, and answers are computed.
        let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, self.ttl);
        Record::from_rdata(self.apex.clone(), self.ttl, RData::SOA(soa))
    }
}

/// `name` as an absolute, lower-case [`Name`], if it is a domain name at all.
fn absolute(name: &str) -> Option<Name> {
    let name = Name::from_ascii(name).ok()?.to_lowercase();
    let mut name = name;
    name.set_fqdn(true);
    Some(name)
}

/// What a zone answers to one question.
#[derive(Debug)]
pub struct Answer {
    /// The response code.
    pub code: ResponseCode,
    /// The answer section.
    pub answers: Vec<Record>,
    /// The authority section: the SOA, for negative answers.
    pub authority: Vec<Record>,
}

impl Answer {
    /// An answer that is only a response code.
    pub fn code(code: ResponseCode) -> Self {
        Self {
            code,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }
}

/// Answers questions about the zone from the fleet.
pub struct Answerer {
    zone: DnsZone,
    fleet: Arc<Mutex<Fleet>>,
    metrics: Option<Arc<crate::metrics::DiscoveryMetrics>>,
}

impl Answerer {
    /// Answers for `zone` from `fleet`, the service's live view.
    pub fn new(zone: DnsZone, fleet: Arc<Mutex<Fleet>>) -> Self {
        Self {
            zone,
            fleet,
            metrics: None,
        }
    }

    /// Counts every answer's response code in `metrics`.
    pub fn counting(mut self, metrics: Arc<crate::metrics::DiscoveryMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn answer(&self, name: &Name, qtype: RecordType, class: DNSClass) -> Answer {
        let zone = &self.zone;
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        if class != DNSClass::IN || !zone.apex.zone_of(&name) {
            return Answer::code(ResponseCode::Refused);
        }
        let nodata = || Answer {
            code: ResponseCode::NoError,
            answers: Vec::new(),
            authority: vec![zone.soa()],
        };
        if name == zone.apex {
            let answers = match qtype {
                RecordType::SOA => vec![zone.soa()],
                RecordType::NS => zone
                    .name_servers
                    .iter()
                    .map(|ns| {
                        Record::from_rdata(zone.apex.clone(), zone.ttl, RData::NS(NS(ns.clone())))
                    })
                    .collect(),
                _ => return nodata(),
            };
            return Answer {
                code: ResponseCode::NoError,
                answers,
                authority: Vec::new(),
            };
        }
        let host = Name::from_labels(
            name.iter()
                .take(name.num_labels() as usize - zone.apex.num_labels() as usize),
        )
        .ok()
        .map(|host| host.to_ascii())
        .and_then(|host| shroud_mux::hostname::normalize(&host).ok());
        let Some(host) = host else {
            return Answer::code(ResponseCode::Refused);
        };
        let wanted = |addr: &IpAddr| match qtype {
            RecordType::A => addr.is_ipv4(),
            RecordType::AAAA => addr.is_ipv6(),
            RecordType::ANY => true,
            _ => false,
        };
        if !matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY) {
            return nodata();
        }
        let addrs = {
            let fleet = self.fleet.lock().unwrap_or_else(PoisonError::into_inner);
            fleet.addresses(&host, zone.max_proxies, tokio::time::Instant::now())
        };
        let mut v4 = 0;
        let mut v6 = 0;
        let answers: Vec<Record> = addrs
            .into_iter()
            .filter(wanted)
            .filter_map(|addr| {
                let (count, data) = match addr {
                    IpAddr::V4(v) => (&mut v4, RData::A(A(v))),
                    IpAddr::V6(v) => (&mut v6, RData::AAAA(AAAA(v))),
                };
                *count += 1;
                (*count <= MAX_RECORDS).then(|| Record::from_rdata(name.clone(), zone.ttl, data))
            })
            .collect();
        if answers.is_empty() {
            return nodata();
        }
        Answer {
            code: ResponseCode::NoError,
            answers,
            authority: Vec::new(),
        }
    }
}

/// Answers `request` on `handle` with what `answer` says to its question: FORMERR for a
/// message that is not a query with one question, NOTIMP for opcodes other than QUERY. The
/// response is authoritative unless refused, and offers no recursion; EDNS is echoed.
pub async fn respond<R: ResponseHandler>(
    request: &Request,
    mut handle: R,
    answer: impl FnOnce(&Query) -> Answer,
) -> ResponseInfo {
    let response_edns = request.edns.as_ref().map(|requested| {
        let mut edns = Edns::new();
        edns.set_max_payload(requested.max_payload().max(512));
        edns.set_version(0);
        edns
    });
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &response_edns {
        builder.edns(edns);
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    let answer = if request.metadata.message_type != MessageType::Query {
        Answer::code(ResponseCode::FormErr)
    } else if request.metadata.op_code != OpCode::Query {
        Answer::code(ResponseCode::NotImp)
    } else {
        match request.request_info() {
            Ok(info) => answer(info.query.original()),
            Err(_) => Answer::code(ResponseCode::FormErr),
        }
    };
    debug!(code = ?answer.code, answers = answer.answers.len(), "DNS question answered");
    metadata.authoritative = !matches!(
        answer.code,
        ResponseCode::Refused | ResponseCode::FormErr | ResponseCode::NotImp
    );
    metadata.recursion_available = false;
    metadata.response_code = answer.code;
    let response = builder.build(
        metadata,
        answer.answers.iter(),
        iter::empty(),
        answer.authority.iter(),
        iter::empty(),
    );
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(err) => {
            warn!(%err, "could not send a DNS response");
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// What a DNS server answers, one question at a time; served by [`ZoneHandler`].
pub trait Zone: Send + Sync + Unpin + 'static {
    /// The answer to `query`.
    fn answer(&self, query: &Query) -> Answer;

    /// Called for every request received, answerable or not (to count them, say).
    fn on_request(&self) {}
}

impl Zone for Answerer {
    fn answer(&self, query: &Query) -> Answer {
        let answer = Answerer::answer(self, query.name(), query.query_type(), query.query_class());
        if let Some(metrics) = &self.metrics {
            metrics.dns_answer(answer.code);
        }
        answer
    }
}

/// A hickory-server request handler that answers from a [`Zone`] through [`respond`].
pub struct ZoneHandler<Z>(pub Z);

// `RequestHandler` is declared with `async_trait`; this is the signature it expands to.
impl<Z: Zone> RequestHandler for ZoneHandler<Z> {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.on_request();
        Box::pin(respond(request, response_handle, |query| {
            self.0.answer(query)
        }))
    }
}

/// How many times [`bind`] looks for a port free for both UDP and TCP.
const BIND_ATTEMPTS: usize = 50;

/// Binds UDP and TCP to `addr`, as a name server listens. With port 0, UDP takes a free port
/// and TCP the same one, trying again with a new port when TCP's is taken.
pub fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(addr)?;
        match std::net::TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?));
            }
            Err(err) if err.kind() == io::ErrorKind::AddrInUse && addr.port() == 0 => {
                last_err = Some(err);
            }
            Err(err) => return Err(err),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Serves `answerer` on `udp` and `tcp` (bind both to the same address, see [`bind`]) until
/// `shutdown` is cancelled.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    answerer: Answerer,
    shutdown: CancellationToken,
) {
    let mut server = Server::new(ZoneHandler(answerer));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    shutdown.cancelled().await;
    if let Err(err) = server.shutdown_gracefully().await {
        warn!(%err, "the DNS listener stopped with an error");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::fleet::{FleetFile, Reach};
    use crate::signed::ProxyEntry;

    fn answerer() -> Answerer {
        let file = FleetFile::parse(
            "[[proxy]]\nname = \"s.net\"\nport = 443\nregion = \"eu\"\n\
             addrs = [\"192.0.2.1\", \"2001:db8::1\"]\n",
        )
        .unwrap();
        let mut fleet = Fleet::new(file, Duration::from_secs(30));
        let entry = ProxyEntry {
            name: "live.net".into(),
            port: 443,
            region: "us".into(),
            onion: None,
        };
        let reach = Reach {
            addrs: vec!["192.0.2.9".parse().unwrap()],
            names: vec!["held.example".into()],
            peer: None,
        };
        fleet
            .heartbeat(entry, reach, tokio::time::Instant::now())
            .unwrap();
        let zone = DnsZone::new("Proxy.Example.NET", &["ns1.example.org".into()], 30, 3).unwrap();
        Answerer::new(zone, Arc::new(Mutex::new(fleet)))
    }

    fn ask(answerer: &Answerer, name: &str, qtype: RecordType) -> Answer {
        answerer.answer(&Name::from_ascii(name).unwrap(), qtype, DNSClass::IN)
    }

    fn data(answer: &Answer) -> Vec<String> {
        answer.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn hostnames_get_their_holders_addresses() {
        let answerer = answerer();
        let held = ask(&answerer, "held.example.proxy.example.net.", RecordType::A);
        assert_eq!(held.code, ResponseCode::NoError);
        assert_eq!(data(&held), ["192.0.2.9"]);
        assert_eq!(held.answers[0].ttl, 30);

        // Held by a proxy without IPv6: NODATA, with the SOA for negative caching.
        let none = ask(
            &answerer,
            "HELD.example.proxy.example.net",
            RecordType::AAAA,
        );
        assert_eq!(none.code, ResponseCode::NoError);
        assert!(none.answers.is_empty());
        assert_eq!(none.authority[0].record_type(), RecordType::SOA);

        // Held nowhere: the proxies a list would name, each family on its own.
        let a = ask(&answerer, "new.example.proxy.example.net.", RecordType::A);
        let mut got = data(&a);
        got.sort();
        assert_eq!(got, ["192.0.2.1", "192.0.2.9"]);
        let aaaa = ask(
            &answerer,
            "new.example.proxy.example.net.",
            RecordType::AAAA,
        );
        assert_eq!(data(&aaaa), ["2001:db8::1"]);
        let mx = ask(&answerer, "new.example.proxy.example.net.", RecordType::MX);
        assert_eq!((mx.code, mx.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn the_apex_has_soa_and_ns() {
        let answerer = answerer();
        let soa = ask(&answerer, "proxy.example.net.", RecordType::SOA);
        assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
        let ns = ask(&answerer, "proxy.example.net.", RecordType::NS);
        assert_eq!(data(&ns), ["ns1.example.org."]);
        let a = ask(&answerer, "proxy.example.net.", RecordType::A);
        assert_eq!((a.code, a.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn other_names_are_refused_or_do_not_exist() {
        let answerer = answerer();
        let outside = ask(&answerer, "example.com.", RecordType::A);
        assert_eq!(outside.code, ResponseCode::Refused);
        let sibling = ask(&answerer, "evilproxy.example.net.", RecordType::A);
        assert_eq!(sibling.code, ResponseCode::Refused);
        for name in ["*.proxy.example.net.", "a.*.b.proxy.example.net."] {
            let not_a_host = ask(&answerer, name, RecordType::A);
            assert_eq!(not_a_host.code, ResponseCode::Refused, "{name}");
        }
        let chaos = answerer.answer(
            &Name::from_ascii("x.proxy.example.net.").unwrap(),
            RecordType::A,
            DNSClass::CH,
        );
        assert_eq!(chaos.code, ResponseCode::Refused);
    }

    #[test]
    fn zones_that_cannot_work_are_refused() {
        let ns = ["ns1.example.org".to_owned()];
        assert!(matches!(
            DnsZone::new(".", &ns, 30, 3),
            Err(ZoneError::BadApex(_))
        ));
        assert!(matches!(
            DnsZone::new("a..b", &ns, 30, 3),
            Err(ZoneError::BadApex(_))
        ));
        assert!(matches!(
            DnsZone::new("z.net", &[], 30, 3),
            Err(ZoneError::NoNameServer)
        ));
        assert!(matches!(
            DnsZone::new("z.net", &["ns1.z.net".into()], 30, 3),
            Err(ZoneError::NameServerInZone(..))
        ));
    }
}
