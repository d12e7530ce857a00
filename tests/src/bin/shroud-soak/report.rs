//! The summary: what ran, what was asked of it, what happened to every request and every
//! event, and the verdict. The accounting behind it is in [`crate::accounting`].
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shroud_tests::load::{Outcome, Record, Request};
use shroud_tests::tool;

use crate::accounting::{
    attribute, broken_tunnels, event_end, recovery, tunnels, windows, Inputs, Recovery, Tunnel,
    Verdict, Window,
};
use crate::chaos::{stamp, Event, Kind};
use crate::fleet::{CLIENTS, DRAIN_SECS, KEEPALIVE_SECS, MAX_BACKOFF_SECS, PROXIES};
use crate::procs::Seen;
use crate::traffic::KINDS;

/// The most unexplained or corrupted requests listed one by one.
const LISTED: usize = 40;

/// The summary as Markdown, and whether the soak passed.
pub fn summarize(inputs: &Inputs<'_>) -> (String, bool) {
    let windows = windows(inputs);
    let mut out = String::new();

    // Sort every request.
    let mut attributed: Vec<(&Record, usize)> = Vec::new();
    let mut unexplained: Vec<&Record> = Vec::new();
    let mut corrupted: Vec<&Record> = Vec::new();
    for record in inputs.records {
        match &record.outcome {
            // Cut short by an interrupted run, which is a FAIL anyway.
            Outcome::Ok | Outcome::Aborted => {}
            Outcome::Corrupted(_) => corrupted.push(record),
            Outcome::Failed(_) | Outcome::Unreachable => match attribute(record, &windows) {
                Verdict::Attributed(event) => attributed.push((record, event)),
                Verdict::Unexplained => unexplained.push(record),
            },
        }
    }
    let ok = inputs
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .count();
    let bytes: u64 = inputs.records.iter().map(|r| r.bytes_verified).sum();
    let traffic = inputs
        .traffic_end
        .saturating_duration_since(inputs.traffic_start);

    let mut reasons = Vec::new();
    if let Some(why) = &inputs.stopped_early {
        reasons.push(format!("the run ended early: {why}"));
    }
    if !corrupted.is_empty() {
        reasons.push(format!("{} corrupted", corrupted.len()));
    }
    if !unexplained.is_empty() {
        reasons.push(format!("{} unexplained failures", unexplained.len()));
    }
    for kind in KINDS {
        let done = inputs
            .records
            .iter()
            .filter(|r| r.request.kind() == kind && r.outcome == Outcome::Ok)
            .count();
        if done == 0 {
            reasons.push(format!("no {kind} request succeeded"));
        }
    }
    let pass = reasons.is_empty();

    let _ = writeln!(out, "# shroud soak summary\n");
    if pass {
        let _ = writeln!(
            out,
            "**PASS**: {} requests, {ok} completed with every byte checked ({}), {} failed, \
             each attributed to the event that broke it; 0 corrupted, 0 unexplained.\n",
            inputs.records.len(),
            human_bytes(bytes),
            attributed.len()
        );
    } else {
        let _ = writeln!(out, "**FAIL**: {}.\n", reasons.join("; "));
    }

    let _ = writeln!(out, "## Run\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| started | {} |", tool::utc(inputs.wall_start));
    let _ = writeln!(
        out,
        "| clock | times (`+12.345s`) count from the start of the soak, as in the logs |"
    );
    let _ = writeln!(
        out,
        "| traffic | {} (asked: {} min), from {} to {}, after {:.0} s of setup |",
        minutes_seconds(traffic),
        inputs.minutes,
        stamp(inputs.epoch, inputs.traffic_start),
        stamp(inputs.epoch, inputs.traffic_end),
        inputs.setup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| seed | {} (replay: `soak/run.sh --minutes {} --seed {}`) |",
        inputs.seed, inputs.minutes, inputs.seed
    );
    let _ = writeln!(out, "| source | {} |", inputs.source);
    let _ = writeln!(out, "| Tor network | {} |", inputs.network);
    let _ = writeln!(
        out,
        "| fleet | {PROXIES} `shroud-proxy` (drain {DRAIN_SECS} s), {CLIENTS} `shroud` clients \
         publishing one hostname through Tor (keepalive {KEEPALIVE_SECS} s, max backoff \
         {MAX_BACKOFF_SECS} s), one origin each |"
    );
    let _ = writeln!(out, "| logs | `{}` |", inputs.log_dir.display());
    if let Some(why) = &inputs.stopped_early {
        let _ = writeln!(out, "| stopped early | {why} |");
    }

    requests_section(&mut out, inputs, &attributed, &unexplained, &corrupted);
    events_section(&mut out, inputs, &attributed);
    failures_section(&mut out, inputs, &attributed, &unexplained, &corrupted);
    recovery_section(&mut out, inputs);
    tunnels_section(&mut out, inputs);

    let _ = writeln!(
        out,
        "\n{}",
        if pass {
            "PASS: zero corrupted, zero unexplained."
        } else {
            "FAIL"
        }
    );
    (out, pass)
}

