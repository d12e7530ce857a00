//! The task that obtains and renews the certificate.
//!
//! One order at a time: new order → authorization → TLS-ALPN-01 challenge certificate
//! installed → wait for the tunnels → challenge ready → poll until the order is ready →
//! finalize with a fresh key → poll for the certificate → store, serve, export → challenge
//! removed. A failure is logged with the CA's problem document and retried with backoff
//! (jittered, doubling from [`Timing::retry_base`] to [`Timing::retry_cap`], or later if the CA
//! said so); the certificate held meanwhile is still served. The task ends only at shutdown.

use std::fmt;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use rustls::ServerConfig;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::http::TransportHttp;
use super::store::{self, Issued, Store};
use super::{Acme, AcmeConfig, AcmeError, Export, Fatal, Timing};
use crate::backoff::Backoff;

/// Problem types after which asking again will not help until a human acts: reported to
/// [`Acme::ready`] (the manager still retries at [`Timing::retry_cap`]).
const REFUSALS: &[&str] = &[
    "rejectedIdentifier",
    "unsupportedIdentifier",
    "caa",
    "invalidContact",
    "unsupportedContact",
    "externalAccountRequired",
    "userActionRequired",
];
const PROBLEM_PREFIX: &str = "urn:ietf:params:acme:error:";

/// How often the CA's renewal information is asked again when asking failed.
const ARI_RETRY: Duration = Duration::from_secs(6 * 3600);
/// Bounds on the CA's own suggestion of when to ask again.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);
/// The longest sleep before looking at the certificate again: the wall clock may jump or the
/// machine sleep, and months-long timers would not notice.
const LONGEST_NAP: Duration = Duration::from_secs(24 * 3600);
/// The longest a `Retry-After` is honoured for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(24 * 3600);

/// Reads the directory and fails with its terms of service, if it has any: called when the
/// user has not agreed to them.
pub(crate) async fn check_terms(http: &TransportHttp, url: &str) -> Result<(), AcmeError> {
    #[derive(Deserialize)]
    struct Directory {
        #[serde(default)]
        meta: Meta,
    }
    #[derive(Default, Deserialize)]
    struct Meta {
        #[serde(rename = "termsOfService")]
        terms_of_service: Option<String>,
    }
    let directory_error = |source| AcmeError::Directory {
        url: url.to_owned(),
        source,
    };
    let body = http.get(url).await.map_err(directory_error)?;
    let directory: Directory = serde_json::from_slice(&body)
        .map_err(|err| directory_error(instant_acme::Error::Json(err)))?;
    match directory.meta.terms_of_service {
        Some(terms) => Err(AcmeError::TermsNotAgreed { terms }),
        None => Ok(()),
    }
}

/// The manager task's state.
pub(crate) struct Manager {
    acme: Arc<Acme>,
    config: AcmeConfig,
    hostname: String,
    contact: Vec<String>,
    store: Store,
    http: TransportHttp,
    ready_to_validate: Box<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
    account: Option<Account>,
    current: Option<Issued>,
}

/// When to renew, and when to ask the CA's renewal information again before that.
struct Plan {
    at: SystemTime,
    recheck: Option<Duration>,
}

