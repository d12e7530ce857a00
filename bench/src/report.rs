//! BENCHMARKS.md and its charts, from a run's [`Results`].
//!
//! Every figure is the median over runs and is shown beside its ratio to the no-tunnel figure
//! of the same run, so that two reports from different machines compare by their ratios.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::contender::{Kind, HOST};
use crate::fleet::FleetResults;
use crate::measure::{median, percentile, Series};
use crate::run::{ContenderResults, Results};

/// Targets the report measures shroud against.
const TARGET_THROUGHPUT_VS_RATHOLE: f64 = 1.25;
const TARGET_RPS_VS_RATHOLE: f64 = 1.25;
const TARGET_KIB_PER_VISITOR: f64 = 16.0;
const TARGET_KIB_PER_TUNNEL: f64 = 64.0;
const TARGET_RTT_MS: u64 = 300;
const TARGET_RTT_SHARE: f64 = 0.8;
/// The speed issue's loopback targets (TLS on): shares of the no-tunnel figure of the same run.
const TARGET_STREAM_VS_NONE: f64 = 0.40;
const TARGET_KEEPALIVE_VS_NONE: f64 = 0.50;
const TARGET_CLOSE_VS_NONE: f64 = 0.50;
/// ...per held idle visitor, on each side of the tunnel.
const TARGET_KIB_PER_VISITOR_EACH_SIDE: f64 = 4.0;
/// ...and CPU per GB against rathole with TLS.
const TARGET_CPU_VS_RATHOLE: f64 = 0.6;
/// What one forward between proxies may cost at most, against direct visitors in the same run:
/// when forwarding landed it kept 0.81-0.82 of direct's req/s and added 1-3 ms at p99 (runs
/// since: 0.75-0.86, +1 to +6 ms); a holder that made every forwarded visitor wait 100 ms went
/// unremarked at 0.04-0.17× and +93 to +110 ms.
const FORWARDED_RPS_VS_DIRECT: f64 = 0.70;
const FORWARDED_P99_ADDED_MS: f64 = 10.0;
/// The window of the high-RTT downloads the target reads: after 10 s.
const RTT_FROM: Duration = Duration::from_secs(10);

/// Writes the report to `out` and the charts into `charts`.
pub fn write(results: &Results, out: &Path, charts: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(charts).with_context(|| format!("creating {}", charts.display()))?;
    let base = out.parent().unwrap_or(Path::new("."));
    let md = render(results, &relative(charts, base))?;
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
    if let Err(err) = crate::report::charts::draw(results, charts) {
        eprintln!("shroud-bench: charts: {err:#}");
        anyhow::bail!("the report is written, but its charts are not: {err:#}");
    }
    Ok(())
}

