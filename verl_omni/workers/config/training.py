"""The typed sections the trainer and every training rank read, parsed once on the driver and handed over as is."""

from __future__ import annotations

from dataclasses import dataclass, field

from verl_omni.workers.config.algorithm import AlgorithmConfig
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig


@dataclass(frozen=True)
class TrainingSections:
    """``diffusion``: the rollout's sampling section (the recompute must use the sampler's guidance, noise level,
    SDE type and chunking; the trained steps follow its schedule). ``algorithm``: which algorithm runs, and its
    options (windows, GRPO-Guard)."""

    diffusion: DiffusionRolloutConfig = field(default_factory=DiffusionRolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
