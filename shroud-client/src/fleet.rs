//! Where a client's list of proxies comes from: a fixed list, or a [`FleetSource`] asked again
//! before its answer goes stale (discovery, DNS SRV).

use std::time::Duration;

use futures::future::BoxFuture;

use crate::shared::ProxyAddr;
use crate::transport::Transport;

/// Where the list of proxies comes from.
pub enum ProxySource {
    /// A fixed list, as `--proxy` gives.
    Static(Vec<ProxyAddr>),
    /// A list that is asked for again: discovery, or DNS SRV records.
    Dynamic(Box<dyn FleetSource>),
}

/// A source of proxy lists that changes over time.
pub trait FleetSource: Send + Sync + 'static {
    /// Fetches the current list, through `transport` where it goes over the network.
    fn fetch<'a>(
        &'a mut self,
        transport: &'a dyn Transport,
    ) -> BoxFuture<'a, Result<Fleet, FleetError>>;

    /// What this source is, for logs (never secret).
    fn describe(&self) -> String;
}

/// One answer of a [`FleetSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The proxies to hold tunnels to now.
    pub proxies: Vec<ProxyAddr>,
    /// The rest of the list, in its order, beyond the number to hold (`--max-proxies`): a
    /// tunnel goes to the first of them instead of a proxy whose circuits churn (see
    /// [`crate::circuits`]).
    pub spares: Vec<ProxyAddr>,
    /// When to ask again.
    pub refresh_after: Duration,
}

/// Why a [`FleetSource`] could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FleetError {
    /// Whether asking again cannot help (a forged or wrongly signed answer, say).
    pub permanent: bool,
    /// What went wrong.
    pub message: String,
}