/// The report's Markdown, its charts linked under `chart_dir`.
fn render(results: &Results, chart_dir: &Path) -> anyhow::Result<String> {
    let chart_link = |name: &str| -> String { chart_dir.join(name).display().to_string() };
    let mut md = String::new();
    let plan = results.plan.as_ref().context("results without a plan")?;
    let none = find(results, Kind::NoTunnel);

    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `bench/run.sh` (see [bench/README.md](bench/README.md) for what each figure \
         measures and how). Everything ran on loopback on one machine: {}. The run took {:.0} s.\n",
        results.machine, results.elapsed_secs
    );
    let _ = writeln!(
        md,
        "Each figure is the median of {} runs; `×` is its ratio to the no-tunnel figure of the \
         same run. Visitors fetch over plain HTTP, so that every contender (shroud and PageKite \
         route by the `Host` header) carries the same bytes; the tunnels' own links are TLS for \
         shroud and rathole (TLS), plain TCP for the others, and SSH for `ssh -R`.\n",
        plan.runs
    );
    if let Some(mbs) = results.iperf3_mbs {
        let _ = writeln!(
            md,
            "For scale: iperf3, one stream on loopback with no HTTP at all, moved {:.0} MB/s.\n",
            mbs
        );
    }

    // Targets first: they are what the run is for.
    let _ = writeln!(md, "## Against the targets\n");
    let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
    for (target, measured, met) in targets(results) {
        let _ = writeln!(md, "| {target} | {measured} | {} |", yes_no(met));
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Throughput\n");
    let _ = writeln!(
        md,
        "A download of an endless body, {} s after 1 s of warm-up, MB/s (10⁶ bytes per second); \
         one connection, then {} at once.\n",
        plan.seconds, plan.parallel
    );
    let _ = writeln!(
        md,
        "CPU s/GB: CPU time both sides of the tunnel spent (user and system, with child processes) \
         per GB of the single-stream download; what the tunnel costs to run, whatever the speed.\n"
    );
    let _ = writeln!(
        md,
        "| contender | 1 stream, MB/s | × | {} streams, MB/s | × | CPU s/GB |\n|---|---:|---:|---:|---:|---:|",
        plan.parallel
    );
    for entry in &results.contenders {
        let single = median(&entry.single_mbs);
        let parallel = median(&entry.parallel_mbs);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            entry.kind.name(),
            num(single, 0),
            ratio(single, none.map(|n| median(&n.single_mbs))),
            num(parallel, 0),
            ratio(parallel, none.map(|n| median(&n.parallel_mbs))),
            num(median(&entry.single_cpu_per_gb), 2),
        );
    }
    let _ = writeln!(md, "\n![throughput]({})\n", chart_link("throughput.png"));

    let _ = writeln!(md, "## HTTP requests\n");
    let _ = writeln!(
        md,
        "wrk, 2 threads, {} connections, {} s, for a 612-byte page; with keep-alive, then with a \
         new connection for every request (`Connection: close`). Latencies in ms.\n",
        plan.wrk_connections, plan.seconds
    );
    let _ = writeln!(
        md,
        "| contender | keep-alive req/s | × | p50 | p99 | new-connection req/s | × | p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for entry in &results.contenders {
        let ka = wrk_medians(&entry.wrk_keepalive);
        let nc = wrk_medians(&entry.wrk_close);
        let none_ka = none.map(|n| wrk_medians(&n.wrk_keepalive).0);
        let none_nc = none.map(|n| wrk_medians(&n.wrk_close).0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            entry.kind.name(),
            num(ka.0, 0),
            ratio(ka.0, none_ka),
            num(ka.1, 2),
            num(ka.2, 2),
            num(nc.0, 0),
            ratio(nc.0, none_nc),
            num(nc.1, 2),
            num(nc.2, 2),
        );
    }
    let errors: Vec<String> = results
        .contenders
        .iter()
        .filter_map(|e| {
            let n: u64 = e
                .wrk_keepalive
                .iter()
                .chain(&e.wrk_close)
                .map(|w| w.errors)
                .sum();
            (n > 0).then(|| format!("{} {n}", e.kind.name()))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(
            md,
            "\nwrk counted errors (socket errors and non-2xx answers, all runs): {}.",
            errors.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\n![HTTP requests per second]({})\n",
        chart_link("http.png")
    );

    let _ = writeln!(md, "## Connection setup\n");
    let _ = writeln!(
        md,
        "From the visitor's `connect()` to the origin reading the first byte of the request sent \
         right after it, one connection at a time, {} per run. Microseconds.\n",
        plan.setup_samples
    );
    let _ = writeln!(
        md,
        "| contender | p50 µs | p99 µs | added at p50, µs |\n|---|---:|---:|---:|"
    );
    let none_setup = none.map(|n| median(&n.setup_us));
    for entry in &results.contenders {
        let p50 = median(&entry.setup_us);
        let p99 = percentile(&entry.setup_us, 99.0);
        let added = none_setup.map_or(f64::NAN, |n| p50 - n);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            entry.kind.name(),
            num(p50, 0),
            num(p99, 0),
            num(added, 0)
        );
    }
    let _ = writeln!(md);

    memory_section(&mut md, results, &plan.idle_steps);
    if !plan.idle_steps.is_empty() {
        let _ = writeln!(
            md,
            "![memory per idle visitor]({})\n",
            chart_link("memory.png")
        );
    }

    rtt_section(&mut md, results);
    if !results.rtt.is_empty() {
        let _ = writeln!(
            md,
            "![single stream over a long link]({})\n",
            chart_link("rtt.png")
        );
    }

    if let Some(fleet) = &results.fleet {
        md.push_str(&fleet_section(fleet));
    }

    let failures: Vec<String> = results
        .contenders
        .iter()
        .flat_map(|e| {
            e.errors
                .iter()
                .map(move |err| format!("- {}: {err}", e.kind.name()))
        })
        .chain(results.rtt.iter().flat_map(|r| {
            r.errors
                .iter()
                .map(move |err| format!("- {} ms RTT: {err}", r.rtt_ms))
        }))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "## What failed in this run\n");
        for line in failures {
            let _ = writeln!(md, "{}", line.replace('\n', " "));
        }
        let _ = writeln!(md);
    }

    Ok(md)
}

/// The heading of the forwarding section, which `--fleet-only` finds and replaces.
const FLEET_HEADING: &str = "## Forwarding between proxies";
/// The heading the forwarding section goes before when a report has none yet.
const FAILURES_HEADING: &str = "## What failed in this run";

/// Replaces the forwarding section of the report at `out` with `fleet`'s, or adds it (before
/// the failures, if any), leaving every other section as it is.
pub fn write_fleet(fleet: &FleetResults, out: &Path) -> anyhow::Result<()> {
    let md = std::fs::read_to_string(out).unwrap_or_default();
    let md = splice_section(&md, &fleet_section(fleet));
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))
}

/// Sets the `fleet` entry of the raw figures at `path` to `fleet`'s, keeping every other
/// entry byte for byte (parsed and written again, floats could change in their last digit);
/// a file that is missing or not a JSON object is started afresh.
pub fn write_fleet_json(fleet: &FleetResults, path: &Path) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let entry = serde_json::to_string_pretty(fleet)?;
    let json = splice_json_entry(&old, "fleet", &entry);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// `json`, an object as `serde_json::to_string_pretty` writes it, with its top-level entry
