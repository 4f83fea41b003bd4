#!/usr/bin/env bash
# GPU smoke test of the FlowGRPO recipe on one GPU: 2 training steps with each rollout backend (diffusers, then
# vllm_omni), then each run's metrics, images/s and the first step's actor/ratio_max_abs_dev. One command on a
# fresh machine with a GPU:
#
#   [SMOKE_MODEL_PATH=/ckpt/stable-diffusion-3.5-medium] bash tests/gpu_smoke/run.sh [extra hydra overrides]
#
# Without SMOKE_MODEL_PATH: the tiny model, 2 replicas sharing the GPU (0.25 Ray GPU each). With it (a diffusers
# SD3/SD3.5 directory): that checkpoint with a LoRA adapter at 512x512, 1 replica (0.5 Ray GPU).
# SMOKE_BACKENDS (default "diffusers vllm_omni") picks the backends; vllm_omni installs the extra first
# (`pip install -e .[vllm-omni]`). Where `nvidia-smi -L` lists no GPU it prints a skip message and exits 0, before
# installing anything. SMOKE_TIMEOUT (s, default 900) bounds each run, SMOKE_INSTALL_TIMEOUT (s, default 1800) each
# install; SMOKE_RUN_DIR sets the run directory (default outputs/gpu_smoke/<time>, one subdirectory per backend).
# Then one more diffusers run at the SD3.5 config's precision (bf16 sampling, bf16-mixed training, LoRA r=32, CFG 4.5,
# clip_ratio 1e-4, batch-invariant chunks of 4; SMOKE_PRECISION=0 skips it): its first inner step, before any
# update, must clip at most 1% of its rows (actor/clip_frac_first), and actor/ratio_max_abs_dev is printed.
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
SMOKE_DIR="${SMOKE_RUN_DIR:-$ROOT/outputs/gpu_smoke/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$SMOKE_DIR"
read -r -a BACKENDS <<<"${SMOKE_BACKENDS:-diffusers vllm_omni}"

# Which processes hold GPU memory during the runs: the replicas, plus the trainer when it landed on the GPU.
GPU_LOG="$SMOKE_DIR/gpu_processes.csv"
(
  while :; do
    nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null || true
    sleep 5
  done
) >"$GPU_LOG" &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null || true' EXIT

# Placement: the tiny model with 2 replicas at 0.25 GPU; a real checkpoint with 1 replica at 0.5 GPU and LoRA.
if [[ -n "${SMOKE_MODEL_PATH:-}" ]]; then
  [[ -f "$SMOKE_MODEL_PATH/model_index.json" ]] || {
    echo "FAIL gpu_smoke: SMOKE_MODEL_PATH=$SMOKE_MODEL_PATH has no model_index.json" >&2
    exit 2
  }
  MODEL_OVERRIDES=(
    "actor_rollout_ref.model.path=$SMOKE_MODEL_PATH"
    actor_rollout_ref.model.lora_rank=32
    actor_rollout_ref.model.lora_alpha=64
    actor_rollout_ref.rollout.diffusion.height=512
    actor_rollout_ref.rollout.diffusion.width=512
    actor_rollout_ref.rollout.n_gpus_per_node=1
    actor_rollout_ref.rollout.diffusion.num_gpus_per_replica=0.5
  )
else
  MODEL_OVERRIDES=(
    actor_rollout_ref.rollout.n_gpus_per_node=2
    actor_rollout_ref.rollout.diffusion.num_gpus_per_replica=0.25
  )
fi
EXTRA_OVERRIDES=("$@")