impl Manager {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        acme: Arc<Acme>,
        config: AcmeConfig,
        hostname: String,
        contact: Vec<String>,
        store: Store,
        http: TransportHttp,
        ready_to_validate: Box<dyn Fn() -> bool + Send + Sync>,
        shutdown: CancellationToken,
        current: Option<Issued>,
    ) -> Self {
        Self {
            acme,
            config,
            hostname,
            contact,
            store,
            http,
            ready_to_validate,
            shutdown,
            account: None,
            current,
        }
    }

    fn timing(&self) -> &Timing {
        &self.config.timing
    }

    fn new_backoff(&self) -> Backoff {
        Backoff::new(
            self.timing().retry_base,
            self.timing().retry_cap,
            Duration::MAX,
        )
    }

    /// Obtains and renews until shutdown.
    pub(crate) async fn run(mut self) {
        if let (Some(export), Some(current)) = (&self.config.export, &self.current) {
            if export_is_stale(export, current) {
                run_export(export, current, self.config.timing.reload_timeout).await;
            }
        }
        let mut backoff = self.new_backoff();
        let mut last_issued: Option<tokio::time::Instant> = None;
        loop {
            if let Some(current) = self.current.clone() {
                let shutdown = self.shutdown.clone();
                let plan = tokio::select! {
                    () = shutdown.cancelled() => break,
                    plan = self.plan_renewal(&current) => plan,
                };
                let wait = plan
                    .at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                if !wait.is_zero() {
                    let wait = plan
                        .recheck
                        .map_or(wait, |recheck| wait.min(recheck))
                        .min(LONGEST_NAP);
                    tracing::debug!(
                        renew_at = %httpdate::fmt_http_date(plan.at),
                        "next look at the certificate in {:?}",
                        Duration::from_secs(wait.as_secs())
                    );
                    if !self.sleep(wait).await {
                        break;
                    }
                    if SystemTime::now() < plan.at {
                        continue;
                    }
                }
                tracing::info!(
                    valid_until = %httpdate::fmt_http_date(current.not_after),
                    "renewing the certificate"
                );
            }
            // No two orders closer than retry_base, even if a certificate is due as soon as it
            // is issued (renew_before longer than the CA's lifetime).
            if let Some(last) = last_issued {
                let earliest = last + self.timing().retry_base;
                if earliest > tokio::time::Instant::now()
                    && !self.sleep(earliest - tokio::time::Instant::now()).await
                {
                    break;
                }
            }
            // A Retry-After from an earlier attempt is no guide to this one.
            self.http.take_retry_after();
            let shutdown = self.shutdown.clone();
            let attempt = tokio::select! {
                () = shutdown.cancelled() => break,
                attempt = self.obtain() => attempt,
            };
            match attempt {
                Ok(issued) => {
                    self.install(issued).await;
                    backoff = self.new_backoff();
                    last_issued = Some(tokio::time::Instant::now());
                }
                Err(failure) => {
                    let delay = self.after_failure(&failure, &mut backoff);
                    if !self.sleep(delay).await {
                        break;
                    }
                }
            }
        }
        if self.acme.certificate().is_none() {
            self.acme.fail(Fatal::Stopped);
        }
        tracing::debug!("ACME manager stopped");
    }

    /// Logs a failed attempt and says how long to wait before the next.
    fn after_failure(&mut self, failure: &Failure, backoff: &mut Backoff) -> Duration {
        if failure.account_gone {
            // The CA no longer knows the stored account (a test CA restarted, or the account
            // was deactivated): a new one is made on the next attempt.
            self.account = None;
            if let Err(err) = self.store.discard_account() {
                tracing::warn!(%err, "could not move the unknown account's file aside");
            }
        }
        let refusal = failure.refusal();
        let mut delay = if refusal.is_some() {
            self.timing().retry_cap
        } else {
            backoff.next_delay()
        };
        let retry_at = failure.retry_at.or_else(|| self.http.take_retry_after());
        if let Some(at) = retry_at {
            if let Ok(asked) = at.duration_since(SystemTime::now()) {
                delay = delay.max(asked.min(RETRY_AFTER_MAX));
            }
        }
        let retry_in = Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        match (&failure.problem, refusal) {
            // The CA's problem document says it all: its type and detail, not instant-acme's
            // rendering of them.
            (Some(problem), Some(fatal)) => {
                tracing::error!(
                    kind = problem.r#type.as_deref().unwrap_or(""),
                    detail = problem.detail.as_deref().unwrap_or(""),
                    ?retry_in,
                    "the ACME CA refuses to certify this name ({})",
                    failure.what
                );
                self.acme.fail(fatal);
            }
            (Some(problem), None) => tracing::warn!(
                kind = problem.r#type.as_deref().unwrap_or(""),
                detail = problem.detail.as_deref().unwrap_or(""),
                ?retry_in,
                "could not obtain a certificate ({})",
                failure.what
            ),
            (None, _) => tracing::warn!(?retry_in, "could not obtain a certificate: {failure}"),
        }
        delay
    }

    /// Sleeps `duration`; false if shut down meanwhile.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(duration) => true,
        }
    }

    /// Stores, serves and exports a new certificate.
    async fn install(&mut self, issued: Issued) {
        if let Err(err) = self.store.write_certificate(&issued) {
            tracing::error!(%err, "could not store the new certificate; serving it anyway");
        }
        self.acme.install(&issued);
        tracing::info!(
            valid_until = %httpdate::fmt_http_date(issued.not_after),
            "installed a new certificate"
        );
        if let Some(export) = &self.config.export {
            run_export(export, &issued, self.config.timing.reload_timeout).await;
        }
        self.current = Some(issued);
    }

    /// When to renew `current`: `renew_before` if configured; else the CA's renewal window
    /// (ARI) if it offers one; else when a third of the lifetime is left.
    async fn plan_renewal(&mut self, current: &Issued) -> Plan {
        let rule = renewal_time(
            current.not_before,
            current.not_after,
            self.config.renew_before,
        );
        if self.config.renew_before.is_some() {
            return Plan {
                at: rule,
                recheck: None,
            };
        }
        match self.renewal_window(current).await {
            Ok(Some((start, end, recheck))) => {
                let span = end.duration_since(start).unwrap_or(Duration::ZERO);
                let offset = span.mul_f64(fastrand::f64());
                Plan {
                    at: start + offset,
                    recheck: Some(recheck.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX)),
                }
            }
            Ok(None) => Plan {
                at: rule,
                recheck: None,
            },
            Err(err) => {
                tracing::debug!(%err, "could not ask the CA when to renew; renewing at a third of the lifetime left");
                Plan {
                    at: rule,
                    recheck: Some(ARI_RETRY),
                }
            }
        }
    }

    /// The CA's suggested renewal window and when to ask again; `None` when the CA does not
    /// offer renewal information (pebble 2.4), or the certificate cannot be identified to it.
    async fn renewal_window(
        &mut self,
        current: &Issued,
    ) -> Result<Option<(SystemTime, SystemTime, Duration)>, instant_acme::Error> {
        let Some(leaf) = current.leaf() else {
            return Ok(None);
        };
        let Ok(id) = CertificateIdentifier::try_from(leaf) else {
            return Ok(None);
        };
        // Only an account already stored is used: none is created just to ask.
        let account = match &self.account {
            Some(account) => account.clone(),
            None => match self.stored_account().await? {
                Some(account) => account,
                None => return Ok(None),
            },
        };
        match account.renewal_info(&id).await {
            Ok((info, recheck)) => {
                let window = info.suggested_window;
                Ok(Some((
                    store::system_time(window.start.unix_timestamp()),
                    store::system_time(window.end.unix_timestamp()),
                    recheck,
                )))
            }
            Err(instant_acme::Error::Unsupported(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The account from the stored credentials, if there are any (and remembers it).
    async fn stored_account(&mut self) -> Result<Option<Account>, instant_acme::Error> {
        let json = match self.store.read_account() {
            Ok(Some(json)) => json,
            Ok(None) => return Ok(None),
            Err(err) => return Err(instant_acme::Error::Other(Box::new(err))),
        };
        let credentials: AccountCredentials = serde_json::from_slice(&json)?;
        let account = Account::builder_with_http(Box::new(self.http.clone()))
            .from_credentials(credentials)
            .await?;
        self.account = Some(account.clone());
        Ok(Some(account))
    }

    /// The account: remembered, stored, or created now (and stored, 0600).
    async fn account(&mut self) -> Result<Account, Failure> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        if let Some(account) = self
            .stored_account()
            .await
            .map_err(|err| Failure::from_acme("loading the ACME account", err))?
        {
            tracing::debug!(id = account.id(), "using the stored ACME account");
            return Ok(account);
        }
        let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: self.config.agree_tos,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(|err| Failure::from_acme("creating the ACME account", err))?;
        let json = serde_json::to_vec(&credentials)
            .map_err(|err| Failure::message("storing the ACME account", err.to_string()))?;
        // Kept even if storing fails: the CA limits how many accounts an address may make.
        self.account = Some(account.clone());
        if let Err(err) = self.store.write_account(&json) {
            tracing::error!(%err, "could not store the new ACME account");
        }
        tracing::info!(
            id = account.id(),
            file = %self.store.account_path().display(),
            "created an ACME account"
        );
        Ok(account)
    }

    /// One order, from creation to the certificate.
    async fn obtain(&mut self) -> Result<Issued, Failure> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(self.hostname.clone())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|err| Failure::from_acme("ordering a certificate", err))?;
        tracing::debug!(order = order.url(), "ordered a certificate");

        // Removes the challenge answers however this attempt ends.
        let mut challenges = Challenges {
            acme: &self.acme,
            names: Vec::new(),
        };
        if order.state().status == OrderStatus::Pending {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization
                    .map_err(|err| Failure::from_acme("reading an authorization", err))?;
                match authorization.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    status => {
                        return Err(Failure::message(
                            "authorizing",
                            format!("the authorization is {status:?}"),
                        ))
                    }
                }
                let name = authorization.identifier().to_string().to_ascii_lowercase();
                let mut challenge = authorization
                    .challenge(ChallengeType::TlsAlpn01)
                    .ok_or_else(|| {
                        Failure::message(
                            "authorizing",
                            "the CA offers no tls-alpn-01 challenge".to_owned(),
                        )
                    })?;
                let digest: [u8; 32] = challenge
                    .key_authorization()
                    .digest()
                    .as_ref()
                    .try_into()
                    .map_err(|_| {
                    Failure::message("authorizing", "a digest not of SHA-256".to_owned())
                })?;
                let config = super::tls::challenge_config(&name, &digest)
                    .map_err(|err| Failure::message("authorizing", err.to_string()))?;
                challenges.install(&name, config);
                wait_for_tunnels(&*self.ready_to_validate, &self.config.timing).await;
                challenge
                    .set_ready()
                    .await
                    .map_err(|err| Failure::from_acme("asking the CA to validate", err))?;
                tracing::info!("asked the CA to validate (TLS-ALPN-01)");
            }
        }

        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(self.timing().validation_timeout);
        let status = order
            .poll_ready(&policy)
            .await
            .map_err(|err| Failure::from_acme("waiting for validation", err))?;
        if status != OrderStatus::Ready {
            let problem = challenge_problem(&mut order).await;
            return Err(Failure {
                what: "validation",
                message: format!("the order is {status:?}"),
                problem,
                retry_at: None,
                account_gone: false,
            });
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|err| Failure::from_acme("finalizing the order", err))?;
        let chain_pem = order
            .poll_certificate(&policy)
            .await
            .map_err(|err| Failure::from_acme("downloading the certificate", err))?;
        drop(challenges);
        Issued::from_pem(chain_pem, key_pem)
            .map_err(|reason| Failure::message("reading the new certificate", reason))
    }
}

