#!/usr/bin/env bash
# Hosts in network namespaces: the cluster on one "host", TCP publishers on another, a remote
# subscriber on a third, joined only by veth links, as real processes of the release binary.
#
#   <prefix>-srv  the pool host: `embar cluster up` (control process, 2 brokers) on 10.77.0.1,
#                 a bridge br0 that the other two namespaces' links join
#   <prefix>-pub  10.77.0.2: publishers over TCP (`embar publish --transport tcp`), or with
#                 EMBAR_NETNS_TRANSPORT=dpdk over DPDK: Ethernet frames from an af_packet port on
#                 eth0 to the brokers' af_packet ports on br0 (a build with --features dpdk)
#   <prefix>-sub  10.77.0.3: a subscriber over TCP (`embar subscribe --transport tcp
#                 --check-order`)
#
# The namespaces share the file system, so the pool file in /dev/shm would be visible from the
# publisher and subscriber namespaces too; there each command runs with an empty tmpfs over
# /dev/shm (in the private mount namespace `ip netns exec` gives it), as on a host without the
# pool. The script checks that a shm publisher there fails for want of the pool, that every
# TCP publisher exits 0, that the subscriber exits 0 with exactly every line, total orders
# 0..TOTAL-1 and each publisher's lines in its order, and that the bytes crossed the links
# (veth counters on the server side). Addresses exist only inside the namespaces; nothing is
# added to the host's interfaces.
#
# Root only. Idempotent: the namespaces, cluster and files of an earlier run are removed first;
# everything is removed on exit, failed or not (the logs stay in the work directory after a
# failure, for reading; the next run removes them). Prints one PASS or FAIL line; exits non-zero
# on failure.
#
# Env: EMBAR_BIN (default: target/release/embar, built with cargo), EMBAR_NETNS_PREFIX (names of
# namespaces, work directory and pool; default embar), EMBAR_NETNS_NET (the /24, default
# 10.77.0), EMBAR_NETNS_LINES (lines per publisher, default 4000), EMBAR_NETNS_TRANSPORT
# (the publishers' transport: tcp, the default, or dpdk).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

PREFIX=${EMBAR_NETNS_PREFIX:-embar}
NET=${EMBAR_NETNS_NET:-10.77.0}
LINES=${EMBAR_NETNS_LINES:-4000}
TRANSPORT=${EMBAR_NETNS_TRANSPORT:-tcp}
case $TRANSPORT in
  tcp) BROKER_FLAGS=(); PUB_FLAGS=(--transport tcp); FEATURES=() ;;
  dpdk)
    BROKER_FLAGS=(--dpdk-port net_af_packet0,iface=br0)
    PUB_FLAGS=(--transport dpdk --dpdk-port net_af_packet0,iface=eth0)
    FEATURES=(--features dpdk)
    ;;
  *) echo "netns-test: FAIL: EMBAR_NETNS_TRANSPORT=$TRANSPORT (tcp or dpdk)"; exit 1 ;;