/// `key` (if any) removed and `key: value` (`value` pretty-printed) added last. In that
/// layout a top-level key, and only one, starts a line with exactly two spaces and a quote
/// (strings hold no raw newline).
fn splice_json_entry(json: &str, key: &str, value: &str) -> String {
    let is_object = serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| v.is_object());
    let mut entries: Vec<Vec<&str>> = Vec::new();
    if is_object {
        let lines: Vec<&str> = json.trim_end().lines().collect();
        let inner = lines.get(1..lines.len().saturating_sub(1)).unwrap_or(&[]);
        for &line in inner {
            let starts_entry = line.starts_with("  \"") || entries.is_empty();
            if starts_entry {
                entries.push(vec![line]);
            } else if let Some(entry) = entries.last_mut() {
                entry.push(line);
            }
        }
    }
    let ours = format!("  \"{key}\": ");
    entries.retain(|entry| !entry.first().is_some_and(|line| line.starts_with(&ours)));
    let mut out = String::from("{\n");
    for entry in &entries {
        for (i, line) in entry.iter().enumerate() {
            // The separating comma ends an entry's last line; put it back on every entry.
            let line = if i + 1 == entry.len() {
                line.strip_suffix(',').unwrap_or(line)
            } else {
                line
            };
            out.push_str(line);
            out.push_str(if i + 1 == entry.len() { ",\n" } else { "\n" });
        }
    }
    let _ = write!(out, "{ours}{}\n}}", value.replace('\n', "\n  "));
    out
}

/// `md` with the section starting at [`FLEET_HEADING`] replaced by `section` (up to the next
/// `## ` heading), or with `section` put before [`FAILURES_HEADING`] or at the end.
fn splice_section(md: &str, section: &str) -> String {
    let heading_at = |heading: &str| {
        if md.starts_with(heading) {
            Some(0)
        } else {
            md.find(&format!("\n{heading}")).map(|i| i + 1)
        }
    };
    if let Some(start) = heading_at(FLEET_HEADING) {
        let body = start + FLEET_HEADING.len();
        let end = md[body..].find("\n## ").map_or(md.len(), |i| body + i + 1);
        return format!("{}{section}{}", &md[..start], &md[end..]);
    }
    if let Some(at) = heading_at(FAILURES_HEADING) {
        return format!("{}{section}{}", &md[..at], &md[at..]);
    }
    let gap = match md {
        "" => "",
        md if md.ends_with("\n\n") => "",
        md if md.ends_with('\n') => "\n",
        _ => "\n\n",
    };
    format!("{md}{gap}{section}")
}

/// The forwarding section: both paths, each kind of visitor, with ratios to direct.
fn fleet_section(fleet: &FleetResults) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{FLEET_HEADING}\n");
    let _ = writeln!(
        md,
        "Two `shroud-proxy` processes of one fleet (each with `--listen-peer 127.0.0.1:0` and the \
         same `--fleet-secret-file`, the second with `--peer` naming the first) and one client \
         holding its tunnel to the first. Visitors go either to the first (\"direct\") or to the \
         second, which holds no tunnel and forwards each visitor over its peer link (TLS, yamux) \
         to the first (\"forwarded\", one hop). Same origin, same client, same load: both paths \
         are measured in the same run, one after the other, {} times each (which goes first \
         alternates); figures are medians, and `×` is the ratio to direct.\n",
        fleet.runs
    );
    let when = if fleet.alone {
        "in a run of their own (`bench/run.sh --fleet-only`), apart from the sections above"
    } else {
        "in the same run as the sections above"
    };
    let _ = writeln!(
        md,
        "These figures were taken {when}, on {}; this part took {:.0} s.\n",
        fleet.machine, fleet.elapsed_secs
    );
    if let Some(ms) = fleet.converged_ms {
        let _ = writeln!(
            md,
            "Measuring starts once gossip has converged: the first request at the second proxy, \
             sent as soon as the client reported its tunnel up, was answered {ms:.0} ms later (a \
             proxy that does not yet know who holds a name holds the visitor until gossip tells \
             it).\n"
        );
    }
    let _ = writeln!(
        md,
        "- **HTTPS**: the bench's own visitors, {} at once for {} s; every request a new TCP \
         connection and a full TLS handshake (SNI `{HOST}`, certificate verified, no session \
         resumed), `GET /page`, the whole answer read. The proxies route by SNI without \
         decrypting; the client terminates TLS (`--tls-cert`) in front of the same plain origin. \
         Latency from `connect()` to the answer's last byte.\n\
         - **HTTP**: wrk as in [HTTP requests](#http-requests), 2 threads, {} connections, {} s, \
         `Connection: close`: a new connection per request, routed by `Host`. wrk times a \
         request from when it is sent.\n",
        fleet.connections, fleet.seconds, fleet.connections, fleet.seconds
    );
    let _ = writeln!(
        md,
        "| visitors | path | new-connection req/s | × | p50 ms | p99 ms | p99 added by the forward, ms |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for (label, paths) in [("HTTPS", &fleet.https), ("HTTP", &fleet.http)] {
        let direct = wrk_medians(&paths.direct);
        let forwarded = wrk_medians(&paths.forwarded);
        let _ = writeln!(
            md,
            "| {label} | direct | {} | {} | {} | {} | — |",
            num(direct.0, 0),
            ratio(direct.0, Some(direct.0)),
            num(direct.1, 2),
            num(direct.2, 2),
        );
        let _ = writeln!(
            md,
            "| {label} | forwarded | {} | {} | {} | {} | {} |",
            num(forwarded.0, 0),
            ratio(forwarded.0, Some(direct.0)),
            num(forwarded.1, 2),
            num(forwarded.2, 2),
            signed(forwarded.2 - direct.2, 2),
        );
    }
    let _ = writeln!(
        md,
        "\nNothing worse than when forwarding landed: a forward keeps at least \
         {FORWARDED_RPS_VS_DIRECT:.2} of direct's req/s and adds at most \
         {FORWARDED_P99_ADDED_MS:.0} ms at p99.\n\n\
         | visitors | forwarded ÷ direct, p99 added | met |\n|---|---|---|"
    );
    for (label, paths) in [("HTTPS", &fleet.https), ("HTTP", &fleet.http)] {
        let (direct, forwarded) = (wrk_medians(&paths.direct), wrk_medians(&paths.forwarded));
        let (share, added) = (forwarded.0 / direct.0, forwarded.2 - direct.2);
        let met = known(share).zip(known(added)).map(|(share, added)| {
            share >= FORWARDED_RPS_VS_DIRECT && added <= FORWARDED_P99_ADDED_MS
        });
        let measured = match met {
            Some(_) => format!("{}×, {} ms", num(share, 2), signed(added, 2)),
            None => "—".into(),
        };
        let _ = writeln!(md, "| {label} | {measured} | {} |", yes_no(met));
    }
    let counted: Vec<String> = [
        ("HTTPS direct", &fleet.https.direct),
        ("HTTPS forwarded", &fleet.https.forwarded),
        ("HTTP direct", &fleet.http.direct),
        ("HTTP forwarded", &fleet.http.forwarded),
    ]
    .into_iter()
    .filter_map(|(label, runs)| {
        let n: u64 = runs.iter().map(|w| w.errors).sum();
        (n > 0).then(|| format!("{label} {n}"))
    })
    .collect();
    if !counted.is_empty() {
        let _ = writeln!(
            md,
            "\nFailed requests (socket errors, timeouts and non-2xx answers, all runs): {}.",
            counted.join(", ")
        );
    }
    for err in &fleet.errors {
        let _ = writeln!(md, "\nFailed: {}", err.replace('\n', " "));
    }
    let _ = writeln!(md);
    md
}

