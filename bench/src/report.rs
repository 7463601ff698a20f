//! What `embar bench` prints and writes: each repetition's figures, their min, median and max
//! over `--runs`, the JSON (stdout or `--json FILE`), the SVG plots (`--plot DIR`) and the
//! HdrHistogram interval log (`--hdr-log FILE`).

use std::path::Path;

use embar_dataplane::units::format_bytes;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::pipeline::{Began, Config, Repetition, Run, TimelinePoint};
use crate::plot::{self, Bars, Curve};
use crate::{BenchError, BenchResult};

/// Percentiles of a latency histogram (nanoseconds) in microseconds.
fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({ "p50": us(0.5), "p99": us(0.99), "p999": us(0.999), "max": h.max() as f64 / 1e3 })
}

fn run_json(r: &Run) -> Value {
    json!({
        "order": r.order,
        "ack": r.ack,
        "throughput_gbps": r.gbps(),
        "messages_per_s": r.messages as f64 / r.elapsed_s,
        "messages": r.messages,
        "elapsed_s": r.elapsed_s,
        // From the first publish to the last hand-off: what the subscribers kept up with.
        "delivered_gbps": r.bytes as f64 / r.deliver_elapsed_s / 1e9,
        "order_check": if r.errors.is_empty() { "passed" } else { "failed" },
        "errors": r.errors,
        "latency_us": latency_json(&r.latency),
        "deliver_latency_us": latency_json(&r.deliver),
        "grant_waits": r.grant_waits,
        "timeline": r.timeline,
    })
}

/// The keys of the compared run: `comparison` for another ORDER, `ack_comparison` for ACK 1
/// beside ACK 2.
fn comparison_key(main: &Run, other: &Run) -> &'static str {
    if other.ack != main.ack {
        "ack_comparison"
    } else {
        "comparison"
    }
}

/// One repetition: its main run's figures, its baselines, and the compared run.
fn repetition_json(a: &Config, rep: &Repetition) -> Value {
    let main = &rep.runs[0];
    let mut out = run_json(main);
    out["memcpy_gbps"] = json!(rep.memcpy_gbps);
    out["ratio_to_memcpy"] = json!(main.gbps() / rep.memcpy_gbps);
    if let Some(c) = rep.ceiling {
        let (k, t) = (c.key, c.gbps);
        out[format!("{k}_gbps")] = json!(t);
        out[format!("ratio_to_{k}")] = json!(main.gbps() / t);
        out[format!("delivered_ratio_to_{k}")] =
            json!(main.bytes as f64 / main.deliver_elapsed_s / 1e9 / t);
    }
    // Every replica writes to a disk of its own in a real cluster; here they all share this
    // one, so the fair ceiling of a topic's throughput is the disk's over RF.
    let per_replica = rep.disk_gbps.map(|d| d / f64::from(a.rf.max(1)));
    if let (Some(d), Some(per)) = (rep.disk_gbps, per_replica) {
        out["disk_ceiling_gbps"] = json!(d);
        out["disk_ceiling_per_replica_gbps"] = json!(per);
        out["ratio_to_disk_ceiling"] = json!(main.gbps() / per);
    }
    out["host_stalls"] = json!(rep.stalls);
    if let Some(other) = rep.runs.get(1) {
        let og = other.gbps();
        let key = comparison_key(main, other);
        out[key] = json!({
            "run": run_json(other),
            "ratio": if og > 0.0 { main.gbps() / og } else { 0.0 },
        });
        if let Some(per) = per_replica {
            out[key]["ratio_to_disk_ceiling"] = json!(og / per);
        }
    }
    out
}

/// Keys that are not figures to summarise (settings, counts, checks, series).
const NOT_FIGURES: [&str; 7] = [
    "order", "ack", "messages", "errors", "timeline", "cpus", "probe_ms",
];

/// The JSON pointers of every number in a repetition's object (the figures).
fn figure_pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, x) in m {
            if NOT_FIGURES.contains(&k.as_str()) {
                continue;
            }
            let p = format!("{at}/{k}");
            match x {
                Value::Number(_) => out.push(p),
                Value::Object(_) => figure_pointers(x, &p, out),
                _ => {}
            }
        }
    }
}

/// Min, median (the mean of the middle two of an even count) and max.
pub fn min_median_max(mut xs: Vec<f64>) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    Some((xs[0], median, xs[n - 1]))
}

