#!/usr/bin/env bash
# The GPU checks of lightning-score on one CUDA machine, in under 8 minutes, ending with a summary.
#
#   bash benchmarks/gpu_check.sh             # on a machine with one GPU
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere, on the CPU, every step small: checks the script itself
#
# Steps (each under its own time limit; the merges get what is left of GPU_CHECK_SECONDS, default 460 s, so the
# whole stays under 8 minutes; raise it to measure every row when more time is available):
#   1. packages: open_clip, ftfy, jsonargparse... from the wheels in .whl/ when the machine lacks them
#      (a machine without network; prepare them with `bash benchmarks/gpu_check.sh --download-wheels`, see
#      docs/benchmarks.md); the repository itself goes on PYTHONPATH
#   2. the CUDA tests (every test with "cuda" in its name; they skip without a GPU)
#   3. a short bf16-mixed fit of a ViT-B/32 expert (random weights, synthetic images): images/s
#   4. one batch of ViT-L/14 c_fc-shaped matrices through each CUDA SVD driver
#   5. SCORE and TSV-M merge times, GPU (batched and not) vs CPU, ViT-B/32 and ViT-L/14 shapes, T = 3 and 5,
#      and the CPU-GPU agreement of SCORE with sign_convention="canonical"
# Logs and the summary go to $OUT (when set) or a temporary folder, named on the last line.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--download-wheels" ]]; then  # here, with network: the wheels the GPU machine lacks
  mkdir -p .whl   # ignored by git; the versions are those of this environment
  for name in open_clip_torch ftfy wcwidth jsonargparse docstring_parser typeshed_client; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$name==$version" \
      || exit 1
  done
  ls -la .whl
  exit 0
fi

DRY=""
[[ "${1:-}" == "--dry-run" ]] && DRY="--dry-run"
LOGS=${OUT:-$(mktemp -d -t gpu-check-XXXX)}
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS COMMAND...: run with a limit, keep the log, say how it ended
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  if [[ $rc == 124 || $rc == 137 ]]; then note "[$name] stopped at its ${limit}s limit (log: $LOGS/$name.log)"; fi
  if [[ $rc != 0 && $rc != 124 && $rc != 137 ]]; then note "[$name] failed with exit code $rc (log: $LOGS/$name.log)"; fi
  return 0
}

# 1. packages
if ! "$PY" -c "import open_clip, ftfy, jsonargparse" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { note "installing the wheels of .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    note "open_clip, ftfy or jsonargparse is missing and .whl/ has no wheels: run --download-wheels where pip works"
    exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
note "== lightning-score GPU check $(date -u +%Y-%m-%dT%H:%MZ) ${DRY:+(dry run, CPU)}"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import os, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {gpu}, CPU cores: {os.cpu_count()}")
EOF

# 2. the CUDA tests
step cuda-tests 100 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda tests/merging tests/test_analysis.py
note "[cuda-tests] $(grep -E '(passed|failed|error|skipped)' "$LOGS/cuda-tests.log" | tail -1)"

# 3. a short bf16 fit
step fit 100 "$PY" benchmarks/gpu_check.py fit $DRY --deadline 60
grep -h '^fit:' "$LOGS/fit.log" >>"$SUMMARY"

# 4. the SVD drivers
step svd 40 "$PY" benchmarks/gpu_check.py svd $DRY --deadline 25
grep -h '^svd' "$LOGS/svd.log" >>"$SUMMARY"

# 5. merges, CPU vs GPU, with what is left of the 8 minutes (the python part starts no new row after its deadline)
BUDGET=${GPU_CHECK_SECONDS:-460}
LEFT=$((BUDGET - ($(date +%s) - START)))
((LEFT < 120)) && LEFT=120
step merges "$LEFT" "$PY" benchmarks/gpu_check.py merges $DRY --deadline $((LEFT - 70))
grep -h -E '^\||^\(' "$LOGS/merges.log" >>"$SUMMARY"

echo
echo "================ summary ($(($(date +%s) - START)) s) ================"
cat "$SUMMARY"
echo "(logs: $LOGS)"