fn memory_section(md: &mut String, results: &Results, steps: &[usize]) {
    if steps.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Memory\n");
    let _ = writeln!(
        md,
        "Resident memory (RSS, with child processes) of the public side (\"proxy\": shroud-proxy, \
         rathole server, bore server, PageKite front end, sshd) and of the side next to the \
         origin (\"client\"), with the tunnel up and idle, then with idle visitor connections \
         held open, each having fetched one page first. MiB, and KiB per visitor connection \
         from idle to the last step. Where a contender held fewer connections than asked, the \
         count it held is in brackets.\n"
    );
    let mut header = String::from("| contender | proxy idle |");
    let mut rule = String::from("|---|---:|");
    for n in steps {
        let _ = write!(header, " proxy, {n} |");
        rule.push_str("---:|");
    }
    let _ = write!(header, " KiB per visitor (proxy) | client idle |");
    rule.push_str("---:|---:|");
    for n in steps {
        let _ = write!(header, " client, {n} |");
        rule.push_str("---:|");
    }
    header.push_str(" KiB per visitor (client) |");
    rule.push_str("---:|");
    let _ = writeln!(md, "{header}\n{rule}");
    for entry in &results.contenders {
        let Some(memory) = &entry.memory else {
            continue;
        };
        let cell = |i: usize, side: fn(&crate::run::Step) -> Option<u64>| match memory.steps.get(i)
        {
            Some(step) if step.0 == steps[i] => mib(side(step)),
            Some(step) => format!("{} ({})", mib(side(step)), step.0),
            None => "—".into(),
        };
        let mut row = format!("| {} | {} |", entry.kind.name(), mib(memory.proxy_idle));
        for i in 0..steps.len() {
            let _ = write!(row, " {} |", cell(i, |s| s.1));
        }
        let _ = write!(
            row,
            " {} | {} |",
            num(per_visitor(memory.proxy_idle, memory, |s| s.1), 1),
            mib(memory.client_idle)
        );
        for i in 0..steps.len() {
            let _ = write!(row, " {} |", cell(i, |s| s.2));
        }
        let _ = write!(
            row,
            " {} |",
            num(per_visitor(memory.client_idle, memory, |s| s.2), 1)
        );
        let _ = writeln!(md, "{row}");
    }
    if let Some(t) = &results.tunnels {
        let _ = writeln!(
            md,
            "\nshroud's proxy with no tunnel: {}; with {} idle tunnels: {}, so {:.1} KiB per idle tunnel.",
            mib(Some(t.rss_none)),
            t.tunnels,
            mib(Some(t.rss_many)),
            per_tunnel_kib(t),
        );
    }
    let _ = writeln!(md);
}

