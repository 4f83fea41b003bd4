"""Bytes of weights that pass through the driver per weight sync: before (the driver fetched the actor's state
dict and put it into the object store itself) and now (the actor puts it; the driver passes object refs on).

One real actor worker group (verl ``RayWorkerGroup``, one CPU rank) on the tiny model, full fine-tuning and LoRA.
"Before" is measured by fetching what the refs hold, as the old driver did; "now" is what the driver holds after
``put_rollout_weights``. Both counted by ``verl_omni.utils.payload_bytes.held_bytes`` (the hook the trainer logs as
``weight_sync/driver_bytes``), and the object-store bytes per sync, the same either way (one copy).

    python -m benchmarks.weight_sync_bench [--model DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def driver_bytes_per_sync(actor_wg: Any) -> dict[str, int]:
    """``before``: bytes the old driver materialised per sync (the full payload); ``now``: bytes it holds now."""
    import ray

    from verl_omni.utils.payload_bytes import held_bytes

    (refs,) = actor_wg.put_rollout_weights()[:1]
    now = held_bytes(refs)
    before = held_bytes({key: ray.get(ref) for key, ref in refs.items()})
    return {"before": before, "now": now, "object_store": before}


def _actor_group(model: str, lora_rank: int, name: str) -> Any:
    from verl.single_controller.ray import RayResourcePool

    from recipes.flowgrpo.config_compose import compose_recipe, training_sections
    from verl_omni.workers.diffusion_actor import actor_worker_group

    cfg = compose_recipe(f"actor_rollout_ref.model.path={model}", f"actor_rollout_ref.model.lora_rank={lora_rank}")
    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1, name_prefix=name)
    group = actor_worker_group(cfg, training_sections(cfg), pool, name)
    group.init_model()
    return group


def run(model: str) -> dict[str, dict[str, int]]:
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        return {
            name: driver_bytes_per_sync(_actor_group(model, rank, f"weight_sync_{name}"))
            for name, rank in (("full", 0), ("lora_r8", 8))
        }
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="diffusers pipeline directory (default: the recipe's pretrained tiny model)")
    args = parser.parse_args(argv)
    from verl_omni.models.tiny_pretrain import ensure_pretrained_tiny_sd3

    model = args.model or str(ensure_pretrained_tiny_sd3(Path.home() / ".cache" / "verl_omni" / "tiny_sd3"))
    print("weight-sync bytes through the driver per sync (tiny model, one CPU rank):")
    for name, counts in run(model).items():
        print(
            f"  {name:8s} before {counts['before']:>10,d} B   now {counts['now']:>3d} B   "
            f"object store {counts['object_store']:>10,d} B (one copy, both ways)"
        )


if __name__ == "__main__":
    main()
