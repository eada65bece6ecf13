#!/usr/bin/env bash
# bench.sh runs every benchmark side by side with its baseline, in one run, and prints medians
# and ratios. Figures go into docs/performance.md by hand, with the machine they came from.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.deps/bin:$PATH

echo "==> machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}')"

echo "==> cold start: deskvm vs Nomad's qemu driver vs bare QEMU"
go run ./scripts/coldstart -runs "${BENCH_RUNS:-5}"

echo "==> owner slowdown through a real Nomad: deskvm vs Nomad's qemu driver vs plain QEMU at nice 19"
go run ./scripts/slowdown -runs "${BENCH_RUNS:-5}"

echo "==> yield layers on a real VM: owner slowdown, CPU cap and balloon reaction, free page reporting, harvest, checkpoint"
go test -run '^$' -bench . -benchtime 1x -timeout 20m ./driver/vm/

echo "==> owner sensing, yield decisions and forecasts (Go benchmarks)"
go test -run '^$' -bench . -benchmem -count 1 ./internal/owner/ ./internal/yield/ ./predictor/...

echo "==> fleet simulator, HTCondor's policy beside the forecast policy: the library trace's test year and 10,000 synthetic desktops for four weeks (target: each under 60 s)"
go test -run '^$' -bench . -benchtime 1x -timeout 20m ./internal/harvest/
