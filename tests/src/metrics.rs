//! Scraping a binary's `--metrics-listen` endpoint, and a strict parser of what it serves.
//!
//! [`Exposition::parse`] reads the OpenMetrics text format as prometheus-client writes it and
//! refuses anything else: every line is a `# HELP`, `# TYPE` or `# UNIT` of a declared family,
//! a sample of a declared family with a name its type allows (`_total` and `_created` for a
//! counter, `_bucket`/`_sum`/`_count` for a histogram, `_info` for an info, the bare name for a
//! gauge), labels as `name="value"` with only the three escapes the format has, a number, and
//! one `# EOF` as the very last line. No family is declared twice, no sample repeats its name
//! and labels, and histogram buckets are cumulative and end at `+Inf` equal to `_count`.
//!
//! [`scrape`] asks the endpoint as Prometheus does and parses the answer; [`status`] fetches
//! `/healthz` or `/readyz`. [`wait_for`] polls until a value is what a test expects: counts
//! settle a moment after the traffic that made them (bytes are reported when a copy pauses).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::Process;

/// What Prometheus 2.x sends as `Accept` when it scrapes.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// One metric family's declaration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, `info`, …
    pub kind: String,
    /// Its `# HELP` text.
    pub help: String,
    /// Its `# UNIT`, if any.
    pub unit: Option<String>,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name, suffix included (`shroud_proxy_connections_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Declared families, by name.
    pub families: HashMap<String, Family>,
    /// Samples, in the order served.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses OpenMetrics text, strictly (see the module documentation).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let Some(body) = text.strip_suffix("# EOF\n") else {
            bail!("the exposition does not end with \"# EOF\\n\"");
        };
        let mut exposition = Exposition::default();
        let mut seen = std::collections::HashSet::new();
        let mut current: Option<String> = None;
        for (number, line) in body.lines().enumerate() {
            let at = || format!("line {}: {line:?}", number + 1);
            ensure!(!line.is_empty(), "{}: empty line", at());
            if let Some(rest) = line.strip_prefix("# ") {
                let (keyword, rest) = rest.split_once(' ').with_context(at)?;
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                check_name(name).with_context(at)?;
                match keyword {
                    "TYPE" => {
                        ensure!(
                            matches!(
                                value,
                                "counter"
                                    | "gauge"
                                    | "histogram"
                                    | "gaugehistogram"
                                    | "summary"
                                    | "info"
                                    | "stateset"
                                    | "unknown"
                            ),
                            "{}: unknown type",
                            at()
                        );
                        let family = exposition.families.entry(name.to_owned()).or_default();
                        ensure!(family.kind.is_empty(), "{}: family declared twice", at());
                        family.kind = value.to_owned();
                        current = Some(name.to_owned());
                    }
                    "HELP" | "UNIT" => {
                        // prometheus-client writes HELP before TYPE: declare the family then.
                        ensure!(
                            current.as_deref() == Some(name)
                                || !exposition.families.contains_key(name),
                            "{}: family declared twice",
                            at()
                        );
                        let family = exposition.families.entry(name.to_owned()).or_default();
                        if keyword == "HELP" {
                            family.help = value.to_owned();
                        } else {
                            ensure!(
                                name.ends_with(&format!("_{value}")),
                                "{}: a family's name ends with its unit",
                                at()
                            );
                            family.unit = Some(value.to_owned());
                        }
                        current = Some(name.to_owned());
                    }
                    _ => bail!("{}: unknown keyword", at()),
                }
                continue;
            }
            let sample = parse_sample(line).with_context(at)?;
            let family = current.as_deref().context("a sample before any family")?;
            let kind = &exposition.families[family].kind;
            let suffix = sample
                .name
                .strip_prefix(family)
                .with_context(|| format!("{}: not a sample of {family}", at()))?;
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "gauge" | "unknown" => &[""],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "info" => &["_info"],
                other => bail!("{}: samples of type {other} are not expected", at()),
            };
            ensure!(
                allowed.contains(&suffix),
                "{}: {kind} {family} has no sample named {}",
                at(),
                sample.name
            );
            ensure!(
                (suffix == "_bucket") == sample.labels.contains_key("le"),
                "{}: le belongs on buckets, and only there",
                at()
            );
            ensure!(
                seen.insert((sample.name.clone(), format!("{:?}", sample.labels))),
                "{}: a sample repeated",
                at()
            );
            exposition.samples.push(sample);
        }
        for (name, family) in &exposition.families {
            ensure!(!family.kind.is_empty(), "{name} has HELP but no TYPE");
        }
        exposition.check_histograms()?;
        Ok(exposition)
    }

    /// Checks that each histogram series' buckets are cumulative and that `+Inf` is `_count`.
    fn check_histograms(&self) -> anyhow::Result<()> {
        for (name, family) in &self.families {
            if family.kind != "histogram" {
                continue;
            }
            let bucket = format!("{name}_bucket");
            let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for sample in self.samples.iter().filter(|s| s.name == bucket) {
                let mut labels = sample.labels.clone();
                let le = labels.remove("le").unwrap_or_default();
                let le = parse_value(&le)?;
                by_series
                    .entry(format!("{labels:?}"))
                    .or_default()
                    .push((le, sample.value));
            }
            for (series, buckets) in by_series {
                ensure!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{name}{series}: buckets not cumulative"
                );
                let last = buckets.last().context("no bucket")?;
                ensure!(last.0 == f64::INFINITY, "{name}{series}: no +Inf bucket");
                let count = self
                    .samples
                    .iter()
                    .find(|s| {
                        s.name == format!("{name}_count") && format!("{:?}", s.labels) == series
                    })
                    .with_context(|| format!("{name}{series}: no _count"))?;
                ensure!(
                    count.value == last.1,
                    "{name}{series}: +Inf bucket is not _count"
                );
            }
        }
        Ok(())
    }

    /// The value of the sample `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// [`Exposition::get`], or 0 when no such sample is served.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum of every sample `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Every sample named `name`.
    pub fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let first = chars.next().context("an empty name")?;
    ensure!(
        (first.is_ascii_alphabetic() || first == '_' || first == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "{name:?} is not a metric name"
    );
    Ok(())
}

fn parse_value(text: &str) -> anyhow::Result<f64> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            ensure!(
                !text.is_empty()
                    && text
                        .chars()
                        .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')),
                "{text:?} is not a number"
            );
            text.parse()
                .with_context(|| format!("{text:?} is not a number"))
        }
    }
}

