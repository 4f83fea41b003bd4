"""The policy worker's sharded data-parallel path on CPU: FSDP2 over 2 ranks in a verl RayWorkerGroup (gloo).

This is the code path multi-GPU training takes (there with NCCL); here each rank is a CPU process.
"""

from __future__ import annotations

import pytest
import ray
import torch
from verl.protocol import DataProto
from verl.single_controller.ray import RayResourcePool, RayWorkerGroup

from recipes.flowgrpo.config_compose import compose_recipe, training_sections
from verl_omni.pipelines.sd3.sampling import compute_log_prob
from verl_omni.protocol import CONDITIONING, CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX, expand
from verl_omni.workers.diffusion_actor import actor_worker_group, load_transformer

pytestmark = pytest.mark.integration


def _batch(model_path: str, n: int = 8, steps: int = 2) -> DataProto:
    """Random stored transitions with on-policy old log-probs (recomputed by the initial transformer); the copies of
    a prompt (2 each) share one conditioning entry, as a rollout batch holds them."""
    transformer = load_transformer(model_path)
    cfg = transformer.config
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    chain = [start]
    for _ in range(steps):
        chain.append(chain[-1] + 0.1 * torch.randn(start.shape, generator=gen))
    latents = torch.stack(chain, dim=1)  # (n, steps + 1, ...): step t moves latents[:, t] to latents[:, t + 1]
    sigmas = torch.tensor([0.9, 0.6, 0.3]).repeat(n, 1)
    table = [
        {
            "prompt_embeds": torch.randn(8, cfg.joint_attention_dim, generator=gen),
            "pooled_prompt_embeds": torch.randn(cfg.pooled_projection_dim, generator=gen),
        }
        for _ in range(n // 2)
    ]
    index = torch.arange(n) // 2
    with torch.no_grad():
        old = torch.stack(
            [
                compute_log_prob(
                    transformer,
                    latents[:, t],
                    latents[:, t + 1],
                    sigmas[:, t],
                    sigmas[:, t + 1],
                    expand(table, index),
                )[0]
                for t in range(steps)
            ],
            dim=1,
        )
    advantages = torch.linspace(-1.0, 1.0, n)
    return DataProto.from_dict(
        tensors={
            "latents": latents,
            "sigmas": sigmas,
            "log_probs": old,
            "advantages": advantages,
            CONDITIONING_INDEX: index,
            NEGATIVE_CONDITIONING_INDEX: torch.full((n,), -1),
        },
        meta_info={CONDITIONING: table},
    )


def _group(cfg, ranks: int, name: str) -> tuple[RayWorkerGroup, RayResourcePool]:
    pool = RayResourcePool(process_on_nodes=[ranks], use_gpu=False, max_colocate_count=1, name_prefix=name)
    group = actor_worker_group(cfg, training_sections(cfg), pool, name)
    return group, pool


def _kill(*groups: tuple[RayWorkerGroup, RayResourcePool]) -> None:
    """Kill the workers and free their placement groups (the module's Ray has 4 CPUs for all tests)."""
    for group, pool in groups:
        for worker in group.workers:
            ray.kill(worker)
        for pg in pool.pgs or []:
            ray.util.remove_placement_group(pg)


def _rollout_weights(group: RayWorkerGroup, ema: bool = False) -> list[dict | None]:
    """Each rank's rollout weights, fetched from the object refs rank 0 put (the other ranks put none)."""
    return [
        None if refs is None else {key: ray.get(ref) for key, ref in refs.items()}
        for refs in group.put_rollout_weights(ema=ema)
    ]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp_two_ranks_shard_and_match_one_rank(ray_local, tiny_model_path):
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={tiny_model_path}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # one optimizer step over the whole batch
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",
    )
    (two, two_pool), (one, one_pool) = _group(cfg, 2, "fsdp2_test"), _group(cfg, 1, "single_test")
    try:
        layout = two.init_model()
        (single_layout,) = one.init_model()
        assert [r["strategy"] for r in layout] == ["fsdp2", "fsdp2"]
        assert single_layout["strategy"] == "single"
        total = single_layout["trainable_params"]
        assert all(r["trainable_params"] == total for r in layout)
        # each rank holds about half of the weights (FSDP pads dim 0 of a shard to an even split)
        assert all(r["local_trainable_params"] < 0.6 * total for r in layout)
        assert sum(r["local_trainable_params"] for r in layout) >= total

        batch = _batch(tiny_model_path)
        metrics = two.update_policy(batch)
        (reference,) = one.update_policy(batch)
        for rank_metrics in metrics:
            # on-policy on each shard; to rounding only: the old log-probs were computed here, in 8-row calls
            assert rank_metrics["actor/ratio_max_abs_dev"] < 1e-4
            # the norm of the averaged, sharded gradient equals the single process's gradient norm
            assert rank_metrics["actor/grad_norm"] == pytest.approx(reference["actor/grad_norm"], rel=1e-4)
            assert rank_metrics["actor/param_norm"] == pytest.approx(reference["actor/param_norm"], rel=1e-6)

        weights = _rollout_weights(two)
        assert weights[1] is None  # only rank 0 puts weights for the replicas
        (single_weights,) = _rollout_weights(one)
        assert _max_diff(weights[0]["state_dict"], single_weights["state_dict"]) < 1e-4  # lr 1e-3, one Adam step

        # A checkpoint holds full tensors: the 2-rank state loads into 1 rank and gives its exact weights.
        state = two.state_dict()
        assert state[1] is None
        one.load_state_dict(state[0])
        (restored,) = _rollout_weights(one)
        assert _max_diff(weights[0]["state_dict"], restored["state_dict"]) == 0.0
    finally:
        _kill((two, two_pool), (one, one_pool))


