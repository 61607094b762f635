#!/usr/bin/env bash
# Runs the kernel and train-step benchmarks, keeps their JSON under benchmarks/results/ and prints
# the Markdown tables of BENCHMARKS.md. Run it on an otherwise idle machine: the figures are
# medians of interleaved samples, but a busy neighbour still slows parallel code unevenly.
#   benchmarks/run.sh                 # the default sizes (2^16 .. 2^26): a few minutes
#   benchmarks/run.sh --sizes 20 24   # extra arguments go to `dropkit bench kernels`
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
"$BIN/dropkit" bench kernels "$@" --out benchmarks/results/kernels.json > /dev/null
"$BIN/dropkit" bench step --out benchmarks/results/step.json > /dev/null
"$BIN/python" benchmarks/summarize.py benchmarks/results/kernels.json benchmarks/results/step.json
