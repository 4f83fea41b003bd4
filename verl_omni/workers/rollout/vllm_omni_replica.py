"""``VllmOmniRolloutReplica``: verl rollout replica whose server is a :class:`VllmOmniRolloutServer` actor.

Registered in verl's ``RolloutReplicaRegistry`` as ``vllm_omni`` when ``verl_omni`` is imported, beside
``diffusers``; ``actor_rollout_ref.rollout.name=vllm_omni`` selects it. It launches and places its server like the
diffusers replica (one server actor per replica: ``diffusion.num_gpus_per_replica`` GPUs on a GPU cluster, CPU
resources otherwise, where the server runs vllm-omni on vLLM's CPU build).
"""

from __future__ import annotations

from verl_omni.workers.rollout.replica_base import DiffusionRolloutReplica
from verl_omni.workers.rollout.vllm_omni_server import BACKEND, VllmOmniRolloutServer


class VllmOmniRolloutReplica(DiffusionRolloutReplica):
    """One vllm-omni rollout server (a Ray actor holding ``AsyncOmni``) per replica."""

    backend = BACKEND
    server_class = VllmOmniRolloutServer
    address_prefix = "vllm-omni-replica"
