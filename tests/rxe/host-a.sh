#!/bin/sh
# Two hosts (scripts/rxe-test.sh), host A: the control process, two brokers taking verbs
# publishers and subscribers on eth0 (RDMA over the link to host B), and a subscriber that
# checks what host B's publishers sent. It stops the cluster once host B's verbs subscriber
# is done (host B then creates the topic `done`).
set -eu
export RUST_LOG=warn
N=2000
CONTROL="$RDMA_IP:7000"
./embar cluster up --brokers 2 --dir /tmp/c --verbs "$RDMA_IP" --listen "$CONTROL" \
    --pool-bytes 256MiB --segment-bytes 4MiB
./embar topic create t --order 5 --batch-bytes 64KiB --control "$CONTROL"
echo "host A: cluster ready at $CONTROL"
./embar subscribe --topic t --count $((2 * N)) --format text --idle-timeout-s 180 \
    --control "$CONTROL" > /tmp/got.txt
echo "host A: received $(wc -l < /tmp/got.txt) messages"
[ "$(wc -l < /tmp/got.txt)" -eq $((2 * N)) ]
for p in x y; do
  # Each publisher's lines, all of them, once, in its order.
  grep "^$p " /tmp/got.txt | awk -v n=$N '$2 != NR - 1 { exit 1 } END { exit NR != n }'
done
i=0
until ./embar topic describe done --control "$CONTROL" >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 300 ] || { echo "host A: host B's subscriber never finished"; exit 1; }
  sleep 1
done
./embar cluster down --dir /tmp/c
echo "host A: two-host check passed"
