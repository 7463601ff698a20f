#!/usr/bin/env bash
# The DPDK transport (a build with --features dpdk): installs DPDK from apt when missing,
# lints the feature, runs the shim's memif test, the process tests over memif links
# (tests/dpdk_transport.rs: ordering with shm publishers, injected loss and corruption, a
# rogue peer's garbage frames), and the hosts-in-namespaces test with publishers sending
# Ethernet frames over af_packet ports on veth links (scripts/netns-test.sh,
# EMBAR_NETNS_TRANSPORT=dpdk; root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pkg-config --exists libdpdk 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libdpdk-dev pkg-config >/dev/null
fi
echo "== dpdk: DPDK $(pkg-config --modversion libdpdk)"
cargo clippy --all-targets --workspace --features dpdk -- -D warnings
cargo test --release --features dpdk -p embar-sys --test dpdk
cargo test --release --features dpdk -p embar-dataplane --lib dpdk::
cargo test --release --features dpdk --test dpdk_transport
EMBAR_NETNS_TRANSPORT=dpdk EMBAR_NETNS_PREFIX=embar-dpdk scripts/netns-test.sh
