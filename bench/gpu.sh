#!/usr/bin/env bash
# GPU benchmark: the chunked KD loss against the naive path, cache generation against the teacher
# forward, distill-step throughput and MFU of a ~600M student, and a 2-trial study; one table.
#
#   bash bench/gpu.sh               # on one GPU; at most 8 minutes
#   bash bench/gpu.sh --cpu-smoke   # every part at tiny sizes on the CPU (meant to take under 2 minutes)
#
# It installs nothing: run it from a checkout where `make install` ran (with a CUDA build of
# torch on a GPU machine: TORCH_SPEC= make install after installing it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Each part has its own limit inside bench/gpu.py (450 s in all); this is the hard stop.
exec timeout --kill-after=10 480 "$PY" bench/gpu.py "$@"