/// The challenge answers of one attempt, withdrawn when it ends.
struct Challenges<'a> {
    acme: &'a Acme,
    names: Vec<String>,
}

impl Challenges<'_> {
    fn install(&mut self, name: &str, config: Arc<ServerConfig>) {
        self.acme.set_challenge(name, Some(config));
        self.names.push(name.to_owned());
    }
}

impl Drop for Challenges<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            self.acme.set_challenge(name, None);
        }
    }
}

/// Waits until `ready` says every tunnel is bound, at most `timing.tunnel_wait`.
async fn wait_for_tunnels(ready: &(dyn Fn() -> bool + Send + Sync), timing: &Timing) {
    if ready() {
        return;
    }
    tracing::info!("waiting for every tunnel to be bound before asking the CA to validate");
    let deadline = tokio::time::Instant::now() + timing.tunnel_wait;
    loop {
        tokio::time::sleep(timing.tunnel_poll).await;
        if ready() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "not every tunnel is bound after {:?}; asking the CA to validate anyway",
                timing.tunnel_wait
            );
            return;
        }
    }
}

/// The first challenge error of the order's authorizations, fetched afresh.
async fn challenge_problem(order: &mut Order) -> Option<Problem> {
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let Ok(mut authorization) = authorization else {
            continue;
        };
        if authorization.refresh().await.is_err() {
            continue;
        }
        if let Some(problem) = authorization
            .challenges
            .iter()
            .find_map(|challenge| challenge.error.clone())
        {
            return Some(problem);
        }
    }
    None
}

