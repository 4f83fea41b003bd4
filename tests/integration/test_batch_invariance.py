"""Batch-invariant mode end to end on the tiny model: a sample's bits do not depend on its batch-mates, and the
trainer recomputes the rollout's log-probs bit for bit.

The engine runs in a Ray task with the replica's process environment (``MKL_CBWR`` strict must be set before
MKL loads, so not in this test process) and the actor in a ``RayWorkerGroup`` with the recipe's
``worker_env``. Bit equality is asserted because the fixed chunk shape guarantees it on any x86-64 CPU, idle
or loaded: every network call of a sample runs at exactly ``chunk_size`` samples.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import ray
import torch
from verl.protocol import DataProto
from verl.single_controller.ray import RayResourcePool

from recipes.flowgrpo.config_compose import compose_recipe, training_sections
from verl_omni.utils.batch_invariant import cpu_process_env
from verl_omni.workers.diffusion_actor import actor_worker_group

pytestmark = pytest.mark.integration

# CFG on: the transformer sees [negative; positive] rows of one chunk, and the trainer must build the same layout.
SAMPLING = {"num_inference_steps": 4, "guidance_scale": 4.5, "height": 32, "width": 32}
CHUNK = 4


def _engine_runs(
    model_path: str, config: dict[str, Any], runs: list[list[tuple[str, int]]], record_noise: bool = False
) -> list[list[Any]]:
    """One engine; each run is one fused batch of (prompt, seed) requests. Returns each run's SampleGroup."""
    from verl_omni.request import Request
    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
    from verl_omni.workers.rollout.diffusers_engine import DiffusersEngine
    from verl_omni.workers.rollout.sampling_params import resolve_sampling_params

    cfg = DiffusionRolloutConfig.from_config(config)
    torch.set_num_threads(cfg.cpu_threads)  # as the replica's server does
    engine = DiffusersEngine(model_path, cfg)
    outputs = []
    for run in runs:
        requests = [
            Request(
                f"r{i}", prompt, resolve_sampling_params({"seed": seed, "record_noise": record_noise}, cfg, engine.spec)
            )
            for i, (prompt, seed) in enumerate(run)
        ]
        outputs.append(engine.run_batch(requests))
    return outputs


def _remote_engine_runs(
    model_path: str, runs: list[list[tuple[str, int]]], record_noise: bool = False, **config: Any
) -> list[list[Any]]:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable by workers
    config = {**SAMPLING, "chunk_size": CHUNK, **config}
    env = cpu_process_env(config.get("cpu_threads", 1), config.get("batch_invariant", True))
    task = ray.remote(_engine_runs).options(num_cpus=1, runtime_env={"env_vars": env})
    return ray.get(task.remote(model_path, config, runs, record_noise))


def test_one_sample_alone_in_a_full_batch_and_in_a_ragged_batch_has_the_same_bits(ray_local, tiny_model_path):
    target = ("a red cube", 3)
    mates = [(f"a {c} sphere", 100 + i) for i, c in enumerate(("blue", "green", "white", "black", "pink"))]
    runs = [
        [target],  # alone: one chunk padded from 1 to 4
        [mates[0], target, mates[1], mates[2]],  # a full chunk, other prompts around it
        [mates[3], mates[4], target],  # ragged: 3 of 4
        [*mates, target],  # two chunks: 4 + a ragged 2, the target in the second at another position
    ]
    results = _remote_engine_runs(tiny_model_path, runs)
    found = [
        next((o, group.conditioning) for o, request in zip(group.samples, run, strict=True) if request == target)
        for group, run in zip(results, runs, strict=True)
    ]
    assert [o.extra_fields["batch_size"] for o, _ in found] == [1, 4, 3, 6]
    alone, alone_table = found[0]
    assert alone.log_probs.shape == (4,) and alone.image.dtype == torch.uint8
    for other, table in found[1:]:
        for field in ("image", "latents", "sigmas", "log_probs"):
            assert torch.equal(getattr(other, field), getattr(alone, field)), (other.extra_fields["batch_size"], field)
        for key in (other.conditioning, other.negative_conditioning):  # the prompt's and the CFG negative's
            for name, tensor in table[key].items():
                assert torch.equal(tensor, alone_table[key][name]), (other.extra_fields["batch_size"], key, name)