/// Parses `name{a="b",c="d"} value`, or `name value`.
fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line.find(['{', ' ']).context("a sample without a value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        if after.starts_with('}') {
            end = Some(0);
        }
        while end.is_none() {
            // name=
            let start = chars
                .peek()
                .map(|(i, _)| *i)
                .context("unterminated labels")?;
            let eq = after[start..].find('=').context("a label without =")? + start;
            let key = &after[start..eq];
            check_name(key)?;
            ensure!(!key.starts_with("__"), "reserved label name {key:?}");
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            ensure!(
                chars.next().map(|(_, c)| c) == Some('"'),
                "label value not quoted"
            );
            let mut value = String::new();
            loop {
                match chars.next().context("unterminated label value")? {
                    (_, '"') => break,
                    (_, '\\') => match chars.next().context("a dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => bail!("unknown escape \\{other}"),
                    },
                    (_, '\n') => bail!("a raw newline in a label value"),
                    (_, c) => value.push(c),
                }
            }
            ensure!(
                labels.insert(key.to_owned(), value).is_none(),
                "label {key:?} twice"
            );
            match chars.next().context("unterminated labels")? {
                (_, ',') => {
                    ensure!(
                        chars.peek().is_some_and(|(_, c)| *c != '}'),
                        "a trailing comma"
                    );
                }
                (i, '}') => end = Some(i),
                (_, c) => bail!("{c:?} after a label value"),
            }
        }
        rest = &after[end.unwrap_or(0) + 1..];
    }
    let value = rest
        .strip_prefix(' ')
        .context("no space before the value")?;
    ensure!(
        !value.contains(' '),
        "timestamps and exemplars are not expected: {value:?}"
    );
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(value)?,
    })
}

/// One HTTP/1.1 request to the endpoint at `addr`, read to its end: the status, the
/// headers (names in lower case) and the body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    accept: &str,
) -> anyhow::Result<(u16, Vec<(String, String)>, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("the metrics endpoint did not answer within 10 s")??;
    let answer = String::from_utf8(answer).context("the answer is not UTF-8")?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no end of head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// Scrapes `/metrics` at `addr` as Prometheus does, checks the status and content type, and
/// parses the exposition strictly.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Exposition> {
    let (status, headers, body) = request(addr, "GET", "/metrics", PROMETHEUS_ACCEPT).await?;
    ensure!(status == 200, "GET /metrics: {status}: {body}");
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    ensure!(
        content_type == Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "content type {content_type:?}"
    );
    Exposition::parse(&body)
}

/// `GET path` at `addr`: the status and the body.
pub async fn status(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = request(addr, "GET", path, "*/*").await?;
    Ok((status, body))
}