/// Every figure's min, median and max over the repetitions, keyed by its dotted path
/// (`latency_us.p99`, `comparison.ratio`).
fn summary(reps: &[Value]) -> Map<String, Value> {
    let mut pointers = Vec::new();
    if let Some(first) = reps.first() {
        figure_pointers(first, "", &mut pointers);
    }
    let mut out = Map::new();
    for p in pointers {
        let xs: Vec<f64> = reps
            .iter()
            .filter_map(|r| r.pointer(&p).and_then(Value::as_f64))
            .collect();
        if xs.len() != reps.len() {
            continue;
        }
        if let Some((min, median, max)) = min_median_max(xs) {
            let key = p.trim_start_matches('/').replace('/', ".");
            out.insert(key, json!({ "min": min, "median": median, "max": max }));
        }
    }
    out
}

/// Prints the report, writes the files asked for; `Ok(false)`: a check failed.
pub(crate) fn report(
    a: &Config,
    brokers: usize,
    reps: &[Repetition],
    began: &Began,
) -> BenchResult<bool> {
    let per_rep: Vec<Value> = reps.iter().map(|r| repetition_json(a, r)).collect();
    let summary = summary(&per_rep);
    // The top level keeps the shape of one run's object, each figure its median over the
    // repetitions (with one run, that run's figures).
    let mut out = per_rep[0].clone();
    for (key, s) in &summary {
        let p = format!("/{}", key.replace('.', "/"));
        if let Some(slot) = out.pointer_mut(&p) {
            *slot = s["median"].clone();
        }
    }
    let passed = reps
        .iter()
        .all(|r| r.runs.iter().all(|x| x.errors.is_empty()));
    let errors: Vec<String> = reps
        .iter()
        .flat_map(|r| r.runs.iter().flat_map(|x| x.errors.clone()))
        .collect();
    out["order_check"] = json!(if passed { "passed" } else { "failed" });
    out["errors"] = json!(errors);
    for key in ["comparison", "ack_comparison"] {
        if let Some(c) = out.get_mut(key) {
            let other_ok = reps
                .iter()
                .all(|r| r.runs.get(1).is_none_or(|x| x.errors.is_empty()));
            c["run"]["order_check"] = json!(if other_ok { "passed" } else { "failed" });
        }
    }
    if let Some(m) = out.as_object_mut() {
        m.remove("timeline");
        for key in ["comparison", "ack_comparison"] {
            if let Some(c) = m.get_mut(key).and_then(Value::as_object_mut) {
                if let Some(r) = c.get_mut("run").and_then(Value::as_object_mut) {
                    r.remove("timeline");
                }
            }
        }
    }
    let policy = crate::pipeline::sync_policy(a);
    out["config"] = json!({
        "transport": a.transport.name(),
        "brokers": brokers,
        "order": a.order,
        "ack": a.ack,
        "rf": a.rf,
        // The brokers' disk log sync policy, which the disk ceiling uses too.
        "sync_bytes": policy.bytes,
        "sync_interval_ms": policy.interval.as_millis() as u64,
        "message_size": a.message_bytes,
        "batch_size": a.batch_bytes,
        "publishers": a.publishers,
        "subscribers": a.subscribers,
        "rate_per_publisher": a.rate,
        "compare_order": a.compare_order,
        "runs": a.runs,
        // Publish-to-deliver is measured on one message in this many of each publisher.
        "deliver_sample": crate::pipeline::deliver_sample(a),
    });
    out["summary"] = Value::Object(summary);
    out["runs"] = Value::Array(per_rep);
    if let Some(dir) = &a.plot_dir {
        plots(a, reps, dir)?;
    }
    if let Some(path) = &a.hdr_log {
        crate::hdr_log::write(path, reps, began)?;
    }
    if let Some(path) = &a.json_file {
        let text = serde_json::to_string_pretty(&out)?;
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })?;
    }
    if a.json {
        println!("{out}");
    } else {
        print_human(a, brokers, reps, &out);
    }
    Ok(passed)
}