def _train_batch(groups: list[Any]) -> DataProto:
    """The trainer's update batch from rollout groups, as the agent loop and trainer assemble it."""
    from verl_omni.protocol import CONDITIONING, NOISE, TRAIN_KEYS, stack_samples

    samples = [s for g in groups for s in g.samples]
    tensors, table = stack_samples(samples, [g.conditioning for g in groups for _ in g.samples])
    tensors["advantages"] = torch.linspace(-1.0, 1.0, len(samples))
    keys = [k for k in (*TRAIN_KEYS, NOISE) if k in tensors]
    return DataProto.from_dict(tensors={k: tensors[k] for k in keys}, meta_info={CONDITIONING: table})


@contextmanager
def _actor_group(model_path: str, name: str, *overrides: str) -> Iterator[Any]:
    """One training rank in a ``RayWorkerGroup`` (the recipe's worker, initialised) for the rollout's sampling
    settings and ``overrides``; its worker and placement group are gone after."""
    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={model_path}",
        *(f"actor_rollout_ref.rollout.diffusion.{k}={v}" for k, v in SAMPLING.items()),
        f"actor_rollout_ref.rollout.diffusion.chunk_size={CHUNK}",
        *overrides,
    )
    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1, name_prefix=name)
    group = actor_worker_group(cfg, training_sections(cfg), pool, name)
    try:
        group.init_model()
        yield group
    finally:
        for worker in group.workers:
            ray.kill(worker)
        for pg in pool.pgs or []:
            ray.util.remove_placement_group(pg)


def test_trainer_recomputes_the_rollouts_log_probs_bit_for_bit(ray_local, tiny_model_path):
    """A real rollout (fused 6 + 2, CFG), then the actor with ragged 3-sample micro-batches padded to the chunk
    and the full-model reference pass (KL): before the update the ratio is exactly 1 and the KL exactly 0.

    The replica runs 3 threads and the trainer 1 (measured: 3 threads change the transformer's bits); the
    actor recomputes with the replicas' count."""
    runs = [[(f"prompt {i % 2}", i) for i in range(6)], [("prompt 1", 6), ("prompt 0", 7)]]
    groups = _remote_engine_runs(tiny_model_path, runs, cpu_threads=3)
    overrides = (
        "actor_rollout_ref.rollout.diffusion.cpu_threads=3",
        "trainer.cpu_threads=1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # one optimizer step, after every micro-batch
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",  # 3, 3, 2 rows, each padded to 4
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.04",
    )
    with _actor_group(tiny_model_path, "bit_exact", *overrides) as group:
        (metrics,) = group.update_policy(_train_batch(groups))
    assert metrics["actor/ratio_max_abs_dev"] == 0.0
    assert metrics["actor/log_ratio_abs_mean"] == 0.0
    assert metrics["actor/kl"] == 0.0  # policy and reference (same weights) give the same means, bit for bit


def test_re_centring_fresh_samples_trains_exactly_as_sync_and_leaves_later_mini_batches_unclipped(
    ray_local, tiny_model_path
):
    """``one_step_off``'s re-centring (``actor.recentre_stale``) at the weights that sampled moves nothing: an update of
    one mini-batch on re-centred transitions equals the plain one bit for bit. With two mini-batches the second is
    re-centred on the weights the first moved, so its ratio stays 1 and a clip range that clips the plain update's
    second mini-batch clips none of it (the trade docs/advanced_features/flowgrpo.md states)."""
    runs = [[(f"prompt {i % 2}", i) for i in range(8)]]
    (rollout,) = _remote_engine_runs(tiny_model_path, runs, record_noise=True)
    with_noise = _train_batch([rollout])
    plain = _train_batch([rollout])
    plain.batch.pop("noise")
    results = {}
    for mini_batch in (8, 4):
        overrides = (
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.actor.clip_ratio=1e-6",
        )
        with _actor_group(tiny_model_path, "recentre", *overrides) as group:
            (start,) = group.state_dict()
            (as_drawn,) = group.update_policy(plain)
            group.load_state_dict(start)
            (recentred,) = group.update_policy(with_noise)
            results[mini_batch] = as_drawn, recentred
    as_drawn, recentred = results[8]
    assert recentred["actor/recentre_shift_max"] < 1e-5  # the sampler's own weights: nothing to move but rounding
    trained = {k: v for k, v in as_drawn.items() if k.startswith("actor/")}
    assert trained == {k: v for k, v in recentred.items() if k in trained}
    as_drawn, recentred = results[4]
    assert as_drawn["actor/clip_frac_later"] > 0.0 and recentred["actor/clip_frac_later"] == 0.0
    assert as_drawn["actor/clip_frac_first"] == recentred["actor/clip_frac_first"] == 0.0