def test_fsdp_lora_with_kl_is_on_policy_and_ships_the_adapter(ray_local, tiny_model_path):
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={tiny_model_path}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=1.0",
        "actor_rollout_ref.model.lora_rank=4",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    )
    group, pool = _group(cfg, 2, "fsdp2_lora_test")
    try:
        layout = group.init_model()
        assert all(r["strategy"] == "fsdp2" for r in layout)
        metrics = group.update_policy(_batch(tiny_model_path))
        for rank_metrics in metrics:
            assert rank_metrics["actor/ratio_max_abs_dev"] < 1e-4  # to rounding, as above
            assert rank_metrics["actor/kl"] >= 0.0
        assert metrics[0]["actor/param_norm"] == metrics[1]["actor/param_norm"]
        weights = _rollout_weights(group)
        adapter = weights[0]["lora_state_dict"]
        assert adapter and all("lora_" in key for key in adapter)
        assert weights[0]["lora_config"]["r"] == 4
    finally:
        _kill((group, pool))


def test_uneven_split_over_ranks_is_refused(ray_local, tiny_model_path):
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={tiny_model_path}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=3",
    )
    group, pool = _group(cfg, 2, "fsdp2_uneven_test")
    try:
        group.init_model()
        with pytest.raises(Exception, match="ppo_mini_batch_size=3 must be a multiple of the 2 training ranks"):
            group.update_policy(_batch(tiny_model_path))
    finally:
        _kill((group, pool))


def test_one_rank_honours_bf16_and_keeps_ema_weights(ray_local, tiny_model_path):
    overrides = (
        f"actor_rollout_ref.model.path={tiny_model_path}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # one optimizer step
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.ema.enable=true",
        "actor_rollout_ref.actor.ema.update_every=1",
    )
    bf16 = compose_recipe(*overrides, "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bfloat16")
    (group, pool), (fp32, fp32_pool) = _group(bf16, 1, "bf16_ema_test"), _group(compose_recipe(*overrides), 1, "fp32")
    try:
        (layout,) = group.init_model()
        assert layout["strategy"] == "fsdp2" and layout["param_dtype"] == "bfloat16"  # FSDP2 applies it on one rank
        fp32.init_model()
        batch = _batch(tiny_model_path)
        (before,) = _rollout_weights(group)
        (low,) = group.update_policy(batch)
        (full,) = fp32.update_policy(batch)
        # the old log-probs were computed in float32: bf16 compute moves the ratio far more than fp32 rounding does
        assert low["actor/approx_kl"] > 100 * max(full["actor/approx_kl"], 1e-14)

        (live,) = _rollout_weights(group)
        (ema,) = _rollout_weights(group, ema=True)
        # one update at optimizer step 1: decay min(0.9, 2 / 11), so ema = p0 + (1 - 2/11) (p1 - p0)
        for key, p1 in live["state_dict"].items():
            p0 = before["state_dict"][key]
            torch.testing.assert_close(ema["state_dict"][key], p0 + (1 - 2 / 11) * (p1 - p0), rtol=1e-5, atol=1e-6)
        assert _max_diff(live["state_dict"], ema["state_dict"]) > 0
        (after,) = _rollout_weights(group)
        assert _max_diff(live["state_dict"], after["state_dict"]) == 0.0  # the trained weights came back

        # both weights are in the checkpoint state and restore exactly
        (state,) = group.state_dict()
        fp32.load_state_dict(state)
        (restored_ema,) = _rollout_weights(fp32, ema=True)
        assert _max_diff(ema["state_dict"], restored_ema["state_dict"]) == 0.0
    finally:
        _kill((group, pool), (fp32, fp32_pool))
