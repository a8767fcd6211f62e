#!/usr/bin/env bash
# The README's picture of the MLflow runs page, taken the way tests/test_ui.py looks at it: a real
# `mlflow server` on 127.0.0.1 over the demo's store, rendered by headless Chromium.
# Usage: scripts/ui-screenshot.sh [STORE_URI] [OUT.png]   (run `make demo` first)
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-sqlite:///$PWD/mlflow.db}
out=${2:-docs/runs-page.png}
bin=${BIN:-$PWD/.venv/bin}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "ui-screenshot: Chromium is not installed (apt-get install chromium)" >&2; exit 1; }
[[ $store != sqlite:///* ]] || [ -f "${store#sqlite:///}" ] || { echo "ui-screenshot: no store at $store: run make demo first" >&2; exit 1; }
port=$("$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$bin/mlflow" server --host 127.0.0.1 --port "$port" \
  --workers 1 --backend-store-uri "$store" --default-artifact-root "$PWD/mlruns" >"$work/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 1
done
exp=$("$bin/python" - "$store" <<'PY'
import sys, mlflow
from soups.recipe import load_recipe
name = load_recipe("configs/demo.yaml").experiment
found = mlflow.MlflowClient(sys.argv[1]).get_experiment_by_name(name)
print(found.experiment_id if found else "0")
PY
)
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
  --virtual-time-budget=20000 --window-size=1600,900 --screenshot="$PWD/$out" \
  "http://127.0.0.1:$port/#/experiments/$exp/runs" >/dev/null 2>&1
echo "ui-screenshot: wrote $out (runs page of experiment $exp)"
