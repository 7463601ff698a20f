#!/bin/sh
# Runs inside the Soft-RoCE VM (started by scripts/rxe-test.sh, in the staged directory):
# the verbs device tests, the verbs process tests, then the transport's publish throughput
# against ib_write_bw at the same write size, and an end-to-end ordered bench over rxe.
set -eu
export EMBAR_REQUIRE_RDMA=1 EMBAR_BIN=/mnt/host/embar RUST_LOG=warn
BATCH=${BATCH:-256KiB}
BATCH_BYTES=262144

echo "== rxe: verbs device tests (sys/tests/verbs.rs)"
./sys-verbs --test-threads 1
echo "== rxe: verbs process tests (tests/verbs_processes.rs)"
./verbs-processes --test-threads 1

# Alternating, best of two each: a TCG VM is noisy, and a run's place in the sequence moves
# it more than anything else.
IBW=0; OURS=0
for round in 1 2; do
  echo "== rxe: ib_write_bw, $BATCH_BYTES-byte writes (perftest), round $round"
  ib_write_bw -d "$RDMA_DEVICE" -x "$RDMA_GID_INDEX" -s $BATCH_BYTES -n 400 -F >/tmp/ibw-server.log 2>&1 &
  sleep 1
  ib_write_bw -d "$RDMA_DEVICE" -x "$RDMA_GID_INDEX" -s $BATCH_BYTES -n 400 -F "$RDMA_IP" | tee /tmp/ibw.log
  wait
  IBW=$(awk -v s=$BATCH_BYTES -v best="$IBW" '$1 == s && $4 > best { best = $4 } END { print best }' /tmp/ibw.log)

  echo "== rxe: embar bench --transport verbs, publish throughput ($BATCH batches, 1 KiB messages, ORDER 5, ACK 1), round $round"
  ./embar bench --transport verbs --json --brokers 1 --subscribers 0 --total-bytes 128MiB \
      --batch-bytes "$BATCH" --segment-bytes 4MiB --pool-bytes 512MiB > /tmp/pub.json
  cat /tmp/pub.json
  OURS=$(sed -n 's/.*"throughput_gbps":\([0-9.e-]*\).*/\1/p' /tmp/pub.json | awk -v best="$OURS" '{ print ($1 > best ? $1 : best) }')
done
awk -v i="$IBW" -v o="$OURS" 'BEGIN { printf "RXE_PUBLISH {\"ib_write_bw_mb_s\":%.1f,\"embar_verbs_mb_s\":%.1f,\"ratio\":%.2f}\n", i, o * 1000, o * 1000 / i }'

echo "== rxe: end-to-end bench over rxe (2 brokers, verbs publisher, verbs subscriber, ordering checked)"
./embar bench --transport verbs --json --brokers 2 --subscribers 1 --total-bytes 64MiB \
    --batch-bytes "$BATCH" --segment-bytes 4MiB --pool-bytes 512MiB > /tmp/e2e.json
echo "RXE_E2E $(cat /tmp/e2e.json)"
grep -q '"order_check":"passed"' /tmp/e2e.json
# The verbs subscriber's throughput: to the last message it delivered, in the same run.
echo "RXE_SUBSCRIBE {$(grep -o '"throughput_gbps":[0-9.e-]*' /tmp/e2e.json | head -1),$(grep -o '"delivered_gbps":[0-9.e-]*' /tmp/e2e.json | head -1)} ib_write_bw_mb_s $IBW"
echo "== rxe: light open loop over rxe (64 B messages, 1000/s), beside ib_write_lat (64 B)"
ib_write_lat -d "$RDMA_DEVICE" -x "$RDMA_GID_INDEX" -s 64 -n 2000 -F >/tmp/ibl-server.log 2>&1 &
sleep 1
ib_write_lat -d "$RDMA_DEVICE" -x "$RDMA_GID_INDEX" -s 64 -n 2000 -F "$RDMA_IP" > /tmp/ibl.log
wait
tail -3 /tmp/ibl.log
./embar bench --transport verbs --json --brokers 1 --subscribers 1 --message-bytes 64 \
    --total-bytes 128KiB --rate 1000 --segment-bytes 4MiB --pool-bytes 256MiB > /tmp/lat.json
echo "RXE_LATENCY $(sed -n 's/.*"latency_us":\({[^}]*}\).*/\1/p' /tmp/lat.json) ib_write_lat typical (one way) $(awk '$1 == 64 { print $5 }' /tmp/ibl.log) us"
grep -q '"order_check":"passed"' /tmp/lat.json
echo "== rxe: all passed"
