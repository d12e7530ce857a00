//! Reloading while running: what asks for a reload ([`Reloads`]: SIGHUP, and with `--watch` an
//! edit to a file the process reads), how many there were ([`ReloadCounts`]), and which
//! changed settings a reload cannot apply ([`changed_settings`]).
//!
//! Each binary has one reload entry point that takes its settings, loads every file they name,
//! and only when all of them load puts the new state in place: a reload that fails changes
//! nothing. This module knows nothing of what is reloaded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

/// The `--watch` flags every binary shares. Flatten it into a command's arguments, except into
/// a group that is itself an `Option` (a command with subcommands): clap leaves such a group
/// `None` when it holds a flattened group (clap issue #4697), so copy the two fields there.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Also reload, as SIGHUP does, when a file this process reads changes: its size, time or
    /// content, looked at every --watch-interval-secs
    #[arg(long, env = "SHROUD_WATCH")]
    pub watch: bool,

    /// How often --watch looks at the files, in seconds
    #[arg(long, env = "SHROUD_WATCH_INTERVAL_SECS", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch_interval_secs: u64,
}

impl WatchArgs {
    /// How often to look at the files, when watching.
    pub fn every(&self) -> Option<Duration> {
        watch_every(self.watch, self.watch_interval_secs)
    }
}

/// How often to look at the files: every `interval_secs` (at least 1) when `watch` is set.
pub fn watch_every(watch: bool, interval_secs: u64) -> Option<Duration> {
    watch.then(|| Duration::from_secs(interval_secs.max(1)))
}

impl Default for WatchArgs {
    fn default() -> Self {
        Self {
            watch: false,
            watch_interval_secs: 5,
        }
    }
}

/// Why a reload was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (`systemctl reload`, `kill -HUP`).
    Hangup,
    /// `--watch` saw this file change.
    Changed(PathBuf),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hangup => f.write_str("SIGHUP"),
            Self::Changed(path) => write!(f, "{} changed", path.display()),
        }
    }
}

/// The reload requests of a process, one at a time.
///
/// Requests that arrive while one is waiting to be taken are folded into it: the reload that
/// takes it reads the files as they are then, which covers them all.
pub struct Reloads {
    requests: mpsc::Receiver<Trigger>,
    watched: watch::Sender<Watched>,
}

/// The files `--watch` looks at, and what each held when it was last looked at.
#[derive(Debug, Clone, Default)]
struct Watched {
    files: Vec<PathBuf>,
    seen: HashMap<PathBuf, Fingerprint>,
}

impl Watched {
    /// `files` as they are now (read here, on the caller's thread: they are few and small).
    fn now(files: Vec<PathBuf>) -> Self {
        let seen = files
            .iter()
            .map(|path| (path.clone(), fingerprint(path)))
            .collect();
        Self { files, seen }
    }
}

/// After a watched file changes, how long it must stay the same before the reload: a
/// certificate and its key are written one after the other, and a reload between the two would
/// fail for nothing.
const SETTLE: Duration = Duration::from_millis(300);
/// Most looks while a file keeps changing before reloading anyway.
const MAX_SETTLE_LOOKS: usize = 10;

impl Reloads {
    /// Starts listening for SIGHUP at once (from here on SIGHUP no longer ends the process)
    /// and, with `watch_every` (see [`WatchArgs::every`]), looking at `files` that often.
    /// Needs a tokio runtime; fails only if the signal handler cannot be installed.
    pub fn listen(watch_every: Option<Duration>, files: Vec<PathBuf>) -> std::io::Result<Self> {
        let mut hangups = crate::signal::hangups()?;
        let (requests_tx, requests) = mpsc::channel(1);
        let signals = requests_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = signals.closed() => return,
                    got = hangups.recv() => match got {
                        // Full: a request is waiting already, and its reload covers this one.
                        Some(()) => drop(signals.try_send(Trigger::Hangup)),
                        None => return,
                    },
                }
            }
        });
        let (watched, watched_rx) = watch::channel(Watched::default());
        if let Some(every) = watch_every {
            watched.send_replace(Watched::now(files));
            tokio::spawn(watch_files(watched_rx, every, requests_tx));
        }
        Ok(Self { requests, watched })
    }

    /// The next request; `None` once nothing can ask any more.
    pub async fn next(&mut self) -> Option<Trigger> {
        self.requests.recv().await
    }

    /// With `--watch`, watches `files` from now on instead (a reload may have named other
    /// files), starting from what they hold now.
    pub fn set_files(&self, files: Vec<PathBuf>) {
        if self.watched.receiver_count() > 0 && self.watched.borrow().files != files {
            self.watched.send_replace(Watched::now(files));
        }
    }
}