esac
SRV=$PREFIX-srv
PUB=$PREFIX-pub
SUB=$PREFIX-sub
WORK=/tmp/$PREFIX-netns-test
POOL=/dev/shm/$PREFIX-netns-test.pool
TOPIC=netns
PUBLISHERS=(alpha beta gamma)
TOTAL=$((LINES * ${#PUBLISHERS[@]}))
# Filler after each line's prefix and number: about 120-byte messages.
FILLER=$(printf 'x%.0s' $(seq 1 100))
# Longest wait for any one readiness condition.
READY_LIMIT_S=60

why=""
passed=0
trap 'why=${why:-"line $LINENO: \`$BASH_COMMAND\` failed"}' ERR

say() { echo "netns-test: $*"; }
fail() {
  why=$*
  exit 1
}

ns_exists() { ip netns list | awk '{ print $1 }' | grep -qx "$1"; }

# Runs a command in namespace $1 as on a host without the pool: /dev/shm is an empty tmpfs
# there (a mount private to this command: `ip netns exec` gives it its own mount namespace).
remote() {
  local ns=$1
  shift
  ip netns exec "$ns" sh -c \
    'mount -t tmpfs -o size=1m,mode=1777 embar-remote /dev/shm && exec "$@"' remote "$@"
}

# Waits until a command succeeds, READY_LIMIT_S at most; $1 names what is awaited.
wait_until() {
  local what=$1
  shift
  local deadline=$((SECONDS + READY_LIMIT_S))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "not ready after ${READY_LIMIT_S} s: $what"
    sleep 0.1
  done
}

# Removes what this script (now or an earlier run) made: the cluster, whatever still runs in
# its namespaces (only this script starts processes there), the namespaces with their links
# and bridge, the pool.
cleanup() {
  if [ -f "$WORK/cluster.json" ]; then
    if ns_exists "$SRV"; then
      ip netns exec "$SRV" "$EMBAR" cluster down --purge --dir "$WORK" >/dev/null 2>&1 || true
    else
      "$EMBAR" cluster down --purge --dir "$WORK" >/dev/null 2>&1 || true
    fi
  fi
  local ns pid
  for ns in "$PUB" "$SUB" "$SRV"; do
    ns_exists "$ns" || continue
    for pid in $(ip netns pids "$ns"); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 10))
    while [ -n "$(ip netns pids "$ns")" ] && [ $SECONDS -lt $deadline ]; do
      sleep 0.05
    done
    ip netns delete "$ns"
  done
  rm -f "$POOL"
}

on_exit() {
  local rc=$?
  trap - ERR
  set +e
  if [ "$passed" != 1 ] && [ -d "$WORK" ]; then
    for f in "$WORK"/*.log "$WORK"/out/*.err; do
      [ -s "$f" ] && { echo "--- $f (last lines)"; tail -n 15 "$f"; }
    done
  fi
  cleanup
  if [ "$passed" = 1 ]; then
    rm -rf "$WORK"
    echo "netns-test: PASS: $TOTAL messages from ${#PUBLISHERS[@]} publishers in $PUB, over $TRANSPORT through $SRV's brokers, to a subscriber in $SUB, in order"
  else
    echo "netns-test: FAIL: ${why:-exit status $rc} (logs: $WORK)"
    [ "$rc" != 0 ] || rc=1
  fi
  exit "$rc"
}

[ "$(id -u)" = 0 ] || { echo "netns-test: FAIL: needs root (network namespaces)"; exit 1; }
command -v ip >/dev/null || { echo "netns-test: FAIL: no \`ip\` (apt-get install iproute2)"; exit 1; }
if [ -n "${EMBAR_BIN:-}" ]; then
  EMBAR=$EMBAR_BIN
else
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir = /* ]] || target_dir=$PWD/$target_dir
  EMBAR=$target_dir/release/embar
  if command -v cargo >/dev/null; then
    cargo build --release -q -p embar "${FEATURES[@]}"
  fi
  [ -x "$EMBAR" ] || { echo "netns-test: FAIL: no $EMBAR (cargo build --release -p embar)"; exit 1; }
fi

trap on_exit EXIT
# Leftovers of an earlier run first.
cleanup
rm -rf "$WORK"
trap 'why="interrupted"; exit 130' INT TERM
mkdir -p "$WORK/out"

say "namespaces $SRV, $PUB, $SUB on $NET.0/24"
for ns in "$SRV" "$PUB" "$SUB"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$SRV" link add br0 type bridge
ip -n "$SRV" addr add "$NET.1/24" dev br0
ip -n "$SRV" link set br0 up
host=2
for ns in "$PUB" "$SUB"; do
  # One end in the server namespace on the bridge, the other as eth0 of the remote one.
  ip -n "$SRV" link add "to-${ns##*-}" type veth peer name eth0 netns "$ns"
  ip -n "$SRV" link set "to-${ns##*-}" master br0 up
  ip -n "$ns" addr add "$NET.$host/24" dev eth0
  ip -n "$ns" link set eth0 up
  host=$((host + 1))
done

say "cluster in $SRV"
ip netns exec "$SRV" "$EMBAR" cluster up --dir "$WORK" --listen "$NET.1:0" --brokers 2 \
  --path "$POOL" --pool-bytes 256MiB --segment-bytes 4MiB "${BROKER_FLAGS[@]}" \
  >"$WORK/out/up.out" 2>"$WORK/out/up.err" \
  || fail "cluster up failed: $(tail -n 3 "$WORK/out/up.err")"
[ -f "$WORK/cluster.json" ] || fail "cluster up wrote no $WORK/cluster.json"
CONTROL=$(sed -n 's/.*"control": *"\([^"]*\)".*/\1/p' "$WORK/cluster.json")
[ -n "$CONTROL" ] || fail "no control address in $WORK/cluster.json"
# The control process, seen across the links from each remote namespace.
for ns in "$PUB" "$SUB"; do
  wait_until "the control process at $CONTROL from $ns" \
    remote "$ns" "$EMBAR" cluster status --control "$CONTROL"
done
ip netns exec "$SRV" "$EMBAR" topic create "$TOPIC" --order 5 --batch-bytes 64KiB \
  --control "$CONTROL" >/dev/null
wait_until "topic $TOPIC from $PUB" \
  remote "$PUB" "$EMBAR" topic describe "$TOPIC" --control "$CONTROL"
tcp=$(ip netns exec "$SRV" "$EMBAR" cluster status --json --control "$CONTROL" \
  | grep -o '"tcp": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/' | tr '\n' ' ' | sed 's/ $//')
say "control process $CONTROL, brokers over TCP at $tcp"
[ "$(echo "$tcp" | wc -w)" = 2 ] || fail "not 2 brokers with a TCP address: $tcp"

# The publisher namespace has no pool: a shm publisher there cannot publish.
[ -f "$POOL" ] || fail "no pool at $POOL on the server"
rc=0
echo "shm 000000" | remote "$PUB" "$EMBAR" publish --transport shm --topic "$TOPIC" \
  --control "$CONTROL" >/dev/null 2>"$WORK/out/shm.err" || rc=$?
[ "$rc" = 66 ] || fail "a shm publisher in $PUB exited $rc, not 66 (no pool): $(cat "$WORK/out/shm.err")"
say "a shm publisher in $PUB finds no pool: $(cat "$WORK/out/shm.err")"

link_bytes() { ip netns exec "$SRV" cat "/sys/class/net/$1/statistics/$2"; }
pub_rx0=$(link_bytes to-pub rx_bytes)
sub_tx0=$(link_bytes to-sub tx_bytes)

say "subscriber in $SUB, ${#PUBLISHERS[@]} publishers of $LINES lines each in $PUB"
remote "$SUB" "$EMBAR" subscribe --transport tcp --topic "$TOPIC" --control "$CONTROL" \
  --from oldest --count "$TOTAL" --format jsonl --check-order --idle-timeout-s 120 \
  >"$WORK/out/sub.jsonl" 2>"$WORK/out/sub.err" &
sub_pid=$!
pub_pids=()
for p in "${PUBLISHERS[@]}"; do
  awk -v p="$p" -v n="$LINES" -v f="$FILLER" 'BEGIN { for (i = 0; i < n; i++) printf "%s %06d %s\n", p, i, f }' \
    | remote "$PUB" "$EMBAR" publish "${PUB_FLAGS[@]}" --topic "$TOPIC" --control "$CONTROL" \
      >"$WORK/out/pub-$p.out" 2>"$WORK/out/pub-$p.err" &
  pub_pids+=($!)
done
for i in "${!PUBLISHERS[@]}"; do
  p=${PUBLISHERS[$i]}
  rc=0
  wait "${pub_pids[$i]}" || rc=$?
  [ "$rc" = 0 ] || fail "publisher $p exited $rc: $(tail -n 2 "$WORK/out/pub-$p.err")"
  grep -q "published $LINES messages.*$LINES acknowledged" "$WORK/out/pub-$p.err" \
    || fail "publisher $p: $(cat "$WORK/out/pub-$p.err")"
done
rc=0
wait "$sub_pid" || rc=$?
[ "$rc" = 0 ] || fail "subscriber exited $rc: $(tail -n 2 "$WORK/out/sub.err")"

got=$(wc -l <"$WORK/out/sub.jsonl")
[ "$got" = "$TOTAL" ] || fail "subscriber printed $got lines, $TOTAL expected"
summary="order check passed: $TOTAL messages, ${#PUBLISHERS[@]} publishers"
grep -qx "$summary" "$WORK/out/sub.err" || fail "no \"$summary\" from the subscriber: $(cat "$WORK/out/sub.err")"
# Independently of --check-order: total orders 0..TOTAL-1 and each publisher's lines all
# there, once, in its order.
sed -n 's/.*"total_order":\([0-9]*\).*/\1/p' "$WORK/out/sub.jsonl" \
  | awk -v n="$TOTAL" '$1 != NR - 1 { print "line " NR ": total order " $1; exit 1 } END { if (NR != n) { print NR " total orders"; exit 1 } }' \
  >"$WORK/out/total-order.err" || fail "total orders: $(cat "$WORK/out/total-order.err")"
for p in "${PUBLISHERS[@]}"; do
  sed -n 's/.*"payload":"\([^"]*\)".*/\1/p' "$WORK/out/sub.jsonl" \
    | awk -v p="$p" -v n="$LINES" '$1 == p { if ($2 + 0 != k) { print p " line " $2 " where " k " was next"; exit 1 } k++ } END { if (k != n) { print p ": " k " lines of " n; exit 1 } }' \
    >"$WORK/out/fifo-$p.err" || fail "publisher order: $(cat "$WORK/out/fifo-$p.err")"
done

# Every message crossed the links: into the server from the publishers' namespace, and out
# to the subscriber's (payload bytes alone; frames and headers come on top).
payload_bytes=0
for p in "${PUBLISHERS[@]}"; do
  payload_bytes=$((payload_bytes + LINES * (${#p} + 8 + ${#FILLER})))
done
pub_rx=$(($(link_bytes to-pub rx_bytes) - pub_rx0))
sub_tx=$(($(link_bytes to-sub tx_bytes) - sub_tx0))
say "link bytes: $pub_rx from $PUB, $sub_tx to $SUB (payloads: at least $payload_bytes)"
[ "$pub_rx" -ge "$payload_bytes" ] || fail "only $pub_rx bytes came from $PUB"
[ "$sub_tx" -ge "$payload_bytes" ] || fail "only $sub_tx bytes went to $SUB"
passed=1