fn requests_section(
    out: &mut String,
    inputs: &Inputs<'_>,
    attributed: &[(&Record, usize)],
    unexplained: &[&Record],
    corrupted: &[&Record],
) {
    let _ = writeln!(out, "\n## Requests\n");
    let _ = writeln!(
        out,
        "| kind | started | ok | failed, attributed | failed, unexplained | corrupted | bytes verified |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let row = |kind: Option<&str>| {
        let of = |r: &Record| kind.is_none_or(|k| r.request.kind() == k);
        let count = |list: &[&Record]| list.iter().filter(|r| of(r)).count();
        let started = inputs.records.iter().filter(|r| of(r)).count();
        let ok = inputs
            .records
            .iter()
            .filter(|r| of(r) && r.outcome == Outcome::Ok)
            .count();
        let bytes: u64 = inputs
            .records
            .iter()
            .filter(|r| of(r))
            .map(|r| r.bytes_verified)
            .sum();
        let att = attributed.iter().filter(|(r, _)| of(r)).count();
        format!(
            "| {} | {started} | {ok} | {att} | {} | {} | {} |",
            kind.unwrap_or("**all**"),
            count(unexplained),
            count(corrupted),
            human_bytes(bytes)
        )
    };
    for kind in KINDS {
        let _ = writeln!(out, "{}", row(Some(kind)));
    }
    let _ = writeln!(out, "{}", row(None));
    let _ = writeln!(
        out,
        "\n`get`: HTTPS GET of a path of its own, answer checked; `bulk`: 1 KiB to 8 MiB each \
         way, both directions checked (visitor's bytes by the origin's SHA-256, origin's byte \
         by byte); `paced`: the same, 64 KiB to 1 MiB over 20 to 120 s (long-lived)."
    );

    let _ = writeln!(out, "\nBy proxy (requests whose connection it accepted):\n");
    let _ = writeln!(
        out,
        "| proxy | accepted | ok | failed |\n|---|---:|---:|---:|"
    );
    for proxy in 0..PROXIES {
        let at: Vec<&Record> = inputs
            .records
            .iter()
            .filter(|r| r.proxy == Some(proxy))
            .collect();
        let ok = at.iter().filter(|r| r.outcome == Outcome::Ok).count();
        let _ = writeln!(out, "| {proxy} | {} | {ok} | {} |", at.len(), at.len() - ok);
    }
    let aborted = inputs
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Aborted)
        .count();
    if aborted > 0 {
        let _ = writeln!(
            out,
            "\n{aborted} requests were still in flight when the interrupted run stopped them; \
             they count as neither completed nor failed."
        );
    }
    let served: Vec<String> = (0..CLIENTS)
        .map(|client| {
            let n = inputs
                .records
                .iter()
                .filter(|r| r.outcome == Outcome::Ok && r.origin == Some(client))
                .count();
            format!("client {client}'s origin {n}")
        })
        .collect();
    let _ = writeln!(
        out,
        "\nCompleted requests by the origin that answered (told by its certificate): {}.",
        served.join(", ")
    );
}

