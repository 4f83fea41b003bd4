#!/usr/bin/env bash
# GPU smoke test of the FlowGRPO recipe: 2 training steps of the tiny model, 2 rollout replicas sharing one GPU
# (0.25 Ray GPU each), then the run's metrics. One command on a fresh machine with a GPU:
#
#   bash tests/gpu_smoke/run.sh [extra hydra overrides]
#
# Where `nvidia-smi -L` lists no GPU it prints a skip message and exits 0, before installing anything.
# SMOKE_TIMEOUT (s, default 900) bounds the run, SMOKE_INSTALL_TIMEOUT (s, default 1800) `make install`;
# SMOKE_RUN_DIR sets the run directory (default outputs/gpu_smoke/<time>).
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]'; then
  echo "SKIP gpu_smoke: no GPU found (nvidia-smi -L lists none)"
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

# The same venv as every other target: `make install` picks the CUDA build of torch when it sees a GPU.
timeout "${SMOKE_INSTALL_TIMEOUT:-1800}" make install
PY="$ROOT/.venv/bin/python"

# Exactly one GPU, whatever the machine has, so the replicas (and the trainer) really share it.
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
RUN_DIR="${SMOKE_RUN_DIR:-$ROOT/outputs/gpu_smoke/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RUN_DIR"

# Which processes hold GPU memory during the run: 2 replicas, plus the trainer when it landed on the GPU.
GPU_LOG="$RUN_DIR/gpu_processes.csv"
(
  while :; do
    nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null || true
    sleep 5
  done
) >"$GPU_LOG" &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT

# trainer.n_gpus_per_node=0: main.py gives the trainer a whole-GPU Ray bundle otherwise, leaving nothing for the
# replicas on a single GPU. With no Ray GPU, Ray leaves CUDA_VISIBLE_DEVICES as inherited, so the training
# worker still finds the GPU and trains there, outside Ray's GPU accounting.
# dtype=float32: the trainer recomputes log-probs in fp32, so the first inner step stays on-policy (ratio 1
# to rounding; the checker prints actor/ratio_max_abs_dev).
status=0
timeout --kill-after=30 "${SMOKE_TIMEOUT:-900}" "$PY" -m recipes.flowgrpo.main \
  trainer.total_training_steps=2 \
  trainer.experiment_name=gpu_smoke \
  "trainer.default_local_dir=$RUN_DIR" \
  trainer.resume_mode=disable \
  trainer.save_freq=2 \
  trainer.sample_freq=1 \
  trainer.n_gpus_per_node=0 \
  actor_rollout_ref.rollout.n_gpus_per_node=2 \
  actor_rollout_ref.rollout.diffusion.device=cuda \
  actor_rollout_ref.rollout.diffusion.num_gpus_per_replica=0.25 \
  actor_rollout_ref.rollout.diffusion.dtype=float32 \
  "$@" || status=$?
if ((status == 124 || status == 137)); then
  echo "FAIL gpu_smoke: the run did not finish within ${SMOKE_TIMEOUT:-900} s" >&2
  exit "$status"
elif ((status != 0)); then
  echo "FAIL gpu_smoke: the recipe exited with status $status" >&2
  exit "$status"
fi

METRICS="$RUN_DIR/metrics.jsonl"
[[ -s "$METRICS" ]] || {
  echo "FAIL gpu_smoke: no metrics at $METRICS" >&2
  exit 1
}
echo "== $METRICS (tail)"
tail -n 2 "$METRICS"
"$PY" - "$METRICS" "$GPU_LOG" <<'EOF'
import json
import math
import sys

logged = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
# training steps; the validation after the last step logs a line of its own
rows = [row for row in logged if "reward/mean" in row["data"]]
if len(rows) != 2:
    sys.exit(f"FAIL gpu_smoke: expected 2 logged training steps, found {len(rows)}")
for row in rows:
    reward = row["data"].get("reward/mean")
    if reward is None or not math.isfinite(reward):
        sys.exit(f"FAIL gpu_smoke: step {row['step']} has reward/mean={reward!r}")
print("== last step")
for key, value in sorted(rows[-1]["data"].items()):
    print(f"{key:48s} {value:.6g}" if isinstance(value, (int, float)) else f"{key:48s} {value}")
for row in logged:
    if "val/reward/mean" in row["data"]:
        print(f"== validation at step {row['step']}: val/reward/mean {row['data']['val/reward/mean']:.6g}")
# On GPU the recomputed log-prob equals the stored one only to rounding (not claimed bit-exact): report how far.
for row in rows:
    dev = row["data"].get("actor/ratio_max_abs_dev")
    if dev is not None:
        print(f"== step {row['step']}: actor/ratio_max_abs_dev {dev:.3g} (max |ratio - 1| before the first update)")
        if dev > 1e-2:
            print(f"WARNING: actor/ratio_max_abs_dev={dev:.3g}: rollout and trainer log-probs disagree")
pids = {line.split(",")[0].strip() for line in open(sys.argv[2]) if line.strip()}
print(f"== processes seen on the GPU: {len(pids)} (2 replicas, 3 with the trainer; 0 where PIDs are namespaced)")
EOF
echo "PASS gpu_smoke: 2 steps on $(nvidia-smi -L | head -n 1); run dir $RUN_DIR"
