#!/usr/bin/env bash
# FlowGRPO + LoRA on Wan2.1-T2V-1.3B (text-to-video, config/model/wan2_1_t2v_1_3b.yaml: 33 frames at 240x416, the
# reference's settings) with the video_color reward (the colour reward per frame with a temporal-consistency term;
# programmatic, no reward model), on one node of 8 GPUs: 4 rollout replicas x 1 GPU + 4 training GPUs.
#
#   MODEL_PATH=/ckpt/Wan2.1-T2V-1.3B-Diffusers bash recipes/flowgrpo/run_wan_lora.sh [hydra overrides...]
#   MODEL_PATH=... ROLLOUT=vllm_omni PYTHON=/venvs/vllm-omni/bin/python bash recipes/flowgrpo/run_wan_lora.sh
#
# MODEL_PATH  a diffusers WanPipeline directory with one transformer (Wan2.1-T2V-1.3B/14B; Wan2.2-T2V-A14B's second
#             transformer is refused), e.g. a local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
# ROLLOUT     the rollout backend: diffusers (default) or vllm_omni (needs the vllm-omni extra in PYTHON's
#             environment: pip install -e ".[vllm-omni]")
# PROMPTS     optional prompt file (.txt, .jsonl or .parquet); default: the colour prompts video_color scores
# PYTHON      the interpreter (default: the repo's .venv)
# Outputs go to outputs/verl_omni_flowgrpo/wan2_1_t2v_1_3b_lora_video_color/ under the repo; rerunning resumes.
# Another reward: reward.name=... (or reward.function='package.module:function') with data.train_files=....
set -euo pipefail

# shellcheck source=recipes/flowgrpo/script_helpers.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"

[[ -n "${MODEL_PATH:-}" ]] || die "set MODEL_PATH to a diffusers WanPipeline directory (e.g. Wan2.1-T2V-1.3B-Diffusers)"
[[ -f "$MODEL_PATH/model_index.json" ]] ||
  die "MODEL_PATH=$MODEL_PATH has no model_index.json: not a diffusers pipeline directory"
grep -q '"_class_name": *"WanPipeline"' "$MODEL_PATH/model_index.json" ||
  die "MODEL_PATH=$MODEL_PATH is not a WanPipeline checkpoint (model=wan2_1_t2v_1_3b needs one)"
ROLLOUT="${ROLLOUT:-diffusers}"
case "$ROLLOUT" in
  diffusers | vllm_omni) ;;
  *) die "ROLLOUT=$ROLLOUT is not a rollout backend; valid choices: diffusers, vllm_omni" ;;
esac
if [[ -n "${PROMPTS:-}" ]]; then
  [[ -f "$PROMPTS" ]] || die "PROMPTS=$PROMPTS is not a file"
fi
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "no interpreter at $PYTHON: run \`make install\` in $ROOT (or set PYTHON)"

OVERRIDES=(
  "model=wan2_1_t2v_1_3b"
  "actor_rollout_ref.model.path=$(hydra_str "$(abspath "$MODEL_PATH")")"
  "actor_rollout_ref.rollout.name=$ROLLOUT"
)
if [[ -n "${PROMPTS:-}" ]]; then
  OVERRIDES+=("data.train_files=$(hydra_str "$(abspath "$PROMPTS")")")
fi
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m recipes.flowgrpo.main "${OVERRIDES[@]}" "$@"