# trainer.n_gpus_per_node=0: main.py gives the trainer a whole-GPU Ray bundle otherwise, leaving nothing for the
# replicas on a single GPU. With no Ray GPU, Ray leaves CUDA_VISIBLE_DEVICES as inherited, so the training
# worker still finds the GPU and trains there, outside Ray's GPU accounting.
# dtype=float32 (SMOKE_DTYPE): the trainer recomputes log-probs in fp32, so the first inner step stays on-policy
# (ratio 1 to rounding; the checker prints actor/ratio_max_abs_dev).
run_backend() {
  local backend="$1"
  local label="${2:-$1}"  # the run's name (a subdirectory); more arguments: overrides of this run only
  shift $(($# > 1 ? 2 : 1))
  local run_overrides=("$@")
  local max_clip_first="${MAX_CLIP_FIRST:-}"
  local run_dir="$SMOKE_DIR/$label"
  local status=0
  mkdir -p "$run_dir"
  if [[ "$backend" == vllm_omni ]]; then
    timeout "${SMOKE_INSTALL_TIMEOUT:-1800}" "$PY" -m pip install -q -e ".[vllm-omni]" || {
      echo "FAIL gpu_smoke[$backend]: pip install -e .[vllm-omni] failed" >&2
      return 1
    }
  fi
  timeout --kill-after=30 "${SMOKE_TIMEOUT:-900}" "$PY" -m recipes.flowgrpo.main \
    "actor_rollout_ref.rollout.name=$backend" \
    trainer.total_training_steps=2 \
    "trainer.experiment_name=gpu_smoke_$backend" \
    "trainer.default_local_dir=$run_dir" \
    trainer.resume_mode=disable \
    trainer.save_freq=2 \
    trainer.sample_freq=1 \
    trainer.n_gpus_per_node=0 \
    actor_rollout_ref.rollout.diffusion.device=cuda \
    "actor_rollout_ref.rollout.diffusion.dtype=${SMOKE_DTYPE:-float32}" \
    "${MODEL_OVERRIDES[@]}" \
    ${run_overrides[@]+"${run_overrides[@]}"} \
    ${EXTRA_OVERRIDES[@]+"${EXTRA_OVERRIDES[@]}"} || status=$?
  if ((status == 124 || status == 137)); then
    echo "FAIL gpu_smoke[$backend]: the run did not finish within ${SMOKE_TIMEOUT:-900} s" >&2
    return "$status"
  elif ((status != 0)); then
    echo "FAIL gpu_smoke[$backend]: the recipe exited with status $status" >&2
    return "$status"
  fi
  local metrics="$run_dir/metrics.jsonl"
  [[ -s "$metrics" ]] || {
    echo "FAIL gpu_smoke[$backend]: no metrics at $metrics" >&2
    return 1
  }
  echo "== [$backend] $metrics (tail)"
  tail -n 2 "$metrics"
  "$PY" - "$label" "$metrics" "$run_dir/config.yaml" $max_clip_first <<'PYEOF'
import json
import math
import sys

from omegaconf import OmegaConf

backend, metrics, config = sys.argv[1:4]
max_clip_first = float(sys.argv[4]) if len(sys.argv) > 4 else None
logged = [json.loads(line) for line in open(metrics) if line.strip()]
# training steps; the validation after the last step logs a line of its own
rows = [row for row in logged if "reward/mean" in row["data"]]
if len(rows) != 2:
    sys.exit(f"FAIL gpu_smoke[{backend}]: expected 2 logged training steps, found {len(rows)}")
for row in rows:
    reward = row["data"].get("reward/mean")
    if reward is None or not math.isfinite(reward):
        sys.exit(f"FAIL gpu_smoke[{backend}]: step {row['step']} has reward/mean={reward!r}")
print(f"== [{backend}] last step")
for key, value in sorted(rows[-1]["data"].items()):
    print(f"{key:48s} {value:.6g}" if isinstance(value, (int, float)) else f"{key:48s} {value}")
for row in logged:
    if "val/reward/mean" in row["data"]:
        print(f"== [{backend}] validation at step {row['step']}: val/reward/mean {row['data']['val/reward/mean']:.6g}")
cfg = OmegaConf.load(config)
images = int(cfg.data.train_batch_size) * int(cfg.actor_rollout_ref.rollout.n)
# step 1 includes warm-up (first allocations, compilation): both steps are printed, compare the second
for row in rows:
    seconds = row["data"].get("timing_s/rollout") or float("nan")
    print(f"== [{backend}] step {row['step']}: {images} images in {seconds:.3g} s of rollout = {images / seconds:.3g} images/s")
# On GPU the recomputed log-prob equals the stored one only to rounding (not claimed bit-exact): report how far.
dev = rows[0]["data"].get("actor/ratio_max_abs_dev")
if dev is None:
    print(f"== [{backend}] first step: actor/ratio_max_abs_dev not logged")
else:
    print(f"== [{backend}] first step: actor/ratio_max_abs_dev {dev:.3g} (max |ratio - 1| before the first update)")
    if dev > 1e-2:
        print(f"WARNING [{backend}]: actor/ratio_max_abs_dev={dev:.3g}: rollout and trainer log-probs disagree")
clip_first = rows[0]["data"].get("actor/clip_frac_first")
if clip_first is not None:
    clip = OmegaConf.select(OmegaConf.load(config), "actor_rollout_ref.actor.clip_ratio")
    print(f"== [{backend}] first step: actor/clip_frac_first {clip_first:.3g} at clip_ratio {clip:g}")
    if max_clip_first is not None and clip_first > max_clip_first:
        sys.exit(
            f"FAIL gpu_smoke[{backend}]: the first inner step clipped {clip_first:.1%} of its rows before any update "
            f"(> {max_clip_first:.0%}): the rollout's and the trainer's log-probs disagree on this device; rerun with "
            "actor_rollout_ref.actor.recompute_old_log_prob=true to train on-policy anyway"
        )
PYEOF
}

failed=()
for backend in "${BACKENDS[@]}"; do
  echo "== gpu_smoke: backend $backend"
  run_backend "$backend" || failed+=("$backend")
done
if [[ "${SMOKE_PRECISION:-1}" != 0 ]]; then
  # The SD3.5 config's precision, LoRA, CFG, clip range and chunking on this device (tiny model unless
  # SMOKE_MODEL_PATH): bf16 sampling and bf16-mixed training must agree before the first update.
  echo "== gpu_smoke: diffusers at the SD3.5 precision (bf16 rollout + bf16 training)"
  MAX_CLIP_FIRST=0.01 run_backend diffusers diffusers_bf16 \
    actor_rollout_ref.rollout.diffusion.dtype=bfloat16 \
    actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bfloat16 \
    actor_rollout_ref.model.lora_rank=32 \
    actor_rollout_ref.model.lora_alpha=64 \
    actor_rollout_ref.rollout.diffusion.guidance_scale=4.5 \
    actor_rollout_ref.rollout.diffusion.num_inference_steps=10 \
    actor_rollout_ref.rollout.diffusion.chunk_size=4 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.clip_ratio=1e-4 || failed+=("diffusers_bf16")
fi
"$PY" - "$GPU_LOG" <<'PYEOF'
import sys

pids = {line.split(",")[0].strip() for line in open(sys.argv[1]) if line.strip()}
print(f"== processes seen on the GPU: {len(pids)} (replicas, plus the trainer; 0 where PIDs are namespaced)")
PYEOF
if ((${#failed[@]})); then
  echo "FAIL gpu_smoke: ${failed[*]} failed (see above); run dir $SMOKE_DIR" >&2
  exit 1
fi
echo "PASS gpu_smoke: 2 steps with each of ${BACKENDS[*]} on $(nvidia-smi -L | head -n 1); run dir $SMOKE_DIR"
