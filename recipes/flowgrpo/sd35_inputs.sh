# shellcheck shell=bash disable=SC2034  # sourced: its variables are used by the calling script
# Shared by run_sd35_medium_lora.sh and run_sd35_medium_lora_multinode.sh (sourced, not run): checks the
# inputs both scripts take from the environment and collects them as Hydra overrides in SD35_OVERRIDES.
# die() and PYTHON are left defined for the calling script.

# shellcheck source=recipes/flowgrpo/script_helpers.sh
source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"

[[ -n "${MODEL_PATH:-}" ]] ||
  die "set MODEL_PATH to a diffusers SD3/SD3.5 pipeline directory (e.g. a local copy of stabilityai/stable-diffusion-3.5-medium)"
[[ -f "$MODEL_PATH/model_index.json" ]] ||
  die "MODEL_PATH=$MODEL_PATH has no model_index.json: not a diffusers pipeline directory"
[[ -n "${PICKSCORE_PATH:-}" ]] ||
  die "set PICKSCORE_PATH to a CLIP model directory saved with save_pretrained (e.g. yuvalkirstain/PickScore_v1)"
[[ -d "$PICKSCORE_PATH" ]] || die "PICKSCORE_PATH=$PICKSCORE_PATH is not a directory"
PICKSCORE_PROCESSOR_PATH="${PICKSCORE_PROCESSOR_PATH:-$PICKSCORE_PATH}"
[[ -d "$PICKSCORE_PROCESSOR_PATH" ]] || die "PICKSCORE_PROCESSOR_PATH=$PICKSCORE_PROCESSOR_PATH is not a directory"
[[ -n "${PROMPTS:-}" ]] ||
  die "set PROMPTS to a prompt file (.txt, .jsonl or .parquet); $ROOT/recipes/flowgrpo/data/prompts.txt is a small example"
[[ -f "$PROMPTS" ]] || die "PROMPTS=$PROMPTS is not a file"
MODEL_PATH="$(abspath "$MODEL_PATH")"
PICKSCORE_PATH="$(abspath "$PICKSCORE_PATH")"
PICKSCORE_PROCESSOR_PATH="$(abspath "$PICKSCORE_PROCESSOR_PATH")"
PROMPTS="$(abspath "$PROMPTS")"

PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "no interpreter at $PYTHON: run \`make install\` in $ROOT (or set PYTHON)"

SD35_OVERRIDES=(
  "actor_rollout_ref.model.path=$(hydra_str "$MODEL_PATH")"
  "reward.kwargs.model_path=$(hydra_str "$PICKSCORE_PATH")"
  "reward.kwargs.processor_path=$(hydra_str "$PICKSCORE_PROCESSOR_PATH")"
  "data.train_files=$(hydra_str "$PROMPTS")"
)
