//! `embar bench --hdr-log FILE`: every run's latency histograms in HdrHistogram's interval log
//! format (what `HistogramLogProcessor` and HdrHistogram's plotters read), values in
//! nanoseconds, one interval per run and figure, tagged `run<N>-o<ORDER>-ack` (publish-to-ack)
//! and `run<N>-o<ORDER>-deliver` (publish-to-deliver), timestamps from the bench's start; with
//! `--ack 2`, whose repetitions run ACK 1 too, `run<N>-o<ORDER>-a<ACK>-ack` and so on.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;

use crate::pipeline::{Began, Repetition};
use crate::{BenchError, BenchResult};

/// The tag of one run's histogram of one figure; `ack` when runs of a repetition differ in it.
pub fn tag(run: usize, order: u8, ack: Option<u8>, figure: &str) -> String {
    match ack {
        Some(ack) => format!("run{run}-o{order}-a{ack}-{figure}"),
        None => format!("run{run}-o{order}-{figure}"),
    }
}

pub(crate) fn write(path: &Path, reps: &[Repetition], began: &Began) -> BenchResult<()> {
    let fail = |reason: String| BenchError::HdrLog {
        path: path.to_path_buf(),
        reason,
    };
    let mut buf = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    {
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment("embar bench: latencies in nanoseconds; tags run<N>-o<ORDER>-ack (publish-to-ack, per batch) and run<N>-o<ORDER>-deliver (publish-to-deliver, per message), run<N>-o<ORDER>-a<ACK>-... when a run compares ACK levels")
            .with_start_time(began.wall)
            .with_base_time(began.wall)
            // The max column in microseconds, as the bench reports.
            .with_max_value_divisor(1e3)
            .begin_log_with(&mut buf, &mut serializer)
            .map_err(|e| fail(e.to_string()))?;
        for (k, rep) in reps.iter().enumerate() {
            let acks_differ = rep.runs.iter().any(|x| x.ack != rep.runs[0].ack);
            for r in &rep.runs {
                let start = Duration::from_nanos(r.first_ns.saturating_sub(began.mono_ns));
                let length = Duration::from_secs_f64(r.elapsed_s);
                for (figure, h) in [("ack", &r.latency), ("deliver", &r.deliver)] {
                    let t = tag(k + 1, r.order, acks_differ.then_some(r.ack), figure);
                    log.write_histogram(h, start, length, Tag::new(&t))
                        .map_err(|e| fail(format!("{e:?}")))?;
                }
            }
        }
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&buf))
        .map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })
}
