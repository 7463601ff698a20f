#!/usr/bin/env bash
# Usage: scripts/idle-cpu.sh [EMBAR] [SECONDS] [RUNS]
#
# What an idle cluster costs: starts a local cluster (control process, 2 brokers, the
# sequencer in broker 0) with a topic and nothing published, lets it settle, then RUNS times
# (default 3) reads each broker's utime+stime from /proc/PID/stat over SECONDS (default 10)
# and prints the CPU each used, in percent of one core.
set -eu
bin=${1:-target/release/embar}
secs=${2:-10}
runs=${3:-3}
dir=$(mktemp -d /tmp/embar-idle-cpu.XXXXXX)
trap '"$bin" cluster down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$bin" cluster up --dir "$dir" --brokers 2 --pool-bytes 256MiB --segment-bytes 4MiB >/dev/null
control=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["control"])' "$dir/cluster.json")
"$bin" topic create t --control "$control" >/dev/null
echo hi | "$bin" publish --topic t --control "$control" >/dev/null
pids=$(python3 -c 'import json,sys; print(" ".join(str(p) for p in json.load(open(sys.argv[1]))["pids"][1:]))' "$dir/cluster.json")
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
sleep 2 # past the loops' yield phase after the publish above
for run in $(seq 1 "$runs"); do
  declare -A before=()
  for p in $pids; do before[$p]=$(ticks "$p"); done
  sleep "$secs"
  line="run $run:"
  for p in $pids; do
    t=$(( $(ticks "$p") - ${before[$p]} ))
    line="$line broker pid $p $(awk -v t="$t" -v hz="$hz" -v s="$secs" 'BEGIN { printf "%.1f%%", 100 * t / hz / s }')"
  done
  echo "$line"
done