fn events_section(out: &mut String, inputs: &Inputs<'_>, attributed: &[(&Record, usize)]) {
    let events = inputs.events;
    let tunnels = tunnels(inputs);
    let _ = writeln!(out, "\n## Events\n");
    let by_kind: Vec<String> = Kind::ALL
        .iter()
        .map(|kind| {
            let n = events.iter().filter(|e| e.kind == *kind).count();
            format!("{kind} {n}")
        })
        .collect();
    let _ = writeln!(out, "{} events: {}.\n", events.len(), by_kind.join(", "));
    if events.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "| # | at | event | target | down | tunnels it broke | all bound again after | failures attributed (get/bulk/paced) | notes |"
    );
    let _ = writeln!(out, "|---:|---:|---|---|---:|---|---:|---|---|");
    for (i, event) in events.iter().enumerate() {
        let down = event.restarted.map_or_else(
            || "not restarted".to_owned(),
            |at| {
                format!(
                    "{:.1} s",
                    at.saturating_duration_since(event.at).as_secs_f64()
                )
            },
        );
        let back = event.recovered.map_or_else(
            || match event.restarted {
                Some(_) => "**not within 180 s**".to_owned(),
                None => "-".to_owned(),
            },
            |at| {
                format!(
                    "{:.1} s",
                    at.saturating_duration_since(event.at).as_secs_f64()
                )
            },
        );
        let counts: Vec<String> = KINDS
            .iter()
            .map(|kind| {
                attributed
                    .iter()
                    .filter(|(r, e)| *e == i && r.request.kind() == *kind)
                    .count()
                    .to_string()
            })
            .collect();
        let total = attributed.iter().filter(|(_, e)| *e == i).count();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {down} | {} | {back} | {total} ({}) | {} |",
            event.id,
            stamp(inputs.epoch, event.at),
            event.kind,
            event.target,
            broke(inputs, &tunnels, i),
            counts.join("/"),
            event.notes.join("; ")
        );
    }
}