fn rtt_section(md: &mut String, results: &Results) {
    if results.rtt.is_empty() {
        return;
    }
    let plan = results.plan.as_ref();
    let rate = plan.map_or(0.0, |p| p.link_rate as f64 / 1e6);
    let seconds = plan.map_or(0, |p| p.rtt_seconds);
    let _ = writeln!(md, "## One stream over a long link\n");
    let _ = writeln!(
        md,
        "The client reaches the proxy through a relay that adds the round trip (half each way) \
         and carries {rate:.0} MB/s each way, with buffers of twice the bandwidth-delay product. \
         The baseline is a plain TCP download through the same relay. {seconds} s downloads; MB/s \
         in the first 2 s and from 10 s on.\n"
    );
    let _ = writeln!(
        md,
        "| RTT | plain TCP, 0–2 s | plain TCP, 10 s on | shroud, 0–2 s | shroud, 10 s on | shroud ÷ plain, 10 s on |\n|---|---:|---:|---:|---:|---:|"
    );
    let end = Duration::from_secs(seconds);
    for r in &results.rtt {
        let early = |s: &Option<Series>| {
            s.as_ref().map_or(f64::NAN, |s| {
                s.rate_mbs(Duration::ZERO, Duration::from_secs(2))
            })
        };
        let late = |s: &Option<Series>| s.as_ref().map_or(f64::NAN, |s| s.rate_mbs(RTT_FROM, end));
        let _ = writeln!(
            md,
            "| {} ms | {} | {} | {} | {} | {} |",
            r.rtt_ms,
            num(early(&r.plain), 1),
            num(late(&r.plain), 1),
            num(early(&r.shroud), 1),
            num(late(&r.shroud), 1),
            num(late(&r.shroud) / late(&r.plain), 2),
        );
    }
    let _ = writeln!(md);
}

/// The targets, each with what was measured and whether it was met (`None`: not measured).
fn targets(results: &Results) -> Vec<(String, String, Option<bool>)> {
    let shroud = find(results, Kind::Shroud);
    let rathole = find(results, Kind::RatholeTls);
    let mut rows = Vec::new();

    let single = |e: Option<&ContenderResults>| e.map_or(f64::NAN, |e| median(&e.single_mbs));
    let r = single(shroud) / single(rathole);
    rows.push((
        format!("single-stream throughput ≥ {TARGET_THROUGHPUT_VS_RATHOLE}× rathole (TLS)"),
        format!(
            "{}× ({} vs {} MB/s)",
            num(r, 2),
            num(single(shroud), 0),
            num(single(rathole), 0)
        ),
        known(r).map(|r| r >= TARGET_THROUGHPUT_VS_RATHOLE),
    ));

    let keepalive = |e: &ContenderResults| wrk_medians(&e.wrk_keepalive);
    let close = |e: &ContenderResults| wrk_medians(&e.wrk_close);
    type Figures<'a> = &'a dyn Fn(&ContenderResults) -> (f64, f64, f64);
    let modes: [(&str, Figures); 2] = [("keep-alive", &keepalive), ("new-connection", &close)];
    for (label, figures) in modes {
        let unknown = (f64::NAN, f64::NAN, f64::NAN);
        let (s, t) = (
            shroud.map_or(unknown, figures),
            rathole.map_or(unknown, figures),
        );
        let r = s.0 / t.0;
        rows.push((
            format!("HTTP {label} req/s ≥ {TARGET_RPS_VS_RATHOLE}× rathole (TLS)"),
            format!("{}× ({} vs {})", num(r, 2), num(s.0, 0), num(t.0, 0)),
            known(r).map(|r| r >= TARGET_RPS_VS_RATHOLE),
        ));
        rows.push((
            format!("HTTP {label} p99 no worse than rathole (TLS)"),
            format!("{} vs {} ms", num(s.2, 2), num(t.2, 2)),
            known(s.2 - t.2).map(|d| d <= 0.0),
        ));
    }

    let per_visitor_kib = shroud
        .and_then(|e| e.memory.as_ref())
        .and_then(|m| known(per_visitor(m.proxy_idle, m, |s| s.1)));
    rows.push((
        format!("proxy ≤ {TARGET_KIB_PER_VISITOR} KiB per idle visitor connection"),
        per_visitor_kib.map_or("not measured".into(), |k| format!("{k:.1} KiB")),
        per_visitor_kib.map(|k| k <= TARGET_KIB_PER_VISITOR),
    ));
    let per_tunnel = results.tunnels.as_ref().map(per_tunnel_kib);
    rows.push((
        format!("proxy ≤ {TARGET_KIB_PER_TUNNEL} KiB per idle tunnel"),
        per_tunnel.map_or("not measured".into(), |k| format!("{k:.1} KiB")),
        per_tunnel.map(|k| k <= TARGET_KIB_PER_TUNNEL),
    ));

    let at_target = results.rtt.iter().find(|r| r.rtt_ms == TARGET_RTT_MS);
    let share = at_target.and_then(|r| {
        let end = Duration::from_secs(results.plan.as_ref()?.rtt_seconds);
        let plain = r.plain.as_ref()?.rate_mbs(RTT_FROM, end);
        let shroud = r.shroud.as_ref()?.rate_mbs(RTT_FROM, end);
        known(shroud / plain)
    });
    rows.push((
        format!(
            "at {TARGET_RTT_MS} ms, one stream within {:.0}% of plain TCP after 10 s",
            (1.0 - TARGET_RTT_SHARE) * 100.0
        ),
        share.map_or("not measured".into(), |s| {
            format!("{:.0}% of plain TCP", s * 100.0)
        }),
        share.map(|s| s >= TARGET_RTT_SHARE),
    ));
    rows.extend(speed_targets(results));
    rows
}

