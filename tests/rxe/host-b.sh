#!/bin/sh
# Two hosts (scripts/rxe-test.sh), host B: two verbs publishers RDMA-writing to host A's
# brokers over the link (no pool here).
set -eu
export RUST_LOG=warn
N=2000
CONTROL=10.0.0.1:7000
i=0
until ./embar topic describe t --control "$CONTROL" >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 180 ] || { echo "host B: host A never got ready"; exit 1; }
  sleep 1
done
seq 0 $((N - 1)) | sed 's/^/x /' | ./embar publish --topic t --transport verbs --control "$CONTROL" &
seq 0 $((N - 1)) | sed 's/^/y /' | ./embar publish --topic t --transport verbs --control "$CONTROL"
wait $!
echo "host B: published and acknowledged"
