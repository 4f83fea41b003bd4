"""The ``reward`` config section: one reward by name, or several combined with weights.

    reward:
      name: geneval_color          # one reward (weight 1) ...
      kwargs: {}                   # ... and its options
      weights: null                # or several: {geneval_color: 1.0, jpeg_compressibility: 0.05}
                                   # (then ``name`` is null and ``kwargs`` maps a reward name to its options;
                                   # ``<reward>-<label>`` uses one reward twice: {remote-geneval: 1, remote-vlm: 1})
      overlap: true                # score each group as soon as it is sampled, while others still sample

Advantages use the weighted sum; every term is logged on its own. A reward that raises or returns NaN/inf
stops the run with a :class:`RewardError` naming the reward and the prompt: a failed score is never 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from verl_omni.rewards.registry import check_reward_options, get_reward_fn, is_known_reward, registered_rewards

REWARD_KEY = "reward"


class RewardError(RuntimeError):
    """A reward function failed or returned a non-finite score for a sample."""


@dataclass(frozen=True)
class RewardSpec:
    """One term of the reward: a registered name, its weight in the sum and its options."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _plain(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(section, Mapping):
        raise ValueError(f"{REWARD_KEY}={section!r} must be a mapping with name/kwargs or weights")
    return dict(section)


def reward_specs(section: Any) -> list[RewardSpec]:
    """Parse and check the ``reward`` section (names, weights, options) without building any reward model.

    Raises ``ValueError`` naming the key, the bad value and the valid choices.
    """
    cfg = _plain(section)
    unknown = sorted(set(cfg) - {"name", "kwargs", "weights", "overlap"})
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in {REWARD_KEY}; valid keys: ['kwargs', 'name', 'overlap', 'weights']"
        )
    if not isinstance(cfg.get("overlap", True), bool):
        raise ValueError(f"{REWARD_KEY}.overlap={cfg['overlap']!r} is not valid; valid choices: true, false")
    name, weights, kwargs = cfg.get("name"), cfg.get("weights"), cfg.get("kwargs") or {}
    valid = registered_rewards()
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{REWARD_KEY}.kwargs={kwargs!r} must be a mapping")
    if weights is None:
        if not is_known_reward(name):
            raise ValueError(
                f"{REWARD_KEY}.name={name!r} is not a known reward; valid choices: {list(valid)} or "
                "'package.module:function'"
            )
        specs = [RewardSpec(name, 1.0, dict(kwargs))]
    else:
        if name is not None:
            raise ValueError(
                f"{REWARD_KEY}.name={name!r} and {REWARD_KEY}.weights are both set: use name (one reward) or "
                "weights (several), and set the other to null"
            )
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(
                f"{REWARD_KEY}.weights={weights!r} must map reward names to weights, e.g. {{{valid[0]}: 1.0}}"
            )
        specs = []
        for key, weight in weights.items():
            if not is_known_reward(key):
                raise ValueError(
                    f"{REWARD_KEY}.weights has {key!r}, not a known reward; valid choices: {list(valid)} (a name may "
                    "carry a label, '<reward>-<label>', to use one reward twice)"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"{REWARD_KEY}.weights.{key}={weight!r} must be a finite number")
            options = kwargs.get(key) or {}
            if not isinstance(options, Mapping):
                raise ValueError(f"{REWARD_KEY}.kwargs.{key}={options!r} must be a mapping of that reward's options")
            specs.append(RewardSpec(str(key), float(weight), dict(options)))
        extra = sorted(set(kwargs) - set(weights))
        if extra:
            raise ValueError(
                f"{REWARD_KEY}.kwargs has options for {extra}, which are not in {REWARD_KEY}.weights "
                f"({sorted(weights)})"
            )
    for spec in specs:
        where = f"{REWARD_KEY}.kwargs" + ("" if weights is None else f".{spec.name}")
        check_reward_options(spec.name, spec.kwargs, key=where)
    return specs


class WeightedReward:
    """Scores images with every term and returns the weighted sum plus each term, all checked finite."""

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ValueError("WeightedReward needs at least one reward")
        self.specs = list(specs)
        self.fns = [get_reward_fn(s.name, **s.kwargs) for s in self.specs]

    @classmethod
    def from_config(cls, section: Any) -> WeightedReward:
        return cls(reward_specs(section))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total (B,), {name: score (B,)})``; raises :class:`RewardError` naming the reward and the prompt."""
        import torch  # here: parsing reward options (the recipe's start-up check) needs no torch

        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for spec, fn in zip(self.specs, self.fns, strict=True):
            try:
                score = torch.as_tensor(fn(images, prompts), dtype=torch.float32).reshape(-1).cpu()
            except Exception as err:
                raise RewardError(f"reward {spec.name!r} failed on prompt {prompts[0]!r}: {err}") from err
            if score.numel() != len(prompts):
                raise RewardError(f"reward {spec.name!r} returned {score.numel()} scores for {len(prompts)} images")
            bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise RewardError(
                    f"reward {spec.name!r} returned {score[i].item()} for prompt {prompts[i]!r}; rewards must be finite"
                )
            terms[spec.name] = score
            total += spec.weight * score
        return total, terms