/// What `--watch` compares: a file's size, modification time and SHA-256, or `None` when it
/// cannot be read (a reload would fail on it; its coming back is a change too).
type Fingerprint = Option<(u64, Option<SystemTime>, [u8; 32])>;

fn fingerprint(path: &PathBuf) -> Fingerprint {
    let contents = std::fs::read(path).ok()?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Some((
        contents.len() as u64,
        modified,
        Sha256::digest(&contents).into(),
    ))
}

/// Every watched file's fingerprint, read off the runtime's threads.
async fn fingerprints(files: Vec<PathBuf>) -> HashMap<PathBuf, Fingerprint> {
    let looked = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|path| {
                let print = fingerprint(&path);
                (path, print)
            })
            .collect()
    });
    looked.await.unwrap_or_default()
}

/// The first of `files` whose fingerprint in `now` differs from `before`.
fn first_change(
    files: &[PathBuf],
    before: &HashMap<PathBuf, Fingerprint>,
    now: &HashMap<PathBuf, Fingerprint>,
) -> Option<PathBuf> {
    files
        .iter()
        .find(|path| before.get(*path) != now.get(*path))
        .cloned()
}

/// Looks at the files every `every` and asks for a reload when one changed and has settled.
async fn watch_files(
    mut watched: watch::Receiver<Watched>,
    every: Duration,
    requests: mpsc::Sender<Trigger>,
) {
    let Watched {
        files: mut list,
        mut seen,
    } = watched.borrow_and_update().clone();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = requests.closed() => return,
            _ = ticker.tick() => {}
        }
        if watched.has_changed().unwrap_or(false) {
            // New files: what they held when they were named is the starting point.
            Watched { files: list, seen } = watched.borrow_and_update().clone();
        }
        let mut now = fingerprints(list.clone()).await;
        let Some(changed) = first_change(&list, &seen, &now) else {
            continue;
        };
        for _ in 0..MAX_SETTLE_LOOKS {
            tokio::time::sleep(SETTLE).await;
            let again = fingerprints(list.clone()).await;
            let settled = again == now;
            now = again;
            if settled {
                break;
            }
        }
        seen = now;
        tracing::debug!(path = %changed.display(), "watched file changed");
        // Full: a request is waiting already, and its reload reads this change too.
        drop(requests.try_send(Trigger::Changed(changed)));
    }
}

/// What a binary reloads: its one reload entry point, as SIGHUP and `--watch` call it.
pub trait Reload: Send + 'static {
    /// Re-reads every file the running settings name and, if all of them load, puts what they
    /// hold in place; otherwise changes nothing. Logs what it did either way.
    fn reload(&mut self);

    /// The files [`Reload::reload`] reads, for `--watch`.
    fn files(&self) -> Vec<PathBuf>;
}

/// Reloads `reloader` at each of `reloads`' requests until `shutdown` is cancelled.
pub async fn serve(
    mut reloader: impl Reload,
    mut reloads: Reloads,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let trigger = tokio::select! {
            () = shutdown.cancelled() => return,
            trigger = reloads.next() => trigger,
        };
        let Some(trigger) = trigger else { return };
        tracing::info!(%trigger, "reloading");
        reloader.reload();
        reloads.set_files(reloader.files());
    }
}

/// The settings a reload applies.
#[derive(Debug)]
pub enum Settings<C> {
    /// The ones the process runs with: there is no config file to read anew.
    Running,
    /// The command line and environment as at start, with the config file read anew.
    Anew(C),
}

/// The settings a reload applies: with `config_file` (the `--config` the process runs with),
/// the process's command line parsed again with that file read anew; `None` when the file
/// does not load, which is logged and counted in `counts` as a failed reload.
pub fn reread<C: clap::Parser>(
    config_file: Option<&std::path::Path>,
    counts: &ReloadCounts,
) -> Option<Settings<C>> {
    if config_file.is_none() {
        return Some(Settings::Running);
    }
    match crate::config::reload::<C>() {
        Ok(parsed) => Some(Settings::Anew(parsed.cli)),
        Err(err) => {
            counts.record(false);
            tracing::error!(%err, "reload failed; nothing changed");
            None
        }
    }
}

