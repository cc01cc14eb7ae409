#!/usr/bin/env bash
# bench.sh [--quick]: relay's benchmarks on loopback, with bounded sizes,
# every process stopped at the end. Prints a table, writes
# bench-results.json and updates docs/BENCHMARKS.md (not with --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x bin/relayctl ] || make build
go build -o bin/loadgen ./scripts/loadgen
if [ "${1:-}" = "--quick" ]; then
	exec bin/loadgen bench -relay bin/relayctl -quick
fi
exec bin/loadgen bench -relay bin/relayctl -out docs/BENCHMARKS.md