/// When a certificate valid from `not_before` to `not_after` is due: `renew_before` its end,
/// or when a third of its lifetime is left.
pub(crate) fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Option<Duration>,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let before = renew_before.unwrap_or(lifetime / 3);
    if before >= lifetime {
        not_before
    } else {
        not_after.checked_sub(before).unwrap_or(not_before)
    }
}

/// Whether the export directory lacks the certificate held (first run with an export, or
/// files removed).
fn export_is_stale(export: &Export, current: &Issued) -> bool {
    match store::read_optional(&export.dir.join("fullchain.pem")) {
        Ok(Some(chain)) => chain != current.chain_pem.as_bytes(),
        Ok(None) | Err(_) => true,
    }
}

/// Writes the certificate into the export directory, then runs the reload command.
async fn run_export(export: &Export, issued: &Issued, reload_timeout: Duration) {
    let created = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&export.dir);
    if let Err(err) = created {
        tracing::error!(%err, dir = %export.dir.display(), "could not create the export directory");
        return;
    }
    if let Err(err) = store::write_pair(&export.dir, issued) {
        tracing::error!(%err, "could not export the certificate");
        return;
    }
    tracing::info!(dir = %export.dir.display(), "exported the certificate");
    let Some(command) = &export.reload_cmd else {
        return;
    };
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            tracing::error!(%err, "could not run the reload command");
            return;
        }
    };
    match tokio::time::timeout(reload_timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::info!(%status, "the reload command succeeded");
        }
        Ok(Ok(status)) => tracing::warn!(%status, "the reload command failed"),
        Ok(Err(err)) => tracing::error!(%err, "could not wait for the reload command"),
        Err(_) => {
            // Dropping the child kills it (kill_on_drop).
            tracing::warn!(
                "the reload command was still running after {reload_timeout:?}; killed it"
            );
        }
    }
}