/// What event `i` broke, for the events table: each tunnel (`c0/p2`: client 0's at proxy 2),
/// when its proxy closed it (and so stopped routing visitors to it) and when its client
/// noticed.
fn broke(inputs: &Inputs<'_>, tunnels: &[Tunnel], i: usize) -> String {
    let event = &inputs.events[i];
    if matches!(event.kind, Kind::ProxyKill | Kind::ProxyTerm) {
        return "every tunnel at that proxy".into();
    }
    let after = |at: Option<Instant>| {
        at.map_or_else(
            || "never".to_owned(),
            |at| {
                format!(
                    "{:.1} s",
                    at.saturating_duration_since(event.at).as_secs_f64()
                )
            },
        )
    };
    let parts: Vec<String> = broken_tunnels(inputs, tunnels, i)
        .iter()
        .map(|b| {
            let name = format!(
                "c{}/p{}",
                b.client.map_or("?".into(), |c| c.to_string()),
                b.proxy
            );
            if event.kind == Kind::ClientKill {
                format!("{name} closed by the proxy after {}", after(b.closed))
            } else {
                format!(
                    "{name} closed by the proxy after {}, lost by the client after {}",
                    after(b.closed),
                    after(b.lost)
                )
            }
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// Every request as a CSV row (with a header): what it was, where it went, when, how it
/// ended, and what the accounting made of it.
pub fn requests_csv(inputs: &Inputs<'_>) -> String {
    let windows = windows(inputs);
    let secs = |at: Instant| {
        at.checked_duration_since(inputs.epoch)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let mut out = String::from(
        "kind,index,bytes_each_way,proxy,origin,started,connected,ended,outcome,verdict,cause\n",
    );
    let mut records: Vec<&Record> = inputs.records.iter().collect();
    records.sort_by_key(|r| r.started);
    for record in records {
        let bytes = match &record.request {
            Request::Get { .. } => 0,
            Request::Bulk { bytes } | Request::PacedBulk { bytes, .. } => *bytes,
        };
        let (outcome, verdict, why) = match &record.outcome {
            Outcome::Ok => ("ok", String::new(), String::new()),
            Outcome::Aborted => ("aborted", String::new(), String::new()),
            Outcome::Corrupted(why) => ("corrupted", "corrupted".into(), why.clone()),
            Outcome::Failed(why) => (
                "failed",
                verdict_text(inputs, record, &windows),
                why.clone(),
            ),
            Outcome::Unreachable => (
                "unreachable",
                verdict_text(inputs, record, &windows),
                String::new(),
            ),
        };
        let _ = writeln!(
            out,
            "{},{},{bytes},{},{},{:.3},{},{:.3},{outcome},{verdict},\"{}\"",
            record.request.kind(),
            record.index,
            record.proxy.map_or(String::new(), |p| p.to_string()),
            record.origin.map_or(String::new(), |o| o.to_string()),
            secs(record.started),
            record
                .connected
                .map_or(String::new(), |at| format!("{:.3}", secs(at))),
            secs(record.ended),
            why.replace('"', "'")
        );
    }
    out
}

fn verdict_text(inputs: &Inputs<'_>, record: &Record, windows: &[Window]) -> String {
    match attribute(record, windows) {
        Verdict::Attributed(event) => {
            let event = &inputs.events[event];
            format!("event {} {}", event.id, event.kind)
        }
        Verdict::Unexplained => "unexplained".into(),
    }
}

fn failures_section(
    out: &mut String,
    inputs: &Inputs<'_>,
    attributed: &[(&Record, usize)],
    unexplained: &[&Record],
    corrupted: &[&Record],
) {
    let _ = writeln!(out, "\n## Failures\n");
    let _ = writeln!(out, "By attributed event kind:\n");
    let _ = writeln!(
        out,
        "| event kind | events | failures | get | bulk | paced |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for kind in Kind::ALL {
        let of_kind: Vec<&Record> = attributed
            .iter()
            .filter(|(_, e)| inputs.events[*e].kind == kind)
            .map(|(r, _)| *r)
            .collect();
        let per: Vec<String> = KINDS
            .iter()
            .map(|k| {
                of_kind
                    .iter()
                    .filter(|r| r.request.kind() == *k)
                    .count()
                    .to_string()
            })
            .collect();
        let _ = writeln!(
            out,
            "| {kind} | {} | {} | {} |",
            inputs.events.iter().filter(|e| e.kind == kind).count(),
            of_kind.len(),
            per.join(" | ")
        );
    }

    let mut causes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (record, _) in attributed {
        causes.entry(cause(record)).or_default().0 += 1;
    }
    for record in unexplained {
        causes.entry(cause(record)).or_default().1 += 1;
    }
    let _ = writeln!(out, "\nBy cause (numbers replaced by N):\n");
    if causes.is_empty() {
        let _ = writeln!(out, "No request failed.");
    } else {
        let _ = writeln!(out, "| cause | attributed | unexplained |\n|---|---:|---:|");
        let mut rows: Vec<_> = causes.into_iter().collect();
        rows.sort_by_key(|(_, (att, unex))| std::cmp::Reverse(att + unex));
        for (cause, (att, unex)) in rows {
            let _ = writeln!(out, "| {} | {att} | {unex} |", cause.replace('|', "/"));
        }
    }

    let _ = writeln!(out, "\nUnexplained failures: {}.", unexplained.len());
    list_records(out, inputs, unexplained);
    let _ = writeln!(out, "\nCorrupted: {}.", corrupted.len());
    list_records(out, inputs, corrupted);
}

fn list_records(out: &mut String, inputs: &Inputs<'_>, records: &[&Record]) {
    if records.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n| kind | # | proxy | origin | started | ended | cause |\n|---|---:|---:|---:|---:|---:|---|"
    );
    for record in records.iter().take(LISTED) {
        let detail = match &record.outcome {
            Outcome::Failed(why) | Outcome::Corrupted(why) => why.clone(),
            Outcome::Unreachable => "no proxy accepted the connection".to_owned(),
            Outcome::Ok | Outcome::Aborted => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            record.request.kind(),
            record.index,
            record.proxy.map_or("-".into(), |p| p.to_string()),
            record.origin.map_or("?".into(), |o| o.to_string()),
            stamp(inputs.epoch, record.started),
            stamp(inputs.epoch, record.ended),
            detail.replace('|', "/")
        );
    }
    if records.len() > LISTED {
        let _ = writeln!(out, "\n({} more not listed.)", records.len() - LISTED);
    }
}

fn recovery_section(out: &mut String, inputs: &Inputs<'_>) {
    let _ = writeln!(out, "\n## Recovery\n");
    let _ = writeln!(
        out,
        "From the event (the signal) to the last affected tunnel bound again, as the clients \
         logged it; for restarts also from the restart. A relay kill affects only the tunnels \
         whose circuits crossed it.\n"
    );
    let _ = writeln!(
        out,
        "| event kind | measured | median from event | max from event | median from restart | max from restart |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let mut untouched = 0;
    for kind in Kind::ALL {
        let mut from_event = Vec::new();
        let mut from_restart = Vec::new();
        for event in inputs.events.iter().filter(|e| e.kind == kind) {
            match recovery(inputs, event) {
                Recovery::Back(at) => {
                    from_event.push(at.saturating_duration_since(event.at));
                    // Tunnels a relay broke come back through other relays, not its restart.
                    if let (Some(restarted), false) = (event.restarted, kind == Kind::RelayKill) {
                        from_restart.push(at.saturating_duration_since(restarted));
                    }
                }
                Recovery::Untouched => untouched += 1,
                Recovery::Never => {}
            }
        }
        let _ = writeln!(
            out,
            "| {kind} | {} | {} | {} | {} | {} |",
            from_event.len(),
            median(&mut from_event),
            max(&from_event),
            median(&mut from_restart),
            max(&from_restart)
        );
    }
    if untouched > 0 {
        let _ = writeln!(
            out,
            "\n{untouched} relay kill(s) broke no tunnel (no circuit of a tunnel crossed the relay)."
        );
    }
}

fn tunnels_section(out: &mut String, inputs: &Inputs<'_>) {
    // Tunnel losses and go-aways no event explains.
    let mut stray = Vec::new();
    for (client, notes) in inputs.client_notes.iter().enumerate() {
        for note in notes {
            let (what, proxy) = match note.seen {
                Seen::TunnelLost(p) => ("tunnel lost", p),
                Seen::Draining(p) => ("go-away", p),
                Seen::GaveUp(p) => ("gave up", p),
                _ => continue,
            };
            if note.at < inputs.traffic_start {
                continue;
            }
            let explained = inputs.events.iter().enumerate().any(|(i, event)| {
                let end = event_end(inputs.events, i);
                note.at >= event.at && note.at <= end
            });
            if !explained {
                stray.push((note.at, client, proxy, what));
            }
        }
    }
    stray.sort();
    let _ = writeln!(out, "\n## Tunnels\n");
    let _ = writeln!(
        out,
        "Tunnel losses, go-aways and give-ups that no event explains: {}.",
        stray.len()
    );
    for (at, client, proxy, what) in stray.iter().take(LISTED) {
        let _ = writeln!(
            out,
            "- {}: client {client}, proxy {proxy}: {what}",
            stamp(inputs.epoch, *at)
        );
    }
    let terms: Vec<&Event> = inputs
        .events
        .iter()
        .filter(|e| e.kind == Kind::ProxyTerm)
        .collect();
    let full = terms
        .iter()
        .filter(|e| e.gone.saturating_duration_since(e.at) >= Duration::from_secs(DRAIN_SECS))
        .count();
    let forced: usize = inputs
        .proxy_notes
        .iter()
        .map(|notes| {
            notes
                .iter()
                .filter(|n| n.seen == Seen::DrainDeadline)
                .count()
        })
        .sum();
    let _ = writeln!(
        out,
        "\nSIGTERM drains: {}, of which {full} ran to the {DRAIN_SECS} s deadline (streams still \
         open then are cut, and their requests attributed to the drain); proxies that had to \
         close connections still open after it: {forced}.",
        terms.len()
    );
}

/// A failure's cause with numbers (ports, sizes, pids) replaced by `N`, so alike causes group.
fn cause(record: &Record) -> String {
    let text = match &record.outcome {
        Outcome::Failed(why) | Outcome::Corrupted(why) => why.as_str(),
        Outcome::Unreachable => "no proxy accepted the connection",
        Outcome::Ok | Outcome::Aborted => "",
    };
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    format!("{}: {out}", record.request.kind())
}

fn median(values: &mut [Duration]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort();
    let mid = values.len() / 2;
    let median = if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2
    } else {
        values[mid]
    };
    format!("{:.1} s", median.as_secs_f64())
}

fn max(values: &[Duration]) -> String {
    values
        .iter()
        .max()
        .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `30m00s`.
pub fn minutes_seconds(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}
