#!/usr/bin/env bash
# deps.sh installs everything deskcloud's tests and `make dev` need, pinned and cached.
#
#   scripts/deps.sh [apt|tools|guest|all]
#
# Third-party binaries are built once into $DESKCLOUD_CACHE (default ~/.cache/deskcloud) and
# linked into .deps/bin/; the guest kit lands in .deps/guest/. Every step checks its own stamp
# first, so a second run with warm caches does no work.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DESKCLOUD_CACHE:-$HOME/.cache/deskcloud}
DEPS=$ROOT/.deps
mkdir -p "$CACHE/bin" "$CACHE/src" "$DEPS/bin"

# Pinned versions. Changing one rebuilds just that tool.
NOMAD_VERSION=v1.11.2
NOMAD_API_VERSION=v0.0.0-20260211190147-f876384fe3ab # the api module at the same commit as NOMAD_VERSION
CONSUL_VERSION=v1.22.5
AUTOSCALER_VERSION=v0.5.0

# Debian packages the project uses at run or test time.
APT_PACKAGES=(
  qemu-system-x86 qemu-utils # the hypervisor and qemu-img
  busybox-static             # /bin/sh and friends inside the guest kit
  syslinux syslinux-common mtools dosfstools # the bootable test disk image for image mode
  containernetworking-plugins # CNI plugins for Nomad bridge networking
  dbus-daemon                # a private bus for the owner-sensing logind tests
  jq curl
)

banner() { printf '==> %s\n' "$*"; }

moddir() { go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'; }

apt_deps() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    banner "debian packages present"
    return
  fi
  banner "installing debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# copy_module MODULE@VERSION DEST copies a module's source out of the read-only module cache.
copy_module() {
  local dir
  dir=$(moddir "$1")
  [ -n "$dir" ] || { echo "deps: cannot download $1" >&2; return 1; }
  rm -rf "$2"
  mkdir -p "$2"
  cp -r "$dir/." "$2/"
  chmod -R u+w "$2"
}

link_tool() { ln -sfn "$CACHE/bin/$1-$2" "$DEPS/bin/$1"; }

build_nomad() {
  local out=$CACHE/bin/nomad-$NOMAD_VERSION
  if [ ! -x "$out" ]; then
    banner "building nomad $NOMAD_VERSION (about 6 minutes on 2 cores)"
    local src=$CACHE/src/nomad-$NOMAD_VERSION
    copy_module "github.com/hashicorp/nomad@$NOMAD_VERSION" "$src"
    copy_module "github.com/hashicorp/nomad/api@$NOMAD_API_VERSION" "$src/api"
    # The "release" tag leaves out Nomad's mock driver; we test against the flavour users run.
    (cd "$src" && CGO_ENABLED=1 go build -trimpath -tags "hashicorpmetrics codegen_generated release" -o "$out.tmp" .)
    mv "$out.tmp" "$out"
    rm -rf "$src"
  fi
  link_tool nomad "$NOMAD_VERSION"
}

build_consul() {
  local out=$CACHE/bin/consul-$CONSUL_VERSION
  if [ ! -x "$out" ]; then
    banner "building consul $CONSUL_VERSION (about 5 minutes on 2 cores)"
    local src=$CACHE/src/consul-$CONSUL_VERSION
    copy_module "github.com/hashicorp/consul@$CONSUL_VERSION" "$src"
    local sub ver
    for sub in api sdk proto-public envoyextensions troubleshoot; do
      ver=$(awk -v m="github.com/hashicorp/consul/$sub" '$1==m && $2 ~ /^v/ {print $2; exit}' "$src/go.mod")
      [ -n "$ver" ] || { echo "deps: consul go.mod does not require consul/$sub" >&2; return 1; }
      copy_module "github.com/hashicorp/consul/$sub@$ver" "$src/$sub"
    done
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -o "$out.tmp" .)
    mv "$out.tmp" "$out"
    rm -rf "$src"
  fi
  link_tool consul "$CONSUL_VERSION"
}

build_autoscaler() {
  local out=$CACHE/bin/nomad-autoscaler-$AUTOSCALER_VERSION
  if [ ! -x "$out" ]; then
    banner "building nomad-autoscaler $AUTOSCALER_VERSION (about 2 minutes on 2 cores)"
    local src=$CACHE/src/nomad-autoscaler-$AUTOSCALER_VERSION
    copy_module "github.com/hashicorp/nomad-autoscaler@$AUTOSCALER_VERSION" "$src"
    (cd "$src" && go build -trimpath \
      -ldflags "-X github.com/hashicorp/nomad-autoscaler/version.GitDescribe=$AUTOSCALER_VERSION" -o "$out.tmp" .)
    mv "$out.tmp" "$out"
    rm -rf "$src"
  fi
  link_tool nomad-autoscaler "$AUTOSCALER_VERSION"
}

tools_deps() {
  build_nomad
  build_consul
  build_autoscaler
}

guest_deps() {
  "$ROOT/scripts/guestkit.sh"
}

case "${1:-all}" in
  apt) apt_deps ;;
  tools) tools_deps ;;
  nomad) build_nomad ;;
  consul) build_consul ;;
  autoscaler) build_autoscaler ;;
  guest) guest_deps ;;
  all) apt_deps; tools_deps; guest_deps ;;
  *) echo "usage: $0 [apt|tools|nomad|consul|autoscaler|guest|all]" >&2; exit 2 ;;
esac
