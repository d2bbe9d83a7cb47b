#!/usr/bin/env bash
# benchmarks/gpu.py on a device machine, JSON to $OUT/gpu.json; XLA may use 90% of the GPU's memory.
cd "$(dirname "$0")/.." && XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" exec python benchmarks/gpu.py --out "${OUT:-benchmarks/results}/gpu.json" "$@"
