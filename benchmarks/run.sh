#!/usr/bin/env bash
# Runs the kernel and train-step benchmarks, keeps their JSON under benchmarks/results/ and rewrites
# the tables of BENCHMARKS.md from it. Run it on an otherwise idle machine: the figures are medians
# of interleaved samples, but a busy neighbour still slows parallel code unevenly.
#   benchmarks/run.sh                 # the default sizes (2^16 .. 2^26): a few minutes
#   benchmarks/run.sh --sizes 20 24   # extra arguments go to `dropkit bench kernels`
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
"$BIN/dropkit" bench kernels "$@" --out benchmarks/results/kernels_cpu.json > /dev/null
"$BIN/dropkit" bench step --out benchmarks/results/step_mlp_cpu.json > /dev/null
"$BIN/python" benchmarks/summarize.py --stamp benchmarks/results/kernels_cpu.json benchmarks/results/step_mlp_cpu.json
