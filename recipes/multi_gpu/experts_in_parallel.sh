#!/usr/bin/env bash
# Train all experts of a study at once, one per GPU: each domain's fit is an independent process pinned
# to one GPU with CUDA_VISIBLE_DEVICES. Usage:
#
#   recipes/multi_gpu/experts_in_parallel.sh recipes/pacs/vit_b32_expert.yaml art_painting cartoon photo sketch
#
# Extra arguments for every fit go in FIT_ARGS, e.g. FIT_ARGS="--data.root /data/PACS".
# The task vectors land in the recipe's <default_root_dir>/task_vectors (one file per domain), ready for merge.
set -euo pipefail
recipe=$1; shift
gpus=$(nvidia-smi --list-gpus | wc -l)
i=0
failed=0
pids=()
for domain in "$@"; do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) lightning-score fit --config "$recipe" --data.train_domains "[$domain]" \
    --trainer.devices 1 ${FIT_ARGS:-} > "fit-$domain.log" 2>&1 &
  pids+=("$!")
  i=$((i + 1))
  if (( i % gpus == 0 )); then   # more domains than GPUs: the next wave starts when this whole wave is done
    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    pids=()
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
if (( failed )); then echo "$failed expert fit(s) failed: see fit-<domain>.log" >&2; exit 1; fi
echo "experts trained: $*"