/// Scrapes `addr` until `check` accepts the exposition, up to `limit`; the last scrape is in
/// the error otherwise.
pub async fn wait_for(
    addr: SocketAddr,
    limit: Duration,
    what: &str,
    check: impl Fn(&Exposition) -> bool,
) -> anyhow::Result<Exposition> {
    let deadline = Instant::now() + limit;
    loop {
        let exposition = scrape(addr).await?;
        if check(&exposition) {
            return Ok(exposition);
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: not so within {limit:?}; last scrape: {:#?}",
                exposition.samples
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `GET path` at `addr` until its status is `want`, up to `limit`; returns the body.
pub async fn wait_for_status(
    addr: SocketAddr,
    path: &str,
    want: u16,
    limit: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = status(addr, path).await?;
        if status == want {
            return Ok(body);
        }
        if Instant::now() >= deadline {
            bail!("GET {path}: still {status} ({body:?}) after {limit:?}, not {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address `process` logged for its metrics endpoint (`listening addr=…
/// listener="metrics"`), waiting for it up to `limit`. Looks through every line it printed
/// so far, so the line may come before or after another a test waited for.
pub async fn endpoint(process: &mut Process, limit: Duration) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + limit;
    loop {
        let text = process.output_text();
        if let Some(line) = text.lines().find(|l| l.contains("listener=\"metrics\"")) {
            return crate::stack::log_addr(line);
        }
        if Instant::now() >= deadline {
            bail!("no metrics endpoint logged within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const GOOD: &str = "# HELP x_requests Requests.\n\
        # TYPE x_requests counter\n\
        x_requests_total{route=\"a\",why=\"q\\\"uote\\\\ \\n\"} 3\n\
        x_requests_total{route=\"b\"} 0\n\
        # HELP x_open Open.\n\
        # TYPE x_open gauge\n\
        x_open -2\n\
        # HELP x_latency_seconds Latency.\n\
        # TYPE x_latency_seconds histogram\n\
        # UNIT x_latency_seconds seconds\n\
        x_latency_seconds_sum 0.5\n\
        x_latency_seconds_count 2\n\
        x_latency_seconds_bucket{le=\"0.1\"} 1\n\
        x_latency_seconds_bucket{le=\"+Inf\"} 2\n\
        # HELP x_build Build.\n\
        # TYPE x_build info\n\
        x_build_info{version=\"1\"} 1\n\
        # EOF\n";

    #[test]
    fn reads_what_prometheus_client_writes() {
        let e = Exposition::parse(GOOD).unwrap();
        assert_eq!(
            e.get(
                "x_requests_total",
                &[("route", "a"), ("why", "q\"uote\\ \n")]
            ),
            Some(3.0)
        );
        assert_eq!(e.get("x_requests_total", &[("route", "a")]), None);
        assert_eq!(e.get("x_open", &[]), Some(-2.0));
        assert_eq!(e.sum("x_requests_total", &[]), 3.0);
        assert_eq!(
            e.families["x_latency_seconds"].unit.as_deref(),
            Some("seconds")
        );
        assert_eq!(e.families["x_build"].kind, "info");
    }

    #[test]
    fn refuses_what_the_format_does_not_allow() {
        let bad = [
            ("no EOF", GOOD.trim_end_matches("# EOF\n").to_owned()),
            ("text after EOF", format!("{GOOD}x_open 1\n")),
            (
                "a counter without _total",
                GOOD.replace("x_requests_total{route=\"b\"}", "x_requests{route=\"b\"}"),
            ),
            (
                "an undeclared family",
                GOOD.replace("x_open -2", "y_open -2"),
            ),
            (
                "a trailing comma",
                GOOD.replace("{route=\"b\"}", "{route=\"b\",}"),
            ),
            (
                "an unquoted value",
                GOOD.replace("{route=\"b\"}", "{route=b}"),
            ),
            ("a bad escape", GOOD.replace("q\\\"uote", "q\\tuote")),
            (
                "a repeated sample",
                GOOD.replace("route=\"b\"", "route=\"a\",why=\"q\\\"uote\\\\ \\n\""),
            ),
            ("not a number", GOOD.replace("x_open -2", "x_open two")),
            (
                "a timestamp",
                GOOD.replace("x_open -2", "x_open -2 1700000000"),
            ),
            (
                "a family twice",
                GOOD.replace("# TYPE x_open gauge", "# TYPE x_requests gauge"),
            ),
            (
                "buckets not cumulative",
                GOOD.replace("le=\"0.1\"} 1", "le=\"0.1\"} 3"),
            ),
            (
                "+Inf is not the count",
                GOOD.replace("x_latency_seconds_count 2", "x_latency_seconds_count 5"),
            ),
            (
                "le outside a bucket",
                GOOD.replace("x_open -2", "x_open{le=\"1\"} -2"),
            ),
            (
                "an empty line",
                GOOD.replace("x_open -2\n", "x_open -2\n\n"),
            ),
            (
                "a unit the name lacks",
                GOOD.replace(
                    "# UNIT x_latency_seconds seconds",
                    "# UNIT x_latency_seconds bytes",
                ),
            ),
        ];
        for (what, text) in bad {
            assert!(Exposition::parse(&text).is_err(), "{what} was accepted");
        }
    }
}
