"""The policy worker's data-parallel path on CPU: 2 ranks in a verl RayWorkerGroup (gloo all-reduce).

This is the code path multi-GPU training takes; here each rank is a CPU process.
"""

from __future__ import annotations

import pytest
import ray
import torch
from verl.protocol import DataProto
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

from recipes.flowgrpo.config_compose import compose_recipe
from verl_omni.pipelines.flow_match_sde import compute_log_prob
from verl_omni.workers.diffusion_actor import DiffusionActorWorker, load_transformer

pytestmark = pytest.mark.integration


def _batch(model_path: str, n: int = 8, steps: int = 2) -> DataProto:
    """Random stored transitions with on-policy old log-probs (recomputed by the initial transformer)."""
    transformer = load_transformer(model_path)
    cfg = transformer.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, steps, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    next_latents = latents + 0.1 * torch.randn(latents.shape, generator=gen)
    sigmas = torch.tensor([0.9, 0.6]).repeat(n, 1)
    sigmas_next = torch.tensor([0.6, 0.3]).repeat(n, 1)
    embeds = torch.randn(n, 8, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(n, cfg.pooled_projection_dim, generator=gen)
    with torch.no_grad():
        old = torch.stack(
            [
                compute_log_prob(
                    transformer, latents[:, t], next_latents[:, t], sigmas[:, t], sigmas_next[:, t], embeds, pooled
                )[0]
                for t in range(steps)
            ],
            dim=1,
        )
    advantages = torch.linspace(-1.0, 1.0, n)
    return DataProto.from_dict(
        tensors={
            "latents": latents,
            "next_latents": next_latents,
            "sigmas": sigmas,
            "sigmas_next": sigmas_next,
            "old_log_probs": old,
            "advantages": advantages,
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
        }
    )


def test_two_ranks_average_gradients_and_stay_in_sync(ray_local, tiny_model_path):
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={tiny_model_path}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    )
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1, name_prefix="dp_test")
    group = RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(DiffusionActorWorker), config=cfg),
        name_prefix="dp_test",
        device_name="cpu",
    )
    try:
        group.init_model()
        metrics = group.update_policy(_batch(tiny_model_path))
        assert len(metrics) == 2
        for rank_metrics in metrics:
            assert abs(rank_metrics["actor/ratio_first_step"] - 1.0) < 1e-5  # on-policy on each shard
        # averaged gradients -> identical updates -> bit-identical weights on both ranks
        assert metrics[0]["actor/param_norm"] == metrics[1]["actor/param_norm"]
        assert metrics[0]["actor/grad_norm"] == metrics[1]["actor/grad_norm"]
        weights = group.get_rollout_weights()
        assert weights[0] is not None and weights[1] is None  # only rank 0 ships weights to the replicas
    finally:
        for worker in group.workers:
            ray.kill(worker)
