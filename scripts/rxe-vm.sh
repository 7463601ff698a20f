#!/usr/bin/env bash
# A throw-away VM with Soft-RoCE (rdma_rxe) for the verbs tests, on hosts whose kernel has no
# RDMA (this project's CI machines). It boots Debian's stock 6.1 kernel under qemu (TCG; KVM on
# these hosts cannot boot a stock kernel) with a busybox initramfs, creates `rxe0` on a dummy
# netdev, mounts a host directory read-only over 9p at /mnt/host and runs one command there.
#
#   scripts/rxe-vm.sh setup             # once: apt packages, kernel, initramfs (~1 min)
#   scripts/rxe-vm.sh run DIR CMD...    # boot, run CMD in DIR, exit with CMD's status
#
# Inside the VM: RDMA_DEVICE=rxe0, RDMA_GID_INDEX=1 (the RoCEv2 IPv4 GID), RDMA_IP=10.9.9.1,
# a 1.5 GiB tmpfs on /dev/shm for pools, and the host's rdma-core libraries. Output lines the
# command prints reach this script's stdout (the serial console).
#
# Env: EMBAR_VM_DIR (cache, default /var/tmp/embar-rxe-vm), VM_MEM_MB (default 3072),
#      VM_CPUS (default 2), VM_TIMEOUT seconds (default 1200), KVER (kernel ABI, e.g. 6.1.0-40-amd64),
#      VM_NET=listen:PORT|connect:PORT with VM_IP=A.B.C.D/N: a virtio NIC on a qemu socket
#      network shared with another VM (two hosts; rxe0 then runs on eth0 at VM_IP).
#
# On a host whose kernel has rdma_rxe, no VM is needed:
#   modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0
set -euo pipefail
WORK=${EMBAR_VM_DIR:-/var/tmp/embar-rxe-vm}
mkdir -p "$WORK"

setup() {
  export DEBIAN_FRONTEND=noninteractive
  local pkgs="qemu-system-x86 busybox-static kmod cpio rdma-core ibverbs-utils ibverbs-providers
      perftest iproute2 libibverbs-dev librdmacm-dev libclang-dev"
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  fi
  if [ -f "$WORK/initramfs.gz" ] && [ -f "$WORK/vmlinuz" ] && [ "$WORK/initramfs.gz" -nt "$0" ]; then
    echo "rxe-vm: already set up in $WORK"
    return
  fi
  local kver=${KVER:-$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1)}
  [ -n "$kver" ] || { echo "rxe-vm: cannot find the kernel package linux-image-amd64" >&2; exit 1; }
  echo "rxe-vm: kernel $kver"
  rm -rf "$WORK/kdeb" "$WORK/kroot"; mkdir -p "$WORK/kdeb"
  (cd "$WORK/kdeb" && apt-get download -qq "linux-image-$kver")
  dpkg-deb -x "$WORK"/kdeb/linux-image-"$kver"_*.deb "$WORK/kroot"
  cp "$WORK/kroot/boot/vmlinuz-$kver" "$WORK/vmlinuz"
  depmod -b "$WORK/kroot" "$kver"
  initramfs "$kver"
  rm -rf "$WORK/kdeb"
  echo "rxe-vm: ready in $WORK"
}

# Copies a file and the shared libraries it needs into the image.
copy_with_libs() {
  local ir=$1; shift
  for f in "$@"; do
    mkdir -p "$ir$(dirname "$f")"; cp -L "$f" "$ir$f"
    ldd "$f" 2>/dev/null | awk '/=> \//{print $3}' | while read -r l; do
      mkdir -p "$ir$(dirname "$l")"; cp -Ln "$l" "$ir$l"
    done
  done
}

