//! `embar bench --runs N` with its files: the JSON of every run and the summary, the SVG plots
//! and the HdrHistogram interval log, from the real binary and its local cluster.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use embar_bench::pipeline::DELIVER_SAMPLE_CLOSED_LOOP;
use embar_test_support::{exe, output_within, serial};
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde_json::Value;

/// Every interval of an HdrHistogram interval log: its tag and its histogram.
fn read_hdr_log(path: &Path) -> Vec<(String, Histogram<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    for entry in IntervalLogIterator::new(&bytes) {
        if let LogEntry::Interval(h) = entry.unwrap_or_else(|e| panic!("{e:?}")) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(h.encoded_histogram())
                .unwrap();
            let hist: Histogram<u64> = Deserializer::new()
                .deserialize(&mut raw.as_slice())
                .unwrap();
            let tag = h.tag().map(|t| t.as_str().to_string()).unwrap_or_default();
            out.push((tag, hist));
        }
    }
    out
}

#[test]
fn repeated_runs_report_each_run_a_summary_svg_plots_and_a_readable_hdr_log() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("embar-bench-runs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (plots, hdr, json) = (
        dir.join("plots"),
        dir.join("lat.hlog"),
        dir.join("out.json"),
    );
    let mut cmd = Command::new(exe());
    cmd.args(["bench", "--runs", "2", "--compare-order", "0"])
        .args(["--total-bytes", "4MiB", "--message-bytes", "1KiB"])
        .args(["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"])
        .args(["--batch-bytes", "256KiB"])
        .arg("--plot")
        .arg(&plots)
        .arg("--hdr-log")
        .arg(&hdr)
        .arg("--json")
        .arg(&json);
    let out = output_within(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("over 2 runs, min / median / max"),
        "{stdout}"
    );

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["order_check"], "passed", "{r:#}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{r:#}");
    for run in runs {
        assert_eq!(run["order_check"], "passed", "{run:#}");
        assert_eq!(run["comparison"]["run"]["order_check"], "passed", "{run:#}");
        assert_eq!(run["messages"], 4096);
        for key in ["latency_us", "deliver_latency_us"] {
            assert!(run[key]["p50"].as_f64().unwrap() > 0.0, "{key}: {run:#}");
        }
        assert!(run["memcpy_gbps"].as_f64().unwrap() > 0.0, "{run:#}");
        assert!(!run["timeline"].as_array().unwrap().is_empty(), "{run:#}");
    }
    let s = &r["summary"];
    for key in [
        "throughput_gbps",
        "memcpy_gbps",
        "ratio_to_memcpy",
        "latency_us.p99",
        "deliver_latency_us.p99",
        "comparison.ratio",
    ] {
        let f = |k: &str| s[key][k].as_f64().unwrap_or_else(|| panic!("{key}: {s:#}"));
        assert!(
            0.0 < f("min") && f("min") <= f("median") && f("median") <= f("max"),
            "{key}: {s:#}"
        );
    }
    let ratios: Vec<f64> = runs
        .iter()
        .map(|x| x["ratio_to_memcpy"].as_f64().unwrap())
        .collect();
    // The median of two is their mean (to a rounding of the JSON's decimal floats).
    let median = s["ratio_to_memcpy"]["median"].as_f64().unwrap();
    assert!(
        (median - (ratios[0] + ratios[1]) / 2.0).abs() <= 1e-12 * median,
        "{median} {ratios:?}"
    );

    for name in ["latency.svg", "throughput.svg", "orders.svg"] {
        let text = std::fs::read_to_string(plots.join(name)).unwrap();
        assert!(
            text.trim_start().starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{name}: {}",
            &text[..text.len().min(200)]
        );
    }

    let log = read_hdr_log(&hdr);
    let tags: Vec<&str> = log.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        tags,
        [
            "run1-o5-ack",
            "run1-o5-deliver",
            "run1-o0-ack",
            "run1-o0-deliver",
            "run2-o5-ack",
            "run2-o5-deliver",
            "run2-o0-ack",
            "run2-o0-deliver",
        ]
    );
    let sample = DELIVER_SAMPLE_CLOSED_LOOP;
    assert_eq!(r["config"]["deliver_sample"], sample);
    for (tag, h) in &log {
        if tag.ends_with("deliver") {
            // Every sampled message of the run, handed to the one subscriber.
            assert_eq!(h.len(), 4096 / sample, "{tag}");
        } else {
            assert!(!h.is_empty(), "{tag}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_ack_2_without_a_replication_factor_is_a_usage_error_that_says_what_to_give() {
    let mut cmd = Command::new(exe());
    cmd.args(["bench", "--ack", "2", "--total-bytes", "1MiB"]);
    let out = output_within(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--ack 2 needs --rf N") && stderr.contains("--brokers 3"),
        "{stderr}"
    );
    // Refused before any cluster was started: nothing on stdout.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bench_ack_2_rf_2_reports_the_disk_ceiling_and_ack_1_on_the_same_topic_shape() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("embar-bench-ack2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(exe());
    cmd.args(["bench", "--ack", "2", "--rf", "2", "--brokers", "3"])
        .args(["--total-bytes", "64MiB", "--pool-bytes", "256MiB"])
        .args(["--sync-interval-ms", "50", "--json", "--data-dir"])
        .arg(&dir);
    let out = output_within(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["order_check"], "passed", "{r:#}");
    assert_eq!(r["ack"], 2, "{r:#}");
    assert_eq!(r["messages"], 64 * 1024, "{r:#}");
    assert_eq!(r["config"]["rf"], 2, "{r:#}");
    assert_eq!(r["config"]["sync_interval_ms"], 50, "{r:#}");
    let ceiling = r["disk_ceiling_gbps"].as_f64().unwrap();
    assert!(ceiling > 0.0, "{r:#}");
    let per_replica = r["disk_ceiling_per_replica_gbps"].as_f64().unwrap();
    assert!(
        (per_replica - ceiling / 2.0).abs() <= 1e-9 * ceiling,
        "{r:#}"
    );
    let ratio = r["ratio_to_disk_ceiling"].as_f64().unwrap();
    let gbps = r["throughput_gbps"].as_f64().unwrap();
    assert!((ratio - gbps / per_replica).abs() <= 1e-9 * ratio, "{r:#}");
    for key in ["p50", "p99"] {
        assert!(r["latency_us"][key].as_f64().unwrap() > 0.0, "{key}: {r:#}");
    }
    let ack1 = &r["ack_comparison"];
    assert_eq!(ack1["run"]["ack"], 1, "{r:#}");
    assert_eq!(ack1["run"]["order"], 5, "{r:#}");
    assert_eq!(ack1["run"]["order_check"], "passed", "{r:#}");
    assert_eq!(ack1["run"]["messages"], 64 * 1024, "{r:#}");
    assert!(
        ack1["run"]["throughput_gbps"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert!(
        ack1["run"]["latency_us"]["p99"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert!(ack1["ratio"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(
        ack1["ratio_to_disk_ceiling"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    for key in [
        "disk_ceiling_gbps",
        "ratio_to_disk_ceiling",
        "ack_comparison.ratio",
        "ack_comparison.run.throughput_gbps",
    ] {
        assert!(
            r["summary"][key]["median"].as_f64().unwrap() > 0.0,
            "{key}: {r:#}"
        );
    }
    // The cluster's directory (its brokers' logs) and the ceiling's file are gone.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
