"""The one sample contract, from the rollout server to the loss.

A replica answers a group of requests with a :class:`SampleGroup`: one :class:`Sample` per request, whose field
names are the batch keys the trainer reads, and the group's model conditioning once per distinct text (the
copies of a GRPO group share one prompt, and usually one negative prompt), each sample naming its entries by key.
The agent-loop worker stacks samples into a ``DataProto`` (:func:`stack_samples`): per-sample tensors in the
batch, the conditioning table in ``meta_info[CONDITIONING]`` with a row index per sample; a training rank gets
its own rows and the entries they use (:func:`shard`), and expands them only when a step needs them.

The request half (``SamplingParams``, ``Request``) is torch-free, in :mod:`verl_omni.request`.

The conditioning is a bundle of tensors the model family declares (SD3: ``prompt_embeds`` and
``pooled_prompt_embeds``); nothing here, in the agent loop, the trainer or the actor names a model's fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

Conditioning = dict[str, torch.Tensor]
"""A model's conditioning of one text, as its pipeline package declares it (host tensors, no batch dim)."""

# meta_info key of a DataProto's conditioning table, and the per-sample batch keys indexing it (-1: none).
CONDITIONING = "conditioning"
CONDITIONING_INDEX = "conditioning_index"
NEGATIVE_CONDITIONING_INDEX = "negative_conditioning_index"
# Per-sample tensors a Sample carries, stacked under the same names in the batch; NOISE only when requested.
SAMPLE_TENSORS = ("image", "latents", "sigmas", "log_probs")
NOISE = "noise"
# What the policy update reads (and NOISE, where the rollout recorded it); the rest of a rollout batch stays on the
# driver.
TRAIN_KEYS = ("latents", "sigmas", "log_probs", "advantages", CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX)


class Sample(BaseModel):
    """One generated image and the SDE trajectory FlowGRPO trains on (CPU tensors).

    ``T`` is the number of recorded (SDE) steps, consecutive in the schedule; 0 for ODE sampling.

    Attributes:
        request_id: the caller's request id.
        image: uint8 ``(3, H, W)``; a video family's sample is a video, uint8 ``(F, 3, H, W)`` (frames first, as
            diffusers' video processor returns them), under the same field and batch key.
        latents: float32 ``(T + 1, C, h, w)``: ``x`` before each recorded step, then after the last one (empty
            when ``T == 0``); step ``t`` moves ``latents[t]`` to ``latents[t + 1]``.
        sigmas: float32 ``(T + 1,)``: the noise levels of those latents (empty when ``T == 0``).
        log_probs: float32 ``(T,)``: ``log p(latents[t + 1] | latents[t])`` under the sampling policy.
        noise: float32 ``(T, C, h, w)``: each recorded step's standard-normal draw (``latents[t + 1]`` is the step's
            mean plus its std times ``noise[t]``), returned when the request sets ``record_noise``; else None.
        conditioning / negative_conditioning: keys of the text's (and the CFG negative's) entries in the group's
            conditioning table; None when nothing was recorded (or without CFG).
        model_version: weight version that produced the sample.
        extra_fields: timings, the batch size the request ran in, prompt-cache hit, server id, seed.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    request_id: str
    image: torch.Tensor
    latents: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor
    noise: torch.Tensor | None = None
    conditioning: str | None = None
    negative_conditioning: str | None = None
    model_version: int = 0
    extra_fields: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[0])


class SampleGroup(BaseModel):
    """What a ``generate_group`` call returns: the samples in request order and their conditioning, once."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    samples: list[Sample]
    conditioning: dict[str, Conditioning] = Field(default_factory=dict)

    @classmethod
    def gather(cls, groups: Iterable[SampleGroup], order: Sequence[tuple[int, int]] | None = None) -> SampleGroup:
        """One group from several (e.g. the replicas a group was split over); ``order`` lists ``(group, sample)``
        positions in the wanted order (default: as given). A key two groups encoded differently is renamed."""
        groups = list(groups)
        table = ConditioningTable()
        renamed = [table.add_all(g.conditioning) for g in groups]
        if order is None:
            order = [(g, s) for g, group in enumerate(groups) for s in range(len(group.samples))]
        samples = []
        for g, s in order:
            sample, names = groups[g].samples[s], renamed[g]
            if names:  # a copy only where a key changed
                sample = sample.model_copy(
                    update={
                        "conditioning": names.get(sample.conditioning, sample.conditioning),
                        "negative_conditioning": names.get(sample.negative_conditioning, sample.negative_conditioning),
                    }
                )
            samples.append(sample)
        # the parts were validated when they were built: not again, tensor by tensor
        return cls.model_construct(samples=samples, conditioning=table.by_key())


