"""``VllmOmniRolloutReplica``: verl rollout replica whose server is a :class:`VllmOmniRolloutServer` actor.

Registered in verl's ``RolloutReplicaRegistry`` as ``vllm_omni`` when ``verl_omni`` is imported, beside
``diffusers``; ``actor_rollout_ref.rollout.name=vllm_omni`` selects it. It launches like the diffusers replica
(one server actor per replica, ``diffusion.num_gpus_per_replica`` GPUs) but only on GPUs.
"""

from __future__ import annotations

from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX
from verl_omni.workers.rollout.diffusers_replica import DiffusersRolloutReplica
from verl_omni.workers.rollout.vllm_omni_server import BACKEND, VllmOmniRolloutServer


class VllmOmniRolloutReplica(DiffusersRolloutReplica):
    """One vllm-omni rollout server (a Ray actor holding ``AsyncOmni``) per replica."""

    backend = BACKEND
    server_class = VllmOmniRolloutServer
    address_prefix = "vllm-omni-replica"

    def placement(self) -> tuple[str, float]:
        """Always ``cuda``: ``diffusion.device=cpu`` or a Ray cluster without GPUs is an error naming the key."""
        import ray

        cfg = self.diffusion_config
        if cfg.device == "cpu":
            raise ValueError(
                f"{DIFFUSION_CONFIG_PREFIX}.device='cpu' but actor_rollout_ref.rollout.name='vllm_omni' runs on CUDA "
                "GPUs only; valid choices: auto, cuda (or rollout.name=diffusers on CPU)"
            )
        if not ray.is_initialized() or float(ray.cluster_resources().get("GPU", 0)) <= 0:
            raise ValueError("actor_rollout_ref.rollout.name='vllm_omni' needs GPUs, but the Ray cluster has none")
        return "cuda", float(cfg.num_gpus_per_replica)