initramfs() {
  local kv=$1 kroot=$WORK/kroot ir=$WORK/ir
  rm -rf "$ir"
  mkdir -p "$ir"/{bin,sbin,etc/libibverbs.d,proc,sys,dev,tmp,run,mnt/host,root,usr/bin,lib64}
  cp /bin/busybox "$ir/bin/"
  for a in $(/bin/busybox --list); do [ -e "$ir/bin/$a" ] || ln -s busybox "$ir/bin/$a"; done
  : > "$ir/modlist"
  # crc32_generic before rdma_rxe (rxe's ICRC); virtio + 9p for the host share.
  for m in crc32_generic crc32-pclmul virtio_pci virtio_net 9pnet_virtio 9p dummy veth rdma_rxe ib_uverbs rdma_ucm; do
    modprobe -d "$kroot" -S "$kv" --show-depends "$m" | awk '$1=="insmod"{print $2}' | while read -r f; do
      local rel=${f#"$kroot"}
      mkdir -p "$ir$(dirname "$rel")"; cp -n "$f" "$ir$rel"
      grep -qxF "$rel" "$ir/modlist" || echo "$rel" >> "$ir/modlist"
    done
  done
  local ml=/usr/lib/x86_64-linux-gnu
  copy_with_libs "$ir" /usr/bin/ibv_devices /usr/bin/ibv_devinfo /usr/bin/ib_write_bw \
      /usr/bin/ib_write_lat /usr/bin/rdma /usr/bin/ip "$ml/libibverbs/librxe-rdmav34.so" \
      "$ml/libibverbs.so.1" "$ml/librdmacm.so.1" "$ml/libgcc_s.so.1"
  cp /etc/libibverbs.d/rxe.driver "$ir/etc/libibverbs.d/"
  mkdir -p "$ir/lib/x86_64-linux-gnu"
  cp -n "$ir$ml"/*.so* "$ir/lib/x86_64-linux-gnu/" 2>/dev/null || true
  cp -L /lib64/ld-linux-x86-64.so.2 "$ir/lib64/"
  echo "root:x:0:0:root:/root:/bin/sh" > "$ir/etc/passwd"
  echo "127.0.0.1 localhost" > "$ir/etc/hosts"
  cat > "$ir/init" <<'INIT'
#!/bin/sh
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
mkdir -p /dev/shm && mount -t tmpfs -o size=1536m shm /dev/shm
while read -r m; do insmod "$m" 2>/dev/null || echo "rxe-vm: insmod $m failed"; done < /modlist
# busybox ip cannot make a dummy device: use iproute2's.
/usr/bin/ip link set lo up
# With `embar_ip=A.B.C.D/N` on the kernel command line (VM_IP) the VM has a real NIC, eth0,
# linked to another VM: rxe0 runs on it. Otherwise rxe0 runs on a dummy netdev (loopback).
NETIP=$(sed -n 's/.*embar_ip=\([0-9./]*\).*/\1/p' /proc/cmdline)
if [ -n "$NETIP" ]; then
  NETDEV=eth0
  /usr/bin/ip addr add "$NETIP" dev eth0
else
  NETDEV=dummy0
  NETIP=10.9.9.1/24
  # The dummy module may already have made dummy0.
  /usr/bin/ip link show dummy0 >/dev/null 2>&1 || /usr/bin/ip link add dummy0 type dummy
  /usr/bin/ip addr add "$NETIP" dev dummy0
fi
/usr/bin/ip link set "$NETDEV" up
rdma link add rxe0 type rxe netdev "$NETDEV" || echo "rxe-vm: could not create rxe0"
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostshare /mnt/host
cd /mnt/host
export RDMA_DEVICE=rxe0 RDMA_IP=${NETIP%/*} RDMA_GID_INDEX=1 HOME=/root TMPDIR=/tmp
echo "rxe-vm: running $(cat /cmd.sh)"
sh /cmd.sh; echo "RXE_VM_EXIT=$?"
sync; poweroff -f
INIT
  chmod +x "$ir/init"
  (cd "$ir" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$WORK/initramfs.gz"
  rm -rf "$ir"
}

run() {
  [ -f "$WORK/initramfs.gz" ] || { echo "rxe-vm: not set up; run: $0 setup" >&2; exit 2; }
  local dir; dir=$(realpath "$1"); shift
  [ $# -gt 0 ] || { echo "usage: $0 run DIR CMD..." >&2; exit 2; }
  local t; t=$(mktemp -d)
  trap 'rm -rf "$t"' RETURN
  # The command goes in as /cmd.sh in a second, tiny initramfs archive appended to the base.
  mkdir -p "$t/x"; printf '%s\n' "$*" > "$t/x/cmd.sh"
  (cd "$t/x" && echo cmd.sh | cpio -o -H newc --quiet | gzip -1) | cat "$WORK/initramfs.gz" - > "$t/initrd.gz"
  # Two VMs linked by a qemu socket network: VM_NET=listen:PORT on one, connect:PORT on
  # the other, each with its VM_IP.
  local nic=(-nic none) kargs="console=ttyS0 panic=-1 quiet"
  if [ -n "${VM_NET:-}" ]; then
    local mode=${VM_NET%%:*} port=${VM_NET#*:} mac
    case "${VM_IP:-}" in */*) ;; *) echo "rxe-vm: VM_NET needs VM_IP=A.B.C.D/N" >&2; return 2 ;; esac
    mac=$(printf '52:54:00:12:34:%02x' "$(echo "${VM_IP%/*}" | cut -d. -f4)")
    nic=(-netdev "socket,id=n0,$mode=127.0.0.1:$port" -device "virtio-net-pci,netdev=n0,mac=$mac")
    kargs="$kargs embar_ip=$VM_IP"
  fi
  set +e
  timeout "${VM_TIMEOUT:-1200}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
    -m "${VM_MEM_MB:-3072}" -smp "${VM_CPUS:-2}" -nographic -no-reboot "${nic[@]}" \
    -kernel "$WORK/vmlinuz" -initrd "$t/initrd.gz" -append "$kargs" \
    -virtfs local,path="$dir",mount_tag=hostshare,security_model=none,readonly=on \
    < /dev/null | tee "$t/console.log"
  set -e
  local rc; rc=$(sed -n 's/^RXE_VM_EXIT=\([0-9]*\).*/\1/p' "$t/console.log" | tail -1)
  echo "rxe-vm: exit status ${rc:-none (the VM crashed or timed out)}"
  return "${rc:-99}"
}

case "${1:-}" in
  setup) setup ;;
  run) shift; run "$@" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
