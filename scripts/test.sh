#!/usr/bin/env bash
# The project's test suite: unit, property and multi-process tests, then the loom model of the
# ring. As root it also mounts a hugetlbfs (64 x 2 MiB pages) so the hugetlbfs pool test runs.
set -euo pipefail
cd "$(dirname "$0")/.."

HUGE_DIR=${EMBAR_HUGETLBFS_DIR:-/mnt/embar-hugetlbfs}
if [ "$(id -u)" = 0 ] && ! mountpoint -q "$HUGE_DIR" 2>/dev/null; then
  if [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -lt 64 ]; then
    echo 64 > /proc/sys/vm/nr_hugepages 2>/dev/null || true
  fi
  mkdir -p "$HUGE_DIR" && mount -t hugetlbfs -o pagesize=2M none "$HUGE_DIR" 2>/dev/null \
    || echo "note: could not mount hugetlbfs at $HUGE_DIR; its test will say it skipped"
fi
if mountpoint -q "$HUGE_DIR" 2>/dev/null; then
  export EMBAR_HUGETLBFS_DIR=$HUGE_DIR
fi

echo "== cargo test --workspace"
cargo test --workspace
echo "== loom model of the batch ring"
scripts/loom.sh
