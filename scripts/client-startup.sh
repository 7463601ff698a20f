#!/usr/bin/env bash
# Usage: scripts/client-startup.sh [EMBAR] [POOL_BYTES] [RUNS]
#
# What a client costs to start on a pool of a given size: starts a local cluster (control
# process, 2 brokers) on a pool of POOL_BYTES (default 1GiB) in /dev/shm, creates a topic,
# then RUNS times (default 7) measures (wall clock, and the child's rusage from wait4)
#   publish:   echo hi | embar publish --topic t
#   subscribe: embar subscribe --topic t --from oldest --count 1
# and prints min / median / max of wall time, system time and peak resident set (maxrss).
# The brokers map (and pre-fault) the whole pool: check free memory before a large pool
# (`free -g`): a /dev/shm file costs nothing until touched, but a client (or broker) that
# pre-faults the whole pool allocates all of it. CLUSTER_EMBAR=path runs the cluster with
# another binary than the clients (an older client against a cluster that starts quickly).
set -eu
bin=${1:-target/release/embar}
cluster_bin=${CLUSTER_EMBAR:-$bin}
pool_bytes=${2:-1GiB}
runs=${3:-7}
dir=$(mktemp -d /tmp/embar-client-startup.XXXXXX)
pool=/dev/shm/embar-client-startup-$$.pool
cleanup() {
  "$cluster_bin" cluster down --dir "$dir" >/dev/null 2>&1 || true
  rm -f "$pool"
  rm -rf "$dir"
}
trap cleanup EXIT
"$cluster_bin" cluster up --dir "$dir" --brokers 2 --path "$pool" --pool-bytes "$pool_bytes" >/dev/null
control=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["control"])' "$dir/cluster.json")
"$bin" topic create t --control "$control" >/dev/null

# One measured run of "$@" with stdin from $input: "wall_s sys_s maxrss_kib" (wait4's
# rusage of the child: its system time and peak resident set; wall from a monotonic clock).
measure() {
  printf '%s' "$input" | python3 -c '
import os, subprocess, sys, time
t = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
wall = time.monotonic() - t
if status != 0:
    sys.exit("failed: %s: %s" % (" ".join(sys.argv[1:]), err.decode(errors="replace")))
print(wall, ru.ru_stime, ru.ru_maxrss)
' "$@"
}

# min / median / max of column $2 of stdin, scaled by $3, with unit $4.
summary() {
  sort -g -k"$1" | awk -v c="$1" -v k="$2" -v u="$3" '
    { v[NR] = $c * k }
    END { printf "%.1f / %.1f / %.1f %s", v[1], v[int((NR + 1) / 2)], v[NR], u }'
}

for what in publish subscribe; do
  rows=""
  for _ in $(seq 1 "$runs"); do
    if [ "$what" = publish ]; then
      input=$'hi\n'
      row=$(measure "$bin" publish --topic t --control "$control")
    else
      input=""
      row=$(measure "$bin" subscribe --topic t --from oldest --count 1 --control "$control")
    fi
    rows="$rows$row"$'\n'
  done
  rows=$(printf '%s' "$rows" | sed '/^$/d')
  printf '%-9s pool %-6s runs %s  wall %s  sys %s  maxrss %s\n' "$what" "$pool_bytes" "$runs" \
    "$(printf '%s\n' "$rows" | summary 1 1000 ms)" \
    "$(printf '%s\n' "$rows" | summary 2 1000 ms)" \
    "$(printf '%s\n' "$rows" | summary 3 0.0009765625 MiB)"
done