/// How many reloads a process made, and how many failed (and changed nothing). A handle: its
/// clones count into the same counters, which [`ReloadCounts::register`] exposes as
/// `PREFIX_reloads_total{result="succeeded"|"failed"}`.
#[derive(Debug, Clone)]
pub struct ReloadCounts {
    family: Family<[(&'static str, &'static str); 1], Counter>,
    succeeded: Counter,
    failed: Counter,
}

impl Default for ReloadCounts {
    fn default() -> Self {
        let family = Family::default();
        // Both series exist from the start, at 0: an alert on failures needs its series.
        let succeeded = family.get_or_create_owned(&[("result", "succeeded")]);
        let failed = family.get_or_create_owned(&[("result", "failed")]);
        Self {
            family,
            succeeded,
            failed,
        }
    }
}

impl ReloadCounts {
    /// Counts one reload.
    pub fn record(&self, succeeded: bool) {
        let counter = if succeeded {
            &self.succeeded
        } else {
            &self.failed
        };
        counter.inc();
    }

    /// Reloads that took effect.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.get()
    }

    /// Reloads that failed, keeping the state they found.
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }

    /// Serves these counts from `registry` as `reloads_total`, by result.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "reloads",
            "Reloads (SIGHUP or --watch), by result: succeeded, or failed and changed nothing",
            self.family.clone(),
        );
    }
}

/// The settings that differ between `old` and `new`, as flags (`--listen-https`), leaving out
/// the fields named in `reloadable` (field names, `tls_cert`): what a reload found changed but
/// cannot apply, to be logged as needing a restart. Only names are returned, never values,
/// which may be secret.
///
/// Settings are compared through their `{:#?}` form: it shows every field a settings struct
/// has, including fields added later, so a setting no reload applies is reported without
/// anyone listing it. Fields of a nested struct (a flattened group of flags, such as the log
/// flags) are compared one by one.
pub fn changed_settings<T: fmt::Debug>(old: &T, new: &T, reloadable: &[&str]) -> Vec<String> {
    let (old, new) = (fields(&format!("{old:#?}")), fields(&format!("{new:#?}")));
    let changed: BTreeSet<&String> = old
        .iter()
        .filter(|(name, value)| new.get(*name) != Some(*value))
        .chain(new.iter().filter(|(name, _)| !old.contains_key(*name)))
        .map(|(name, _)| name)
        .filter(|name| !reloadable.contains(&name.as_str()))
        .collect();
    changed
        .into_iter()
        .map(|name| format!("--{}", name.replace('_', "-")))
        .collect()
}

/// The fields of a struct's `{:#?}` text, by name, each with its value's text; a field that
/// holds a struct is replaced by that struct's own fields.
fn fields(pretty: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    let finish = |current: Option<(String, Vec<&str>)>, fields: &mut BTreeMap<_, _>| {
        if let Some((name, lines)) = current {
            let value = lines.join("\n");
            let value = value.strip_suffix(',').unwrap_or(&value).to_owned();
            if is_struct(&value) {
                fields.extend(fields_dedented(&value));
            } else {
                fields.insert(name, value);
            }
        }
    };
    // The first line is the struct's name and `{`, the last its `}`.
    for line in pretty.lines().skip(1) {
        if line.trim_end() == "}" {
            break;
        }
        match field_line(line) {
            Some((name, value)) => {
                finish(current.take(), &mut fields);
                current = Some((name.to_owned(), vec![value]));
            }
            None => {
                if let Some((_, lines)) = &mut current {
                    lines.push(line);
                }
            }
        }
    }
    finish(current, &mut fields);
    fields
}

/// A nested struct's fields: its text is indented four more spaces than a top-level one's.
fn fields_dedented(value: &str) -> BTreeMap<String, String> {
    let dedented: Vec<&str> = value
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect();
    fields(&dedented.join("\n"))
}

/// Whether a value's text is a struct with named fields: `Name {` and more lines.
fn is_struct(value: &str) -> bool {
    let first = value.lines().next().unwrap_or_default();
    first.strip_suffix(" {").is_some_and(|name| {
        !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_')
    }) && value.lines().count() > 1
}

