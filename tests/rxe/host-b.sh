#!/bin/sh
# Two hosts (scripts/rxe-test.sh), host B (no pool): two verbs publishers RDMA-writing to
# host A's brokers over the link, then a verbs subscriber reading the total order back over
# the link (the broker RDMA-writes it into this host's ring), checked by the ordering
# checker; then it tells host A it is done (the topic `done`).
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
./embar subscribe --topic t --transport verbs --check-order --count $((2 * N)) \
    --format text --control "$CONTROL" > /tmp/got.txt 2> /tmp/sub.err || { cat /tmp/sub.err; exit 1; }
cat /tmp/sub.err
grep -q "order check passed: $((2 * N)) messages, 2 publishers" /tmp/sub.err
for p in x y; do
  grep "^$p " /tmp/got.txt | awk -v n=$N '$2 != NR - 1 { exit 1 } END { exit NR != n }'
done
echo "host B: verbs subscriber received $(wc -l < /tmp/got.txt) messages in order"
./embar topic create done --control "$CONTROL"
