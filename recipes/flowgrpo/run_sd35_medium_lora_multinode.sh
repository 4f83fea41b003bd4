#!/usr/bin/env bash
# FlowGRPO + LoRA on SD3.5 Medium with PickScore on a running Ray cluster of NNODES GPU nodes.
# Each node gives half its GPUs to rollout replicas (1 GPU each) and half to data-parallel training,
# as run_sd35_medium_lora.sh does on one node; prompts per step scale with the node count.
#
# 1. Start the cluster, from the project venv (`make install`) at the same path on every node:
#      head node (a GPU node; this script runs there):  . .venv/bin/activate && ray start --head --port=6379
#      every other node:                                . .venv/bin/activate && ray start --address=<head-ip>:6379
#    MODEL_PATH, PICKSCORE_PATH and PICKSCORE_PROCESSOR_PATH must exist at the same paths on every node
#    (shared filesystem or copies). PROMPTS and the run directory are used on the head node only.
# 2. On the head node:
#      NNODES=2 MODEL_PATH=/ckpt/stable-diffusion-3.5-medium PICKSCORE_PATH=/ckpt/PickScore_v1 \
#      PICKSCORE_PROCESSOR_PATH=/ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K PROMPTS=/data/pickscore/train.txt \
#      bash recipes/flowgrpo/run_sd35_medium_lora_multinode.sh [hydra overrides...]
#
# NNODES         nodes in the cluster (required)
# GPUS_PER_NODE  GPUs per node (default 8; even, split half rollout / half training)
# RAY_ADDRESS    cluster to join (default auto: the cluster this node belongs to); a GCS address such as
#                <head-ip>:6379 also works, a ray:// client address does not
# MODEL_PATH, PICKSCORE_PATH, PICKSCORE_PROCESSOR_PATH, PROMPTS, PYTHON: as in run_sd35_medium_lora.sh.
# Extra arguments are Hydra overrides and win over the ones set here.
set -euo pipefail

# shellcheck source=recipes/flowgrpo/sd35_inputs.sh
source "$(dirname "${BASH_SOURCE[0]}")/sd35_inputs.sh"

[[ "${NNODES:-}" =~ ^[1-9][0-9]*$ ]] || die "set NNODES to the number of GPU nodes in the Ray cluster (got '${NNODES:-}')"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
if ! [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || ((GPUS_PER_NODE % 2)); then
  die "GPUS_PER_NODE=$GPUS_PER_NODE must be an even number of GPUs (half rollout, half training)"
fi

# main.py calls ray.init() only with ray_kwargs.ray_init (num_cpus: null in this config), so Ray takes the
# address from RAY_ADDRESS and joins the cluster instead of starting a local one.
export RAY_ADDRESS="${RAY_ADDRESS:-auto}"
HALF=$((GPUS_PER_NODE / 2))

cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m recipes.flowgrpo.main --config-name flowgrpo_sd35_medium_lora "${SD35_OVERRIDES[@]}" \
  "trainer.nnodes=$NNODES" \
  "trainer.n_gpus_per_node=$HALF" \
  "actor_rollout_ref.rollout.nnodes=$NNODES" \
  "actor_rollout_ref.rollout.n_gpus_per_node=$HALF" \
  "data.train_batch_size=$((2 * HALF * NNODES))" \
  "actor_rollout_ref.actor.ppo_mini_batch_size=$((16 * HALF * NNODES))" \
  "trainer.experiment_name=sd35_medium_lora_pickscore_${NNODES}nodes" \
  "$@"
