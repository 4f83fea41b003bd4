"""Training and weight sync per model family (FLUX.1, Qwen-Image, Wan), LoRA and full fine-tuning, in one process.

The recipe's loop, one step of it, with its real parts: the policy worker (``DiffusionActorWorker``, one CPU rank, as
the recipe's trainer builds it from ``model=<family>_tiny``) trains on a group the diffusers rollout server sampled,
then exports its weights as it does for the replicas (``put_rollout_weights``: the peft adapter with its config, or
the full state dict) and the server loads them (``update_weights``). Only the transport is left out: the worker's
``ray.put`` hands the tensors over as they are instead of through Ray's object store.

Asserted per family and mode: the first update is on policy bit for bit in batch-invariant mode (the worker's
recompute equals the server's sampling); the update trains what the mode trains (the adapter only, or every
weight); after the sync the server's sample of a seed is bit for bit what the trained weights sample from that
seed and not what the old weights sampled, and the next update is again exactly on policy (as the recipe's second
step is: ``tests/integration/test_{flux,qwen_image,wan}_recipe.py``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from verl.protocol import DataProto

from recipes.flowgrpo.config_compose import compose_recipe, training_sections
from verl_omni.protocol import CONDITIONING, TRAIN_KEYS, SampleGroup, stack_samples
from verl_omni.utils.batch_invariant import onednn, torch_threads
from verl_omni.workers import diffusion_actor
from verl_omni.workers.diffusion_actor import DiffusionActorWorker
from verl_omni.workers.rollout.diffusers_server import DiffusersRolloutServer

SEEDS = (0, 1, 2, 3)  # one GRPO group of 4 copies of a prompt, one optimizer step (mini-batch 4, micro-batch 2)
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])
RUN = [
    "actor_rollout_ref.rollout.diffusion.num_inference_steps=3",
    "actor_rollout_ref.rollout.diffusion.height=32",
    "actor_rollout_ref.rollout.diffusion.width=32",
    "actor_rollout_ref.rollout.diffusion.chunk_size=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
]


@pytest.fixture
def one_rank(monkeypatch):
    """What a worker group gives its rank (verl's ``Worker`` reads it and writes it back into the environment; the
    monkeypatch restores it) and the identity for ``ray.put``. The torch thread count the server and the worker set
    is restored too."""
    for key, value in {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "REDIS_STORE_SERVER_HOST": "127.0.0.1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(diffusion_actor.ray, "put", lambda value: value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _batch(group: SampleGroup) -> DataProto:
    """The training batch of a group, as the agent loop stacks it, with fixed advantages."""
    tensors, table = stack_samples(group.samples, [group.conditioning] * len(group.samples))
    train = {k: tensors[k] for k in TRAIN_KEYS if k in tensors}
    return DataProto.from_dict(tensors={**train, "advantages": ADVANTAGES}, meta_info={CONDITIONING: table})


def _sample_locally(family: str, transformer: torch.nn.Module, group: SampleGroup, diffusion) -> torch.Tensor:
    """The group's seeds sampled with ``transformer`` through the family's sampler (not the server), from the
    group's conditioning, in the replicas' batch-invariant chunks: the recorded latents (B, T + 1, ...)."""
    sampling = importlib.import_module(f"verl_omni.pipelines.{family}.sampling")
    samples = group.samples

    def bundle(key: str | None) -> dict[str, torch.Tensor] | None:
        keys = [getattr(s, key) for s in samples]
        if keys[0] is None:
            return None
        return {name: torch.stack([group.conditioning[k][name] for k in keys]) for name in group.conditioning[keys[0]]}

    negative = bundle("negative_conditioning")
    args = [transformer, samples[0].sigmas, bundle("conditioning")]
    if family != "flux":  # FLUX.1 is guidance-distilled: no negative
        args.append(negative)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with onednn(enabled=False), torch_threads(diffusion.cpu_threads):
        traj = sampling.sample_flow_match_sde(
            *args,
            gens,
            tuple(samples[0].latents.shape[1:]),
            guidance_scale=diffusion.guidance_scale,
            noise_level=diffusion.noise_level,
            chunk_size=diffusion.chunk_size,
        )
    return traj.latents


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["flux", "qwen_image", "wan"])
async def test_a_trained_update_synced_to_the_server_samples_what_the_trained_weights_sample(
    family, lora_rank, tiny_model, one_rank
):
    path = tiny_model(family)
    cfg = compose_recipe(
        f"model={family}_tiny",
        f"actor_rollout_ref.model.path={path}",
        f"actor_rollout_ref.model.lora_rank={lora_rank}",
        *RUN,
    )
    sections = training_sections(cfg)
    diffusion = sections.diffusion
    assert diffusion.batch_invariant and diffusion.sde_window is None  # every step recorded, in chunks of 2
    worker = DiffusionActorWorker(cfg, sections)
    layout = worker.init_model()
    server = DiffusersRolloutServer(path, diffusion, server_id=family)
    requests = [{"request_id": f"r{s}", "prompt_ids": "a red car", "sampling_params": {"seed": s}} for s in SEEDS]
    try:
        # the recipe syncs before its first rollout: the adapter at its initial (identity) value, or the weights
        assert await server.update_weights(**worker.put_rollout_weights(), version=0) == 0
        before = await server.generate_group(requests)
        base = {k: v.detach().clone() for k, v in worker.model.named_parameters()}
        first = worker.update_policy(_batch(before))
        weights = worker.put_rollout_weights()
        assert await server.update_weights(**weights, version=1) == 1
        after = await server.generate_group(requests)
        expected = _sample_locally(family, worker.model, after, diffusion)  # the trained weights, not the server
        second = worker.update_policy(_batch(after))  # (trains the worker's weights on: their last use)
    finally:
        await server.close()

    # the first inner step is on policy bit for bit: the worker recomputes the server's log-probs exactly
    assert first["actor/ratio_max_abs_dev"] == 0.0 and first["actor/grad_norm"] > 0
    # the mode trains what it says and exports it
    trained = {k for k, v in worker.model.named_parameters() if not torch.equal(v, base[k])}
    if lora_rank:
        assert set(weights) == {"lora_state_dict", "lora_config"} and weights["lora_config"]["r"] == 4
        assert layout["trainable_params"] == sum(v.numel() for v in weights["lora_state_dict"].values())
        assert trained and all("lora_" in k for k in trained)  # the base weights stay frozen
        assert all("lora_" in k for k in weights["lora_state_dict"])
    else:
        params = dict(worker.model.named_parameters())
        assert set(weights) == {"state_dict"} and set(weights["state_dict"]) == set(params)
        assert layout["trainable_params"] == sum(p.numel() for p in params.values())
        assert len(trained) > len(params) // 2  # AdamW moves every weight with a gradient (and decays them)

    # after the sync: the server samples each seed as the trained weights do, not as the old weights did ...
    assert {s.model_version for s in before.samples} == {0} and {s.model_version for s in after.samples} == {1}
    for i, (old, new) in enumerate(zip(before.samples, after.samples, strict=True)):
        assert torch.equal(new.latents, expected[i])
        assert torch.equal(new.latents[0], old.latents[0])  # the seed's initial noise
        assert not torch.equal(new.latents[-1], old.latents[-1])
    # ... so the next update is on policy again, as the recipe's second step
    assert second["actor/ratio_max_abs_dev"] == 0.0