fn print_human(a: &Config, brokers: usize, reps: &[Repetition], out: &Value) {
    println!(
        "embar bench: {} brokers, {} transport, ORDER {} ACK {}{}, {} B messages, {} batches, {} publisher(s), {} subscriber(s){}",
        brokers,
        a.transport.name(),
        a.order,
        a.ack,
        if a.rf > 0 {
            let p = crate::pipeline::sync_policy(a);
            format!(
                " RF {} (fdatasync every {} or {} ms)",
                a.rf,
                format_bytes(p.bytes),
                p.interval.as_millis()
            )
        } else {
            String::new()
        },
        a.message_bytes,
        format_bytes(a.batch_bytes),
        a.publishers,
        a.subscribers,
        a.rate.map_or(String::new(), |r| format!(", open loop {r} msgs/s per publisher"))
    );
    for (k, rep) in reps.iter().enumerate() {
        if reps.len() > 1 {
            println!("  run {} of {}:", k + 1, reps.len());
        }
        if let Some(d) = rep.disk_gbps {
            println!(
                "  disk ceiling (sequential {} writes, same fdatasync policy, same filesystem): {:.2} GB/s, / RF {}: {:.2} GB/s",
                format_bytes(a.batch_bytes),
                d,
                a.rf,
                d / f64::from(a.rf.max(1))
            );
        }
        for (i, r) in rep.runs.iter().enumerate() {
            let disk = rep.disk_gbps.map_or(String::new(), |d| {
                format!(
                    "  ({:.2} x disk ceiling / RF)",
                    r.gbps() / (d / f64::from(a.rf.max(1)))
                )
            });
            println!(
                "  {}: {} in {} messages, {:.2} s: {:.2} GB/s, {:.2} M msgs/s (all delivered in {:.2} s: {:.2} GB/s){}{disk}",
                shape_name(a, r),
                format_bytes(r.bytes),
                r.messages,
                r.elapsed_s,
                r.gbps(),
                r.messages as f64 / r.elapsed_s / 1e6,
                r.deliver_elapsed_s,
                r.bytes as f64 / r.deliver_elapsed_s / 1e9,
                if i == 0 {
                    format!(
                        "  ({:.2} x memcpy {:.2} GB/s{})",
                        r.gbps() / rep.memcpy_gbps,
                        rep.memcpy_gbps,
                        rep.ceiling.map_or(String::new(), |c| format!(
                            "; {:.2} x {} {:.2} GB/s",
                            r.gbps() / c.gbps,
                            c.what,
                            c.gbps
                        ))
                    )
                } else {
                    String::new()
                }
            );
            print_latency("publish-to-ack", &r.latency, "");
            print_latency(
                "publish-to-deliver",
                &r.deliver,
                if r.errors.is_empty() {
                    "; order check passed"
                } else {
                    "; order check failed"
                },
            );
            for e in &r.errors {
                println!("    error: {e}");
            }
        }
        let s = &rep.stalls;
        println!(
            "  host stalls (a thread spinning on each of {} CPUs for {} ms): {} over 50 us, {} over 200 us, longest {} us: no tail latency here is below these",
            s.cpus, s.probe_ms, s.over_50us, s.over_200us, s.max_us
        );
        if let [main, other] = &rep.runs[..] {
            println!(
                "  {} / {} throughput: {:.2}",
                shape_name(a, main),
                shape_name(a, other),
                main.gbps() / other.gbps()
            );
        }
    }
    if reps.len() > 1 {
        print_summary(a, reps.len(), &out["summary"]);
    }
}

/// What the text report calls a run's topic shape: its ORDER, and its ACK when the runs
/// compare ACK levels.
fn shape_name(a: &Config, r: &Run) -> String {
    if a.ack == 2 {
        format!("ORDER {} ACK {}", r.order, r.ack)
    } else {
        format!("ORDER {}", r.order)
    }
}

fn print_latency(what: &str, h: &Histogram<u64>, tail: &str) {
    if h.is_empty() {
        println!("    {what} latency: none measured (messages under 16 bytes carry no publish time){tail}");
        return;
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "    {what} latency: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us{tail}",
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1e3
    );
}

