#!/usr/bin/env bash
# guestkit.sh builds the deskvm guest kit into .deps/guest/ (or $DESKVM_GUEST_DIR):
#
#   vmlinuz            Debian's generic amd64 kernel (it has 9p; the cloud flavour does not)
#   vmlinux            the same kernel uncompressed: an ELF with a PVH entry point, which QEMU boots
#                      without the in-guest decompression that costs seconds under TCG
#   initramfs.cpio.gz  /init = the guest agent, a static busybox, the kernel modules the agent loads
#   test-image.qcow2   a bootable FAT disk (syslinux) with the two above, booting in image mode
#   MANIFEST           package versions and sha256 of every file
#
# The kernel package is resolved through the linux-image-amd64 metapackage and downloaded into
# ${DESKCLOUD_CACHE:-$HOME/.cache/deskcloud}/guest; it is never installed on the host. A stamp
# hashes every input (agent sources, kernel and busybox versions, this script), so a run with
# nothing changed returns at once.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DESKCLOUD_CACHE:-$HOME/.cache/deskcloud}/guest
OUT=${DESKVM_GUEST_DIR:-$ROOT/.deps/guest}
BUSYBOX=/bin/busybox
# The syslinux.cfg APPEND line of the test image.
IMAGE_APPEND="console=ttyS0 panic=-1 quiet deskvm.mode=image"

