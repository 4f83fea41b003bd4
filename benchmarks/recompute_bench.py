"""What recomputing the old log-probs costs: the FlowGRPO update with ``actor.recompute_old_log_prob`` on vs off.

The SD3.5 config's training settings on the tiny model, on CPU: bf16 sampling and bf16-mixed training, LoRA r=32,
CFG 4.5, 10 steps (9 trained), batch-invariant chunks of 4, micro-batch 4, one optimizer step per update. One real
rollout (an in-process ``DiffusersEngine`` in a Ray task with the replicas' MKL mode) gives the batch; two actor
worker groups (verl ``RayWorkerGroup``, one CPU rank each) differ only in the recompute switch and update on it in
interleaved rounds, so the ratio is measured side by side under the same machine load. Reported: the median update
seconds of each, their ratio, and the share of the recompute pass itself (``timing_s/old_log_prob``).

    python -m benchmarks.recompute_bench [--model DIR] [--rounds 3] [--samples 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

SAMPLING = {"num_inference_steps": 10, "guidance_scale": 4.5, "height": 64, "width": 64}
CHUNK = 4
TRAINED_STEPS = 9  # int(10 x timestep_fraction 0.99): the sigma -> 0 step is sampled, not trained


def _rollout(model: str, samples: int) -> Any:
    """``samples`` bf16 samples of two prompts from one engine (run inside a Ray task with the replica's env)."""
    import torch

    from verl_omni.request import Request
    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
    from verl_omni.workers.rollout.diffusers_engine import DiffusersEngine
    from verl_omni.workers.rollout.sampling_params import resolve_sampling_params

    cfg = DiffusionRolloutConfig.from_config({**SAMPLING, "chunk_size": CHUNK, "dtype": "bfloat16"})
    torch.set_num_threads(cfg.cpu_threads)
    engine = DiffusersEngine(model, cfg, dtype=torch.bfloat16)
    requests = [
        Request(f"r{i}", f"a {'red' if i % 2 else 'blue'} cube", resolve_sampling_params({"seed": i}, cfg, engine.spec))
        for i in range(samples)
    ]
    return engine.run_batch(requests)


def _train_batch(group: Any) -> Any:
    """The update batch the trainer builds from a rollout group (trained steps only, spread advantages)."""
    import torch
    from verl.protocol import DataProto

    from verl_omni.protocol import CONDITIONING, TRAIN_KEYS, stack_samples

    tensors, table = stack_samples(group.samples, [group.conditioning] * len(group.samples))
    tensors["log_probs"] = tensors["log_probs"][:, :TRAINED_STEPS]
    for key in ("latents", "sigmas"):  # step t moves latents[:, t] to latents[:, t + 1]
        tensors[key] = tensors[key][:, : TRAINED_STEPS + 1]
    tensors["advantages"] = torch.linspace(-1.0, 1.0, len(group.samples))
    return DataProto.from_dict(tensors={k: tensors[k] for k in TRAIN_KEYS}, meta_info={CONDITIONING: table})


def _actor_group(model: str, samples: int, recompute: bool, name: str) -> Any:
    from verl.single_controller.ray import RayResourcePool

    from recipes.flowgrpo.config_compose import compose_recipe, training_sections
    from verl_omni.workers.diffusion_actor import actor_worker_group

    cfg = compose_recipe(
        f"actor_rollout_ref.model.path={model}",
        "reward.name=geneval_color",
        "~reward.kwargs",
        "trainer.n_gpus_per_node=0",
        "actor_rollout_ref.rollout.diffusion.device=cpu",
        *(f"actor_rollout_ref.rollout.diffusion.{k}={v}" for k, v in SAMPLING.items()),
        f"actor_rollout_ref.actor.ppo_mini_batch_size={samples}",
        f"actor_rollout_ref.actor.recompute_old_log_prob={str(recompute).lower()}",
        config_name="flowgrpo_sd35_medium_lora",
    )
    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1, name_prefix=name)
    group = actor_worker_group(cfg, training_sections(cfg), pool, name)
    group.init_model()
    return group


def run(model: str, rounds: int, samples: int) -> dict[str, float]:
    import ray

    from verl_omni.utils.batch_invariant import cpu_process_env

    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        env = {"env_vars": cpu_process_env(1, batch_invariant=True)}
        outputs = ray.get(ray.remote(_rollout).options(num_cpus=1, runtime_env=env).remote(model, samples))
        batch = _train_batch(outputs)
        groups = {on: _actor_group(model, samples, on, f"recompute_{int(on)}") for on in (False, True)}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        recompute_s: list[float] = []
        for group in groups.values():  # warm-up: first allocations, thread pools
            group.update_policy(batch)
        for _ in range(rounds):
            for on, group in groups.items():
                start = time.perf_counter()
                (metrics,) = group.update_policy(batch)
                seconds[on].append(time.perf_counter() - start)
                if on:
                    recompute_s.append(metrics["timing_s/old_log_prob"])
    finally:
        ray.shutdown()
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {
        "update_s_off": off,
        "update_s_on": on,
        "ratio": on / off,
        "recompute_share": statistics.median(r / s for r, s in zip(recompute_s, seconds[True], strict=True)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers pipeline directory (default: the recipe's pretrained tiny model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="rollout samples per update (a multiple of 4)")
    args = parser.parse_args(argv)
    from verl_omni.models.tiny_pretrain import ensure_pretrained_tiny_sd3

    model = args.model or str(ensure_pretrained_tiny_sd3(Path.home() / ".cache" / "verl_omni" / "tiny_sd3"))
    result = run(model, args.rounds, args.samples)
    print(
        f"update of {args.samples} samples x {TRAINED_STEPS} trained steps (bf16, LoRA r=32, CFG, chunks of {CHUNK}), "
        f"median of {args.rounds} interleaved rounds:"
    )
    print(f"  recompute off: {result['update_s_off']:.2f} s   recompute on: {result['update_s_on']:.2f} s")
    print(f"  on / off: {result['ratio']:.2f}x; the recompute pass is {result['recompute_share']:.0%} of the update")


if __name__ == "__main__":
    main()
