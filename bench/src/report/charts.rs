//! The report's charts, drawn by gnuplot (Debian's `gnuplot-nox`) from data files written
//! beside them.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use crate::measure::median;
use crate::run::Results;

/// Draws throughput.png, http.png, memory.png and rtt.png into `dir`.
pub fn draw(results: &Results, dir: &Path) -> anyhow::Result<()> {
    let runs = results.plan.as_ref().map_or(0, |p| p.runs);
    let parallel = results.plan.as_ref().map_or(0, |p| p.parallel);

    let mut data = String::new();
    for e in &results.contenders {
        let _ = writeln!(
            data,
            "\"{}\" {} {}",
            e.kind.name(),
            value(median(&e.single_mbs)),
            value(median(&e.parallel_mbs))
        );
    }
    std::fs::write(dir.join("throughput.dat"), data)?;
    let mut data = String::new();
    for e in &results.contenders {
        let rps = |runs: &[crate::measure::WrkResult]| {
            median(&runs.iter().map(|w| w.rps).collect::<Vec<_>>())
        };
        let _ = writeln!(
            data,
            "\"{}\" {} {}",
            e.kind.name(),
            value(rps(&e.wrk_keepalive)),
            value(rps(&e.wrk_close))
        );
    }
    std::fs::write(dir.join("http.dat"), data)?;
    let mut data = String::new();
    for e in &results.contenders {
        let Some(m) = &e.memory else { continue };
        let _ = writeln!(
            data,
            "\"{}\" {} {}",
            e.kind.name(),
            value(super::per_visitor(m.proxy_idle, m, |s| s.1)),
            value(super::per_visitor(m.client_idle, m, |s| s.2))
        );
    }
    let visitors = results
        .contenders
        .iter()
        .filter_map(|e| e.memory.as_ref()?.steps.last().map(|s| s.0))
        .max()
        .unwrap_or(0);
    std::fs::write(dir.join("memory.dat"), data)?;

    let mut script = format!(
        r#"set terminal pngcairo size 960,480 font ",10"
set datafile missing "-"
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key top right
set yrange [0:*]
set xtics nomirror
set output "throughput.png"
set title "Download throughput, median of {runs} runs (higher is better)"
set ylabel "MB/s"
plot "throughput.dat" using 2:xtic(1) title "1 stream", "" using 3 title "{parallel} streams"
set output "http.png"
set title "HTTP requests per second, wrk, median of {runs} runs (higher is better)"
set ylabel "requests/s"
plot "http.dat" using 2:xtic(1) title "keep-alive", "" using 3 title "new connection per request"
"#
    );
    if visitors > 0 {
        let _ = writeln!(
            script,
            r#"set output "memory.png"
set title "Resident memory per idle visitor connection, at {visitors} (lower is better)"
set ylabel "KiB per connection"
plot "memory.dat" using 2:xtic(1) title "public side (proxy)", "" using 3 title "origin side (client)""#
        );
    }

    if !results.rtt.is_empty() {
        let _ = writeln!(
            script,
            "set output \"rtt.png\"\nset terminal pngcairo size 960,{} font \",10\"\nset multiplot layout {},1\nset style data lines\nunset xtics\nset xtics\nset xlabel \"seconds\"\nset ylabel \"MB/s\"\nset key bottom right",
            300 * results.rtt.len(),
            results.rtt.len()
        );
        for r in &results.rtt {
            let name = format!("rtt-{}.dat", r.rtt_ms);
            let mut data = String::new();
            let interval = r
                .plain
                .as_ref()
                .or(r.shroud.as_ref())
                .map_or(250, |s| s.interval_ms) as f64
                / 1e3;
            let len = r
                .plain
                .as_ref()
                .map_or(0, |s| s.bytes.len())
                .max(r.shroud.as_ref().map_or(0, |s| s.bytes.len()));
            for i in 0..len {
                let rate = |s: &Option<crate::measure::Series>| {
                    s.as_ref()
                        .and_then(|s| s.bytes.get(i))
                        .map_or(f64::NAN, |&b| b as f64 / interval / 1e6)
                };
                let _ = writeln!(
                    data,
                    "{:.2} {} {}",
                    (i + 1) as f64 * interval,
                    value(rate(&r.plain)),
                    value(rate(&r.shroud))
                );
            }
            std::fs::write(dir.join(&name), data)?;
            let _ = writeln!(
                script,
                "set title \"One stream, {} ms round trip\"\nplot \"{name}\" using 1:2 title \"plain TCP through the relay\" lw 2, \"\" using 1:3 title \"shroud\" lw 2",
                r.rtt_ms
            );
        }
        script.push_str("unset multiplot\n");
    }
    std::fs::write(dir.join("charts.gp"), &script)?;
    let output = Command::new("gnuplot")
        .arg("charts.gp")
        .current_dir(dir)
        .output()
        .context("running gnuplot (is gnuplot-nox installed?)")?;
    anyhow::ensure!(
        output.status.success(),
        "gnuplot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A figure for gnuplot: `-` (missing) when unknown.
fn value(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "-".into()
    }
}
