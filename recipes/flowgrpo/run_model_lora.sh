#!/usr/bin/env bash
# FlowGRPO + LoRA on a real checkpoint of another model family (config/model/<model>.yaml) with the PickScore
# reward, on one node of 8 GPUs: 4 rollout replicas x 1 GPU + 4 training GPUs.
#
#   MODEL_PATH=/ckpt/FLUX.1-dev \
#   PICKSCORE_PATH=/ckpt/PickScore_v1 \
#   PICKSCORE_PROCESSOR_PATH=/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K \
#   PROMPTS=/data/pickscore/train.txt \
#   bash recipes/flowgrpo/run_model_lora.sh flux_dev [hydra overrides...]
#
# MODEL           first argument: flux_dev (a FluxPipeline checkpoint) or qwen_image (a QwenImagePipeline one)
# MODEL_PATH      that family's diffusers pipeline directory (has model_index.json)
# PICKSCORE_PATH, PICKSCORE_PROCESSOR_PATH, PROMPTS, PYTHON: as for run_sd35_medium_lora.sh.
# Outputs go to outputs/verl_omni_flowgrpo/<model>_lora_pickscore/ under the repo; rerunning resumes.
# SD3.5 Medium has its own config and script (run_sd35_medium_lora.sh).
set -euo pipefail

# shellcheck source=recipes/flowgrpo/script_helpers.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"

MODEL="${1:-}"
case "$MODEL" in
  flux_dev) PIPELINE=FluxPipeline ;;
  qwen_image) PIPELINE=QwenImagePipeline ;;
  *) die "first argument: the model config, one of flux_dev, qwen_image (got '${MODEL}')" ;;
esac
shift

[[ -n "${MODEL_PATH:-}" ]] || die "set MODEL_PATH to a diffusers $PIPELINE directory"
[[ -f "$MODEL_PATH/model_index.json" ]] ||
  die "MODEL_PATH=$MODEL_PATH has no model_index.json: not a diffusers pipeline directory"
grep -q "\"_class_name\": *\"$PIPELINE\"" "$MODEL_PATH/model_index.json" ||
  die "MODEL_PATH=$MODEL_PATH is not a $PIPELINE checkpoint (model=$MODEL needs one)"
[[ -n "${PICKSCORE_PATH:-}" ]] ||
  die "set PICKSCORE_PATH to a CLIP model directory saved with save_pretrained (e.g. yuvalkirstain/PickScore_v1)"
[[ -d "$PICKSCORE_PATH" ]] || die "PICKSCORE_PATH=$PICKSCORE_PATH is not a directory"
PICKSCORE_PROCESSOR_PATH="${PICKSCORE_PROCESSOR_PATH:-$PICKSCORE_PATH}"
[[ -d "$PICKSCORE_PROCESSOR_PATH" ]] || die "PICKSCORE_PROCESSOR_PATH=$PICKSCORE_PROCESSOR_PATH is not a directory"
[[ -n "${PROMPTS:-}" ]] || die "set PROMPTS to a prompt file (.txt, .jsonl or .parquet)"
[[ -f "$PROMPTS" ]] || die "PROMPTS=$PROMPTS is not a file"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "no interpreter at $PYTHON: run \`make install\` in $ROOT (or set PYTHON)"

OVERRIDES=(
  "model=$MODEL"
  "actor_rollout_ref.model.path=$(hydra_str "$(abspath "$MODEL_PATH")")"
  "reward.kwargs.model_path=$(hydra_str "$(abspath "$PICKSCORE_PATH")")"
  "reward.kwargs.processor_path=$(hydra_str "$(abspath "$PICKSCORE_PROCESSOR_PATH")")"
  "data.train_files=$(hydra_str "$(abspath "$PROMPTS")")"
)
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m recipes.flowgrpo.main "${OVERRIDES[@]}" "$@"
