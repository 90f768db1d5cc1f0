#!/usr/bin/env bash
# Build the reference leaderboard (sweep -> results/reference/leaderboard.md -> results/figures/).
# Arguments go to benchmarks/make_reference_results.py, e.g. --executor submitit or ratios=[0.4].
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SVDBENCH_DATA:?set SVDBENCH_DATA to the offline data pack (e.g. ../shared/data)}"
exec "${PYTHON:-python}" -m benchmarks.make_reference_results "$@"
