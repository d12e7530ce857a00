//! HTTPS to the ACME CA over the client's [`Transport`], as instant-acme's [`HttpClient`].
//!
//! Every request opens its own stream with `transport.connect(host, port)` (through Tor by
//! default, where the exit resolves the CA's name), runs TLS over it (the web's roots plus the
//! configured extra CA) and one HTTP/1.1 exchange with `Connection: close`. A fresh connection
//! per request costs a round trip or two, but an issuance takes a dozen requests a few times a
//! month, and nothing long-lived is left to break when a circuit does.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderValue, CONNECTION, HOST, RETRY_AFTER};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use tokio_rustls::TlsConnector;

use crate::transport::Transport;

/// Largest response body read from the CA: a certificate chain is a few KiB.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Sends each ACME request over a new stream of the transport.
#[derive(Clone)]
pub(crate) struct TransportHttp {
    transport: Arc<dyn Transport>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    /// The latest `Retry-After` the CA sent with a refusal (429 or 503): instant-acme drops it
    /// from the errors it returns, so it is kept here for the retry schedule.
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl TransportHttp {
    /// A client whose every request (connection, TLS, exchange and body) takes at most
    /// `timeout`. `tls` must offer ALPN `http/1.1` or none.
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Self {
        Self {
            transport,
            tls,
            timeout,
            retry_after: Arc::new(Mutex::new(None)),
        }
    }

    /// Takes the latest `Retry-After` moment the CA asked for, if any since the last call.
    pub(crate) fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .map(|mut slot| slot.take())
            .unwrap_or(None)
    }

    /// GETs `url` and returns its body, for the directory (and the tests' root certificate).
    pub(crate) async fn get(&self, url: &str) -> Result<Bytes, instant_acme::Error> {
        let request = Request::get(url).body(BodyWrapper::default())?;
        let response = HttpClient::request(self, request).await?;
        let status = response.parts.status;
        let mut body = response.body;
        let bytes = body
            .into_bytes()
            .await
            .map_err(instant_acme::Error::Other)?;
        if !status.is_success() {
            return Err(instant_acme::Error::Other(
                format!("GET {url} answered {status}").into(),
            ));
        }
        Ok(bytes)
    }

    async fn exchange(
        &self,
        mut request: Request<BodyWrapper<Bytes>>,
    ) -> Result<BytesResponse, instant_acme::Error> {
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("https") {
            return Err(other(format!(
                "refusing {uri}: the ACME CA is spoken to over https only"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| other(format!("no host in {uri}")))?;
        // An IPv6 literal keeps its brackets in the URI; neither the transport nor TLS wants them.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let host_header = match uri.port_u16() {
            Some(port) if port != 443 => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        *request.uri_mut() = Uri::from_str(&path)?;
        let headers = request.headers_mut();
        headers.insert(
            HOST,
            HeaderValue::from_str(&host_header).map_err(|err| other(err.to_string()))?,
        );
        headers.insert(CONNECTION, HeaderValue::from_static("close"));

        let stream = self
            .transport
            .connect(bare_host, port)
            .await
            .map_err(|err| instant_acme::Error::Other(Box::new(err)))?;
        let server_name = crate::tls::server_name(bare_host)
            .map_err(|err| instant_acme::Error::Other(Box::new(err)))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(server_name, stream)
            .await
            .map_err(|err| other(format!("TLS to the ACME CA at {host_header}: {err}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|err| instant_acme::Error::Other(Box::new(err)))?;
        // The connection is driven beside the exchange rather than spawned: once the exchange
        // ends it drops the sender, and the connection then closes by itself.
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|err| instant_acme::Error::Other(Box::new(err)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(instant_acme::Error::Other)?
                .to_bytes();
            Ok::<_, instant_acme::Error>((parts, body))
        };
        let (result, connection_result) = tokio::join!(exchange, connection);
        let (parts, body) = result?;
        if let Err(err) = connection_result {
            tracing::debug!(%err, "the connection to the ACME CA ended uncleanly after its answer");
        }
        if matches!(
            parts.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            if let Some(at) = parts.headers.get(RETRY_AFTER).and_then(parse_retry_after) {
                if let Ok(mut slot) = self.retry_after.lock() {
                    *slot = Some(at);
                }
            }
        }
        Ok(BytesResponse::from(Response::from_parts(
            parts,
            Full::new(body),
        )))
    }
}

impl HttpClient for TransportHttp {
    fn request(
        &self,
        request: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            let what = format!("{} {}", request.method(), request.uri());
            match tokio::time::timeout(this.timeout, this.exchange(request)).await {
                Ok(result) => result,
                Err(_) => Err(other(format!(
                    "{what}: the ACME CA did not answer within {:?}",
                    this.timeout
                ))),
            }
        })
    }
}

/// `Retry-After`: a number of seconds, or an HTTP date.
fn parse_retry_after(value: &HeaderValue) -> Option<SystemTime> {
    let value = value.to_str().ok()?.trim();
    match value.parse::<u64>() {
        Ok(seconds) => SystemTime::now().checked_add(Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

fn other(message: String) -> instant_acme::Error {
    instant_acme::Error::Other(message.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::transport::{DirectTransport, Resolve};

    fn client() -> TransportHttp {
        let transport = Arc::new(DirectTransport::new(Resolve::new(), Duration::from_secs(2)));
        let tls = crate::tls::https_client_config(None).unwrap();
        TransportHttp::new(transport, tls, Duration::from_secs(2))
    }

    #[tokio::test]
    async fn refuses_plain_http() {
        let err = client().get("http://127.0.0.1:1/dir").await.unwrap_err();
        assert!(err.to_string().contains("https only"), "{err}");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let soon = parse_retry_after(&HeaderValue::from_static("120")).unwrap();
        let wait = soon.duration_since(SystemTime::now()).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        let date = parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(
            date.unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            784_111_777
        );
        assert!(parse_retry_after(&HeaderValue::from_static("soon")).is_none());
    }
}
