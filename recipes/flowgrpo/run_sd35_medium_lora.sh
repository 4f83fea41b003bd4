#!/usr/bin/env bash
# FlowGRPO + LoRA on SD3.5 Medium with the PickScore reward, on one node of 8 GPUs:
# 4 rollout replicas x 1 GPU + 4 training GPUs (config/flowgrpo_sd35_medium_lora.yaml).
#
#   MODEL_PATH=/ckpt/stable-diffusion-3.5-medium \
#   PICKSCORE_PATH=/ckpt/PickScore_v1 \
#   PICKSCORE_PROCESSOR_PATH=/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K \
#   PROMPTS=/data/pickscore/train.txt \
#   bash recipes/flowgrpo/run_sd35_medium_lora.sh [hydra overrides...]
#
# MODEL_PATH      diffusers SD3/SD3.5 pipeline directory (has model_index.json)
# PICKSCORE_PATH  CLIP model directory saved with save_pretrained (PickScore_v1)
# PICKSCORE_PROCESSOR_PATH  its CLIPProcessor directory (optional; default PICKSCORE_PATH)
# PROMPTS         prompt file: .txt (one per line), .jsonl or .parquet (field `prompt`)
# PYTHON          interpreter (default: the project venv made by `make install`)
# Extra arguments are Hydra overrides, e.g. trainer.total_training_steps=100 server_routing.policy=least_inflight.
# Outputs go to outputs/verl_omni_flowgrpo/sd35_medium_lora_pickscore/ under the repo; rerunning resumes.
set -euo pipefail

# shellcheck source=recipes/flowgrpo/sd35_inputs.sh
source "$(dirname "${BASH_SOURCE[0]}")/sd35_inputs.sh"

cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m recipes.flowgrpo.main --config-name flowgrpo_sd35_medium_lora "${SD35_OVERRIDES[@]}" "$@"
