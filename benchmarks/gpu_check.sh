#!/usr/bin/env bash
# GPU check, at most 8 minutes on one GPU, nothing installed or downloaded: run it from a copy of
# the working tree that carries the project's .venv (make install).
#   1. `pytest -m gpu`: the tiny pipeline, a cpu-preset fine-tune and an end-to-end top-2 fine-tune
#      with the packaged encoders on CUDA, each compared with the same run on the CPU (tolerances in
#      tests/test_device.py), exact resume and bf16 autocast on CUDA;       (limit 330 s)
#   2. benchmarks/bench_device.py: end-to-end top-2 training sequences/s of the fused tower, CUDA
#      (bf16 and fp32) vs CPU.                                              (limit 120 s)
# Exit status: 0 when both parts pass, else the first failing part's.
#   bash benchmarks/gpu_check.sh            PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
start=$SECONDS

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY' || exit 3
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, "
      f"{torch.cuda.device_count()} device(s)")
PY

echo "== pytest -m gpu"
timeout -k 10 330 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
tests_rc=$?
echo "== pytest -m gpu: exit $tests_rc after $((SECONDS - start)) s"

echo "== end-to-end top-2 training throughput, fused tower"
timeout -k 10 120 "$PY" benchmarks/bench_device.py --batch 64 --steps 40 --cpu-steps 5
bench_rc=$?
echo "== done: tests exit $tests_rc, benchmark exit $bench_rc, $((SECONDS - start)) s in all"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