fn print_summary(a: &Config, n: usize, s: &Value) {
    println!("  over {n} runs, min / median / max:");
    let me = if a.ack == 2 {
        format!("ORDER {} ACK 2", a.order)
    } else {
        format!("ORDER {}", a.order)
    };
    let mut rows: Vec<(String, String, &str)> = vec![
        (format!("{me} throughput"), "throughput_gbps".into(), "GB/s"),
        (format!("{me} / memcpy"), "ratio_to_memcpy".into(), ""),
        (
            format!("{me} all delivered"),
            "delivered_gbps".into(),
            "GB/s",
        ),
        ("memcpy".into(), "memcpy_gbps".into(), "GB/s"),
        (
            format!("{me} / loopback TCP"),
            "ratio_to_tcp_loopback".into(),
            "",
        ),
        (
            "loopback TCP stream".into(),
            "tcp_loopback_gbps".into(),
            "GB/s",
        ),
        (
            format!("{me} / raw memif link"),
            "ratio_to_memif_link".into(),
            "",
        ),
        ("raw memif link".into(), "memif_link_gbps".into(), "GB/s"),
        (
            format!("{me} / (disk / RF)"),
            "ratio_to_disk_ceiling".into(),
            "",
        ),
        ("disk ceiling".into(), "disk_ceiling_gbps".into(), "GB/s"),
    ];
    for (what, key) in [
        ("publish-to-ack", "latency_us"),
        ("publish-to-deliver", "deliver_latency_us"),
    ] {
        for (q, name) in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")] {
            rows.push((format!("{what} {name}"), format!("{key}.{q}"), "us"));
        }
    }
    if a.ack == 2 {
        let k = "ack_comparison";
        rows.push((
            "ACK 1 throughput".into(),
            format!("{k}.run.throughput_gbps"),
            "GB/s",
        ));
        rows.push((
            "ACK 1 / (disk / RF)".into(),
            format!("{k}.ratio_to_disk_ceiling"),
            "",
        ));
        rows.push(("ACK 2 / ACK 1".into(), format!("{k}.ratio"), ""));
        for q in ["p50", "p99"] {
            rows.push((
                format!("ACK 1 publish-to-ack {q}"),
                format!("{k}.run.latency_us.{q}"),
                "us",
            ));
        }
    }
    if let Some(o) = a.compare_order {
        rows.push((
            format!("ORDER {o} throughput"),
            "comparison.run.throughput_gbps".into(),
            "GB/s",
        ));
        rows.push((format!("{me} / ORDER {o}"), "comparison.ratio".into(), ""));
    }
    for (name, key, unit) in rows {
        let f = &s[key.as_str()];
        if f.is_null() {
            continue;
        }
        let g = |k: &str| f[k].as_f64().unwrap_or(0.0);
        println!(
            "    {name:<28} {:>9.2} / {:>9.2} / {:>9.2} {unit}",
            g("min"),
            g("median"),
            g("max")
        );
    }
}

/// A throughput timeline as steps: each interval's rate held from its start to its end.
fn steps(timeline: &[TimelinePoint]) -> Vec<(f64, f64)> {
    let mut start = 0.0;
    let mut out = Vec::with_capacity(timeline.len() * 2);
    for p in timeline {
        out.push((start, p.gbps));
        out.push((p.end_s, p.gbps));
        start = p.end_s;
    }
    out
}

/// The SVG plots of `--plot DIR`.
fn plots(a: &Config, reps: &[Repetition], dir: &Path) -> BenchResult<()> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let several = reps.len() > 1;
    let name = |k: usize, r: &Run| {
        if several {
            format!("{} run {}", shape_name(a, r), k + 1)
        } else {
            shape_name(a, r)
        }
    };
    let mut latency = Vec::new();
    let mut timeline = Vec::new();
    for (k, rep) in reps.iter().enumerate() {
        for r in &rep.runs {
            latency.push(Curve {
                label: format!("{}: publish-to-ack", name(k, r)),
                points: plot::percentile_points(&r.latency),
                dashed: false,
            });
            latency.push(Curve {
                label: format!("{}: publish-to-deliver", name(k, r)),
                points: plot::percentile_points(&r.deliver),
                dashed: true,
            });
            timeline.push(Curve {
                label: name(k, r),
                points: steps(&r.timeline),
                dashed: false,
            });
        }
    }
    plot::latency_percentiles(&dir.join("latency.svg"), &latency)?;
    plot::throughput_over_time(&dir.join("throughput.svg"), &timeline)?;
    if let Some(other) = a.compare_order {
        let bars = Bars {
            series: vec![
                format!("ORDER {}", a.order),
                format!("ORDER {other}"),
                "memcpy (same run)".into(),
            ],
            runs: reps
                .iter()
                .map(|rep| {
                    vec![
                        rep.runs[0].gbps(),
                        rep.runs.get(1).map_or(0.0, Run::gbps),
                        rep.memcpy_gbps,
                    ]
                })
                .collect(),
        };
        plot::order_comparison(&dir.join("orders.svg"), &bars)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(
            min_median_max(vec![4.0, 1.0, 3.0, 2.0]),
            Some((1.0, 2.5, 4.0))
        );
        assert_eq!(min_median_max(vec![5.0, 1.0, 3.0]), Some((1.0, 3.0, 5.0)));
        assert_eq!(min_median_max(vec![]), None);
    }

    #[test]
    fn summary_covers_every_figure_present_in_every_run() {
        let reps = vec![
            json!({"throughput_gbps": 1.0, "order": 5, "latency_us": {"p50": 2.0}, "comparison": {"ratio": 1.0}}),
            json!({"throughput_gbps": 3.0, "order": 5, "latency_us": {"p50": 4.0}}),
        ];
        let s = summary(&reps);
        assert_eq!(s["throughput_gbps"]["median"], 2.0);
        assert_eq!(s["latency_us.p50"]["max"], 4.0);
        assert!(!s.contains_key("order"));
        assert!(!s.contains_key("comparison.ratio"));
    }
}
