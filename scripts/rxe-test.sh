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
cp tests/rxe/in-vm.sh "$stage/"
scripts/rxe-vm.sh run "$stage" sh in-vm.sh 2>&1 | tee target/rxe-vm.log
