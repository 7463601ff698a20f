#!/usr/bin/env bash
# Usage: scripts/compare-bench.sh OLD_EMBAR NEW_EMBAR [RUNS]: alternates the two binaries;
# each line: which, throughput GB/s, memcpy GB/s, ratio, p50 us, p99 us (publish-to-ack).
# Alternates two embar binaries' `bench --json` runs; prints ratio to the same run's memcpy.
set -u
base=$1; new=$2; runs=${3:-3}
for i in $(seq 1 "$runs"); do
  for which in base new; do
    bin=$base; [ "$which" = new ] && bin=$new
    out=$("$bin" bench --json 2>/dev/null | tail -1)
    echo "$which $(echo "$out" | python3 -c 'import sys,json; v=json.load(sys.stdin); print(v["throughput_gbps"], v["memcpy_gbps"], v["ratio_to_memcpy"], v["latency_us"].get("p50"), v["latency_us"].get("p99"))' 2>/dev/null || echo FAILED)"
  done
done
