"""Bytes a FlowGRPO step moves between processes, before and after the one-sample contract, side by side.

Per step, three hops go through Ray's object store: replica -> agent-loop worker (each group's samples), worker ->
driver (the rollout batch), driver -> training ranks (the update batch). The *after* side runs the project's own
code on every hop (``SampleGroup``, :func:`~verl_omni.protocol.stack_samples`, the trainer's step cut,
:func:`~verl_omni.protocol.shard`); the *before* side is the layout those hops had until the redesign (every copy
carrying its conditioning and CFG negative, ``latents`` and ``next_latents`` both stored, the whole update batch
sent to every rank), rebuilt here from the same tensors. Bytes are tensor payload bytes (what Ray serialises);
tensors are allocated on torch's ``meta`` device, so SD3.5 shapes at the paper's scale cost no memory.

Run: ``python -m benchmarks.data_plane_bench`` (a few seconds; it reads the tiny model's shapes from a real rollout).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from verl.protocol import DataProto

from verl_omni.protocol import CONDITIONING, TRAIN_KEYS, Sample, SampleGroup, compact, shard, stack_samples
from verl_omni.utils.payload_bytes import held_bytes


@dataclass(frozen=True)
class Shapes:
    """One model's per-sample shapes and one run's sizes."""

    name: str
    prompts: int
    copies: int
    steps: int  # recorded SDE steps
    trained: int  # steps the update trains on
    latent: tuple[int, ...]
    image: tuple[int, ...]
    conditioning: dict[str, tuple[int, ...]]
    cfg: bool


# SD3.5-medium at the paper's settings: 512 px (latents 16 x 64 x 64), 10 steps, 9 trained, CFG 4.5, a joint text
# sequence of 77 CLIP + 256 T5 tokens x 4096 and a 2048-wide pooled embedding; 48 prompts x 24 copies per step.
SD35 = Shapes(
    name="SD3.5 (48 prompts x 24)",
    prompts=48,
    copies=24,
    steps=10,
    trained=9,
    latent=(16, 64, 64),
    image=(3, 512, 512),
    conditioning={"prompt_embeds": (333, 4096), "pooled_prompt_embeds": (2048,)},
    cfg=True,
)


def tiny_shapes() -> Shapes:
    """The demo's shapes, read from one real rollout of the tiny model (8 prompts x 8 copies, 8 steps, 64 px)."""
    import tempfile

    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3
    from verl_omni.request import Request
    from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
    from verl_omni.workers.rollout.diffusers_engine import DiffusersEngine
    from verl_omni.workers.rollout.sampling_params import resolve_sampling_params

    demo = {"num_inference_steps": 8, "guidance_scale": 1.0, "height": 64, "width": 64}
    config = DiffusionRolloutConfig.from_config(demo)
    engine = DiffusersEngine(str(ensure_tiny_sd3(tempfile.mkdtemp(prefix="data_plane_bench_"))), config)
    group = engine.run_batch([Request("r", "a red cube", resolve_sampling_params({"seed": 0}, config, engine.spec))])
    sample = group.samples[0]
    entry = group.conditioning[sample.conditioning]
    return Shapes(
        name="tiny demo (8 prompts x 8)",
        prompts=8,
        copies=8,
        steps=sample.num_steps,
        trained=int(sample.num_steps * 0.99),
        latent=tuple(sample.latents.shape[1:]),
        image=tuple(sample.image.shape),
        conditioning={k: tuple(v.shape) for k, v in entry.items()},
        cfg=False,
    )


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _proto_bytes(data: DataProto) -> int:
    return held_bytes(dict(data.batch.items())) + held_bytes(data.non_tensor_batch) + held_bytes(data.meta_info)


def _group_bytes(group: SampleGroup) -> int:
    return held_bytes([dict(s) for s in group.samples]) + held_bytes(group.conditioning)


