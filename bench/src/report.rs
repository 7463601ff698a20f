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

/// One repetition: its main run's figures, its baselines, and the compared ORDER's run.
fn repetition_json(rep: &Repetition) -> Value {
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
    out["host_stalls"] = json!(rep.stalls);
    if let Some(other) = rep.runs.get(1) {
        let og = other.gbps();
        out["comparison"] = json!({
            "run": run_json(other),
            "ratio": if og > 0.0 { main.gbps() / og } else { 0.0 },
        });
    }
    out
}

/// Keys that are not figures to summarise (settings, counts, checks, series).
const NOT_FIGURES: [&str; 6] = [
    "order", "messages", "errors", "timeline", "cpus", "probe_ms",
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
    let per_rep: Vec<Value> = reps.iter().map(repetition_json).collect();
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
    if let Some(c) = out.get_mut("comparison") {
        let other_ok = reps
            .iter()
            .all(|r| r.runs.get(1).is_none_or(|x| x.errors.is_empty()));
        c["run"]["order_check"] = json!(if other_ok { "passed" } else { "failed" });
    }
    if let Some(m) = out.as_object_mut() {
        m.remove("timeline");
        if let Some(c) = m.get_mut("comparison").and_then(Value::as_object_mut) {
            if let Some(r) = c.get_mut("run").and_then(Value::as_object_mut) {
                r.remove("timeline");
            }
        }
    }
    out["config"] = json!({
        "transport": a.transport.name(),
        "brokers": brokers,
        "order": a.order,
        "ack": a.ack,
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
        "embar bench: {} brokers, {} transport, ORDER {} ACK {}, {} B messages, {} batches, {} publisher(s), {} subscriber(s){}",
        brokers,
        a.transport.name(),
        a.order,
        a.ack,
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
        for (i, r) in rep.runs.iter().enumerate() {
            println!(
                "  ORDER {}: {} in {} messages, {:.2} s: {:.2} GB/s, {:.2} M msgs/s (all delivered in {:.2} s: {:.2} GB/s){}",
                r.order,
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
                "  ORDER {} / ORDER {} throughput: {:.2}",
                main.order,
                other.order,
                main.gbps() / other.gbps()
            );
        }
    }
    if reps.len() > 1 {
        print_summary(a, reps.len(), &out["summary"]);
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
    let mut rows: Vec<(String, String, &str)> = vec![
        (
            format!("ORDER {} throughput", a.order),
            "throughput_gbps".into(),
            "GB/s",
        ),
        (
            format!("ORDER {} / memcpy", a.order),
            "ratio_to_memcpy".into(),
            "",
        ),
        (
            format!("ORDER {} all delivered", a.order),
            "delivered_gbps".into(),
            "GB/s",
        ),
        ("memcpy".into(), "memcpy_gbps".into(), "GB/s"),
        (
            format!("ORDER {} / loopback TCP", a.order),
            "ratio_to_tcp_loopback".into(),
            "",
        ),
        (
            "loopback TCP stream".into(),
            "tcp_loopback_gbps".into(),
            "GB/s",
        ),
        (
            format!("ORDER {} / raw memif link", a.order),
            "ratio_to_memif_link".into(),
            "",
        ),
        ("raw memif link".into(), "memif_link_gbps".into(), "GB/s"),
    ];
    for (what, key) in [
        ("publish-to-ack", "latency_us"),
        ("publish-to-deliver", "deliver_latency_us"),
    ] {
        for (q, name) in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")] {
            rows.push((format!("{what} {name}"), format!("{key}.{q}"), "us"));
        }
    }
    if let Some(o) = a.compare_order {
        rows.push((
            format!("ORDER {o} throughput"),
            "comparison.run.throughput_gbps".into(),
            "GB/s",
        ));
        rows.push((
            format!("ORDER {} / ORDER {o}", a.order),
            "comparison.ratio".into(),
            "",
        ));
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
            format!("ORDER {} run {}", r.order, k + 1)
        } else {
            format!("ORDER {}", r.order)
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