/// The speed issue's loopback targets: shroud against no tunnel in the same run, memory per
/// held idle visitor on each side, CPU per GB against rathole with TLS.
fn speed_targets(results: &Results) -> Vec<(String, String, Option<bool>)> {
    let shroud = find(results, Kind::Shroud);
    let none = find(results, Kind::NoTunnel);
    let rathole = find(results, Kind::RatholeTls);
    let mut rows = Vec::new();
    let share = |figure: &dyn Fn(&ContenderResults) -> f64| {
        let (s, n) = (
            shroud.map_or(f64::NAN, figure),
            none.map_or(f64::NAN, figure),
        );
        (s / n, s, n)
    };
    let single = |e: &ContenderResults| median(&e.single_mbs);
    let keepalive = |e: &ContenderResults| wrk_medians(&e.wrk_keepalive).0;
    let close = |e: &ContenderResults| wrk_medians(&e.wrk_close).0;
    type Figure<'a> = &'a dyn Fn(&ContenderResults) -> f64;
    let shares: [(&str, Figure, f64, &str); 3] = [
        ("one stream", &single, TARGET_STREAM_VS_NONE, " MB/s"),
        (
            "HTTP keep-alive req/s",
            &keepalive,
            TARGET_KEEPALIVE_VS_NONE,
            "",
        ),
        (
            "HTTP new-connection req/s",
            &close,
            TARGET_CLOSE_VS_NONE,
            "",
        ),
    ];
    for (label, figure, target, unit) in shares {
        let (r, s, n) = share(figure);
        rows.push((
            format!("{label} ≥ {target:.2} of no tunnel"),
            format!("{} ({} vs {}{unit})", num(r, 2), num(s, 0), num(n, 0)),
            known(r).map(|r| r >= target),
        ));
    }
    let memory = shroud.and_then(|e| e.memory.as_ref());
    type Idle = fn(&crate::run::Memory) -> Option<u64>;
    type At = fn(&crate::run::Step) -> Option<u64>;
    let sides: [(&str, Idle, At); 2] = [
        ("proxy", |m| m.proxy_idle, |s| s.1),
        ("client", |m| m.client_idle, |s| s.2),
    ];
    for (side, idle, at) in sides {
        let kib = memory.and_then(|m| known(per_visitor(idle(m), m, at)));
        rows.push((
            format!("{side} ≤ {TARGET_KIB_PER_VISITOR_EACH_SIDE} KiB per held idle visitor"),
            kib.map_or("not measured".into(), |k| format!("{k:.1} KiB")),
            kib.map(|k| k <= TARGET_KIB_PER_VISITOR_EACH_SIDE),
        ));
    }
    let cpu = |e: Option<&ContenderResults>| e.map_or(f64::NAN, |e| median(&e.single_cpu_per_gb));
    let r = cpu(shroud) / cpu(rathole);
    rows.push((
        format!("CPU per GB ≤ {TARGET_CPU_VS_RATHOLE}× rathole (TLS)"),
        format!(
            "{}× ({} vs {} s/GB)",
            num(r, 2),
            num(cpu(shroud), 2),
            num(cpu(rathole), 2)
        ),
        known(r).map(|r| r <= TARGET_CPU_VS_RATHOLE),
    ));
    rows
}

fn per_tunnel_kib(t: &crate::run::TunnelMemory) -> f64 {
    (t.rss_many as f64 - t.rss_none as f64) / t.tunnels as f64
}

/// KiB per visitor from idle to the last step reached.
pub(crate) fn per_visitor(
    idle: Option<u64>,
    memory: &crate::run::Memory,
    side: impl Fn(&crate::run::Step) -> Option<u64>,
) -> f64 {
    let Some(last) = memory.steps.last() else {
        return f64::NAN;
    };
    match (idle, side(last)) {
        (Some(idle), Some(at)) if last.0 > 0 => (at as f64 - idle as f64) / last.0 as f64,
        _ => f64::NAN,
    }
}

fn find(results: &Results, kind: Kind) -> Option<&ContenderResults> {
    results.contenders.iter().find(|e| e.kind == kind)
}

/// Medians of (req/s, p50, p99) over runs.
fn wrk_medians(runs: &[crate::measure::WrkResult]) -> (f64, f64, f64) {
    let rps: Vec<f64> = runs.iter().map(|w| w.rps).collect();
    let p50: Vec<f64> = runs.iter().map(|w| w.p50_ms).collect();
    let p99: Vec<f64> = runs.iter().map(|w| w.p99_ms).collect();
    (median(&rps), median(&p50), median(&p99))
}

fn known(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "—".into()
    }
}

/// `x` with its sign always shown.
fn signed(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:+.decimals$}")
    } else {
        "—".into()
    }
}

fn ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(base) if base > 0.0 && x.is_finite() => format!("{:.2}", x / base),
        _ => "—".into(),
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// `path` relative to `base` when it lies below it, else as given.
fn relative(path: &Path, base: &Path) -> PathBuf {
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    match (path.canonicalize(), base.canonicalize()) {
        (Ok(p), Ok(b)) => p.strip_prefix(&b).map(Path::to_path_buf).unwrap_or(p),
        _ => path.to_path_buf(),
    }
}