def after(shapes: Shapes, ranks: int) -> dict[str, float]:
    """The three hops of one step with the project's code."""
    entry = {k: _meta(*v) for k, v in shapes.conditioning.items()}
    negative = {k: _meta(*v) for k, v in shapes.conditioning.items()} if shapes.cfg else None
    groups = []
    for p in range(shapes.prompts):
        table = {f"prompt {p}": entry, **({"": negative} if negative else {})}
        samples = [
            Sample(
                request_id=f"p{p}c{c}",
                image=_meta(*shapes.image, dtype=torch.uint8),
                latents=_meta(shapes.steps + 1, *shapes.latent),
                sigmas=_meta(shapes.steps + 1),
                log_probs=_meta(shapes.steps),
                conditioning=f"prompt {p}",
                negative_conditioning="" if negative else None,
            )
            for c in range(shapes.copies)
        ]
        groups.append(SampleGroup(samples=samples, conditioning=table))
    replica_to_worker = sum(_group_bytes(g) for g in groups)

    samples = [s for g in groups for s in g.samples]
    # distinct entries: one per prompt (each group encoded its own) and the negative once per group here; the table
    # dedupes equal keys by identity, as the worker does for a group's shared entries
    tensors, table = stack_samples(samples, [g.conditioning for g in groups for _ in g.samples])
    rollout = DataProto.from_dict(tensors=tensors, meta_info={CONDITIONING: table})
    worker_to_driver = _proto_bytes(rollout)

    rollout.batch["advantages"] = _meta(len(samples))
    train = rollout.select(batch_keys=list(TRAIN_KEYS), meta_info_keys=[CONDITIONING])
    train.batch["log_probs"] = train.batch["log_probs"][:, : shapes.trained]
    for key in ("latents", "sigmas"):
        train.batch[key] = train.batch[key][:, : shapes.trained + 1]
    train = compact(train)
    shards = shard(train, ranks)
    per_rank = [_proto_bytes(s) for s in shards]
    return {
        "replica_to_worker": replica_to_worker,
        "worker_to_driver": worker_to_driver,
        "driver_to_ranks": sum(per_rank),
        "per_rank": max(per_rank),
        "batch": _proto_bytes(train),
    }


def before(shapes: Shapes, ranks: int) -> dict[str, float]:
    """The same step in the layout before the redesign: conditioning per copy, latents and next_latents, the whole
    update batch to every rank."""
    n = shapes.prompts * shapes.copies
    cond = sum(torch.Size(s).numel() for s in shapes.conditioning.values()) * 4 * (2 if shapes.cfg else 1)
    latent = torch.Size(shapes.latent).numel() * 4
    image = torch.Size(shapes.image).numel()
    # per sample: image, latents + next_latents (T each), sigmas, sigmas_next, timesteps, log_probs (T each), cond
    sample = image + 2 * shapes.steps * latent + 4 * shapes.steps * 4 + cond
    # per update row: latents + next_latents, sigmas + sigmas_next, old_log_probs (trained steps), advantage, cond
    row = 2 * shapes.trained * latent + 3 * shapes.trained * 4 + 4 + cond
    return {
        "replica_to_worker": n * sample,
        "worker_to_driver": n * (sample + 8),  # + model_version
        "driver_to_ranks": ranks * n * row,
        "per_rank": n * row,
        "batch": n * row,
    }


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f} MB"


def report(shapes: Shapes, ranks_list: list[int]) -> list[str]:
    lines = [f"\n{shapes.name}: object-store bytes per step and bytes received per training rank"]
    lines.append(f"{'ranks':>5}  {'store before':>14}  {'store after':>13}  {'ratio':>6}  {'rank/batch after':>16}")
    for ranks in ranks_list:
        old, new = before(shapes, ranks), after(shapes, ranks)
        hops = ("replica_to_worker", "worker_to_driver", "driver_to_ranks")
        store_old, store_new = sum(old[h] for h in hops), sum(new[h] for h in hops)
        lines.append(
            f"{ranks:>5}  {_mb(store_old):>14}  {_mb(store_new):>13}  {store_new / store_old:>6.3f}  "
            f"{new['per_rank'] / new['batch']:>16.3f}"
        )
        if ranks == max(ranks_list):
            for h in hops:
                lines.append(f"       {h}: {_mb(old[h])} -> {_mb(new[h])} ({new[h] / old[h]:.3f}x)")
            lines.append(f"       per rank: {_mb(old['per_rank'])} -> {_mb(new['per_rank'])}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--skip-tiny", action="store_true", help="only the SD3.5-shaped case (no model load)")
    args = parser.parse_args(argv)
    cases: list[Any] = [] if args.skip_tiny else [tiny_shapes()]
    cases.append(SD35)
    for shapes in cases:
        print("\n".join(report(shapes, args.ranks)))


if __name__ == "__main__":
    main()