/// A failed attempt: what was being done, and what the CA said.
struct Failure {
    what: &'static str,
    message: String,
    problem: Option<Problem>,
    retry_at: Option<SystemTime>,
    account_gone: bool,
}

impl Failure {
    fn message(what: &'static str, message: String) -> Self {
        Self {
            what,
            message,
            problem: None,
            retry_at: None,
            account_gone: false,
        }
    }

    fn from_acme(what: &'static str, err: instant_acme::Error) -> Self {
        let mut failure = Self::message(what, error_chain(&err));
        match err {
            instant_acme::Error::Api(problem) => {
                failure.account_gone = problem_is(&problem, "accountDoesNotExist");
                failure.problem = Some(problem);
            }
            instant_acme::Error::Timeout(Some(at)) => {
                let wait = at.saturating_duration_since(std::time::Instant::now());
                failure.retry_at = SystemTime::now().checked_add(wait);
            }
            _ => {}
        }
        failure
    }

    /// What to tell [`Acme::ready`], when the CA refuses for good.
    fn refusal(&self) -> Option<Fatal> {
        let problem = self.problem.as_ref()?;
        let refused = |kind: Option<&str>| {
            kind.and_then(|k| k.strip_prefix(PROBLEM_PREFIX))
                .is_some_and(|k| REFUSALS.contains(&k))
        };
        let sub = problem
            .subproblems
            .iter()
            .find(|sub| refused(sub.r#type.as_deref()));
        if !refused(problem.r#type.as_deref()) && sub.is_none() {
            return None;
        }
        let (kind, detail) = match sub {
            Some(sub) if !refused(problem.r#type.as_deref()) => (&sub.r#type, &sub.detail),
            _ => (&problem.r#type, &problem.detail),
        };
        Some(Fatal::Refused {
            kind: kind.clone().unwrap_or_default(),
            detail: detail.clone().unwrap_or_default(),
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.message)
    }
}

fn problem_is(problem: &Problem, kind: &str) -> bool {
    problem
        .r#type
        .as_deref()
        .and_then(|t| t.strip_prefix(PROBLEM_PREFIX))
        == Some(kind)
}

/// An error and its sources, `: `-separated.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_with_a_third_of_the_lifetime_left_or_as_told() {
        assert_eq!(renewal_time(at(0), at(90), None), at(60));
        assert_eq!(
            renewal_time(at(1000), at(1090), Some(Duration::from_secs(10))),
            at(1080)
        );
        // Longer than the lifetime: due from the start.
        assert_eq!(
            renewal_time(at(1000), at(1090), Some(Duration::from_secs(5000))),
            at(1000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn validation_is_asked_for_anyway_when_the_tunnels_never_come_up() {
        let timing = Timing::default();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let never = || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        };
        let began = tokio::time::Instant::now();
        wait_for_tunnels(&never, &timing).await;
        let waited = began.elapsed();
        assert!(
            waited >= timing.tunnel_wait && waited < timing.tunnel_wait + timing.tunnel_poll * 2
        );
        // Asked at once, then every 500 ms for 60 s.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 121);
    }

    #[tokio::test(start_paused = true)]
    async fn tunnels_already_bound_cost_no_wait() {
        let began = tokio::time::Instant::now();
        wait_for_tunnels(&|| true, &Timing::default()).await;
        assert_eq!(began.elapsed(), Duration::ZERO);
    }

    fn problem(kind: &str, subproblems: &str) -> Problem {
        serde_json::from_str(&format!(
            r#"{{"type":"urn:ietf:params:acme:error:{kind}","detail":"no","status":400,
                "subproblems":{subproblems}}}"#
        ))
        .unwrap()
    }

    fn failure(problem: Problem) -> Failure {
        Failure::from_acme("ordering", instant_acme::Error::Api(problem))
    }

    #[test]
    fn refusals_are_told_apart_from_passing_trouble() {
        let refused = failure(problem("rejectedIdentifier", "[]"));
        assert!(matches!(
            refused.refusal(),
            Some(Fatal::Refused { ref kind, .. }) if kind.ends_with("rejectedIdentifier")
        ));
        assert!(failure(problem("caa", "[]")).refusal().is_some());
        assert!(failure(problem("rateLimited", "[]")).refusal().is_none());
        assert!(failure(problem("unauthorized", "[]")).refusal().is_none());
        let compound = failure(problem(
            "compound",
            r#"[{"type":"urn:ietf:params:acme:error:caa","detail":"CAA forbids"}]"#,
        ));
        assert!(matches!(
            compound.refusal(),
            Some(Fatal::Refused { ref detail, .. }) if detail == "CAA forbids"
        ));
        let gone = failure(problem("accountDoesNotExist", "[]"));
        assert!(gone.account_gone && gone.refusal().is_none());
    }
}