class ConditioningTable:
    """Distinct conditioning entries by key, in insertion order; equal keys with equal tensors are stored once."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.entries: list[Conditioning] = []
        self._index: dict[str, int] = {}

    def add(self, key: str, entry: Conditioning) -> tuple[str, int]:
        """Store ``entry`` under ``key`` (or under ``key#n`` when ``key`` holds other tensors); its key and index."""
        name, n = key, 1
        while name in self._index:
            found = self._index[name]
            if _same(self.entries[found], entry):
                return name, found
            n += 1
            name = f"{key}#{n}"
        self._index[name] = len(self.entries)
        self.keys.append(name)
        self.entries.append(entry)
        return name, len(self.entries) - 1

    def add_all(self, entries: Mapping[str, Conditioning]) -> dict[str, str]:
        """Add every entry; the keys that were renamed (old -> new)."""
        renamed = {}
        for key, entry in entries.items():
            name, _ = self.add(key, entry)
            if name != key:
                renamed[key] = name
        return renamed

    def index(self, key: str | None, entries: Mapping[str, Conditioning]) -> int:
        """The row of ``entries[key]`` in this table (added if new); -1 for None."""
        return -1 if key is None else self.add(key, entries[key])[1]

    def by_key(self) -> dict[str, Conditioning]:
        return dict(zip(self.keys, self.entries, strict=True))


def _same(a: Conditioning, b: Conditioning) -> bool:
    if a is b:  # the samples of one group share their group's entries
        return True
    return a.keys() == b.keys() and all(
        a[k] is b[k] or (a[k].shape == b[k].shape and torch.equal(a[k], b[k])) for k in a
    )


def stack_samples(samples: Sequence[Sample], tables: Sequence[Mapping[str, Conditioning]]) -> tuple[dict, list]:
    """The batch tensors of ``samples`` (each with the table its keys refer to) and the merged table."""
    table = ConditioningTable()
    tensors: dict[str, torch.Tensor] = {}
    with_noise = sum(s.noise is not None for s in samples)
    if with_noise not in (0, len(samples)):
        raise ValueError(
            f"{with_noise} of {len(samples)} samples carry their SDE noise: a batch's requests must all set "
            "record_noise or none"
        )
    for key in SAMPLE_TENSORS + ((NOISE,) if with_noise else ()):
        values = [getattr(s, key) for s in samples]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"sample field {key!r} has different shapes across samples: {sorted(shapes)}")
        tensors[key] = torch.stack(values)
    tensors["model_version"] = torch.tensor([s.model_version for s in samples], dtype=torch.int64)
    tensors[CONDITIONING_INDEX] = torch.tensor(
        [table.index(s.conditioning, t) for s, t in zip(samples, tables, strict=True)], dtype=torch.int64
    )
    tensors[NEGATIVE_CONDITIONING_INDEX] = torch.tensor(
        [table.index(s.negative_conditioning, t) for s, t in zip(samples, tables, strict=True)], dtype=torch.int64
    )
    return tensors, table.entries


def merge_tables(parts: Sequence[Any]) -> list[Conditioning]:
    """Concatenate the conditioning tables of ``DataProto`` parts (popped from their ``meta_info``) and shift each
    part's indices to the merged table, in place; returns the merged table."""
    merged: list[Conditioning] = []
    for part in parts:
        entries = part.meta_info.pop(CONDITIONING, [])
        for key in (CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX):
            if key in set(part.batch.keys()):
                index = part.batch[key]
                part.batch[key] = torch.where(index >= 0, index + len(merged), index)
        merged.extend(entries)
    return merged


def compact(data: Any) -> Any:
    """``data`` with only the conditioning entries its rows use (re-indexed), in place; returns it."""
    table = data.meta_info.get(CONDITIONING)
    if table is None:
        return data
    keys = [k for k in (CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX) if k in set(data.batch.keys())]
    used = sorted({int(i) for k in keys for i in data.batch[k].tolist() if i >= 0})
    remap = torch.full((len(table) + 1,), -1, dtype=torch.int64)  # slot len(table) maps -1 to -1
    remap[torch.tensor(used, dtype=torch.int64)] = torch.arange(len(used))
    for key in keys:
        index = data.batch[key]
        data.batch[key] = remap[torch.where(index >= 0, index, len(table))]
    data.meta_info = {**data.meta_info, CONDITIONING: [table[i] for i in used]}
    return data


def shard(data: Any, world_size: int) -> list[Any]:
    """``world_size`` shards of a training batch: rank ``r`` gets the ``r``-th contiguous block of rows and only the
    conditioning entries they use. A rollout batch holds a group's copies side by side, so a block needs few
    entries. Equal row counts per rank are the caller's to ensure (the trainer tops up)."""
    n = len(data)
    if n % world_size:
        raise ValueError(f"a training batch of {n} rows cannot be split evenly over {world_size} ranks")
    size = n // world_size
    return [compact(data.select_idxs(np.arange(r * size, (r + 1) * size))) for r in range(world_size)]


def expand(table: Sequence[Conditioning], index: torch.Tensor) -> Conditioning | None:
    """The batched conditioning of rows ``index`` (entries stacked); None when the rows have none (-1)."""
    rows = index.tolist()
    if not rows or min(rows) < 0:
        if rows and max(rows) >= 0:
            raise ValueError("a batch mixes rows with and without conditioning")
        return None
    names = table[rows[0]].keys()
    return {name: torch.stack([table[i][name] for i in rows]) for name in names}
