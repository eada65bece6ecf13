#!/usr/bin/env bash
# dev.sh up|down: the single-machine deskcloud of `make dev` (state in .dev/).
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./scripts/devctl "$@"
