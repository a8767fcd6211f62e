#!/usr/bin/env bash
# The whole pipeline on a CUDA GPU in about two minutes: start, two 1-epoch fine-tunes (a third on
# 2 GPUs with DDP where 2 exist), evaluate,
# every soup method with BatchNorm recalibrated, infer with an ensemble beside the soup, all with
# bf16 autocast (on by itself on CUDA). Exits non-zero on the first failure. Run it first wherever a
# GPU is available:  bash scripts/cuda-smoke.sh
# DATA=<folder with the Fashion-MNIST IDX files> (default: Debian's; else small generated ones).
# SOUPS_SMOKE_ALLOW_CPU=1 runs it without a GPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
work=$(mktemp -d /tmp/soups-cuda-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" SOUPS_CACHE="$work/cache"
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true

"$PY" - <<'EOF'
import os, sys, torch
if not torch.cuda.is_available() and not os.environ.get("SOUPS_SMOKE_ALLOW_CPU"):
    sys.exit("cuda-smoke: torch sees no CUDA device (set SOUPS_SMOKE_ALLOW_CPU=1 to run it on the CPU)")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print(f"cuda-smoke on {name}, torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)")
EOF

DATA=${DATA:-/usr/share/datasets/fashion-mnist}
if [ ! -s "$DATA/t10k-labels-idx1-ubyte.gz" ]; then
  DATA="$work/fmnist"
  "$PY" -c "from tests.conftest import make_fashion_mnist; from pathlib import Path; make_fashion_mnist(Path('$DATA'), 2000, 500)"
fi
P=(--recipe configs/demo.yaml --data "$DATA" --max_train 1000 --max_val 300 --max_test 1000 --workers 2)
"$PY" -c "from soups.tracking import configure; configure()"
"$PY" entrypoints/start.py "${P[@]}" --start_epochs 1
for i in 0 1; do "$PY" entrypoints/finetune.py "${P[@]}" --i "$i" --epochs 1 --start auto; done
# Wherever 2 GPUs exist: member 2 data-parallel on both (torchrun, NCCL, synchronised BatchNorm),
# one MLflow run that the soup then takes like any other. NCCL refuses two ranks on one GPU
# ("Duplicate GPU detected"), so finishing proves each rank took its own; one progress bar, rank 0's.
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$PY" entrypoints/finetune.py "${P[@]}" --i 2 --epochs 1 --start auto --nproc 2 --sync_bn true \
    2> "$work/ddp.err" || { cat "$work/ddp.err" >&2; exit 1; }
  bars=$(grep -o "epoch 1/1:   0%" "$work/ddp.err" | wc -l || true)
  [ "$bars" -eq 1 ] || { echo "cuda-smoke: $bars progress bars for 2 ranks (want rank 0's alone)"; exit 1; }
  echo "cuda-smoke: 2-GPU data-parallel fine-tune passed (one run, one progress bar)"
fi
"$PY" entrypoints/evaluate.py --recipe configs/demo.yaml --data "$DATA"
"$PY" entrypoints/greedy_soup.py --recipe configs/demo.yaml --data "$DATA" --compare all --bn_recalibrate on \
  --learned_epochs 1 | tee "$work/soup.txt"
"$PY" entrypoints/infer.py --recipe configs/demo.yaml --data "$DATA" --max_test 1000 --ensemble top:2 \
  --output "$work/predictions.csv"
"$PY" - "$work/predictions.csv" <<'EOF'
import sys, pandas as pd
frame = pd.read_csv(sys.argv[1])
assert len(frame) == 1000 and (frame.label >= 0).all(), frame.head()
print(f"cuda-smoke: passed ({len(frame)} predictions)")
EOF
