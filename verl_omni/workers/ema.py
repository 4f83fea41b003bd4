"""Exponential moving average of the trained weights, as FlowGRPO's reference keeps for evaluation and checkpoints.

Once ``k`` optimizer steps are done, the average moves when ``(k + 1) % update_every == 0`` (the reference's
rule: after the 7th, 15th, ... step with ``update_every=8``): ``ema += (1 - d_k) * (param - ema)`` with the
warm-up decay ``d_k = min(decay, (1 + k) / (10 + k))``, so early updates follow the weights closely and later
ones average over about ``update_every / (1 - decay)`` steps (80 with the reference's 0.9 and 8).
Works on plain tensors and on FSDP2 ``DTensor`` shards alike (elementwise ops only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from verl_omni.workers.config.ema import EMAConfig


class EMAWeights:
    """EMA copies of ``params`` (same placement: a DTensor shard stays a shard)."""

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], decay: float, update_every: int):
        EMAConfig(enable=True, decay=decay, update_every=update_every)  # refuses a decay or period out of range
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.steps = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Count one optimizer step; with ``k`` steps done, move the average when ``(k + 1) % update_every == 0``."""
        self.steps += 1
        if (self.steps + 1) % self.update_every:
            return
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach(), weight)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model's parameters hold the EMA values; the trained ones come back after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow, strict=True):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.copy_(value)

    def state_dict(self) -> dict[str, object]:
        """Full (unsharded) CPU tensors keyed by parameter name, so a checkpoint loads on any number of ranks.

        Under FSDP every rank must call it (gathering a shard is a collective).
        """
        from torch.distributed.tensor import DTensor  # here: torch.distributed costs ~1 s at import

        full = {
            name: (s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu().clone()
            for name, s in zip(self.names, self.shadow, strict=True)
        }
        return {"weights": full, "steps": self.steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        weights = state["weights"]
        missing = sorted(set(self.names) - set(weights))
        if missing:
            raise ValueError(f"EMA state lacks parameters of this model: {missing[:5]}")
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for i, (name, param) in enumerate(zip(self.names, self.params, strict=True)):
                value = weights[name]
                if isinstance(param, DTensor):  # this rank keeps its shard of the full tensor
                    self.shadow[i] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
                else:
                    self.shadow[i] = value.to(device=param.device, dtype=param.dtype).clone()
        self.steps = int(state["steps"])


class OldPolicyWeights(EMAWeights):
    """DiffusionNFT's old policy: a copy of the trained weights that samples the rollouts and gives ``v_old``, moved
    towards the trained ones once per training step, ``old <- d old + (1 - d) theta`` with the caller's decay ``d``
    (:func:`~verl_omni.trainer.flowgrpo.nft.old_policy_decay`); ``d = 0`` makes it the trained weights exactly.
    ``steps`` counts the soft updates. Swapping in and (unsharded) checkpoints as :class:`EMAWeights`."""

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]]):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the old policy's decay must be in [0, 1), got {decay!r}")
        for shadow, param in zip(self.shadow, self.params, strict=True):
            if decay == 0.0:
                shadow.copy_(param.detach())  # exactly the trained weights (lerp's rounding aside)
            else:
                shadow.lerp_(param.detach(), 1.0 - decay)
        self.steps += 1

    def after_optimizer_step(self) -> None:  # pragma: no cover - the old policy moves per training step only
        raise TypeError("OldPolicyWeights moves with soft_update(decay), once per training step")