/// A line that starts a top-level field, `    name: value`: its name and the rest.
fn field_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("    ")?;
    let (name, value) = rest.split_once(": ")?;
    let starts_well = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
    let identifier = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (starts_well && identifier).then_some((name, value))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;

    use super::*;

    #[derive(Debug, Clone)]
    struct Inner {
        log_format: String,
        verbose: u8,
    }

    #[derive(Debug, Clone)]
    struct Settings {
        log: Inner,
        listen_https: Option<SocketAddr>,
        tls_cert: PathBuf,
        peers: Vec<String>,
        note: String,
    }

    fn settings() -> Settings {
        Settings {
            log: Inner {
                log_format: "text".into(),
                verbose: 0,
            },
            listen_https: Some("127.0.0.1:443".parse().unwrap()),
            tls_cert: "/etc/cert.pem".into(),
            peers: vec!["a:1".into(), "b:2".into()],
            note: "line one\nverbose: 9".into(),
        }
    }

    #[test]
    fn nothing_changed_is_nothing() {
        assert!(changed_settings(&settings(), &settings(), &[]).is_empty());
    }

    #[test]
    fn changed_fields_are_named_as_flags_except_reloadable_ones() {
        let mut new = settings();
        new.listen_https = Some("127.0.0.1:8443".parse().unwrap());
        new.tls_cert = "/etc/other.pem".into();
        new.peers.push("c:3".into());
        assert_eq!(
            changed_settings(&settings(), &new, &["tls_cert"]),
            ["--listen-https", "--peers"]
        );
        new.listen_https = None;
        assert_eq!(
            changed_settings(&settings(), &new, &["tls_cert", "peers"]),
            ["--listen-https"]
        );
    }

    #[test]
    fn a_nested_group_is_compared_field_by_field() {
        let mut new = settings();
        new.log.verbose = 2;
        assert_eq!(changed_settings(&settings(), &new, &[]), ["--verbose"]);
        new.log.log_format = "json".into();
        assert_eq!(
            changed_settings(&settings(), &new, &["verbose"]),
            ["--log-format"]
        );
    }

    #[test]
    fn text_that_looks_like_a_field_inside_a_value_is_part_of_it() {
        let mut new = settings();
        new.note = "line one\nverbose: 10".into();
        assert_eq!(changed_settings(&settings(), &new, &[]), ["--note"]);
    }

    #[test]
    fn counts_count() {
        let counts = ReloadCounts::default();
        counts.record(true);
        counts.record(false);
        counts.record(true);
        assert_eq!((counts.succeeded(), counts.failed()), (2, 1));
    }

    #[tokio::test]
    async fn an_edit_is_seen_once_it_has_settled_and_a_new_list_is_a_new_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized");
        std::fs::write(&file, "one\n").unwrap();
        let watch = WatchArgs {
            watch: true,
            watch_interval_secs: 1,
        };
        let mut reloads = Reloads::listen(watch.every(), vec![file.clone()]).unwrap();
        // Same size, same second: only the content tells.
        std::fs::write(&file, "two\n").unwrap();
        let trigger = tokio::time::timeout(Duration::from_secs(10), reloads.next())
            .await
            .expect("the edit within the interval and the settling time");
        assert_eq!(trigger, Some(Trigger::Changed(file.clone())));
        assert_eq!(
            Trigger::Changed(file.clone()).to_string(),
            format!("{} changed", file.display())
        );

        // A file that disappears is a change too.
        std::fs::remove_file(&file).unwrap();
        let trigger = tokio::time::timeout(Duration::from_secs(10), reloads.next()).await;
        assert_eq!(trigger.unwrap(), Some(Trigger::Changed(file.clone())));

        // Watching another file starts from what it holds.
        let other = dir.path().join("other");
        std::fs::write(&other, "x").unwrap();
        reloads.set_files(vec![other.clone()]);
        let quiet = tokio::time::timeout(Duration::from_millis(2500), reloads.next()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        std::fs::write(&other, "y").unwrap();
        let trigger = tokio::time::timeout(Duration::from_secs(10), reloads.next()).await;
        assert_eq!(trigger.unwrap(), Some(Trigger::Changed(other)));
    }
}
