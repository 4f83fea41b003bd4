#!/usr/bin/env bash
# One of Flow-GRPO's paper tasks on SD3.5 Medium + LoRA, one node of 8 GPUs, with the reference's settings
# for that task (config/task/<task>.yaml over config/flowgrpo_sd35_medium_lora.yaml):
#
#   MODEL_PATH=/ckpt/stable-diffusion-3.5-medium PROMPTS=/data/flow_grpo/dataset/ocr/train.txt \
#   bash recipes/flowgrpo/run_sd35_medium_lora_task.sh ocr [hydra overrides...]
#
#   task        ocr        OCR reward (PP-OCRv4 on the CPU), text rendering prompts
#               geneval    a GenEval reward service at GENEVAL_URL (default http://127.0.0.1:8001), which must
#                          answer before training starts (docs/advanced_features/reward_service.md)
#               pickscore  PickScore at PICKSCORE_PATH (and PICKSCORE_PROCESSOR_PATH, default PICKSCORE_PATH)
# MODEL_PATH    diffusers SD3/SD3.5 pipeline directory (has model_index.json)
# PROMPTS       the task's training prompts: the reference repository's dataset/<task>/train.txt (OCR,
#               PickScore) or dataset/geneval/train_metadata.jsonl (GenEval)
# PYTHON        interpreter (default: the project venv made by `make install`)
# Validation uses the reference's test prompts, shipped in recipes/flowgrpo/data/flow_grpo/.
# Outputs go to outputs/verl_omni_flowgrpo/sd35_medium_lora_<task>/ under the repo; rerunning resumes.
set -euo pipefail

# shellcheck source=recipes/flowgrpo/script_helpers.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"

TASK="${1:-}"
case "$TASK" in
  ocr | geneval | pickscore) shift ;;
  *) die "the first argument names the task: ocr, geneval or pickscore (got '${TASK}')" ;;
esac

[[ -n "${MODEL_PATH:-}" ]] ||
  die "set MODEL_PATH to a diffusers SD3/SD3.5 pipeline directory (e.g. a local copy of stabilityai/stable-diffusion-3.5-medium)"
[[ -f "$MODEL_PATH/model_index.json" ]] ||
  die "MODEL_PATH=$MODEL_PATH has no model_index.json: not a diffusers pipeline directory"
[[ -n "${PROMPTS:-}" ]] || die "set PROMPTS to the task's training prompts (the reference's dataset/$TASK/...)"
[[ -f "$PROMPTS" ]] || die "PROMPTS=$PROMPTS is not a file"

OVERRIDES=(
  "task=$TASK"
  "actor_rollout_ref.model.path=$(hydra_str "$(abspath "$MODEL_PATH")")"
  "data.train_files=$(hydra_str "$(abspath "$PROMPTS")")"
)
if [[ "$TASK" == pickscore ]]; then
  [[ -d "${PICKSCORE_PATH:-}" ]] ||
    die "set PICKSCORE_PATH to a CLIP model directory saved with save_pretrained (e.g. yuvalkirstain/PickScore_v1)"
  PICKSCORE_PROCESSOR_PATH="${PICKSCORE_PROCESSOR_PATH:-$PICKSCORE_PATH}"
  [[ -d "$PICKSCORE_PROCESSOR_PATH" ]] || die "PICKSCORE_PROCESSOR_PATH=$PICKSCORE_PROCESSOR_PATH is not a directory"
  OVERRIDES+=(
    "reward.kwargs.model_path=$(hydra_str "$(abspath "$PICKSCORE_PATH")")"
    "reward.kwargs.processor_path=$(hydra_str "$(abspath "$PICKSCORE_PROCESSOR_PATH")")"
  )
fi
if [[ "$TASK" == geneval ]]; then
  OVERRIDES+=("reward.kwargs.url=$(hydra_str "${GENEVAL_URL:-http://127.0.0.1:8001}")")
fi

PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "no interpreter at $PYTHON: run \`make install\` in $ROOT (or set PYTHON)"

cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m recipes.flowgrpo.main --config-name flowgrpo_sd35_medium_lora "${OVERRIDES[@]}" "$@"