pub mod charts;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::WrkResult;
    use crate::run::{ContenderResults, Memory, Plan, RttResult, TunnelMemory};

    fn contender(kind: Kind, mbs: f64, rps: f64, p99: f64) -> ContenderResults {
        let wrk = WrkResult {
            rps,
            p50_ms: 1.0,
            p99_ms: p99,
            errors: 0,
        };
        ContenderResults {
            kind,
            single_mbs: vec![mbs, mbs * 0.9, mbs * 1.1],
            single_cpu_per_gb: vec![2.0],
            parallel_mbs: vec![mbs],
            wrk_keepalive: vec![wrk.clone()],
            wrk_close: vec![wrk],
            setup_us: vec![100.0, 200.0],
            memory: None,
            errors: Vec::new(),
        }
    }

    fn results(shroud_mbs: f64) -> Results {
        let mut shroud = contender(Kind::Shroud, shroud_mbs, 30_000.0, 2.0);
        shroud.memory = Some(Memory {
            proxy_idle: Some(10_000),
            client_idle: Some(12_000),
            // 100 visitors: 15 KiB each at the proxy.
            steps: vec![(100, Some(11_500), Some(14_000))],
        });
        let series = |rate: u64| Series {
            interval_ms: 1000,
            bytes: vec![rate; 14],
        };
        Results {
            machine: "test".into(),
            plan: Some(Plan {
                kinds: vec![Kind::NoTunnel, Kind::Shroud, Kind::RatholeTls],
                runs: 3,
                seconds: 3,
                parallel: 8,
                wrk_connections: 32,
                setup_samples: 2,
                idle_steps: vec![100],
                idle_tunnels: 10,
                rtts_ms: vec![300],
                link_rate: 25_000_000,
                rtt_seconds: 14,
                stream_buffer: None,
            }),
            iperf3_mbs: None,
            contenders: vec![
                contender(Kind::NoTunnel, 4000.0, 100_000.0, 1.0),
                shroud,
                contender(Kind::RatholeTls, 500.0, 20_000.0, 5.0),
            ],
            tunnels: Some(TunnelMemory {
                tunnels: 10,
                rss_none: 1000,
                rss_many: 2000,
            }),
            rtt: vec![RttResult {
                rtt_ms: 300,
                plain: Some(series(25_000_000)),
                shroud: Some(series(21_000_000)),
                errors: Vec::new(),
            }],
            fleet: None,
            elapsed_secs: 1.0,
        }
    }

    fn target_row<'a>(md: &'a str, starts: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with(&format!("| {starts}")))
            .unwrap_or_else(|| panic!("no row for {starts:?} in\n{md}"))
    }

    #[test]
    fn targets_say_met_or_not_from_the_figures() {
        let md = render(&results(700.0), Path::new("charts")).unwrap();
        // 700 / 500 = 1.40x.
        let row = target_row(&md, "single-stream throughput");
        assert!(row.contains("1.40×") && row.ends_with("| yes |"), "{row}");
        let row = target_row(&md, "HTTP keep-alive req/s");
        assert!(row.contains("1.50×") && row.ends_with("| yes |"), "{row}");
        let row = target_row(&md, "proxy ≤ 16 KiB per idle visitor");
        assert!(
            row.contains("15.0 KiB") && row.ends_with("| yes |"),
            "{row}"
        );
        let row = target_row(&md, "proxy ≤ 64 KiB per idle tunnel");
        assert!(
            row.contains("100.0 KiB") && row.ends_with("| **no** |"),
            "{row}"
        );
        let row = target_row(&md, "at 300 ms");
        assert!(row.contains("84%") && row.ends_with("| yes |"), "{row}");
        // The speed issue's: 700 of 4000 MB/s, 30,000 of 100,000 req/s.
        let row = target_row(&md, "one stream ≥ 0.40 of no tunnel");
        assert!(row.contains("0.17") && row.ends_with("| **no** |"), "{row}");
        let row = target_row(&md, "HTTP keep-alive req/s ≥ 0.50 of no tunnel");
        assert!(row.contains("0.30") && row.ends_with("| **no** |"), "{row}");
        let row = target_row(&md, "client ≤ 4 KiB per held idle visitor");
        assert!(
            row.contains("20.0 KiB") && row.ends_with("| **no** |"),
            "{row}"
        );
        // 2.0 against 2.0 s/GB.
        let row = target_row(&md, "CPU per GB ≤ 0.6× rathole");
        assert!(
            row.contains("1.00×") && row.ends_with("| **no** |"),
            "{row}"
        );

        let md = render(&results(600.0), Path::new("charts")).unwrap();
        let row = target_row(&md, "single-stream throughput");
        assert!(
            row.contains("1.20×") && row.ends_with("| **no** |"),
            "{row}"
        );
        assert!(
            md.contains("](charts/throughput.png)"),
            "the chart link is missing"
        );
    }

    fn fleet() -> FleetResults {
        let wrk = |rps: f64, p99_ms: f64| WrkResult {
            rps,
            p50_ms: 1.0,
            p99_ms,
            errors: 0,
        };
        FleetResults {
            machine: "test".into(),
            runs: 1,
            seconds: 3,
            connections: 32,
            converged_ms: Some(120.0),
            alone: true,
            https: crate::fleet::Paths {
                direct: vec![wrk(2000.0, 10.0)],
                forwarded: vec![wrk(1500.0, 12.5)],
            },
            http: crate::fleet::Paths {
                direct: vec![wrk(5000.0, 8.0)],
                forwarded: Vec::new(),
            },
            errors: vec!["HTTP, Forwarded: wrk failed".into()],
            elapsed_secs: 30.0,
        }
    }

    #[test]
    fn forwarding_is_shown_against_direct() {
        let md = fleet_section(&fleet());
        let row = target_row(&md, "HTTPS | forwarded");
        assert_eq!(
            row,
            "| HTTPS | forwarded | 1500 | 0.75 | 1.00 | 12.50 | +2.50 |"
        );
        let row = target_row(&md, "HTTPS | direct");
        assert!(row.contains("| 2000 | 1.00 |"), "{row}");
        let row = target_row(&md, "HTTP | forwarded");
        assert_eq!(row, "| HTTP | forwarded | — | — | — | — | — |");
        assert_eq!(
            target_row(&md, "HTTPS | 0.75"),
            "| HTTPS | 0.75×, +2.50 ms | yes |"
        );
        assert_eq!(target_row(&md, "HTTP | —"), "| HTTP | — | not measured |");
        assert!(md.contains("Failed: HTTP, Forwarded: wrk failed"), "{md}");
        assert!(md.contains("answered 120 ms later"), "{md}");
        assert!(md.contains("in a run of their own"), "{md}");
    }

    #[test]
    fn a_forward_that_costs_a_visitor_100_ms_is_not_met() {
        let mut fleet = fleet();
        // p99 108 ms later, as in the regression 5b433e6 fixed, with the rate above its floor.
        fleet.https.forwarded[0].p99_ms = 118.0;
        // And one forward that takes a third of the rate.
        fleet.http.forwarded = vec![WrkResult {
            rps: 3400.0,
            p50_ms: 1.0,
            p99_ms: 8.5,
            errors: 0,
        }];
        let md = fleet_section(&fleet);
        assert_eq!(
            target_row(&md, "HTTPS | 0.75"),
            "| HTTPS | 0.75×, +108.00 ms | **no** |"
        );
        assert_eq!(
            target_row(&md, "HTTP | 0.68"),
            "| HTTP | 0.68×, +0.50 ms | **no** |"
        );
    }

    #[test]
    fn the_forwarding_section_replaces_its_old_self_and_nothing_else() {
        let section = fleet_section(&fleet());
        let before = "# Benchmarks\n\n## Memory\n\nmemory\n\n## Forwarding between proxies\n\nstale figures\n\n## What failed in this run\n\n- x\n";
        let after = splice_section(before, &section);
        assert!(after.starts_with("# Benchmarks\n\n## Memory\n\nmemory\n\n## Forwarding"));
        assert!(after.ends_with(&format!("{section}## What failed in this run\n\n- x\n")));
        assert!(!after.contains("stale figures"), "{after}");
        // Done twice, the same.
        assert_eq!(splice_section(&after, &section), after);

        // Absent: before the failures, or else at the end.
        let without = "# Benchmarks\n\n## Memory\n\nmemory\n\n## What failed in this run\n\n- x\n";
        let with = splice_section(without, &section);
        assert_eq!(
            with,
            before.replace(
                "## Forwarding between proxies\n\nstale figures\n\n",
                &section
            )
        );
        assert_eq!(
            splice_section("# Benchmarks\n\nm\n", &section),
            format!("# Benchmarks\n\nm\n\n{section}")
        );
        // At the end of the file, it runs to the end.
        let last = format!("# B\n\n{section}");
        assert_eq!(splice_section(&last, &section), last);
    }

    #[test]
    fn the_fleet_entry_of_the_raw_figures_is_replaced_and_the_rest_kept_byte_for_byte() {
        // Floats that would not survive a parse and a print unchanged.
        let old = "{\n  \"machine\": \"m, \\\"x\\\"\",\n  \"contenders\": [\n    {\n      \"mbs\": 3853.9882543333333\n    }\n  ],\n  \"elapsed_secs\": 536.0000000000001\n}";
        let value = "{\n  \"runs\": 3\n}";
        let new = splice_json_entry(old, "fleet", value);
        let expected = format!(
            "{},\n  \"fleet\": {{\n    \"runs\": 3\n  }}\n}}",
            old.strip_suffix("\n}").unwrap()
        );
        assert_eq!(new, expected);
        // Again: the old entry goes, wherever it is, and the new one comes last.
        let moved = new.replace("\"machine\"", "\"z\"").replacen(
            "{\n  \"z\"",
            "{\n  \"fleet\": {\n    \"runs\": 1\n  },\n  \"z\"",
            1,
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&moved).is_ok(),
            "{moved}"
        );
        let again = splice_json_entry(&moved, "fleet", value);
        assert_eq!(again, expected.replace("\"machine\"", "\"z\""));
        let parsed: serde_json::Value = serde_json::from_str(&again).unwrap();
        assert_eq!(parsed["fleet"]["runs"], 3);
        // Nothing usable: a fresh object.
        for junk in ["", "[1, 2]", "{ not json"] {
            assert_eq!(
                splice_json_entry(junk, "fleet", value),
                "{\n  \"fleet\": {\n    \"runs\": 3\n  }\n}"
            );
        }
    }

    #[test]
    fn a_missing_contender_is_not_measured_rather_than_met() {
        let mut results = results(700.0);
        results.contenders.retain(|c| c.kind != Kind::RatholeTls);
        let md = render(&results, Path::new("charts")).unwrap();
        let row = target_row(&md, "single-stream throughput");
        assert!(row.ends_with("| not measured |"), "{row}");
    }
}
