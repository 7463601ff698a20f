#!/usr/bin/env bash
# The verbs transport on Soft-RoCE: builds with `--features verbs`, stages the binaries,
# boots the rxe VM (scripts/rxe-vm.sh) and runs tests/rxe/in-vm.sh there: the verbs device
# tests, the verbs process tests, publish throughput against ib_write_bw, and an end-to-end
# bench. Exits non-zero if any of it fails. The VM's console goes to target/rxe-vm.log.
#
# On a host whose kernel has rdma_rxe (or with an RDMA NIC) no VM is needed:
#   modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0
#   RDMA_DEVICE=rxe0 RDMA_GID_INDEX=1 RDMA_IP=<eth0's IPv4> EMBAR_REQUIRE_RDMA=1 \
#     cargo test --release --features verbs -p embar-sys --test verbs -p embar --test verbs_processes -- --test-threads 1
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/rxe-vm.sh setup
cargo build --release --features verbs
# On this host (no RDMA device): the clear errors of a verbs build without a device.
cargo test --release --features verbs -p embar --test verbs_processes -- --test-threads 1
stage=target/rxe-stage
rm -rf "$stage"; mkdir -p "$stage"
cp target/release/embar "$stage/"
# Path of the test executable cargo builds for the given selection.
test_exe() {
  cargo test --release --features verbs "$@" --no-run 2>&1 \
    | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1
}
cp "$(test_exe -p embar-sys --test verbs)" "$stage/sys-verbs"
cp "$(test_exe -p embar --test verbs_processes)" "$stage/verbs-processes"
cp tests/rxe/in-vm.sh tests/rxe/host-a.sh tests/rxe/host-b.sh "$stage/"
scripts/rxe-vm.sh run "$stage" sh in-vm.sh 2>&1 | tee target/rxe-vm.log

# Two hosts: two VMs linked by a qemu socket network, rxe0 on each one's eth0. Host A runs
# the cluster and a subscriber, host B two verbs publishers (RDMA over the link).
echo "== rxe: two hosts (broker VM and publisher VM)"
port=$((20000 + RANDOM % 20000))
VM_NET=listen:$port VM_IP=10.0.0.1/24 scripts/rxe-vm.sh run "$stage" sh host-a.sh \
  > target/rxe-host-a.log 2>&1 &
a=$!
sleep 2
VM_NET=connect:$port VM_IP=10.0.0.2/24 VM_MEM_MB=1024 scripts/rxe-vm.sh run "$stage" sh host-b.sh \
  > target/rxe-host-b.log 2>&1 &
b=$!
ra=0; wait $a || ra=$?
rb=0; wait $b || rb=$?
grep -h '^host [AB]:' target/rxe-host-a.log target/rxe-host-b.log || true
if [ "$ra" != 0 ] || [ "$rb" != 0 ]; then
  echo "two hosts failed (host A $ra, host B $rb); consoles: target/rxe-host-a.log, target/rxe-host-b.log"
  tail -30 target/rxe-host-a.log target/rxe-host-b.log
  exit 1
fi