banner() { printf '==> %s\n' "$*"; }
die() { printf 'guestkit: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=
apt_update_once() {
  [ -n "$APT_UPDATED" ] && return
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  APT_UPDATED=1
}

# need_tools installs the Debian packages behind any missing build tool.
need_tools() {
  local missing=() pair
  for pair in dpkg-deb:dpkg apt-get:apt busybox:busybox-static mkfs.vfat:dosfstools \
    syslinux:syslinux mcopy:mtools qemu-img:qemu-utils sha256sum:coreutils; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  # A dynamic busybox cannot run in the initramfs, which has no libc.
  if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    missing+=(busybox-static)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    banner "installing debian packages: ${missing[*]}"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  [ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || die "syslinux-common is missing"
}

# resolve_kernel sets KPKG and KVER from the linux-image-amd64 metapackage (or $GUEST_KERNEL_PKG).
resolve_kernel() {
  KPKG=${GUEST_KERNEL_PKG:-}
  if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$KPKG" ]; then
      apt_update_once
      KPKG=$(apt-cache depends linux-image-amd64 | awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
    fi
  fi
  [ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64"
  case "$KPKG" in *-cloud-amd64) die "$KPKG is the cloud flavour, which lacks 9p" ;; esac
  KVER=$(apt-cache policy "$KPKG" | awk '$1=="Candidate:" {print $2}')
  [ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version of $KPKG"
}

# extract_vmlinux BZIMAGE OUT unpacks the ELF kernel from a bzImage (xz, zstd or gzip payload).
extract_vmlinux() {
  local magic tool off
  for pair in '\xfd7zXZ\x00:xz' '\x28\xb5\x2f\xfd:zstd' '\x1f\x8b\x08\x00:gzip'; do
    magic=${pair%%:*} tool=${pair##*:}
    command -v "$tool" >/dev/null 2>&1 || continue
    for off in $(LC_ALL=C grep -obUaP "$magic" "$1" | cut -d: -f1 | head -5); do
      case $tool in
        xz) tail -c +$((off + 1)) "$1" | xz -dc --single-stream >"$2" 2>/dev/null || true ;;
        *) tail -c +$((off + 1)) "$1" | "$tool" -dc >"$2" 2>/dev/null || true ;;
      esac
      if [ "$(head -c 4 "$2" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        return
      fi
    done
  done
  die "cannot extract the ELF kernel from $1"
}

# stamp hashes everything the kit is made from.
stamp() {
  {
    echo "kernel $KPKG $KVER"
    echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "append $IMAGE_APPEND"
    go version
    sha256sum "$ROOT/scripts/guestkit.sh" "$ROOT/go.mod" "$ROOT/go.sum"
    (cd "$ROOT" && find driver/guestagent driver/guestctl driver/guestkit -name '*.go' ! -name '*_test.go' -print0 |
      sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-16
}

main() {
  need_tools
  resolve_kernel
  local want
  want=$(stamp)
  if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$want" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/test-image.qcow2" ]; then
    banner "guest kit up to date ($KPKG $KVER, stamp $want)"
    return
  fi
  banner "building guest kit ($KPKG $KVER, stamp $want)"

  mkdir -p "$CACHE/debs" "$OUT"
  local deb="$CACHE/debs/${KPKG}_${KVER//:/%3a}_amd64.deb"
  if [ ! -s "$deb" ]; then
    banner "downloading $KPKG $KVER"
    local dl
    dl=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
    # apt-get download writes into the working directory; _apt cannot write there, hence the
    # (harmless) "unsandboxed" notice.
    (cd "$dl" && apt-get download -q "$KPKG=$KVER" 2>&1 | grep -v 'unsandboxed' || true)
    mv "$dl"/*.deb "$deb" 2>/dev/null || { rm -rf "$dl"; die "download of $KPKG=$KVER failed"; }
    rm -rf "$dl"
  fi

  WORK=$(mktemp -d "${TMPDIR:-/tmp}/guestkit.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  local work=$WORK
  dpkg-deb -x "$deb" "$work/kernel"
  local abi
  abi=$(ls "$work/kernel/lib/modules")
  [ -f "$work/kernel/boot/vmlinuz-$abi" ] || die "$deb has no boot/vmlinuz-$abi"
  cp "$work/kernel/boot/vmlinuz-$abi" "$work/vmlinuz"
  extract_vmlinux "$work/vmlinuz" "$work/vmlinux"

  banner "building the guest agent"
  (cd "$ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$want" \
    -o "$work/init" ./driver/guestagent &&
    go build -o "$work/mkinitramfs" ./driver/guestkit/mkinitramfs)

  banner "packing the initramfs"
  "$work/mkinitramfs" -modules "$work/kernel/lib/modules/$abi" -agent "$work/init" \
    -busybox "$BUSYBOX" -out "$work/initramfs.cpio.gz"

  banner "making the test image"
  cat >"$work/syslinux.cfg" <<EOF
DEFAULT deskvm
PROMPT 0
TIMEOUT 0
LABEL deskvm
  KERNEL vmlinuz
  INITRD initramfs.cpio.gz
  APPEND $IMAGE_APPEND
EOF
  local kib
  kib=$(( ($(stat -c %s "$work/vmlinuz") + $(stat -c %s "$work/initramfs.cpio.gz")) / 1024 + 2048 ))
  # An unpartitioned ("superfloppy") FAT disk: syslinux puts its boot code in the FAT boot
  # sector and SeaBIOS boots it as it is. mtools does the writing: nothing is mounted.
  mkfs.vfat -C -n DESKVMBOOT "$work/test-image.raw" "$kib" >/dev/null
  syslinux --install "$work/test-image.raw"
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/test-image.raw" "$work/vmlinuz" "$work/initramfs.cpio.gz" "$work/syslinux.cfg" ::/
  qemu-img convert -q -c -f raw -O qcow2 "$work/test-image.raw" "$work/test-image.qcow2"

  {
    echo "# deskvm guest kit, stamp $want"
    echo "kernel_package $KPKG"
    echo "kernel_version $KVER"
    echo "kernel_release $abi"
    echo "busybox_version $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "agent_version $want"
    echo "go_version $(go env GOVERSION)"
    (cd "$work" && sha256sum vmlinuz vmlinux initramfs.cpio.gz test-image.qcow2)
  } >"$work/MANIFEST"

  for f in vmlinuz vmlinux initramfs.cpio.gz test-image.qcow2 MANIFEST; do
    mv -f "$work/$f" "$OUT/$f"
  done
  echo "$want" >"$OUT/.stamp"
  banner "guest kit in $OUT: $(du -sh "$OUT" | cut -f1) (vmlinuz $(du -h "$OUT/vmlinuz" | cut -f1), vmlinux $(du -h "$OUT/vmlinux" | cut -f1), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1), test image $(du -h "$OUT/test-image.qcow2" | cut -f1))"
}

main "$@"
