//! This broker's membership: heartbeats to the control process through its outages, and the
//! sequencer assignment its answers carry. The policy (when to retry, rejoin or give up) is
//! the sans-IO [`Keepalive`](embar_control::keepalive) state machine; this is its driver.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_control::ControlClient;

/// Heartbeats until `stop`, through outages of the control process (see
/// [`Keepalive`](embar_control::keepalive)): returns why this broker must stop serving.
pub(crate) fn keep_alive(
    client: &ControlClient,
    reg: &embar_control::client::Registration,
    addrs: &BTreeMap<String, String>,
    grace: Duration,
    stop: &AtomicBool,
    assigned: &AtomicBool,
    pinned: bool,
) -> Result<(), String> {
    use embar_control::keepalive::{Beat, Keepalive, Next};
    use embar_sys::clock::monotonic_ns;
    /// How often a continuing outage is logged again.
    const OUTAGE_LOG: Duration = Duration::from_secs(5);
    let mut k = Keepalive::new(reg.heartbeat, grace, monotonic_ns());
    let mut beat = client.beat(reg.broker_id);
    let mut last_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let outage = k.outage();
        if let Beat::Alive { sequencer: mine } = beat {
            if let Some((since, attempts)) = outage {
                log::info!(
                    "the control process answers again after {:.1} s ({attempts} attempts failed)",
                    Duration::from_nanos(monotonic_ns().saturating_sub(since)).as_secs_f64()
                );
                last_log = None;
            }
            if !pinned && assigned.swap(mine, Ordering::Relaxed) != mine {
                log::info!(
                    "the control process {} the sequencer {} this broker",
                    if mine { "assigned" } else { "took" },
                    if mine { "to" } else { "from" }
                );
            }
        }
        if let Beat::Unreachable(why) = &beat {
            if last_log.is_none_or(|t| t.elapsed() >= OUTAGE_LOG) {
                let attempts = outage.map_or(0, |o| o.1) + 1;
                log::warn!(
                    "cannot reach the control process ({why}); serving on, {attempts} attempts so far, giving up after {:.0} s",
                    grace.as_secs_f64()
                );
                last_log = Some(Instant::now());
            }
        }
        match k.on_beat(beat, monotonic_ns()) {
            Next::Heartbeat(wait) => {
                sleep_unless(stop, wait);
                beat = client.beat(reg.broker_id);
            }
            Next::Rejoin => {
                log::warn!(
                    "the control process does not know broker {}; rejoining slot {}",
                    reg.broker_id,
                    reg.slot
                );
                beat = match client.rejoin(reg, addrs) {
                    // Rejoined: the heartbeat says whether it runs the sequencer.
                    Beat::Alive { .. } => client.beat(reg.broker_id),
                    other => other,
                };
            }
            Next::Stop(why) => return Err(why),
        }
    }
    Ok(())
}

/// Sleeps `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}
